"""Write the `starquant_config` block, and write checkpoint directories atomically."""

import contextlib
import ctypes
import json
import os
import shutil
import uuid
import weakref
from collections.abc import Iterator
from functools import wraps
from pathlib import Path

from torch import nn

from ..errors import InputError
from ..models.family import family_of
from .config import SGATSettings, StarQuantConfig, TACSettings
from .schemes import PACKED_FORMAT, enum_value

__all__ = [
    "atomic_output_dir", "check_output_dir", "install_save_hook", "pack_low_bit_weights",
    "record_results", "starquant_config_of", "write_starquant_config",
]


# What the modifiers calibrated, per model (weakly held: it goes with the model).
_RESULTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def record_results(model: nn.Module, *, sgat: SGATSettings | None = None, tac: TACSettings | None = None) -> None:
    """Hand a modifier's settings to the writer: `model.save_pretrained` writes them (with the
    other modifier's) as the `starquant_config` block. Installs the save hook."""
    results = _RESULTS.setdefault(model, {})
    if sgat is not None:
        results["sgat"] = sgat
    if tac is not None:
        results["tac"] = tac
    install_save_hook(model)


def starquant_config_of(model: nn.Module) -> StarQuantConfig | None:
    """The block for a model the modifiers ran on (None if neither SGAT nor TAC did)."""
    results = _RESULTS.get(model)
    if not results:
        return None
    return StarQuantConfig(mask_token_id=family_of(model.config).mask_token_id(model.config), **results)


def write_starquant_config(directory: str | Path, block: StarQuantConfig) -> None:
    """Add the block to `directory/config.json` (written after transformers' own save, which
    rebuilds config.json from the model config and would drop it)."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config["starquant_config"] = block.model_dump()
    # The hub's remote code would load the weights and silently drop the STaR-Quant tensors: a
    # STaR-Quant checkpoint loads through this package's classes only (no `trust_remote_code`).
    config.pop("auto_map", None)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(config, indent=2) + "\n")
    temporary.replace(path)


def pack_low_bit_weights(model: nn.Module) -> list[str]:
    """Have integer weights of fewer than 8 bits stored packed (compressed-tensors `pack-quantized`:
    32 / bits values per int32) wherever the recipe's scheme names no `format`. Left to infer it,
    compressed-tensors writes W4A8 and W4A4 `int-quantized`, one int8 per 4-bit value: as large on
    disk as W8. Call before the compressing save; returns the modules switched."""
    switched, schemes = [], set()  # config groups share one scheme object between their modules
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        weights = getattr(scheme, "weights", None)
        activations = getattr(scheme, "input_activations", None)
        if weights is None or enum_value(weights.type) != "int" or weights.num_bits >= 8:
            continue
        if activations is not None and enum_value(activations.type) != "int":
            continue  # float activations: not a pack-quantized scheme
        if scheme.format is None:
            scheme.format = PACKED_FORMAT
            schemes.add(id(scheme))
        if id(scheme) in schemes:
            switched.append(name)
    return switched



def install_save_hook(model: nn.Module) -> None:
    """Make `model.save_pretrained(dir, ...)` also write the starquant_config block (idempotent)."""
    save = model.save_pretrained
    if getattr(save, "_starquant_wrapped", False):
        return

    @wraps(save)
    def save_pretrained(save_directory, *args, **kwargs):
        result = save(save_directory, *args, **kwargs)
        block = starquant_config_of(model)
        if block is not None:
            write_starquant_config(save_directory, block)
        return result

    save_pretrained._starquant_wrapped = True
    model.save_pretrained = save_pretrained


def check_output_dir(output: str | Path, sources: list[str | Path] = (), overwrite: bool = False) -> Path:
    """Refuse an output directory before any work starts: one that exists (without `overwrite`),
    is not a directory, is not a checkpoint (`overwrite` replaces checkpoints only), or is, contains
    or lies inside one of `sources` (the input model would be destroyed). Returns it resolved."""
    resolved = Path(output).resolve()
    for source in map(lambda s: Path(s).resolve(), sources):
        if resolved == source or source in resolved.parents or resolved in source.parents:
            relation = "is" if resolved == source else "lies inside" if source in resolved.parents else "contains"
            raise InputError(f"--output {output} {relation} the input model {source}; write the checkpoint elsewhere")
    if not resolved.exists():
        return resolved
    if not overwrite:
        raise InputError(f"output directory {output} already exists (pass --overwrite to replace it)")
    if not resolved.is_dir():
        raise InputError(f"--output {output} exists and is not a directory")
    if any(resolved.iterdir()) and not (resolved / "config.json").is_file():
        raise InputError(f"--output {output} is a non-empty directory without config.json; --overwrite only replaces checkpoints")
    return resolved


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh sibling staging directory that becomes `output` only if the block succeeds.

    A failure or interruption removes the staging directory, so no partial checkpoint sits at
    `output` looking valid. An existing `output` is swapped with the new one in one atomic step
    and only then removed: at every moment `output` holds the old or the new checkpoint.
    """
    output = Path(output)
    check_output_dir(output, overwrite=overwrite)
    staging = output.with_name(f".{output.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not output.exists():
        staging.rename(output)
    elif _exchange(staging, output):
        shutil.rmtree(staging)  # now holds the old checkpoint
    else:  # no atomic exchange: move the old one aside first, so one of the two is always kept
        old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        output.rename(old)
        staging.rename(output)
        shutil.rmtree(old)
