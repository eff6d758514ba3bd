"""TAC — Temporal Attention Compensation (DESIGN.md §2), in pure torch.

A block-diagonal affine map on the attention output (the o-projection input),
`o^ = blockdiag(A_1..A_n) o + c`, with blocks of size `b` (head_dim by default), fitted
in closed form by ridge regression toward the identity so that the quantized model's
attention outputs match the full-precision ones; optionally one map per mask-ratio bucket.
"""

from dataclasses import dataclass

import torch

__all__ = ["TACMap", "fit_tac", "apply_tac", "mask_ratio_bucket"]


@dataclass
class TACMap:
    """`matrices` [buckets, n_blocks, b, b], `offsets` [buckets, dim]; bucket k covers mask
    ratios in (k/K, (k+1)/K] (bucket 0 also takes ratio 0)."""

    matrices: torch.Tensor
    offsets: torch.Tensor

    @property
    def block_size(self) -> int:
        return self.matrices.shape[-1]

    @property
    def num_buckets(self) -> int:
        return self.matrices.shape[0]


def mask_ratio_bucket(mask_ratio: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket index per sequence from its current mask ratio in [0, 1]."""
    return (mask_ratio * num_buckets).ceil().long().clamp(1, num_buckets) - 1


def fit_tac(
    quantized: torch.Tensor,
    reference: torch.Tensor,
    block_size: int,
    ridge: float = 1e-2,
    buckets: torch.Tensor | None = None,
    num_buckets: int = 1,
) -> TACMap:
    """Closed-form fit of `min sum ||A o_q + c - o_fp||^2 + lam ||A - I||^2` per block (and bucket).

    Args:
        quantized, reference: [tokens, dim] attention outputs of the quantized and FP models.
        ridge: strength relative to the mean input energy per channel (scale-free).
        buckets: [tokens] bucket index of each token (None = all in bucket 0).
    """
    tokens, dim = quantized.shape
    if dim % block_size:
        raise ValueError(f"TAC block size {block_size} does not divide the attention width {dim}")
    n_blocks = dim // block_size
    if buckets is None:
        buckets = torch.zeros(tokens, dtype=torch.long)
    eye = torch.eye(block_size, dtype=torch.float64)
    matrices = eye.expand(num_buckets, n_blocks, -1, -1).clone()
    offsets = torch.zeros(num_buckets, dim, dtype=torch.float64)
    for bucket in range(num_buckets):
        rows = buckets == bucket
        if not rows.any():
            continue  # no data: identity
        x = quantized[rows].double().reshape(-1, n_blocks, block_size).transpose(0, 1)  # [blocks, N, b]
        y = reference[rows].double().reshape(-1, n_blocks, block_size).transpose(0, 1)
        ones = torch.ones(*x.shape[:2], 1, dtype=torch.float64)
        design = torch.cat([x, ones], -1)  # [blocks, N, b+1]
        gram = design.transpose(1, 2) @ design
        lam = ridge * gram[:, :block_size, :block_size].diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)
        penalty = torch.zeros(block_size + 1, block_size + 1, dtype=torch.float64)
        penalty[:block_size, :block_size] = eye  # the offset is not pulled toward anything
        prior = torch.cat([eye, torch.zeros(1, block_size, dtype=torch.float64)], 0)  # [b+1, b]
        lhs = gram + lam[:, None, None] * penalty
        rhs = design.transpose(1, 2) @ y + lam[:, None, None] * prior
        solution = torch.linalg.solve(lhs, rhs)  # [blocks, b+1, b]
        matrices[bucket] = solution[:, :block_size].transpose(1, 2)
        offsets[bucket] = solution[:, block_size].reshape(dim)
    return TACMap(matrices.to(quantized.dtype), offsets.to(quantized.dtype))


def apply_tac(attention_output: torch.Tensor, tac: TACMap, buckets: torch.Tensor | None = None) -> torch.Tensor:
    """o^ = blockdiag(A) o + c for `attention_output` [..., dim]; `buckets` [...] selects the map."""
    shape = attention_output.shape
    n_blocks, b = tac.matrices.shape[1], tac.block_size
    if buckets is None:
        buckets = torch.zeros(shape[:-1], dtype=torch.long, device=attention_output.device)
    blocks = attention_output.reshape(-1, n_blocks, b)
    buckets = buckets.reshape(-1)
    matrices = tac.matrices.to(attention_output.dtype)
    # One batched matmul per bucket (blocks as the batch), never a [tokens, blocks, b, b] gather.
    mapped = torch.empty_like(blocks)
    for bucket in range(matrices.shape[0]):
        rows = (buckets == bucket).nonzero().squeeze(-1)
        if rows.numel():
            mapped[rows] = torch.bmm(blocks[rows].transpose(0, 1), matrices[bucket].transpose(1, 2)).transpose(0, 1)
    return mapped.reshape(shape) + tac.offsets.to(attention_output.dtype)[buckets].reshape(shape)
