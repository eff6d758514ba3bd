"""SGAT/TAC sites of a block, as modules, from its model family's site map (`models/family.py`)."""

from torch import nn

from ..models.family import SITE_NAMES, family_of
from .apply import SGATSiteModules

__all__ = ["SITE_NAMES", "sgat_sites", "tac_target"]


def sgat_sites(block: nn.Module, config) -> dict[str, SGATSiteModules]:
    """The SGAT input sites of one block of `config`'s family, in application order; a site whose
    smoothing cannot be folded for this config (`ModelFamily.online_smoothing_sites`) gets none."""
    family = family_of(config)
    online = set(family.online_smoothing_sites(config))
    return {
        name: SGATSiteModules(
            [block.get_submodule(linear) for linear in spec.linears],
            None if name in online else block.get_submodule(spec.fold_into),
        )
        for name, spec in family.sgat_sites.items()
    }


def tac_target(block: nn.Module, config) -> nn.Linear:
    """The linear whose input is the attention output (TAC corrects that input)."""
    return block.get_submodule(family_of(config).tac_target)
