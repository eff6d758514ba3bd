"""STaR-Quant checkpoints: the `starquant_config` block, atomic writing, validation, loading of the tensors."""

from .config import FORMAT_VERSION, SGATSettings, StarQuantConfig, TACSettings
from .loader import load_quantized_into
from .validate import ValidatedCheckpoint, validate_checkpoint
from .writer import atomic_output_dir, install_save_hook, write_starquant_config

__all__ = [
    "FORMAT_VERSION",
    "SGATSettings",
    "StarQuantConfig",
    "TACSettings",
    "ValidatedCheckpoint",
    "atomic_output_dir",
    "install_save_hook",
    "load_quantized_into",
    "validate_checkpoint",
    "write_starquant_config",
]
