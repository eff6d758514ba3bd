"""SGATModifier: State-Guided Activation Transformation for llm-compressor."""

from typing import Literal

import torch
from compressed_tensors.offload import update_offload_parameter
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator

from ...checkpoint.config import SGATSettings
from ...checkpoint.writer import record_results
from ...models.family import family_of
from ...quantization import build_sgat_site, fake_quantize_weight
from ...quantization.apply import apply_sgat_site
from ...quantization.hadamard import rotation_block_for
from ...quantization.mappings import sgat_sites
from ...quantization.runtime import attach_runtime
from ..recipe_check import check_session_recipe
from ..report import stage

__all__ = ["SGATModifier"]


class SGATModifier(Modifier):
    """
    STaR-Quant's State-Guided Activation Transformation (arXiv 2606.04945; our spec in
    docs/method.md). In a diffusion LLM, masked and unmasked tokens have different
    activation distributions at every layer. At every quantized input site (attention
    input, attention output, MLP input, MLP output) SGAT applies one shared invertible
    transform `T = D R` (SmoothQuant-style diagonal `D`, folded upstream where possible,
    and a block-Hadamard rotation `R`), subtracts a per-state channel centre `mu_s`, and
    gives the per-token activation quantizer a per-state clip ratio searched on
    calibration data. The weights become `W D^-1 R` (quantized once, by the weight
    quantizer that follows in the recipe) and a per-state compensation `mu_s W^T` is
    added to each output, so the model is unchanged in full precision.

    Place it before the weight quantizer, so GPTQ's Hessians see transformed inputs; its bits
    come from the quantizer's scheme (the whole-recipe rules: `compress/recipe_check.py`):

    example recipe:
    ```yaml
    starquant_stage:
      starquant_modifiers:
        SGATModifier:
          rotation_block_size: 128
          smoothing_strength: 0.5
        GPTQModifier:
          targets: ["Linear"]
          ignore: ["lm_head", "model.transformer.ff_out"]
          scheme: W4A8
    ```

    Lifecycle:
        - on_initialize: check the architecture, the whole recipe (order, quantizer, scheme)
          and the calibration data; take the bits from the quantizer's scheme; map the sites
        - on_calibration_start: hooks capture each block's token states (from input ids)
          and each site's input rows
        - on_sequential_epoch_end: calibrate the finished blocks' sites (centres,
          smoothing, clip search), fold/transform the weights, store the per-state
          tensors on the linears and (re)attach the run-time hooks
        - on_calibration_end: calibrate anything left, remove the capture hooks
        - on_finalize: record the settings on the model for the checkpoint writer

    :param rotation_block_size: block-Hadamard size (power of two; per site the largest
        power of two dividing the width and not above this); 0 disables the rotation
    :param smoothing_strength: SmoothQuant migration strength in [0, 1]; 0 disables D
    :param centre: per-state channel centre, `mean` or `midrange`
    :param per_state_shift: subtract a per-state centre (ablation: one shared centre)
    :param per_state_clip: search a clip ratio per state (ablation: clip 1.0)
    :param activation_bits: bits of the per-token activation quantizer the clip is tuned for
        (default: the quantizer's scheme at the SGAT sites; if set, it must equal it)
    :param weight_bits: bits of the weight quantizer assumed during the clip search (default:
        the quantizer's scheme; if set, it must equal it)
    :param weight_group_size: group size of that weight quantizer (default: the scheme's; None
        in the scheme = per channel)
    :param max_tokens_per_site: calibration rows kept per site (evenly subsampled)
    """

    requires_calibration_data: bool = True

    rotation_block_size: int = Field(default=128, ge=0)
    smoothing_strength: float = Field(default=0.5, ge=0.0, le=1.0)
    centre: Literal["mean", "midrange"] = "mean"
    per_state_shift: bool = True
    per_state_clip: bool = True
    activation_bits: int | None = Field(default=None, ge=2, le=16)
    weight_bits: int | None = Field(default=None, ge=2, le=16)
    weight_group_size: int | None = Field(default=None, gt=0)
    max_tokens_per_site: int = Field(default=4096, gt=0)

    _blocks: list = PrivateAttr(default_factory=list)
    _captured: dict = PrivateAttr(default_factory=dict)
    _calibrated: set = PrivateAttr(default_factory=set)

    @field_validator("rotation_block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value and value & (value - 1):
            raise ValueError(f"rotation_block_size must be 0 or a power of two, got {value}")
        return value

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        family = family_of(model.config)  # InputError for a model_type without a family
        scheme = check_session_recipe(model).sgat_scheme
        for key, value in scheme.items():  # unset fields take the scheme's value; set ones were checked
            setattr(self, key, value)
        if getattr(state, "data", None) is None or state.data.calib is None:
            raise ValueError("SGATModifier requires calibration data (masked canvases)")
        self._blocks = list(family.block_list(model))
        self._captured = {}
        self._calibrated = set()
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        for index, block in enumerate(self._blocks):
            self.register_hook(block, self._capture_states(index), "forward_pre")
            for name, site in sgat_sites(block, state.model.config).items():
                self.register_hook(site.linears[0], self._capture_input(index, name), "forward_pre")

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        modules = set(map(id, kwargs.get("modules", [])))
        for index, block in enumerate(self._blocks):
            if id(block) in modules and index in self._captured:
                self._calibrate_block(state.model, index)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        for index in sorted(self._captured):
            self._calibrate_block(state.model, index)
        self.remove_hooks()

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_end(state, None)
        missing = [i for i in range(len(self._blocks)) if i not in self._calibrated]
        if missing:
            raise ValueError(f"SGATModifier saw no calibration data for blocks {missing}")
        settings = self.model_dump(
            include={
                "rotation_block_size", "smoothing_strength", "centre", "per_state_shift", "per_state_clip",
                "activation_bits", "weight_bits", "weight_group_size",
            }
        )
        online = family_of(state.model.config).online_smoothing_sites(state.model.config)
        record_results(state.model, sgat=SGATSettings(**settings, online_smoothing=online))
        return True

    def _capture_states(self, index: int):
        def hook(block, args):
            token_states = args[3] if len(args) > 3 else None
            if token_states is None:
                raise ValueError("SGATModifier needs token states: calibrate with input_ids")
            self._captured.setdefault(index, {"states": []})["states"].append(token_states.detach().reshape(-1).cpu())

        return hook

    def _capture_input(self, index: int, site: str):
        def hook(module, args):
            x = args[0].detach()
            self._captured[index].setdefault(site, []).append(x.reshape(-1, x.shape[-1]).float().cpu())

        return hook

    @torch.no_grad()
    def _calibrate_block(self, model, index: int) -> None:
        with stage("SGAT statistics and clip search"):
            self._calibrate_block_sites(model, index)

    def _calibrate_block_sites(self, model, index: int) -> None:
        captured = self._captured.pop(index)
        states = torch.cat(captured["states"])
        keep = torch.linspace(0, states.numel() - 1, min(states.numel(), self.max_tokens_per_site)).long()
        block = self._blocks[index]
        for name, modules in sgat_sites(block, model.config).items():
            inputs = torch.cat(captured[name])[keep]
            site = build_sgat_site(
                inputs,
                states[keep],
                [linear.weight.detach().float().cpu() for linear in modules.linears],
                rotation_block_for(inputs.shape[-1], self.rotation_block_size),
                smoothing_strength=self.smoothing_strength,
                centre=self.centre,
                per_state_shift=self.per_state_shift,
                activation_bits=self.activation_bits if self.per_state_clip else None,
                quantize_weight=lambda w: fake_quantize_weight(w, self.weight_bits, self.weight_group_size),
            )
            device = modules.linears[0].weight.device
            site.smoothing, site.shift, site.clip = (t.to(device) for t in (site.smoothing, site.shift, site.clip))
            apply_sgat_site(modules, site, update_offload_parameter)
        self._calibrated.add(index)
        attach_runtime(model)
        logger.info(f"SGAT: calibrated block {index} on {keep.numel()} tokens")
