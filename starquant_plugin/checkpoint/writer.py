"""Write the `starquant_config` block, and write checkpoint directories atomically."""

import contextlib
import json
import shutil
import uuid
from collections.abc import Iterator
from functools import wraps
from pathlib import Path

from torch import nn

from .config import SGATSettings, StarQuantConfig, TACSettings

__all__ = ["atomic_output_dir", "install_save_hook", "starquant_config_of", "write_starquant_config"]


def starquant_config_of(model: nn.Module) -> StarQuantConfig | None:
    """The block for a model the modifiers ran on (None if neither SGAT nor TAC did)."""
    sgat, tac = getattr(model, "_starquant_sgat", None), getattr(model, "_starquant_tac", None)
    if sgat is None and tac is None:
        return None
    return StarQuantConfig(
        mask_token_id=model.config.mask_token_id,
        sgat=SGATSettings(**sgat) if sgat else None,
        tac=TACSettings(**tac) if tac else None,
    )


def write_starquant_config(directory: str | Path, block: StarQuantConfig) -> None:
    """Add the block to `directory/config.json` (written after transformers' own save, which
    rebuilds config.json from the model config and would drop it)."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config["starquant_config"] = block.model_dump()
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(config, indent=2) + "\n")
    temporary.replace(path)


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


@contextlib.contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh sibling staging directory that becomes `output` only if the block succeeds.

    A failure or interruption removes the staging directory, so no partial checkpoint
    sits at `output` looking valid.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise ValueError(f"output directory {output} already exists (pass --overwrite to replace it)")
    staging = output.with_name(f".{output.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
