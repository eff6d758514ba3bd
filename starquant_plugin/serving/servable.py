"""What the vLLM backend can serve, checked in the calling process before an engine starts.

vLLM reports a layer it cannot build from inside a worker ("Engine core initialization failed",
the cause only in the worker's log); these checks name the layer, the sizes and the way out
first. They read a validated checkpoint (`checkpoint.validate_checkpoint`) and import no vLLM.
"""

from ..checkpoint import ValidatedCheckpoint
from ..checkpoint.schemes import describe_scheme, unservable_reason
from ..errors import InputError
from ..quantization.hadamard import rotation_block_for

__all__ = ["check_servable", "tensor_parallel_problem"]


def check_servable(checkpoint: ValidatedCheckpoint, tensor_parallel_size: int, on_cpu: bool) -> None:
    """InputError naming the layer when the plugin cannot serve a layer's quantization scheme, the
    checkpoint's online rotations (on CPU), or the checkpoint at `tensor_parallel_size` ranks."""
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise InputError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
    sgat_linears = {name.rsplit(".", 1)[0] for name in checkpoint.starquant_shapes if name.endswith(".sgat_shift")}
    for name, scheme in checkpoint.schemes.items():
        reason = unservable_reason(scheme, sgat_site=name in sgat_linears)
        if reason is not None:
            raise InputError(f"{checkpoint.config_path}: quantization_config quantizes {name} as "
                             f"{describe_scheme(scheme)}, which the vLLM backend cannot serve: {reason}")
    if on_cpu and checkpoint.transform_tensors:
        raise InputError(f"{checkpoint.config_path}: quantization_config.transform_config has online rotations; vLLM "
                         "runs them with a CUDA-only kernel and cannot serve them on CPU (use --backend core)")
    problem = tensor_parallel_problem(checkpoint, tensor_parallel_size)
    if problem is not None:
        working = [size for size in range(1, checkpoint.model_config.n_heads + 1)
                   if tensor_parallel_problem(checkpoint, size) is None]
        raise InputError(f"{checkpoint.config_path}: tensor_parallel_size={tensor_parallel_size}: {problem}; "
                         f"sizes that work: {', '.join(map(str, working))}")


def tensor_parallel_problem(checkpoint: ValidatedCheckpoint, size: int) -> str | None:
    """Why the served LLaDA (`serving/models/llada.py`) cannot be split over `size` ranks (None: it can).

    Heads are split across ranks; `attn_out` and the blocks' `ff_out` are row-parallel, so each
    rank quantizes and rotates a slice of their input: SGAT's rotation block, TAC's block and
    the weight quantization group must tile that slice.
    """
    config = checkpoint.model_config
    if config.n_heads % size:
        return f"n_heads={config.n_heads} is not divisible by {size}"
    if config.n_kv_heads % size and size % config.n_kv_heads:
        return f"n_kv_heads={config.n_kv_heads} and {size} do not divide one another"
    if config.mlp_hidden_size % size:
        return f"mlp_hidden_size={config.mlp_hidden_size} is not divisible by {size}"
    block = checkpoint.starquant
    row_parallel = {"attn_out": config.n_heads * config.head_dim, "ff_out": config.mlp_hidden_size}
    for linear, width in row_parallel.items():
        layer = f"model.transformer.blocks.0.{linear} (and every block's)"
        part = width // size
        if block is not None and block.sgat is not None:
            rotation = rotation_block_for(width, block.sgat.rotation_block_size)
            if rotation and part % rotation:
                return (f"{layer} input slice {part} ({width} / {size}) is not a multiple of its SGAT rotation "
                        f"block {rotation}")
        if block is not None and block.tac is not None and linear == "attn_out" and part % block.tac.block_size:
            return (f"{layer} input slice {part} ({width} / {size}) is not a multiple of the TAC block "
                    f"{block.tac.block_size}")
        weights = (checkpoint.schemes.get(f"model.transformer.blocks.0.{linear}") or {}).get("weights") or {}
        group = weights.get("group_size") if weights.get("strategy") == "group" else None
        if group and part % group:
            return (f"{layer} input slice {part} ({width} / {size}) is not a multiple of its weight quantization "
                    f"group {group}")
    return None
