"""Per-architecture SGAT/TAC site maps: which linears share an input, what produces it."""

from torch import nn

from .apply import SGATSiteModules

__all__ = ["SITE_NAMES", "sgat_sites", "tac_target"]

# Order matters: a site's producer may be an earlier site's linear (v_proj, up_proj).
SITE_NAMES = ("attention_input", "attention_output", "mlp_input", "mlp_output")


def sgat_sites(block: nn.Module, config) -> dict[str, SGATSiteModules]:
    """The four SGAT input sites of a LLaDA block, in application order.

    The attention-output site folds its smoothing into `v_proj` rows only without GQA
    (a shared key/value head would need one smoothing for several query heads).
    """
    if config.model_type != "llada":
        raise ValueError(f"no STaR-Quant site map for model_type {config.model_type!r}")
    grouped = config.n_kv_heads != config.n_heads
    return {
        "attention_input": SGATSiteModules([block.q_proj, block.k_proj, block.v_proj], block.attn_norm),
        "attention_output": SGATSiteModules([block.attn_out], None if grouped else block.v_proj),
        "mlp_input": SGATSiteModules([block.ff_proj, block.up_proj], block.ff_norm),
        "mlp_output": SGATSiteModules([block.ff_out], block.up_proj),
    }


def tac_target(block: nn.Module, config) -> nn.Linear:
    """The linear whose input is the attention output (TAC corrects that input)."""
    if config.model_type != "llada":
        raise ValueError(f"no STaR-Quant site map for model_type {config.model_type!r}")
    return block.attn_out
