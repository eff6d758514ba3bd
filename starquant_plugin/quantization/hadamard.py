"""Orthonormal (block-)Hadamard rotations."""

import functools

import torch

__all__ = ["hadamard_matrix", "block_hadamard"]


def hadamard_matrix(size: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Sylvester Hadamard matrix of a power-of-two `size`, scaled to be orthonormal."""
    if size <= 0 or size & (size - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {size}")
    return _hadamard(size, dtype, torch.device(device) if device is not None else torch.device("cpu")).clone()


@functools.lru_cache(maxsize=64)
def _hadamard(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Cached: the serving path rotates every linear's input at every step.
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return (matrix / size**0.5).to(dtype=dtype, device=device)


def block_hadamard(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """`x @ blockdiag(H, ..., H)` over the last dimension, H the orthonormal Hadamard of `block_size`.

    The matrix is symmetric and orthogonal, so applying it twice is the identity.
    """
    dim = x.shape[-1]
    if dim % block_size:
        raise ValueError(f"rotation block size {block_size} does not divide the dimension {dim}")
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {block_size}")
    matrix = _hadamard(block_size, x.dtype, x.device)  # read only
    return (x.reshape(*x.shape[:-1], dim // block_size, block_size) @ matrix).reshape(x.shape)


def rotation_block_for(dim: int, requested: int) -> int:
    """The largest power of two that divides `dim` and does not exceed `requested` (0 = no rotation)."""
    if requested <= 0:
        return 0
    block = 1
    while block * 2 <= requested and dim % (block * 2) == 0:
        block *= 2
    return block if block > 1 else 0
