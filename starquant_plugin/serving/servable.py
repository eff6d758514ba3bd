"""What the vLLM backend can serve, checked in the calling process before an engine starts.

vLLM reports a layer it cannot build from inside a worker ("Engine core initialization failed",
the cause only in the worker's log); these checks name the layer, the sizes and the way out
first. They read a validated checkpoint (`checkpoint.validate_checkpoint`) and import no vLLM.
"""

from ..checkpoint import ValidatedCheckpoint
from ..checkpoint.schemes import PACKED_FORMAT, describe_scheme, unservable_reason
from ..checkpoint.validate import meta_model
from ..errors import InputError
from ..quantization.hadamard import rotation_block_for

__all__ = ["check_servable", "tensor_parallel_problem"]


def check_servable(checkpoint: ValidatedCheckpoint, tensor_parallel_size: int, on_cpu: bool) -> None:
    """InputError naming the layer when the plugin cannot serve a layer's quantization scheme, the
    checkpoint's online rotations (on CPU), or the checkpoint at `tensor_parallel_size` ranks."""
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise InputError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
    sgat_linears = {name.rsplit(".", 1)[0] for name in checkpoint.starquant_shapes if name.endswith(".sgat_shift")}
    model = meta_model(checkpoint.model_config)
    for name, scheme in checkpoint.schemes.items():
        reason = unservable_reason(scheme, sgat_site=name in sgat_linears, on_cpu=on_cpu)
        if reason is None and on_cpu:
            reason = _cpu_int4_shape_problem(scheme, model.get_submodule(name))
        if reason is not None:
            raise InputError(f"{checkpoint.config_path}: quantization_config quantizes {name} as "
                             f"{describe_scheme(scheme)}, which the vLLM backend cannot serve: {reason}")
    if on_cpu and checkpoint.transform_tensors:
        raise InputError(f"{checkpoint.config_path}: quantization_config.transform_config has online rotations; vLLM "
                         "runs them with a CUDA-only kernel and cannot serve them on CPU (use --backend core)")
    problem = tensor_parallel_problem(checkpoint, tensor_parallel_size)
    if problem is not None:
        working = [size for size in range(1, checkpoint.family.heads(checkpoint.model_config)[0] + 1)
                   if tensor_parallel_problem(checkpoint, size) is None]
        raise InputError(f"{checkpoint.config_path}: tensor_parallel_size={tensor_parallel_size}: {problem}; "
                         f"sizes that work: {', '.join(map(str, working))}")


def _cpu_int4_shape_problem(scheme: dict, module) -> str | None:
    """On CPU, int4 weights with quantized activations run torch's packed int4 GEMM (output width a
    multiple of 8, input width of 64); vLLM builds `pack-quantized` ones with a kernel that also
    needs both widths to be multiples of 32 (None: the layer fits)."""
    weights, activations = scheme.get("weights") or {}, scheme.get("input_activations")
    if weights.get("num_bits") != 4 or activations is None:
        return None
    out_features, in_features = module.out_features, module.in_features
    packed = scheme.get("format") == PACKED_FORMAT
    if out_features % (32 if packed else 8) or in_features % 64:
        return (f"the CPU int4 GEMM needs an output width that is a multiple of {32 if packed else 8} and an input "
                f"width that is a multiple of 64, this layer is {in_features} -> {out_features}")
    return None


def tensor_parallel_problem(checkpoint: ValidatedCheckpoint, size: int) -> str | None:
    """Why the served model (the family's vLLM model) cannot be split over `size` ranks (None: it can).

    Heads are split across ranks; the readers of the attention output and of the MLP's
    intermediate (sites `attention_output`, `mlp_output`) are row-parallel, so each rank quantizes
    and rotates a slice of their input: SGAT's rotation block, TAC's block and the weight
    quantization group must tile that slice.
    """
    config, family = checkpoint.model_config, checkpoint.family
    heads, kv_heads, _ = family.heads(config)
    if heads % size:
        return f"num_attention_heads={heads} is not divisible by {size}"
    if kv_heads % size and size % kv_heads:
        return f"num_key_value_heads={kv_heads} and {size} do not divide one another"
    block = checkpoint.starquant
    first = meta_model(config).get_submodule(family.block_prefix(0))
    for site in ("attention_output", "mlp_output"):
        (linear,) = family.sgat_sites[site].linears
        width = first.get_submodule(linear).in_features
        layer = f"{family.block_prefix(0)}.{linear} (and every block's)"
        if width % size:
            return f"{layer} input width {width} is not divisible by {size}"
        part = width // size
        if block is not None and block.sgat is not None:
            rotation = rotation_block_for(width, block.sgat.rotation_block_size)
            if rotation and part % rotation:
                return (f"{layer} input slice {part} ({width} / {size}) is not a multiple of its SGAT rotation "
                        f"block {rotation}")
        if block is not None and block.tac is not None and site == family.tac_site and part % block.tac.block_size:
            return (f"{layer} input slice {part} ({width} / {size}) is not a multiple of the TAC block "
                    f"{block.tac.block_size}")
        weights = (checkpoint.schemes.get(f"{family.block_prefix(0)}.{linear}") or {}).get("weights") or {}
        group = weights.get("group_size") if weights.get("strategy") == "group" else None
        if group and part % group:
            return (f"{layer} input slice {part} ({width} / {size}) is not a multiple of its weight quantization "
                    f"group {group}")
    return None
