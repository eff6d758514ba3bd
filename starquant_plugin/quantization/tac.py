"""TAC — Temporal Attention Compensation (DESIGN.md §2), in pure torch.

A block-diagonal affine map on the attention output (the o-projection input),
`o^ = blockdiag(A_1..A_n) o + c`, with blocks of size `b` (head_dim by default), fitted
in closed form by ridge regression toward the identity so that the quantized model's
attention outputs match the full-precision ones; optionally one map per mask-ratio bucket.
"""

from dataclasses import dataclass

import torch

__all__ = ["TACMap", "fit_tac", "apply_tac", "shrink_tac", "mask_ratio_bucket", "uniform_bucket_edges", "calibrated_bucket_edges"]


@dataclass
class TACMap:
    """`matrices` [buckets, n_blocks, b, b], `offsets` [buckets, dim]; which bucket a canvas
    uses is `mask_ratio_bucket` of its mask ratio with the edges stored beside the maps."""

    matrices: torch.Tensor
    offsets: torch.Tensor

    @property
    def block_size(self) -> int:
        return self.matrices.shape[-1]

    @property
    def num_buckets(self) -> int:
        return self.matrices.shape[0]


def uniform_bucket_edges(num_buckets: int) -> list[float]:
    """Edges k/K (k = 1..K-1): equal-width mask-ratio buckets over [0, 1]."""
    return [k / num_buckets for k in range(1, num_buckets)]


def calibrated_bucket_edges(mask_ratios: torch.Tensor, num_buckets: int) -> list[float]:
    """Edges that split the calibration canvases' mask ratios into K equally populated buckets.

    The ratio counts the prompt too (it is derived from the canvas alone), so a canvas is never
    fully masked: with a 10-token prompt and a 5-token answer it stays below 1/3, and equal-width
    buckets over [0, 1] would put every step in the first one.
    """
    if num_buckets == 1:
        return []
    levels = torch.linspace(0, 1, num_buckets + 1, dtype=torch.float64)[1:-1]
    return [float(v) for v in torch.quantile(mask_ratios.double(), levels)]


def mask_ratio_bucket(mask_ratio: torch.Tensor, edges: torch.Tensor | list[float]) -> torch.Tensor:
    """Bucket index per sequence from its current mask ratio: bucket k covers ratios in
    (edges[k-1], edges[k]] (bucket 0 everything up to edges[0], the last everything above)."""
    edges = torch.as_tensor(edges, dtype=mask_ratio.dtype, device=mask_ratio.device)
    return torch.bucketize(mask_ratio, edges)


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


def shrink_tac(tac: TACMap, strength: float) -> TACMap:
    """The map moved toward the identity: `A' = I + s (A - I)`, `c' = s c` (s = 1 keeps it, 0 is the identity)."""
    eye = torch.eye(tac.block_size, dtype=tac.matrices.dtype, device=tac.matrices.device)
    return TACMap(eye + strength * (tac.matrices - eye), strength * tac.offsets)


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
