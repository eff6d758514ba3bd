"""The `starquant` vLLM quantization method (compressed-tensors + SGAT/TAC) and its custom ops.

Imports vLLM: import `.config` only in the serve environment (the plugin does it).
"""
