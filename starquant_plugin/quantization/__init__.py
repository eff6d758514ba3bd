"""STaR-Quant maths in pure torch: quantizers, rotations, SGAT and TAC (the one implementation
both adapters call)."""

from .hadamard import block_hadamard, hadamard_matrix
from .quantizers import fake_quantize_per_token, fake_quantize_weight
from .sgat import SGATSite, build_sgat_site, search_state_clip, sgat_linear, sgat_transform_input, sgat_transform_weight
from .tac import TACMap, apply_tac, fit_tac, fit_tac_to_output, shrink_tac

__all__ = [
    "SGATSite",
    "TACMap",
    "apply_tac",
    "block_hadamard",
    "build_sgat_site",
    "fake_quantize_per_token",
    "fake_quantize_weight",
    "fit_tac",
    "fit_tac_to_output",
    "hadamard_matrix",
    "search_state_clip",
    "sgat_linear",
    "sgat_transform_input",
    "sgat_transform_weight",
    "shrink_tac",
]
