"""Approximate key/value caching for block-wise diffusion decoding (Fast-dLLM's prefix and dual cache).

A masked-diffusion model re-scores the whole canvas at every step, although only the current
block's positions can be committed and the rest of the canvas changes little within a block:
the prompt and the finished blocks not at all, the masked blocks to the right only through
attention. With a cache, the step that opens a block runs the whole canvas and keeps every
layer's keys and values (after rotary embedding); the block's other steps run only

- `prefix`: the positions from the block's start to the end of the canvas, attending to the
  kept keys/values of the positions left of it;
- `dual`: the block's positions, attending to the kept keys/values left *and* right of it.

The kept keys/values are those of the canvas at the block's first step. The tokens left of the
block do not change within it, but their keys/values would (they attend to the block's newly
committed tokens); those right of it are the masked positions' as they were: that is the
approximation.
`refresh_steps=N` also refreshes the cache every N steps inside a block (N=1: every step,
which reproduces decoding without cache: the check of the mechanism). STaR-Quant's SGAT and
TAC see the token states and mask ratio of the whole canvas, as without cache.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

__all__ = ["CACHE_MODES", "CanvasKVCache", "current_kv_cache", "kv_cache_pass"]

CACHE_MODES = ("none", "prefix", "dual")


@dataclass
class CanvasKVCache:
    """Every layer's keys and values [batch, kv_heads, seq, head_dim] of one canvas (this rank's heads).

    During a forward (`kv_cache_pass`) the attention layers call `keys_values` in order: when
    recording, they store theirs; otherwise they compute positions `span` only and get the full
    canvas's keys/values with theirs spliced in."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    recording: bool = False
    span: tuple[int, int] | None = None
    _next: int = 0

    def keys_values(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index, self._next = self._next, self._next + 1
        if self.recording:
            if index < len(self.layers):
                self.layers[index] = (key, value)
            else:
                self.layers.append((key, value))
            return key, value
        kept_key, kept_value = self.layers[index]
        lo, hi = self.span
        if key.shape[2] != hi - lo or kept_key.shape[:2] != key.shape[:2]:
            raise RuntimeError(f"cached decoding: layer {index} computed {key.shape[2]} positions for span {self.span} "
                               f"of a cache of shape {tuple(kept_key.shape)}")
        return (torch.cat([kept_key[:, :, :lo], key, kept_key[:, :, hi:]], dim=2),
                torch.cat([kept_value[:, :, :lo], value, kept_value[:, :, hi:]], dim=2))


_CURRENT: list[CanvasKVCache] = []


@contextmanager
def kv_cache_pass(cache: CanvasKVCache, span: tuple[int, int] | None):
    """One forward through `cache`: record every layer's keys/values (`span` None: the whole
    canvas is computed), or compute positions `span` = (lo, hi) against the recorded ones."""
    cache.recording, cache.span, cache._next = span is None, span, 0
    _CURRENT.append(cache)
    try:
        yield
    finally:
        _CURRENT.pop()


def current_kv_cache() -> CanvasKVCache | None:
    return _CURRENT[-1] if _CURRENT else None
