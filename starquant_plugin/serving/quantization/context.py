"""Token states of the canvas being scored, for the STaR-Quant linear method.

vLLM calls a linear method as `apply(layer, x, bias)`: nothing says which tokens are masked.
The model (`serving/models/base.py`) derives the states from the input ids once per forward and publishes them
here for the duration of that forward (flattened to match the linears' [tokens, in] inputs).
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ...quantization.runtime import sequence_mask_ratio
from ...quantization.tac import mask_ratio_bucket

__all__ = ["TokenContext", "current_token_context", "token_context"]


@dataclass
class TokenContext:
    """states [tokens] (long, 1 = masked); mask_ratio [tokens]: its sequence's masked fraction."""

    states: torch.Tensor
    mask_ratio: torch.Tensor

    def buckets(self, edges: torch.Tensor) -> torch.Tensor:
        return mask_ratio_bucket(self.mask_ratio, edges)


_CURRENT: list[TokenContext] = []


@contextmanager
def token_context(token_states: torch.Tensor, real: torch.Tensor | None = None, span: tuple[int, int] | None = None):
    """Publish the states of canvases [batch, seq] (`real` marks non-padding tokens); with `span`
    only positions lo..hi-1 are computed (cached decoding): theirs are published, with the mask
    ratio of the whole canvas."""
    ratio = sequence_mask_ratio(token_states, real)
    if span is not None:
        token_states = token_states[:, span[0]:span[1]]
    # One ratio per token, contiguous (a stride-0 view would make torch.bucketize copy it and warn).
    ratios = ratio.repeat_interleave(token_states.shape[1])
    _CURRENT.append(TokenContext(token_states.reshape(-1).long(), ratios))
    try:
        yield
    finally:
        _CURRENT.pop()


def current_token_context() -> TokenContext:
    if not _CURRENT:
        raise RuntimeError("STaR-Quant layers need token states: run the model through its DiffusionForLM forward")
    return _CURRENT[-1]
