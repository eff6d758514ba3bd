"""STaR-Quant checkpoints: the `starquant_config` block, atomic writing, validated loading."""

from .config import FORMAT_VERSION, SGATSettings, StarQuantConfig, TACSettings
from .loader import load_quantized_into
from .writer import atomic_output_dir, install_save_hook, write_starquant_config

__all__ = [
    "FORMAT_VERSION",
    "SGATSettings",
    "StarQuantConfig",
    "TACSettings",
    "atomic_output_dir",
    "install_save_hook",
    "load_quantized_into",
    "write_starquant_config",
]
