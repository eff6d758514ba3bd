"""The `starquant` quantization method for vLLM: compressed-tensors plus SGAT and TAC.

`StarQuantCompressedTensorsConfig` subclasses vLLM's `CompressedTensorsConfig`, so the checkpoint's
`quantization_config` is parsed, and each layer's scheme and integer kernel chosen, exactly
as for a plain compressed-tensors checkpoint. It claims a checkpoint automatically when the
model config carries a `starquant_config` block (`override_quantization_method`); plain
compressed-tensors checkpoints keep vLLM's stock path.

For every SGAT-site linear of a block (the model family says which: `ModelFamily.vllm_site`) it
wraps the layer's compressed-tensors method in
`StarQuantLinearMethod`, which adds the STaR-Quant tensors of the checkpoint
(`docs/checkpoint-format.md`) and computes, per token state s:

    x  <- blockdiag(A_k) x + c_k                       (attention output only, TAC; k = mask-ratio bucket)
    x  <- x * D_online                                 (only where D could not be folded)
    codes, scales <- sgat_quantize(x, s)               (shift, block-Hadamard, clipped per-token int)
    y  <- kernel(codes * scales) + compensation[s]     (the scheme's own integer kernel)

The scheme's kernel re-quantizes its input per token with absmax / qmax; on the grid
`codes * scales` that gives back exactly `codes` and `scales` (the clipped row maximum sits
on the largest code), so the per-state clip reaches the integer GEMM unchanged. Where the
kernel is vLLM's oneDNN int8 GEMM (CPU, W8A8) the codes and scales are handed to it
directly instead, skipping that dequantize / re-quantize pass (`int8_codes_gemm`). On AMX CPUs
the layer's int8 weights are repacked for our AMX GEMM (`starquant::int8_mm`, `starquant_amx_int8`),
which takes the codes as they are and applies the per-token and per-channel scales, the bias and
the compensation in its epilogue (vLLM's own AMX int8 GEMM, which quantizes a bf16 input itself,
is the fallback for shapes ours does not take: the codes go in as bf16 integers, re-quantized
exactly, the per-token scales applied to its output).

W4A8 on CPU: vLLM's kernel (`Dynamic4bitLinearKernel`) falls back on x86 to torch's reference
`_dyn_quant_matmul_4bit`, which keeps 2 bytes per weight and runs at under 1 GFLOP/s. The
layer keeps its int4 weights packed instead and multiplies the codes (exact in bf16) by them,
then scales each token's row: y = scale_t * (codes @ W_int4 * s_group). On AMX CPUs the GEMM
is ours (`starquant::int4_amx_mm`: AMX-INT8 tiles, exact int32 sums per group, the scales and the
compensation in its epilogue) or, for groups of 32, vLLM's AMX W4A8 kernel (`int4_scaled_mm_cpu`,
which quantizes its input itself: a sentinel column makes that exact, see `_int4_codes_gemm`); on
CPUs with AVX512-VNNI or AVX2 and no AMX our own (`starquant::int4_mm`: int8 dot products, exact int32 sums per group, the per-token scales and
the compensation in its epilogue); elsewhere torch's `_weight_int4pack_mm_for_cpu`.
Under tensor parallelism the column-parallel layers hold their slice of the compensation;
row-parallel layers add it on rank 0 only (it is then all-reduced once, like a bias), and
quantize each rank's input slice per token, as vLLM's kernels do.
"""

import warnings
import weakref
from typing import Any

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from torch.nn import Parameter
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_embedding import (
    CompressedTensorsEmbeddingWNA16Int,
)
from vllm.model_executor.utils import set_weight_attrs

from ...checkpoint.config import StarQuantConfig as StarQuantBlock
from ...checkpoint.schemes import INT4_CPU_GROUPS, enum_value
from ...models.family import family_of, known_model_types
from ...quantization.hadamard import rotation_block_for
from ...quantization.sgat import SGATSite, sgat_transform_input
from . import ops  # noqa: F401  (registers torch.ops.starquant.*)
from ..hardware import matmul_dtype
from .context import current_token_context

__all__ = ["STARQUANT_METHOD", "StarQuantCompressedTensorsConfig", "StarQuantLinearMethod", "WNA16EmbeddingMethod"]

STARQUANT_METHOD = "starquant"


def _site(prefix: str | None) -> str | None:
    """The SGAT site of a vLLM layer of the model being built (None: not a block's site linear)."""
    if not prefix:
        return None
    from vllm.config import get_current_vllm_config

    return family_of(get_current_vllm_config().model_config.hf_config).vllm_site(prefix)


def _starquant_block(hf_config) -> StarQuantBlock | None:
    block = getattr(hf_config, "starquant_config", None)
    if block is None:
        return None
    return StarQuantBlock.model_validate(block if isinstance(block, dict) else dict(block))


@register_quantization_config(STARQUANT_METHOD)
class StarQuantCompressedTensorsConfig(CompressedTensorsConfig):
    """compressed-tensors + STaR-Quant (SGAT, TAC); see the module docstring."""

    def get_name(self) -> str:
        return STARQUANT_METHOD

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None):
        if hf_config is None or hf_quant_cfg.get("quant_method") != "compressed-tensors":
            return None
        if user_quant not in (None, STARQUANT_METHOD):
            return None
        if getattr(hf_config, "starquant_config", None) is not None:
            return STARQUANT_METHOD
        # Plain compressed-tensors checkpoints of a family served here, with int4 weights and
        # quantized activations: on CPU vLLM would run them unquantized activations (see the module docstring).
        groups = (hf_quant_cfg.get("config_groups") or {}).values()
        if getattr(hf_config, "model_type", None) in known_model_types() and any(
            _int4_weights_with_activations(g.get("weights"), g.get("input_activations")) for g in groups
        ):
            return STARQUANT_METHOD
        return None

    def _get_scheme_from_parts(self, weight_quant, input_quant, output_quant=None, format=None, layer_name=None):
        # int4 weights with int4 activations on CPU: vLLM's int4-activation scheme (WNA4Int) has GPU
        # kernels only. The W4A8 scheme (`int-quantized`: W4A8Int; `pack-quantized`: WNA8Int) holds the
        # same int4 weights; `StarQuantLinearMethod` repacks them and feeds the packed-int4 GEMM
        # 4-bit activation codes (SGAT's, or plain per-token ones), so the integer math is W4A4's.
        if not torch.cuda.is_available() and _int4_weights_with_activations(weight_quant, input_quant, bits=4):
            input_quant = input_quant.model_copy(update={"num_bits": 8})
        return super()._get_scheme_from_parts(weight_quant, input_quant, output_quant, format, layer_name)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        method = super().get_quant_method(layer, prefix)
        if type(method) is CompressedTensorsEmbeddingWNA16Int:  # adds the CPU lookup
            return WNA16EmbeddingMethod(self.get_scheme_dict(layer, layer_name=prefix)["weights"])
        if not isinstance(method, LinearMethodBase):
            return method
        from vllm.config import get_current_vllm_config

        config = get_current_vllm_config().model_config.hf_config
        if not hasattr(self, "_starquant"):  # parsed once, not once per layer
            self._starquant = _starquant_block(config)
        site = _site(prefix)
        block = self._starquant if site is not None else None
        scheme = self.get_scheme_dict(layer, layer_name=prefix) or {}
        weights, activations = scheme.get("weights"), scheme.get("input_activations")
        cpu_int4 = not torch.cuda.is_available() and _int4_weights_with_activations(weights, activations)
        if block is None and not cpu_int4:
            return method
        if activations is not None and not (activations.dynamic and enum_value(activations.strategy) == "token"):
            raise ValueError(
                f"{prefix}: STaR-Quant needs dynamic per-token activation quantization, got "
                f"strategy={activations.strategy} dynamic={activations.dynamic}"
            )
        return StarQuantLinearMethod(
            method,
            block,
            activation_bits=activations.num_bits if activations is not None else None,
            tac=block is not None and block.tac is not None and site == family_of(config).tac_site,
            # Where D could not be folded upstream, as the checkpoint records it.
            online_smoothing=block is not None and block.sgat is not None and site in block.sgat.online_sites(config),
        )



def _int4_weights_with_activations(weights, activations, bits: int | None = None) -> bool:
    """int4 weights with dynamic per-token int activations (of `bits` bits, if given); the
    arguments are compressed-tensors `QuantizationArgs` or their dicts (a config group's)."""
    if weights is None or activations is None:
        return False
    get = (lambda args, key: args.get(key)) if isinstance(weights, dict) else getattr
    return (
        enum_value(get(weights, "type")) == "int" and get(weights, "num_bits") == 4
        and enum_value(get(activations, "type")) == "int" and bool(get(activations, "dynamic"))
        and enum_value(get(activations, "strategy")) == "token" and (bits is None or get(activations, "num_bits") == bits)
    )


class WNA16EmbeddingMethod(CompressedTensorsEmbeddingWNA16Int):
    """vLLM's weight-only int (WNA16) embedding, with a torch lookup where its Triton kernel does
    not run (CPU): gather the packed rows of the batch's ids, unpack them with compressed-tensors'
    own `unpack_from_int32`, scale per row (channel) or per group. Weights stay packed."""

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        if input_.is_cuda:
            return super().embedding(layer, input_)
        ids = input_.reshape(-1)
        hidden, scale = layer.hidden_size, layer.weight_scale[ids]  # [n, groups]
        codes = unpack_from_int32(layer.weight_packed[ids], self.num_bits, torch.Size((ids.numel(), hidden)))
        rows = codes.view(ids.numel(), scale.shape[1], -1).to(scale.dtype) * scale[..., None]
        return rows.reshape(*input_.shape, hidden)


def _sharded_loader(dim: int):
    """Loads this rank's slice along `dim` (row-parallel inputs are split across ranks)."""

    def load(param: Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.shape[dim]
        if loaded.shape[dim] % size:
            raise ValueError(f"STaR-Quant tensor of shape {tuple(loaded.shape)} cannot be split into slices of {size}")
        param.data.copy_(loaded.narrow(dim, get_tensor_model_parallel_rank() * size, size))

    return load


def _output_shard(layer, shard_id, width: int) -> tuple[int, int, int]:
    """(offset in the local fused output, size, index of the rank's slice in the loaded tensor)."""
    if isinstance(layer, QKVParallelLinear):
        q_size, kv_size = layer.num_heads * layer.head_size, layer.num_kv_heads * layer.head_size
        if shard_id == "q":
            return 0, q_size, layer.tp_rank
        kv_index = layer.tp_rank // layer.num_kv_head_replicas
        return (q_size if shard_id == "k" else q_size + kv_size), kv_size, kv_index
    if isinstance(layer, MergedColumnParallelLinear):
        sizes = [size // layer.tp_size for size in layer.output_sizes]
        return sum(sizes[:shard_id]), sizes[shard_id], layer.tp_rank
    return 0, width, layer.tp_rank


def _compensation_loader(layer):
    # A weak reference: the loader lives on the layer's own parameter, and a strong one would
    # keep the layer (and its kernels' weights) alive past the model.
    layer = weakref.proxy(layer)

    def load(param: Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if isinstance(layer, RowParallelLinear):
            param.data.copy_(loaded)  # output not split; added once (rank 0)
            return
        shard_id = shard_id if shard_id is not None else getattr(loaded, "shard_id", None)
        offset, size, index = _output_shard(layer, shard_id, param.shape[1])
        param.data[:, offset:offset + size].copy_(loaded.narrow(1, index * size, size))

    return load


def _replicated_loader(param: Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    # Fused column layers get the same tensor once per part (q/k/v share one SGAT site).
    param.data.copy_(loaded)


@register_weight_loader_v2_supported_method
class StarQuantLinearMethod(LinearMethodBase):
    """A compressed-tensors (or unquantized) linear method with SGAT/TAC around it (`block`: the
    checkpoint's starquant_config at an SGAT site, None elsewhere), and on CPU the packed int4
    GEMM for int4 weights with quantized activations."""

    def __init__(self, inner: LinearMethodBase, block: StarQuantBlock | None, activation_bits: int | None,
                 tac: bool, online_smoothing: bool):
        self.inner = inner
        self.block = block
        self.activation_bits = activation_bits
        self.sgat = block is not None and block.sgat is not None
        self.tac = tac
        self.online_smoothing = online_smoothing and self.sgat

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        self.inner.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                                  output_size, params_dtype, **extra_weight_attrs)
        self.params_dtype = params_dtype
        row_parallel = isinstance(layer, RowParallelLinear)
        input_loader = _sharded_loader(1) if row_parallel else _replicated_loader

        def add(name: str, shape: tuple, loader) -> None:
            param = Parameter(torch.zeros(shape, dtype=torch.float32), requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(param, {"weight_loader": loader})

        if self.sgat:
            width = input_size_per_partition
            self.rotation_block = rotation_block_for(input_size, self.block.sgat.rotation_block_size)
            if self.rotation_block and width % self.rotation_block:
                raise ValueError(
                    f"{layer.prefix}: tensor-parallel input slice {width} is not a multiple of the SGAT rotation "
                    f"block {self.rotation_block}"
                )
            add("sgat_shift", (2, width), input_loader)
            add("sgat_clip", (2,), _replicated_loader)
            add("sgat_compensation", (2, sum(output_partition_sizes)), _compensation_loader(layer))
            if self.online_smoothing:
                add("sgat_smoothing", (width,), _sharded_loader(0) if row_parallel else _replicated_loader)
        if self.tac:
            b, buckets = self.block.tac.block_size, self.block.tac.num_buckets
            if input_size_per_partition % b:
                raise ValueError(f"{layer.prefix}: TAC block {b} does not divide the input slice {input_size_per_partition}")
            add("tac_matrices", (buckets, input_size_per_partition // b, b, b), _sharded_loader(1))
            add("tac_offsets", (buckets, input_size_per_partition), _sharded_loader(1))
            edges = torch.tensor(self.block.tac.edges, dtype=torch.float32)  # from config.json, not the weights
            layer.register_buffer("tac_bucket_edges", edges, persistent=False)

    def process_weights_after_loading(self, layer) -> None:
        int4 = _pack_cpu_int4(layer) if self.activation_bits in (4, 8) else None
        self.int4_group, int4_layout = int4 if int4 is not None else (None, None)
        scheme = type(getattr(layer, "scheme", None)).__name__
        if self.int4_group is None and not layer_is_cuda(layer) and (
            self.activation_bits == 4 or scheme in _WEIGHT_ONLY_KERNEL_ON_CPU
        ):
            # W4A4: vLLM's W4A8 kernel would quantize 4-bit codes again to 8 bits (W4A8, not W4A4).
            # pack-quantized int4: vLLM's CPU kernel for those schemes does not quantize activations.
            raise ValueError(
                f"{layer.prefix}: int4 weights with {self.activation_bits}-bit activations on CPU need the packed int4 "
                f"GEMM (group size in {INT4_CPU_GROUPS}, output width a multiple of 8, input width a multiple of "
                "64); this layer does not fit it"
            )
        amx_int8 = self.int4_group is None and self.sgat and self.activation_bits == 8 and _pack_amx_int8(layer)
        if self.int4_group is None and not amx_int8:
            self.inner.process_weights_after_loading(layer)
        self.add_compensation = not isinstance(layer, RowParallelLinear) or layer.tp_rank == 0
        self.int8_codes_gemm = _codes_int8_kernel(layer) if self.sgat and self.activation_bits == 8 and not amx_int8 \
            else None
        # Which integer GEMM takes this layer's codes (None: vLLM's own method, on what SGAT hands it).
        self.codes_gemm = int4_layout or ("starquant_amx_int8" if amx_int8 else _int8_kernel_name(self.int8_codes_gemm))
        # The AMX GEMMs take bf16 codes (the int4 one with its sentinel group): our quantize op writes them so.
        self.codes_pad = {"amx_int4": self.int4_group, "amx_int8": 0}.get(self.codes_gemm) \
            if self.params_dtype == torch.bfloat16 else None
        if self.int4_group is not None and not self.sgat:  # plain per-token codes: the same op, no shift or clip
            self.plain_shift = torch.zeros(2, layer.input_size_per_partition)
            self.plain_clip = torch.ones(2)
        if (self.sgat and self.activation_bits is not None and self.codes_gemm is None
                and self.params_dtype == torch.bfloat16):
            _warn_inexact_codes_once(layer.prefix)
        # Loaded in float32; the tensors applied to activations take the model's dtype once, here.
        # sgat_quantize keeps the shift and clip in float32 (it computes in float32); TAC takes
        # `matmul_dtype` (float32 on a CPU without units for the model's dtype).
        for name in ("tac_matrices", "tac_offsets", "sgat_smoothing", "sgat_compensation"):
            param = getattr(layer, name, None)
            if param is not None:
                dtype = matmul_dtype(self.params_dtype, param.device.type) if name.startswith("tac_") else self.params_dtype
                param.data = param.data.to(dtype)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        context = current_token_context() if self.tac or self.sgat else None
        if self.tac:
            buckets = context.buckets(layer.tac_bucket_edges)
            x = torch.ops.starquant.tac(x, buckets, layer.tac_matrices, layer.tac_offsets)
        if self.sgat:
            if self.online_smoothing:
                x = x * layer.sgat_smoothing
            if self.activation_bits is not None:
                codes, scales = _quantize(x, context.states, layer.sgat_shift, layer.sgat_clip, self.rotation_block,
                                          self.activation_bits, self.codes_pad)
                if self.codes_gemm is not None:
                    compensation = layer.sgat_compensation if self.add_compensation else None
                    if self.codes_gemm == "starquant_amx_int8":
                        shape = codes.shape
                        output = torch.ops.starquant.int8_mm(
                            codes.reshape(-1, shape[-1]), layer.starquant_int8, layer.starquant_int8_scales, scales,
                            compensation, context.states if compensation is not None else None, bias, x.dtype)
                        return output.reshape(*shape[:-1], output.shape[-1])
                    if self.int4_group is not None:
                        return _int4_codes_gemm(layer, self.int4_group, self.codes_gemm, codes, scales, bias, x.dtype,
                                                compensation, context.states)
                    return _int8_codes_gemm(self.int8_codes_gemm, layer, codes, scales, bias, x.dtype, compensation,
                                            context.states)
                x = (codes.float() * scales).to(x.dtype)
            else:
                site = SGATSite(torch.ones_like(layer.sgat_shift[0]), layer.sgat_shift, layer.sgat_clip, self.rotation_block)
                x = sgat_transform_input(x, context.states, site)
        elif self.int4_group is not None:  # plain per-token activation codes (no SGAT here)
            states = torch.zeros(x.shape[:-1].numel(), dtype=torch.long)
            codes, scales = _quantize(x, states, self.plain_shift, self.plain_clip, 0, self.activation_bits,
                                      self.codes_pad)
            return _int4_codes_gemm(layer, self.int4_group, self.codes_gemm, codes, scales, bias, x.dtype)
        output = self.inner.apply(layer, x, bias)
        if self.sgat and self.add_compensation:
            output = output + layer.sgat_compensation[context.states]
        return output


def _quantize(x, states, shift, clip, rotation_block: int, bits: int, codes_pad: int | None):
    """`sgat_quantize`'s int8 codes, or with `codes_pad` set the bf16 codes of `sgat_quantize_padded`."""
    if codes_pad is None:
        return torch.ops.starquant.sgat_quantize(x, states, shift, clip, rotation_block, bits)
    return torch.ops.starquant.sgat_quantize_padded(x, states, shift, clip, rotation_block, bits, codes_pad)


class InexactCodesWarning(UserWarning):
    """SGAT's codes reach this layer's integer kernel as bf16 values `codes * scales`, which the
    kernel re-quantizes: bf16's 8 significant bits move about 1.3% of the codes (those above ~64
    in magnitude) by one step, so the served model is not exactly the checkpoint's quantized model.
    Serving in float16 or float32 recovers every code exactly."""


_warned_inexact_codes = False


def _warn_inexact_codes_once(prefix: str) -> None:
    global _warned_inexact_codes
    if not _warned_inexact_codes:
        _warned_inexact_codes = True
        warnings.warn(InexactCodesWarning(f"{prefix} (and any like it): " + " ".join(InexactCodesWarning.__doc__.split())),
                      stacklevel=2)


def _codes_int8_kernel(layer):
    """vLLM's CPU int8 kernel of a W8A8 layer with dynamic symmetric inputs that can take SGAT's
    codes: its oneDNN GEMM (codes and scales as they are), or its AMX GEMM where every state's
    clip is at most 1 (see `_int8_codes_gemm`); None elsewhere (GPU, other kernels)."""
    kernel = getattr(getattr(layer, "scheme", None), "kernel", None)
    if type(kernel).__name__ != "CPUInt8ScaledMMLinearKernel" or not kernel.config.input_symmetric:
        return None
    method = getattr(kernel, "linear_method", None)
    if method == getattr(kernel, "_apply_weights_onednn", None):
        return kernel
    if method == getattr(kernel, "_apply_weights_sgl", None) and bool((layer.sgat_clip <= 1).all()):
        return kernel
    return None


def _pack_amx_int8(layer) -> bool:
    """Repack a CPU W8A8 layer's int8 weights for our AMX GEMM (`starquant::int8_mm`), in place of
    vLLM's processing of them; False (nothing changed) where that GEMM does not apply: no AMX,
    another kernel or scheme, a static input scale, widths it does not take (n a multiple of 32,
    k of 64)."""
    kernel = getattr(getattr(layer, "scheme", None), "kernel", None)
    if (type(kernel).__name__ != "CPUInt8ScaledMMLinearKernel" or not kernel.config.input_symmetric
            or kernel.config.is_static_input_scheme or not ops.int8_amx()):
        return False
    weight_name, scale_name, *_ = kernel.layer_param_names
    weight, scale = getattr(layer, weight_name).data, getattr(layer, scale_name).data
    n, k = weight.shape
    if weight.dtype != torch.int8 or n % 32 or k % 64:
        return False
    if scale.numel() != n:  # per-tensor scales of a fused layer (q/k/v, gate/up): one per output channel
        from vllm.model_executor.layers.quantization.utils.w8a8_utils import convert_to_channelwise

        scale = convert_to_channelwise(scale, layer.logical_widths)
    layer.register_parameter("starquant_int8", Parameter(ops.pack_int8_amx(weight), requires_grad=False))
    layer.register_parameter("starquant_int8_scales",
                             Parameter(scale.reshape(-1).float().contiguous(), requires_grad=False))
    layer._parameters[weight_name] = None  # vLLM's copy: never read on this path
    return True


def _int8_kernel_name(kernel) -> str | None:
    if kernel is None:
        return None
    return "amx_int8" if kernel.linear_method == getattr(kernel, "_apply_weights_sgl", None) else "onednn_int8"


def _int8_codes_gemm(kernel, layer, codes: torch.Tensor, scales: torch.Tensor, bias, dtype,
                     compensation: torch.Tensor | None, states: torch.Tensor) -> torch.Tensor:
    """The kernel's GEMM on int8 codes [..., k] with per-token scales [..., 1], plus SGAT's
    per-state `compensation` [2, n] (None: not on this rank) added in place.

    oneDNN: codes and scales straight in (its quantize step skipped). AMX (`int8_scaled_mm_with_quant`,
    which quantizes its bf16/fp16 input per token itself): the codes go in as 16-bit integers; with
    clips <= 1 every row's largest code is +-127 (or the row is all zero), so its quantizer
    recovers them exactly with scale 1, and the per-token scales multiply its 16-bit output (one
    more rounding than a fused epilogue)."""
    from vllm import _custom_ops as vllm_ops

    shape = codes.shape
    codes = codes.reshape(-1, shape[-1]).contiguous()
    if getattr(kernel, "linear_method", None) == getattr(kernel, "_apply_weights_sgl", None):
        weight, weight_scale, *_ = kernel._get_layer_params(layer)
        output = torch.ops._C.int8_scaled_mm_with_quant(codes.to(dtype), weight, weight_scale, None, dtype, True)
        # One pass: the per-token scales, then the compensation.
        torch.ops.starquant.add_state_rows(output, scales, compensation, states if compensation is not None else None)
        if bias is not None:
            output += bias
        return output.reshape(*shape[:-1], output.shape[-1])
    *_, azp_adj = kernel._get_layer_params(layer)
    output = torch.empty((codes.shape[0], kernel.dnnl_handler.n), dtype=dtype, device=codes.device)
    vllm_ops.onednn_scaled_mm(kernel.dnnl_handler, codes, output, scales.reshape(-1, 1).float().contiguous(),
                              None, azp_adj, bias)
    if compensation is not None:
        torch.ops.starquant.add_state_rows(output, None, compensation, states)
    return output.reshape(*shape[:-1], kernel.dnnl_handler.n)


# int4-weight schemes whose CPU kernel (vLLM's CPUWNA16) ignores the activation quantization.
_WEIGHT_ONLY_KERNEL_ON_CPU = ("CompressedTensorsWNA8Int", "CompressedTensorsWNA4Int")


def layer_is_cuda(layer) -> bool:
    return any(p.is_cuda for p in layer.parameters(recurse=False))


def _pack_cpu_int4(layer) -> tuple[int, str] | None:
    """Repack a CPU layer's int4 weights for our int4 GEMM, freeing vLLM's copies; returns the
    group size and the GEMM (`int4_layout`), or None where this path does not apply (GPU, another
    scheme, unsupported shapes) and vLLM's kernel is kept. The weights come as vLLM's W4A8Int holds them (`int-quantized`:
    int8 values in [-8, 7]) or as WNA8Int does (`pack-quantized`: eight values per int32,
    unpacked with compressed-tensors' own `unpack_from_int32`).

    On AMX CPUs the GEMM is ours (`starquant::int4_amx_mm`, `ops.pack_int4_amx`, groups of 64-256) or
    vLLM's AMX W4A8 kernel (`int4_scaled_mm_cpu`, AWQ-blocked weights, groups of 32),
    with one zero-weight group appended (see `_int4_codes_gemm`); on AVX512-VNNI or AVX2 CPUs
    `starquant::int4_mm` (`ops.pack_int4_vnni`, float32 group scales); elsewhere torch's
    `_weight_int4pack_mm_for_cpu` (two values per byte, bf16 group scales)."""
    scheme = getattr(layer, "scheme", None)
    kernel = type(getattr(scheme, "kernel", None)).__name__
    name = type(scheme).__name__
    if not (name == "CompressedTensorsW4A8Int" and kernel == "Dynamic4bitLinearKernel"
            or name == "CompressedTensorsWNA8Int" and kernel == "CPUWNA16LinearKernel" and scheme.num_bits == 4):
        return None
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    weight, weight_scale = layer.weight_packed.data, layer.weight_scale.data
    if weight.dtype == torch.int32:
        n, k = weight.shape[0], weight.shape[1] * 8
        weight = unpack_from_int32(weight, 4, torch.Size((n, k)))
    n, k = weight.shape
    group = k // weight_scale.shape[1]
    if group not in INT4_CPU_GROUPS or group * weight_scale.shape[1] != k or n % 8 or k % 64:
        return None
    for name in ("weight", "weight_packed", "weight_scale", "weight_shape", "weight_zero_point"):
        if name in layer._parameters:
            layer._parameters[name] = None
    layout = int4_layout(n, group)
    for name, tensor in pack_int4(weight, weight_scale, group, layout).items():
        layer.register_parameter(name, Parameter(tensor, requires_grad=False))
    return group, layout


# The CPU int4 GEMMs, fastest first (`int4_layout`); `model_info()["codes_gemm"]` names them.
INT4_LAYOUTS = ("starquant_amx_int4", "amx_int4", "vnni_int4", "int4pack")


def int4_layout(n: int, group: int) -> str:
    """The int4 GEMM for a layer of `n` output channels and weight groups of `group` on this CPU:
    ours on AMX (`starquant_amx_int4`, `starquant::int4_amx_mm`: the codes as they are, exact
    int32 sums per group; n a multiple of 32, groups of 64, 128 or 256), vLLM's AMX W4A8 kernel
    (`amx_int4`, other groups; n a multiple of its 32-channel tiles), ours on AVX512-VNNI or AVX2 (`vnni_int4`,
    the weights packed for VNNI dot products, which the AVX2 kernel reads too: 1.8x the bf16 GEMM
    at 512 tokens on an AMD EPYC with AVX512-BF16, docs/performance.md; n a multiple of 32), else
    torch's (`int4pack`)."""
    if ops.int8_amx() and n % 32 == 0 and group in ops.INT4_AMX_GROUPS:
        return "starquant_amx_int4"
    if amx_int4_gemm() and n % AMX_INT4_BLOCK_N == 0:
        return "amx_int4"
    if ops.int4_kernels() and n % 32 == 0:
        return "vnni_int4"
    return "int4pack"


def pack_int4(weight: torch.Tensor, weight_scale: torch.Tensor, group: int, layout: str) -> dict[str, torch.Tensor]:
    """int4 values [n, k] in [-8, 7] and scales [n, k / group] -> the tensors `_int4_codes_gemm`
    reads for `layout` (`INT4_LAYOUTS`): `starquant_int4` and `starquant_int4_scales`, plus
    `starquant_int4_zeros` for the AMX kernel (see `_amx_int4_pack`)."""
    if layout == "amx_int4":
        packed, zeros, scales = _amx_int4_pack(weight, weight_scale, group)
        return {"starquant_int4": packed, "starquant_int4_scales": scales, "starquant_int4_zeros": zeros}
    if layout == "starquant_amx_int4":
        return {"starquant_int4": ops.pack_int4_amx(weight),
                "starquant_int4_scales": weight_scale.float().t().contiguous()}  # [k / group, n]
    if layout == "vnni_int4":
        return {"starquant_int4": ops.pack_int4_vnni(weight),
                "starquant_int4_scales": weight_scale.float().t().contiguous()}  # [k / group, n]
    if layout != "int4pack":
        raise ValueError(f"int4 layout {layout!r}: expected one of {INT4_LAYOUTS}")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((weight.int() + 8).contiguous(), 2)
    scales = weight_scale.t().to(torch.bfloat16)  # [k / group, n]
    # The kernel computes (q - 8) * scale + zero for the stored q = w + 8: zero 0 gives w * scale.
    return {"starquant_int4": packed,
            "starquant_int4_scales": torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()}


# vLLM's AMX W4A8 GEMM blocks the output in tiles of this many channels.
AMX_INT4_BLOCK_N = 32


def amx_int4_gemm() -> bool:
    """Whether vLLM's AMX W4A8 GEMM (`torch.ops._C.int4_scaled_mm_cpu`) runs on this CPU."""
    return hasattr(torch.ops._C, "int4_scaled_mm_cpu") and torch.cpu._is_amx_tile_supported()


def _amx_int4_pack(weight: torch.Tensor, weight_scale: torch.Tensor, group: int):
    """int4 values [n, k] and scales [n, k / group] -> the AMX kernel's blocked weights, zero
    points and scales, as vLLM packs an AWQ layer for it (values stored + 8, zero point 8), with
    one more input group of zero weights (scale 1) for `_int4_codes_gemm`'s sentinel column."""
    from vllm import _custom_ops as vllm_ops
    from vllm.model_executor.layers.quantization.utils.quant_utils import pack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    n, k = weight.shape
    stored = torch.cat([weight.int() + 8, torch.full((n, group), 8, dtype=torch.int32)], 1).t()  # [k + group, n]
    awq_order = stored.reshape(k + group, n // 8, 8)[:, :, (0, 2, 4, 6, 1, 3, 5, 7)].reshape(k + group, n)
    packed = pack_quantized_values_into_int32(awq_order, scalar_types.uint4b8, 1).contiguous()
    zeros = torch.full((k // group + 1, n // 8), 0x88888888 - 2**32, dtype=torch.int32)  # eight 8s per int32
    scales = torch.cat([weight_scale.float(), torch.ones(n, 1)], 1).t().to(torch.bfloat16).contiguous()
    return vllm_ops.convert_weight_packed_scale_zp(packed, zeros, scales, vllm_ops.CPUQuantAlgo.AWQ)


def _int4_codes_gemm(layer, group: int, layout: str, codes: torch.Tensor, scales: torch.Tensor, bias, dtype,
                     compensation: torch.Tensor | None = None, states: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes [..., k] (or, for the AMX kernel, `sgat_quantize_padded`'s bf16 rows [..., k + group])
    with per-token scales [..., 1] times the int4 weights packed for `layout` -> [..., n], plus
    SGAT's per-state `compensation` [2, n] (None: none here). `vnni_int4` takes the int8 codes and
    does the rest in its epilogue; the others take the codes as bf16 (|codes| <= 127: exact). The AMX kernel quantizes its input per row itself (scale = the row's
    |max| / 127): a sentinel 127 in the appended zero-weight group makes that scale exactly 1
    for every row, so it recovers the codes of any bit width and clip, and all-zero rows."""
    shape = codes.shape
    k = shape[-1]
    codes = codes.reshape(-1, k)
    if layout == "starquant_amx_int4":  # the scales, the bias, the compensation and the output dtype in its epilogue
        output = torch.ops.starquant.int4_amx_mm(codes, layer.starquant_int4, layer.starquant_int4_scales, group, scales,
                                                 compensation, states if compensation is not None else None, bias,
                                                 dtype)
        return output.reshape(*shape[:-1], output.shape[-1])
    if layout == "vnni_int4":  # the scales, the compensation and the output dtype in the GEMM's epilogue
        output = torch.ops.starquant.int4_mm(codes, layer.starquant_int4, layer.starquant_int4_scales, group, scales,
                                             compensation, states if compensation is not None else None, dtype)
        if bias is not None:
            output += bias
        return output.reshape(*shape[:-1], output.shape[-1])
    if layout == "amx_int4":
        # `sgat_quantize_padded`'s rows have the sentinel group already; int8 codes get it here.
        rows = codes if codes.dtype == torch.bfloat16 else ops.with_sentinel(codes.to(torch.bfloat16), group)
        output = torch.ops._C.int4_scaled_mm_cpu(rows, layer.starquant_int4, layer.starquant_int4_zeros,
                                                 layer.starquant_int4_scales, None)
    else:
        output = torch.ops.aten._weight_int4pack_mm_for_cpu(codes.to(torch.bfloat16), layer.starquant_int4, group,
                                                            layer.starquant_int4_scales)
    output = output.to(dtype)
    torch.ops.starquant.add_state_rows(output, scales, compensation, states)
    if bias is not None:
        output += bias
    return output.reshape(*shape[:-1], output.shape[-1])
