"""TAC — Temporal Attention Compensation (docs/method.md), in pure torch.

A block-diagonal affine map on the attention output (the o-projection input),
`o^ = blockdiag(A_1..A_n) o + c`, with blocks of size `b` (head_dim by default), fitted
in closed form by ridge regression toward the identity so that the quantized model's
attention outputs match the full-precision ones; optionally one map per mask-ratio bucket.
"""

from dataclasses import dataclass

import torch

__all__ = ["TACMap", "fit_tac", "fit_tac_to_output", "apply_tac", "shrink_tac", "mask_ratio_bucket", "uniform_bucket_edges", "calibrated_bucket_edges"]


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


def _ridge_terms(gram: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`lam` per block (`ridge` times the block's mean input energy per channel, from the design's
    gram [blocks, b+1, b+1]) and the penalty pattern [b+1, b+1] (the matrix only: the offset is
    not pulled toward anything)."""
    block_size = gram.shape[-1] - 1
    lam = ridge * gram[:, :block_size, :block_size].diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)
    penalty = torch.zeros(block_size + 1, block_size + 1, dtype=torch.float64)
    penalty[:block_size, :block_size] = torch.eye(block_size, dtype=torch.float64)
    return lam, penalty


def _ridge_toward_identity(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """Per block, `[A^T; c^T]` [blocks, b+1, b] minimising `||x A^T + c - y||^2 + lam ||A - I||^2`
    (float64 `x`, `y` [blocks, N, b]; `lam` = `ridge` times the block's mean input energy per channel;
    the offset is not pulled toward anything)."""
    block_size = x.shape[-1]
    eye = torch.eye(block_size, dtype=torch.float64)
    ones = torch.ones(*x.shape[:2], 1, dtype=torch.float64)
    design = torch.cat([x, ones], -1)  # [blocks, N, b+1]
    gram = design.transpose(1, 2) @ design
    lam, penalty = _ridge_terms(gram, ridge)
    prior = torch.cat([eye, torch.zeros(1, block_size, dtype=torch.float64)], 0)  # [b+1, b]
    lhs = gram + lam[:, None, None] * penalty
    rhs = design.transpose(1, 2) @ y + lam[:, None, None] * prior
    return torch.linalg.solve(lhs, rhs)


def _tac_map(solutions: list[torch.Tensor | None], block_size: int, n_blocks: int, dtype: torch.dtype) -> TACMap:
    """A TACMap from each bucket's `[A^T; c^T]` blocks [blocks, b+1, b] (None: the identity)."""
    eye = torch.eye(block_size, dtype=torch.float64)
    matrices = eye.expand(len(solutions), n_blocks, -1, -1).clone()
    offsets = torch.zeros(len(solutions), n_blocks * block_size, dtype=torch.float64)
    for bucket, solution in enumerate(solutions):
        if solution is not None:
            matrices[bucket] = solution[:, :block_size].transpose(1, 2)
            offsets[bucket] = solution[:, block_size].reshape(-1)
    return TACMap(matrices.to(dtype), offsets.to(dtype))


def _bucket_rows(tokens: int, buckets: torch.Tensor | None, num_buckets: int):
    """Per bucket, the boolean row selection (None where the bucket holds no row)."""
    if buckets is None:
        buckets = torch.zeros(tokens, dtype=torch.long)
    return [(rows if rows.any() else None) for rows in (buckets == k for k in range(num_buckets))]


def _check_block_size(dim: int, block_size: int) -> int:
    if dim % block_size:
        raise ValueError(f"TAC block size {block_size} does not divide the attention width {dim}")
    return dim // block_size


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
    n_blocks = _check_block_size(dim, block_size)
    solutions = []
    for rows in _bucket_rows(tokens, buckets, num_buckets):
        if rows is None:
            solutions.append(None)  # no data: identity
            continue
        x = quantized[rows].double().reshape(-1, n_blocks, block_size).transpose(0, 1)  # [blocks, N, b]
        y = reference[rows].double().reshape(-1, n_blocks, block_size).transpose(0, 1)
        solutions.append(_ridge_toward_identity(x, y, ridge))
    return _tac_map(solutions, block_size, n_blocks, quantized.dtype)


def fit_tac_to_output(
    quantized: torch.Tensor,
    error: torch.Tensor,
    weight: torch.Tensor,
    block_size: int,
    ridge: float = 1e-2,
    buckets: torch.Tensor | None = None,
    num_buckets: int = 1,
    iterations: int = 16,
) -> TACMap:
    """Fit the map so that the o-projection's *output* (what the residual stream receives)
    moves toward full precision: `min ||sum_h ((A_h - I) o_h + c_h) W_h - e||^2 + lam sum_h ||(A_h - I) W_h||^2`.

    The map still acts on the attention output, block by block, but the projection mixes the
    blocks, so they are fitted jointly: conjugate gradients on the normal equations, matrix-free
    (each iteration costs two products with the projection), preconditioned by each block's exact
    solution with the others fixed. Cost and memory scale like one projection over the fitting
    rows, so it serves LLaDA-8B widths too; the objective never increases with `iterations`.

    Args:
        quantized: [tokens, dim] the quantized model's attention outputs (the o-projection input).
        error: [tokens, out] full-precision minus quantized o-projection output on the same tokens
            (the quantized projection's own weight and activation error included: the map can
            undo the part of it that is predictable from its input).
        weight: [dim, out] the linear map from the o-projection input to its output (the
            full-precision weight, transposed, in the space `quantized` lives in).
        ridge, buckets, num_buckets: as in `fit_tac` (the penalty is measured through `weight`).
    """
    tokens, dim = quantized.shape
    n_blocks = _check_block_size(dim, block_size)
    if weight.shape[0] != dim or error.shape != (tokens, weight.shape[1]):
        raise ValueError(f"fit_tac_to_output: weight {tuple(weight.shape)} and error {tuple(error.shape)} "
                         f"do not match attention outputs {tuple(quantized.shape)}")
    w = weight.double()
    w_blocks = w.reshape(n_blocks, block_size, -1)
    gram_w = w_blocks @ w_blocks.transpose(1, 2)  # [blocks, b, b]
    gram_w = gram_w + 1e-10 * gram_w.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-30)[:, None, None] * torch.eye(block_size, dtype=torch.float64)
    solutions = []
    for rows in _bucket_rows(tokens, buckets, num_buckets):
        if rows is None:
            solutions.append(None)
            continue
        x = quantized[rows].double()
        mean = x.mean(0)  # centred inputs decouple the offsets from the matrices
        n = x.shape[0]
        design = torch.cat([(x - mean).reshape(n, n_blocks, block_size), torch.ones(n, n_blocks, 1, dtype=torch.float64)], -1)
        gram_x = torch.einsum("nhi,nhj->hij", design, design)  # [blocks, b+1, b+1]
        lam, penalty = _ridge_terms(gram_x, ridge)
        block_lhs = gram_x + lam[:, None, None] * penalty

        def back(out_space):  # X~_h^T (r W^T)_h for every block
            return torch.einsum("nhi,nhj->hij", design, (out_space @ w.T).reshape(n, n_blocks, block_size))

        def hessian(v):  # v [blocks, b+1, b]: the change [B_h^T; c_h^T] of every block
            output = torch.einsum("nhi,hij->nhj", design, v).reshape(n, dim) @ w
            return back(output) + lam[:, None, None] * (penalty @ v @ gram_w)

        def precondition(r):
            return torch.linalg.solve(gram_w, torch.linalg.solve(block_lhs, r).transpose(1, 2)).transpose(1, 2)

        v = torch.zeros(n_blocks, block_size + 1, block_size, dtype=torch.float64)
        residual = back(error[rows].double())
        z = precondition(residual)
        direction, rz = z, (residual * z).sum()
        for _ in range(iterations):
            if rz <= 0:
                break
            h_direction = hessian(direction)
            step = rz / (direction * h_direction).sum()
            v = v + step * direction
            residual = residual - step * h_direction
            z = precondition(residual)
            rz, rz_old = (residual * z).sum(), rz
            direction = z + (rz / rz_old) * direction
        change = v[:, :block_size]  # [blocks, b, b] = B_h^T
        offsets = v[:, block_size] - torch.einsum("hi,hij->hj", mean.reshape(n_blocks, block_size), change)
        solutions.append(torch.cat([torch.eye(block_size, dtype=torch.float64) + change, offsets[:, None]], 1))
    return _tac_map(solutions, block_size, n_blocks, quantized.dtype)


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
    matrices = tac.matrices.to(attention_output.dtype).transpose(2, 3)  # [K, blocks, b, b], each A^T
    offsets = tac.offsets.to(attention_output.dtype).reshape(-1, n_blocks, 1, b)

    def mapped_rows(rows: torch.Tensor, bucket: int) -> torch.Tensor:  # blocks as the batch; c added before rounding
        return torch.baddbmm(offsets[bucket], rows.transpose(0, 1), matrices[bucket]).transpose(0, 1)

    if buckets.numel() and bool((buckets == buckets[0]).all()):  # one map for every token: no gather
        return mapped_rows(blocks, int(buckets[0])).reshape(shape)
    # One batched matmul per bucket, never a [tokens, blocks, b, b] gather.
    mapped = torch.empty_like(blocks)
    for bucket in range(matrices.shape[0]):
        rows = (buckets == bucket).nonzero().squeeze(-1)
        if rows.numel():
            mapped[rows] = mapped_rows(blocks[rows], bucket)
    return mapped.reshape(shape)
