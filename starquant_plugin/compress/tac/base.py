"""TACModifier: Temporal Attention Compensation for llm-compressor."""

from contextlib import ExitStack, contextmanager
from typing import Literal

import torch
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from ...checkpoint.config import TACSettings
from ...checkpoint.writer import record_results
from ...models.family import family_of
from ...data import trajectory_canvases
from ...diffusion import hf_logits_fn
from ...evaluation.drift import masked_position_kl
from ...quantization import TACMap, fit_tac, fit_tac_to_output, shrink_tac
from ...quantization.mappings import tac_target
from ...quantization.runtime import attach_runtime, attach_tac_bucket_edges, sequence_mask_ratio
from ...quantization.tac import calibrated_bucket_edges, mask_ratio_bucket, uniform_bucket_edges
from ..recipe_check import check_session_recipe
from ..report import stage
from .layerwise import (BlockwiseReference, CanvasGroup, block_input, capture, check_reference, entering,
                        equal_length_groups)

__all__ = ["REFERENCE_LOGITS_BYTES", "TACModifier"]

# Memory the full-precision logits kept for the held-out check may take (float32).
REFERENCE_LOGITS_BYTES = 2**30


class TACModifier(Modifier):
    """
    STaR-Quant's Temporal Attention Compensation (arXiv 2606.04945; docs/method.md). In a
    denoising trajectory each step's quantization error flips decisions that later steps
    build on. TAC fits, per attention layer, a block-diagonal affine map on the attention
    output (`o^ = blockdiag(A_1..A_n) o + c`, one `b x b` block per head by default) in
    closed form (ridge regression toward identity), so that the quantized model's
    attention outputs match the full-precision model's on canvases taken from the
    *quantized* model's own multi-step trajectories. Layers are fitted in order, each
    with the earlier ones corrected; optionally one map per mask-ratio bucket.

    A map that matches the attention output better can still make the model's output worse
    (the MLP after it amplifies what the map adds; docs/llada-gqa-6d/results.md). So each
    fitted map is checked on held-out trajectories (calibration rows not used for fitting):
    of the maps `I + s (A - I), s c` for s in `strengths`, each mask-ratio bucket of the layer
    keeps the one under which the quantized model's final logits at the masked positions are
    closest (KL) to the full-precision model's, on the held-out canvases of that bucket
    (s = 0 is the identity: no correction where none helps).

    Place it after the weight quantizer:

    example recipe:
    ```yaml
    starquant_stage:
      starquant_modifiers:
        SGATModifier: {rotation_block_size: 128}
        GPTQModifier: {targets: ["Linear"], ignore: ["lm_head", "model.transformer.ff_out"], scheme: W4A8}
        TACModifier:
          num_buckets: 2
          ridge: 0.01
    ```

    Lifecycle:
        - on_initialize: check the architecture, block size, the whole recipe (it comes after
          the weight quantizer) and calibration data; pick the
          fitting and held-out rows
        - on_calibration_end: decode the calibration prompts with the quantized model,
          recording every step's canvas; load the full-precision reference; for each
          layer in order capture both models' attention outputs on those canvases, fit
          the maps, keep per bucket the strength whose final logits are closest to full
          precision on the held-out trajectories, and attach them
        - on_finalize: record the settings on the model for the checkpoint writer

    :param block_size: size of the diagonal blocks (default: head_dim; must divide it)
    :param num_buckets: mask-ratio buckets K (one map per bucket)
    :param bucketing: `quantile` (default): bucket edges at the quantiles of the calibration
        canvases' mask ratios, so every bucket holds 1/K of the steps (the ratio counts the
        prompt, so it rarely nears 1); `uniform`: edges k/K. Stored in the checkpoint.
    :param ridge: ridge strength, relative to the mean input energy per channel
    :param objective: what the map is fitted to match. `attention_output` (docs/method.md): the
        full-precision attention output, block by block. `projection_output`: the full-precision
        o-projection output, i.e. what the residual stream receives, so the projection's own
        quantization error (the part predictable from its input) is corrected too; the projection
        mixes the heads, so the blocks are fitted jointly (`fit_tac_to_output`)
    :param iterations: conjugate-gradient iterations of the joint fit for `projection_output`
    :param num_trajectories: calibration rows decoded into trajectories for the fit. A trajectory
        regenerates everything after the row's first mask, so TAC takes the `num_trajectories +
        validation_trajectories` rows masked most densely after their first mask (closest to a
        decode of the whole answer) and spreads the fitting rows evenly over them
    :param validation_trajectories: the other rows of that set, whose trajectories choose each
        layer's and bucket's strength; 0 keeps every fitted map as it is
    :param strengths: candidate strengths s of the fitted map (1 = as fitted, 0 = identity)
    :param validate_on: `logits` (default): mean KL(FP || quantized) of the final logits at the
        held-out canvases' masked positions, i.e. the drift itself (one forward of the model per
        candidate, layer and canvas); `block_output`: relative squared error of the layer's
        block output (cheaper: the forward stops at the layer; greedy in depth)
    :param validation_canvases: held-out canvases used (evenly subsampled). The full-precision
        logits at their masked positions are kept in memory (float32); where they would exceed
        `REFERENCE_LOGITS_BYTES` (1 GiB) an evenly spaced share of each canvas's masked positions
        is scored instead (logged)
    :param validation_depth: blocks the held-out check of a layer runs with `validate_on: logits`:
        layer i's candidates are compared on the logits that the final norm and LM head give from
        the output of layer i + D - 1 (the FP model's the same way), so each check costs D blocks
        and the whole check grows linearly with depth; layers within D of the last are checked on
        the true final logits. `null`: always the final logits (exact; quadratic in depth)
    :param layer_by_layer: run TAC one layer at a time on cached hidden states (default): each
        canvas's hidden state entering layer i is kept, for the quantized model and for the
        full-precision reference (layers before i are final when layer i is fitted), so fitting
        layer i runs that layer only and validating it runs layers i..L, on batches of
        equal-length canvases; the reference is read from its checkpoint one block at a time
        (its embedding, final norm and head stay in memory), not held as a second model.
        `false`: the reference computation (a whole second full-precision model, and a whole
        forward per canvas for every capture and check)
    :param max_tokens_per_layer: fitting rows kept per layer (evenly subsampled)
    :param reference_model: full-precision checkpoint directory (default: the model's own
        `name_or_path`, which llm-compressor requires to be set)
    """

    requires_calibration_data: bool = False

    block_size: int | None = Field(default=None, gt=0)
    num_buckets: int = Field(default=1, ge=1)
    ridge: float = Field(default=1e-2, ge=0.0)
    num_trajectories: int = Field(default=16, gt=0)
    max_tokens_per_layer: int = Field(default=8192, gt=0)
    validation_trajectories: int = Field(default=32, ge=0)
    strengths: list[float] = Field(default_factory=lambda: [1.0, 0.5, 0.0], min_length=1)
    validate_on: Literal["logits", "block_output"] = "logits"
    validation_canvases: int = Field(default=256, gt=0)
    validation_depth: int | None = Field(default=8, gt=0)
    layer_by_layer: bool = True
    reference_model: str | None = None

    bucketing: Literal["quantile", "uniform"] = "quantile"
    objective: Literal["attention_output", "projection_output"] = "attention_output"
    iterations: int = Field(default=16, gt=0)

    _rows: list = PrivateAttr(default_factory=list)
    _errors: list = PrivateAttr(default_factory=list)
    _validation_rows: list = PrivateAttr(default_factory=list)
    _chosen: list = PrivateAttr(default_factory=list)
    _edges: list = PrivateAttr(default_factory=list)

    @field_validator("strengths")
    @classmethod
    def _strengths_in_unit_interval(cls, value: list[float]) -> list[float]:
        if any(not 0 <= s <= 1 for s in value):
            raise ValueError(f"TACModifier.strengths must lie in [0, 1], got {value}")
        return value

    def on_initialize(self, state: State, **kwargs) -> bool:
        config = state.model.config
        head_dim = family_of(config).heads(config)[2]  # InputError for a model_type without a family
        if self.block_size is not None and head_dim % self.block_size:
            raise ValueError(f"TACModifier.block_size={self.block_size} does not divide head_dim={head_dim}")
        check_session_recipe(state.model)
        check_reference(self.reference_model or state.model.name_or_path)  # before any calibration work
        if getattr(state, "data", None) is None or state.data.calib is None:
            raise ValueError("TACModifier requires calibration data (prompts to decode into trajectories)")
        rows = []
        for batch in state.data.calib:
            for ids, keep in zip(batch["input_ids"], batch.get("attention_mask", batch["input_ids"] * 0 + 1)):
                rows.append(ids[keep.bool()].cpu())
        # A trajectory decodes everything after the row's first mask, so the rows that look most like
        # a user's decode (the whole answer masked) are those masked most densely after their first
        # mask; ties keep the calibration order. Of those, fitting rows are evenly spaced and the
        # validation rows are the rest: distinct records, not one record at several ratios.
        pool = sorted(range(len(rows)), key=lambda i: -_tail_masked(rows[i], config.mask_token_id))
        pool = sorted(pool[: self.num_trajectories + self.validation_trajectories])
        fitting = _spread(pool, self.num_trajectories)
        rest = [i for i in pool if i not in set(fitting)]
        self._rows = [rows[i] for i in fitting]
        self._validation_rows = [rows[i] for i in rest]
        if self.validation_trajectories and not self._validation_rows:
            logger.warning("TAC: no calibration rows left for validation; every fitted map is kept as fitted")
        return True

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        with _weights_fake_quantized_once(state.model):
            self._fit(state.model)

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_end(state, None)
        config = state.model.config
        record_results(state.model, tac=TACSettings(
            block_size=self.block_size or family_of(config).heads(config)[2],
            num_buckets=self.num_buckets,
            ridge=self.ridge,
            bucket_edges=self._edges,
        ))
        return True

    @torch.no_grad()
    def _fit(self, model) -> None:
        config = model.config
        device = next(model.parameters()).device
        with stage("TAC trajectories"):
            canvases = trajectory_canvases(hf_logits_fn(model), [r.to(device) for r in self._rows], config.mask_token_id,
                                           vocab_size=config.vocab_size)
            if not canvases:
                raise ValueError("TACModifier: no calibration row contains a mask token to decode")
            held_out = trajectory_canvases(hf_logits_fn(model), [r.to(device) for r in self._validation_rows],
                                           config.mask_token_id, vocab_size=config.vocab_size)
        ratios = torch.cat([sequence_mask_ratio(c == config.mask_token_id) for c in canvases]).cpu()
        edges = calibrated_bucket_edges(ratios, self.num_buckets) if self.bucketing == "quantile" else uniform_bucket_edges(self.num_buckets)
        self._edges = edges
        if edges:
            logger.info(f"TAC: mask-ratio bucket edges {[round(e, 4) for e in edges]} ({self.bucketing})")
        held_out = [held_out[i] for i in _spread(range(len(held_out)), self.validation_canvases)]
        held_buckets = mask_ratio_bucket(torch.cat([sequence_mask_ratio(c == config.mask_token_id) for c in held_out]).cpu(), edges) \
            if held_out else None
        scored = _scored_positions(held_out, config.mask_token_id, config.vocab_size) if self.validate_on == "logits" else None
        reference_path = self.reference_model or model.name_or_path
        logger.info(f"TAC: {len(canvases)} canvases ({len(held_out)} held out); full-precision reference from "
                    f"{reference_path}" + (", one block at a time" if self.layer_by_layer else ""))
        self._chosen, self._errors = [], []
        fit = self._fit_layer_by_layer if self.layer_by_layer else self._fit_whole_model
        fit(model, reference_path, canvases, ratios, edges, held_out, held_buckets, scored)
        if self._chosen:
            logger.info(f"TAC: strengths kept per layer (per bucket) {self._chosen}")

    def _fit_layer_by_layer(self, model, reference_path, canvases, ratios, edges, held_out, held_buckets, scored) -> None:
        """Every layer from cached hidden states (quantized and full precision), canvases of one
        length batched; the reference holds one block at a time (`layerwise`)."""
        config = model.config
        blocks = family_of(config).block_list(model)
        by_logits = self.validate_on == "logits"
        with stage("TAC reference"):
            reference = BlockwiseReference(reference_path, model.dtype, next(model.parameters()).device, share=model)
        fitting = equal_length_groups(canvases, config.vocab_size)
        checking = equal_length_groups(held_out, config.vocab_size)
        for group in checking if scored else []:
            group.scored = torch.cat([scored[p] for p in group.positions])
        order = [p for group in fitting for p in group.positions]  # the captured rows' canvas order
        buckets = mask_ratio_bucket(ratios[order], edges).repeat_interleave(torch.tensor([canvases[p].shape[1] for p in order]))
        keep = torch.linspace(0, buckets.numel() - 1, min(buckets.numel(), self.max_tokens_per_layer)).long()
        buckets = buckets[keep]
        depth = len(blocks)
        window = min(self.validation_depth or depth, depth)
        if checking and by_logits:
            with stage("TAC reference"):  # FP logits at the depth layer 0 is checked at (and the final ones)
                states = self._reference_states(reference, checking, {window, depth})
                final_logits = _lens_logits(reference.model, checking, states[depth], depth)
                ahead, reference_logits = states[window], _lens_logits(reference.model, checking, states[window], window)
                del states
        with stage("TAC fit"):
            for group in fitting:
                group.hidden = block_input(model, 0, group.canvases)
                group.reference_hidden = block_input(reference.model, 0, group.canvases)
        with stage("TAC validation"):
            for group in checking:
                group.hidden = block_input(model, 0, group.canvases)
                if not by_logits:
                    group.reference_hidden = block_input(reference.model, 0, group.canvases)
        quantized_state, reference_state = (lambda g: g.hidden), (lambda g: g.reference_hidden)
        for index in tqdm(range(len(blocks)), desc="TAC layers"):
            target = tac_target(blocks[index], config)
            with ExitStack() as loaded:
                with stage("TAC reference"):
                    reference_block = loaded.enter_context(reference.block(index))
                reference_target = tac_target(reference_block, config)
                with stage("TAC fit"):
                    inputs = capture(model, index, target, fitting, quantized_state, rows=keep)
                    if self.objective == "attention_output":
                        wanted = capture(reference.model, index, reference_target, fitting, reference_state, rows=keep)
                    else:
                        wanted = capture(reference.model, index, reference_target, fitting, reference_state, output=True,
                                         rows=keep) - capture(model, index, target, fitting, quantized_state, output=True, rows=keep)
                    tac = self._fit_map(config, target, reference_target, inputs, wanted, buckets)
                    if index + 1 < len(blocks):  # the reference's layer is final: advance its states past it
                        for group in fitting:
                            group.reference_hidden = block_input(reference.model, index + 1, group.canvases, group.reference_hidden)
                if checking and not by_logits:
                    with stage("TAC validation"):
                        wanted_blocks = capture(reference.model, index, reference_block, checking, reference_state, output=True)
                        if index + 1 < len(blocks):
                            for group in checking:
                                group.reference_hidden = block_input(reference.model, index + 1, group.canvases,
                                                                     group.reference_hidden)
            if checking:
                with stage("TAC validation"):
                    if by_logits:
                        end = index + window
                        fp_logits = reference_logits if end < depth else final_logits

                        def measure(groups=checking, index=index, fp_logits=fp_logits, end=end):
                            return self._held_out_kl(model, index, groups, fp_logits, len(held_out), end)
                    else:
                        def measure(groups=checking, index=index, block=blocks[index], wanted=wanted_blocks):
                            got = capture(model, index, block, groups, quantized_state, output=True)
                            return _relative_errors(got, wanted, groups, len(held_out))
                    tac = self._choose_strengths(model, index, target, tac, edges, held_buckets, measure)
            _attach(model, target, tac, edges)
            if checking and by_logits and index + window + 1 < depth:
                with stage("TAC reference"):  # the next layer is checked one block deeper
                    with reference.block(index + window):
                        ahead = [block_input(reference.model, index + window + 1, g.canvases, h) for g, h in zip(checking, ahead)]
                    reference_logits = _lens_logits(reference.model, checking, ahead, index + window + 1)
            if index + 1 < len(blocks):
                with stage("TAC fit"):  # the layer is final: advance the quantized states past it
                    for group in fitting:
                        group.hidden = block_input(model, index + 1, group.canvases, group.hidden)
                with stage("TAC validation"):
                    for group in checking:
                        group.hidden = block_input(model, index + 1, group.canvases, group.hidden)

    @staticmethod
    def _reference_states(reference: BlockwiseReference, groups: list[CanvasGroup], depths: set[int]) -> dict[int, list]:
        """The reference's hidden states of each group after each of `depths` blocks, running it one
        block at a time."""
        states, kept = [block_input(reference.model, 0, g.canvases) for g in groups], {}
        for index in range(max(depths)):
            if index in depths:
                kept[index] = states
            with reference.block(index):
                states = [block_input(reference.model, index + 1, g.canvases, s) for g, s in zip(groups, states)]
        kept[max(depths)] = states
        return kept

    def _held_out_kl(self, model, index, groups, reference_logits, count, end) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(sum, count) of KL(FP || quantized) at each held-out canvas's scored positions, in the
        held-out list's order, running layers index..end-1 (`end` past the last: to the end) from the
        cached states."""
        config = model.config
        predictions = hf_logits_fn(model)
        parts = [None] * count
        for group, fp in zip(groups, reference_logits):
            with entering(model, index, group.hidden, end if end < len(family_of(config).block_list(model)) else None):
                got = _scored_logits(predictions, group)
            kl = masked_position_kl(fp, got, torch.ones(fp.shape[0], dtype=torch.bool))
            for position, piece in zip(group.positions, kl.split(group.scored.sum(1).tolist())):
                parts[position] = (piece.sum(), piece.new_tensor(piece.numel()))
        return parts

    def _fit_whole_model(self, model, reference_path, canvases, ratios, edges, held_out, held_buckets, scored) -> None:
        """The reference computation: a second, whole full-precision model, and every capture and
        check a forward of the whole model on one canvas at a time."""
        config = model.config
        family = family_of(config)
        device = next(model.parameters()).device
        with stage("TAC reference"):
            reference = AutoModelForCausalLM.from_pretrained(reference_path, dtype=model.dtype).to(device).eval()
            reference_fn = hf_logits_fn(reference)
            reference_logits = [reference_fn(c, None)[s].float().cpu() for c, s in zip(held_out, scored)] \
                if self.validate_on == "logits" else None
        blocks, reference_blocks = family.block_list(model), family.block_list(reference)
        tokens = torch.tensor([c.shape[1] for c in canvases])
        buckets = mask_ratio_bucket(ratios, edges).repeat_interleave(tokens)
        keep = torch.linspace(0, buckets.numel() - 1, min(buckets.numel(), self.max_tokens_per_layer)).long()
        predictions = hf_logits_fn(model)
        for index in tqdm(range(len(blocks)), desc="TAC layers"):
            target, reference_target = tac_target(blocks[index], config), tac_target(reference_blocks[index], config)
            with stage("TAC fit"):
                inputs = _capture(model, target, canvases)[keep]
                if self.objective == "attention_output":
                    wanted = _capture(reference, reference_target, canvases)[keep]
                else:
                    wanted = (_capture(reference, reference_target, canvases, output=True)
                              - _capture(model, target, canvases, output=True))[keep]
                tac = self._fit_map(config, target, reference_target, inputs, wanted, buckets[keep])
            if held_out:
                with stage("TAC validation"):
                    if self.validate_on == "logits":
                        end = index + (self.validation_depth or len(blocks))
                        end = end if end < len(blocks) else None
                        fp_logits = reference_logits
                        if end is not None:  # the logits from block end - 1's output, as in the checked model
                            with entering(reference, 0, None, end):
                                fp_logits = [reference_fn(c, None)[w].float().cpu() for c, w in zip(held_out, scored)]

                        def measure(fp_logits=fp_logits, end=end):
                            parts = []
                            for canvas, fp, where in zip(held_out, fp_logits, scored):
                                with entering(model, 0, None, end):
                                    got = predictions(canvas, None)[where].float().cpu()
                                kl = masked_position_kl(fp, got, torch.ones(fp.shape[0], dtype=torch.bool))
                                parts.append((kl.sum(), kl.new_tensor(kl.numel())))
                            return parts
                    else:
                        wanted_blocks = _capture(reference, reference_blocks[index], held_out, output=True)

                        def measure(block=blocks[index], wanted=wanted_blocks):
                            got = _capture(model, block, held_out, output=True)
                            sizes = [c.numel() for c in held_out]
                            return [((g - w).pow(2).sum(), w.pow(2).sum()) for g, w in zip(got.split(sizes), wanted.split(sizes))]
                    tac = self._choose_strengths(model, index, target, tac, edges, held_buckets, measure)
            _attach(model, target, tac, edges)
        del reference

    def _fit_map(self, config, target, reference_target, inputs, wanted, buckets) -> TACMap:
        """The layer's map from the quantized TAC inputs and, per `objective`, the reference's
        attention outputs or the residual error of the o-projection (FP minus quantized output)."""
        block_size = self.block_size or family_of(config).heads(config)[2]
        folded = getattr(target, "_sgat_folded_smoothing", None)
        if self.objective == "attention_output":
            if folded is not None:
                wanted = wanted * folded.float().cpu()  # fit in the space the layer actually sees
            return fit_tac(inputs, wanted, block_size, self.ridge, buckets, self.num_buckets)
        weight = reference_target.weight.float().T.cpu()  # [in, out]; the layer sees o * D, so o = x / D
        if folded is not None:
            weight = weight / folded.float().cpu()[:, None]
        return fit_tac_to_output(inputs, wanted, weight, block_size, self.ridge, buckets, self.num_buckets, self.iterations)

    def _choose_strengths(self, model, index, target, tac, edges, held_buckets, measure) -> TACMap:
        """Per mask-ratio bucket, the strength whose held-out error (`measure()`: (numerator,
        denominator) per held-out canvas, with the candidate map attached) is lowest; returns the
        map with each bucket shrunk by its strength."""
        errors = {}
        for strength in dict.fromkeys(self.strengths):
            _attach(model, target, shrink_tac(tac, strength), edges)
            parts = measure()
            errors[strength] = _per_bucket_ratio(torch.tensor([[float(a), float(b)] for a, b in parts]), held_buckets, tac.num_buckets)
        chosen = [min(errors, key=lambda s: errors[s][k]) for k in range(tac.num_buckets)]  # ties: the earlier
        self._chosen.append(chosen)
        self._errors.append(errors)
        logger.info(f"TAC layer {index}: held-out {self.validate_on} error per bucket " +
                    ", ".join(f"s={s:g}: {[float(f'{e:.3e}') for e in v]}" for s, v in errors.items()) + f"; keeps {chosen}")
        shrunk = [shrink_tac(tac, s) for s in chosen]
        return TACMap(torch.stack([m.matrices[k] for k, m in enumerate(shrunk)]),
                      torch.stack([m.offsets[k] for k, m in enumerate(shrunk)]))

    @property
    def chosen_strengths(self) -> list[list[float]]:
        """Per layer, the strength each mask-ratio bucket kept (empty without validation)."""
        return [list(c) for c in self._chosen]

    @property
    def chosen_errors(self) -> list[dict[float, list[float]]]:
        """Per layer, each candidate strength's held-out error per bucket (`validate_on`)."""
        return [{s: list(v) for s, v in e.items()} for e in self._errors]


@contextmanager
def _weights_fake_quantized_once(model):
    """While inside, the quantized linears hold their fake-quantized weights and skip
    compressed-tensors' weight fake-quantization, which would recompute them in every forward (most
    of a forward's time at 8B shapes on a CPU); input quantizers run as before. Exact: a weight is
    replaced by its fake-quantization q only where fake-quantizing q gives q again, so every forward
    sees the values it saw before and the stored integers (q / scale, rounded) are the same; the
    others keep their per-forward fake-quantization. The weights keep q afterwards (written with
    `update_offload_parameter`, so offloaded weights are updated where they live)."""
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    skipped, kept = [], 0
    try:
        for module in model.modules():
            scheme, status = getattr(module, "quantization_scheme", None), getattr(module, "quantization_status", None)
            if (scheme is None or scheme.weights is None or status is None or status >= QuantizationStatus.COMPRESSED
                    or not getattr(module, "quantization_enabled", True)):
                continue
            quantized = forward_quantize(module, module.weight.data, "weight", scheme.weights)
            if torch.equal(forward_quantize(module, quantized, "weight", scheme.weights), quantized):
                update_offload_parameter(module, "weight", quantized)
                if torch.equal(module.weight.data, quantized):  # as read back: written where the weight lives
                    skipped.append((module, scheme))
                    module.quantization_scheme = scheme.model_copy(update={"weights": None})
                    continue
            kept += 1
        logger.info(f"TAC: {len(skipped)} quantized linears run their weights fake-quantized once"
                    + (f", {kept} fake-quantize them in every forward" if kept else ""))
        yield
    finally:
        for module, scheme in skipped:
            module.quantization_scheme = scheme


def _per_bucket_ratio(parts: torch.Tensor, buckets: torch.Tensor, num_buckets: int) -> list[float]:
    """sum(numerator) / sum(denominator) of `parts` [canvases, 2] per bucket; a bucket without
    held-out canvases gets the ratio over all of them."""
    total = float(parts[:, 0].sum() / parts[:, 1].sum().clamp(min=1e-30))
    ratios = []
    for k in range(num_buckets):
        rows = parts[buckets == k]
        ratios.append(float(rows[:, 0].sum() / rows[:, 1].sum().clamp(min=1e-30)) if rows.numel() else total)
    return ratios


def _scored_positions(canvases: list[torch.Tensor], mask_token_id: int, vocab_size: int,
                      budget: int | None = None) -> list[torch.Tensor]:
    """Per held-out canvas, bool [1, seq]: the masked positions whose logits the check compares. All
    of them, unless their full-precision logits (float32, kept in memory) would exceed `budget`:
    then an evenly spaced share of each canvas's masked positions (at least one)."""
    budget = REFERENCE_LOGITS_BYTES if budget is None else budget
    masks = [c == mask_token_id for c in canvases]
    total = sum(int(m.sum()) for m in masks)
    if total * vocab_size * 4 <= budget:
        return masks
    share = budget / (total * vocab_size * 4)
    scored = []
    for mask in masks:
        where = mask[0].nonzero()[:, 0]
        chosen = torch.zeros_like(mask)
        chosen[0, where[_spread(range(len(where)), max(1, int(len(where) * share)))]] = True
        scored.append(chosen)
    logger.info(f"TAC: the held-out check scores {sum(int(s.sum()) for s in scored)} of {total} masked positions "
                f"(full-precision logits kept within {budget / 2**30:g} GiB)")
    return scored


def _tail_masked(row: torch.Tensor, mask_token_id: int) -> float:
    """Fraction of the tokens from the row's first mask to its end that are masked (0 without a mask)."""
    masked = (row == mask_token_id).nonzero()
    return 0.0 if masked.numel() == 0 else float((row[int(masked[0, 0]):] == mask_token_id).float().mean())


def _spread(indices, count: int) -> list[int]:
    """`count` of `indices`, evenly spaced (all of them when there are fewer)."""
    indices = list(indices)
    if not indices or count == 0:
        return []
    picked = torch.linspace(0, len(indices) - 1, min(count, len(indices))).round().long()
    return [indices[i] for i in picked.tolist()]


def _lens_logits(model, groups: list[CanvasGroup], states: list[torch.Tensor], depth: int) -> list[torch.Tensor]:
    """The model's logits at each group's scored positions (float32, CPU) from `states`, its hidden
    states after `depth` blocks, through the final norm and LM head (the final logits when `depth`
    is the model's depth)."""
    predictions, logits = hf_logits_fn(model), []
    for group, state in zip(groups, states):
        with entering(model, depth, state, end=depth):
            logits.append(_scored_logits(predictions, group))
    return logits


def _scored_logits(predictions, group: CanvasGroup) -> torch.Tensor:
    """Logits [scored positions, vocab] (float32, CPU) of the group's scored positions, the LM head
    run on the span from the first to the last of them only."""
    columns = group.scored.any(0).nonzero()[:, 0]
    lo, hi = int(columns[0]), int(columns[-1]) + 1
    return predictions(group.canvases, None, window=(lo, hi))[group.scored[:, lo:hi]].float().cpu()


def _relative_errors(got: torch.Tensor, wanted: torch.Tensor, groups: list[CanvasGroup], count: int):
    """(squared error, squared norm) of each held-out canvas's block output, in the held-out list's
    order, from rows [tokens, width] captured group by group."""
    parts, offset = [None] * count, 0
    for group in groups:
        length = group.canvases.shape[1]
        for position in group.positions:
            g, w = got[offset:offset + length], wanted[offset:offset + length]
            parts[position] = ((g - w).pow(2).sum(), w.pow(2).sum())
            offset += length
    return parts


def _attach(model, target, tac, edges) -> None:
    device = target.weight.device
    target.register_buffer("tac_matrices", tac.matrices.to(target.weight.dtype).to(device))
    target.register_buffer("tac_offsets", tac.offsets.to(target.weight.dtype).to(device))
    attach_tac_bucket_edges(target, edges)
    attach_runtime(model)


def _capture(model, module, canvases, output: bool = False) -> torch.Tensor:
    """Rows [tokens, width] of `module`'s raw input or output on each canvas, one whole forward
    (up to `module`) per canvas."""
    return capture(model, 0, module, [CanvasGroup(c, [i]) for i, c in enumerate(canvases)], lambda group: None, output)
