"""Validate a checkpoint directory of a registered model family before any model is built.

Shared by the core loader (`starquant_plugin.load`) and the vLLM backend (`serving.engine`), so
that a corrupted checkpoint is refused the same way on both, in the calling process, with one
`InputError` naming the file and the tensor or field. What is checked is listed in
docs/checkpoint-format.md ("What is validated when a checkpoint is loaded"). Tensors are read
from the safetensors headers only; the expected names and shapes come from the model built on
the meta device, with transformers' compressed-tensors quantizer applied as when loading.
"""

import contextlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from pydantic import ValidationError
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import InputError
from ..models.family import ModelFamily, family_of
from ..models.loading import load_tokenizer, read_model_config
from .config import StarQuantConfig, describe_validation_error
from .loader import online_transform_config, parse_starquant_config, transform_suffixes
from .schema import STARQUANT_SUFFIXES, starquant_tensor_shapes

__all__ = ["StoredTensor", "ValidatedCheckpoint", "read_safetensors_header", "validate_checkpoint"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Bytes per element of the safetensors dtype codes (sub-byte and exotic codes are not size-checked).
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
# Parameters compressed-tensors adds next to a quantized module's weight.
_QUANTIZATION_SUFFIXES = (
    "weight_scale", "weight_zero_point", "weight_g_idx", "weight_packed", "weight_shape", "weight_global_scale",
    "input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
)
_SPECIAL_IDS = ("mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id")


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as its safetensors header describes it."""

    file: Path
    dtype: str  # safetensors dtype code: F32, BF16, I8, ...
    shape: tuple[int, ...]
    offset: int = 0  # where its bytes start in the file


@dataclass
class ValidatedCheckpoint:
    """What validation read, for the loaders to use without reading it again.

    Attributes:
        config: config.json as parsed.
        model_config: the family's config built from it (`family`: its model family).
        starquant: the parsed `starquant_config` block (None for other checkpoints).
        tokenizer: the checkpoint's tokenizer (left padding, a pad id set); None where not asked for.
        tensors: stored tensor name -> header entry, over every weight file.
        schemes: quantized module name -> its compressed-tensors scheme, as config.json writes it.
        starquant_shapes: STaR-Quant tensor name -> shape (attached after loading, not by transformers).
        transform_tensors: stored online-transform matrices (attached after loading, not by transformers).
        packed_shapes: `pack-quantized` module name -> its weight's (out, in) shape, which the stored
            `weight_shape` must hold (the packed tensor alone does not say how many values it holds).
    """

    directory: Path
    config: dict
    model_config: PreTrainedConfig
    starquant: StarQuantConfig | None
    tokenizer: PreTrainedTokenizerBase | None
    tensors: dict[str, StoredTensor]
    schemes: dict[str, dict] = field(default_factory=dict)
    starquant_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    transform_tensors: frozenset[str] = frozenset()
    packed_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.directory / "config.json"

    @property
    def weights_path(self) -> Path:
        """The index of a sharded checkpoint, else its single weight file."""
        index = self.directory / INDEX_FILE
        return index if index.is_file() else self.directory / SINGLE_FILE

    @property
    def quantized(self) -> bool:
        return self.config.get("quantization_config") is not None

    @property
    def family(self) -> ModelFamily:
        return family_of(self.model_config)


def validate_checkpoint(directory: str | Path, with_tokenizer: bool = True) -> ValidatedCheckpoint:
    """Check a checkpoint directory (and its tokenizer, unless `with_tokenizer` is False) without
    building a model in memory; InputError naming the file and the tensor or field otherwise."""
    directory = Path(directory)
    config = read_model_config(directory)
    config_path = directory / "config.json"
    model_config = _model_config(directory, config_path)
    _check_special_ids(model_config, config_path)
    starquant = parse_starquant_config(config, config_path)
    tokenizer = _tokenizer(directory, config, model_config) if with_tokenizer else None
    tensors = _read_weight_headers(directory)
    checkpoint = ValidatedCheckpoint(directory, config, model_config, starquant, tokenizer, tensors)
    expected = _expected_tensors(checkpoint)
    _compare(checkpoint, expected)
    _check_packed_shapes(checkpoint)
    return checkpoint


def _tokenizer(directory: Path, config: dict, model_config: PreTrainedConfig) -> PreTrainedTokenizerBase:
    tokenizer = load_tokenizer(directory)
    rows = meta_model(model_config).get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise InputError(
            f"{directory}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows "
            "(config.json): its ids would index past the embedding"
        )
    if tokenizer.pad_token_id is None:
        # Padding is hidden by the attention mask, so any id serves; prefer the config's.
        tokenizer.pad_token_id = config.get("pad_token_id", config.get("eos_token_id"))
    return tokenizer


def meta_model(model_config: PreTrainedConfig) -> PreTrainedModel:
    """The family's transformers model for `model_config`, on the meta device (no memory)."""
    with torch.device("meta"):
        return family_of(model_config).model_class(model_config)


def _model_config(directory: Path, config_path: Path) -> PreTrainedConfig:
    try:
        return family_of(json.loads(config_path.read_text())).config_class.from_pretrained(directory)
    except (ValueError, TypeError) as error:
        raise InputError(f"{config_path}: {error}".splitlines()[0]) from None


def _check_special_ids(model_config: PreTrainedConfig, config_path: Path) -> None:
    """Special ids must index the vocabulary: an out-of-range mask id never matches a token, so
    every position would read as unmasked."""
    vocab = model_config.vocab_size
    for name in _SPECIAL_IDS:
        value = getattr(model_config, name, None)
        if value is None and name != "mask_token_id":
            continue
        for one in value if isinstance(value, list) else [value]:
            if isinstance(one, bool) or not isinstance(one, int):
                raise InputError(f"{config_path}: {name}={one!r} must be an integer token id")
            if not 0 <= one < vocab:
                raise InputError(f"{config_path}: {name}={one} is outside the vocabulary [0, {vocab}) (vocab_size)")


def read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file's header describes, after checking that the file is as long
    as the header says (a truncated or zero-byte file is refused here, naming it)."""
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: empty file (0 bytes); the checkpoint was not written completely")
    with path.open("rb") as file:
        prefix = file.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if length is None or 8 + length > size:
            raise InputError(f"{path}: not a complete safetensors file ({size} bytes, too short for its header); "
                             "truncated, or not safetensors")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    tensors, end = {}, 0
    for name, entry in header.items():
        try:
            dtype, shape, (start, stop) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: tensor {name}: malformed safetensors header entry") from None
        itemsize = _DTYPE_BYTES.get(dtype)
        if itemsize is not None and stop - start != math.prod(shape) * itemsize:
            raise InputError(f"{path}: tensor {name}: its byte range does not match shape {shape} and dtype {dtype}")
        tensors[name] = StoredTensor(path, dtype, shape, 8 + length + int(start))
        end = max(end, stop)
    if size != 8 + length + end:
        state = "truncated" if size < 8 + length + end else "longer than its header describes"
        raise InputError(f"{path}: {state}: the file has {size} bytes, its header describes {8 + length + end}")
    return tensors


def _read_weight_headers(directory: Path) -> dict[str, StoredTensor]:
    """Every stored tensor of a single-file or sharded checkpoint, the index checked against the shards."""
    index, single = directory / INDEX_FILE, directory / SINGLE_FILE
    if index.is_file() and single.is_file():
        raise InputError(f"{directory}: holds both {SINGLE_FILE} and {INDEX_FILE} (transformers reads the first, "
                         "vLLM the second); keep one")
    if not index.is_file():
        _check_inside(directory, single, single)
        strays = sorted(p.name for p in directory.glob("*.safetensors") if p.name != SINGLE_FILE)
        if strays:  # vLLM reads every *.safetensors of an unindexed directory
            raise InputError(f"{directory / strays[0]}: a weight file beside {SINGLE_FILE} without an index; remove it")
        return read_safetensors_header(single)
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise InputError(f"{index}: not a JSON object with a weight_map") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index}: weight_map is missing or empty")
    headers: dict[str, dict[str, StoredTensor]] = {}
    for tensor, name in weight_map.items():
        if name not in headers:
            headers[name] = read_safetensors_header(_shard_path(directory, index, tensor, name))
        if tensor not in headers[name]:
            raise InputError(f"{index}: weight_map puts {tensor} in {name}, which does not hold it")
    tensors: dict[str, StoredTensor] = {}
    for name, held in headers.items():
        for tensor, stored in held.items():
            if weight_map.get(tensor) != name:  # transformers and vLLM read whole shards, not the map
                raise InputError(f"{stored.file}: holds {tensor}, which {INDEX_FILE} does not place in this shard")
            tensors[tensor] = stored
    return tensors


def _shard_path(directory: Path, index: Path, tensor: str, name) -> Path:
    """The shard a weight_map entry names: a .safetensors file inside the checkpoint directory."""
    where = f"{index}: weight_map[{tensor!r}] = {name!r}"
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: not a file name")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
        raise InputError(f"{where}: shards must be files inside {directory}")
    if not name.endswith(".safetensors"):
        raise InputError(f"{where}: not a .safetensors file (only safetensors are read, never pickles)")
    path = directory / name
    if not path.is_file():
        raise InputError(f"{where}: the shard does not exist")
    _check_inside(directory, path, index)
    return path


def _check_inside(directory: Path, path: Path, source: Path) -> None:
    """A weight file (followed through symlinks) must lie inside the checkpoint directory, or, in a
    Hugging Face cache snapshot (`.../snapshots/REV/`), in that repository's `blobs/`."""
    if not path.is_file():
        return  # read_model_config has named what is missing
    target, root = path.resolve(), directory.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(target.is_relative_to(place) for place in allowed):
        raise InputError(f"{source}: {path.name} resolves to {target}, outside the checkpoint directory {directory}")


def _expected_tensors(checkpoint: ValidatedCheckpoint) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor the checkpoint must hold; fills the checkpoint's
    `schemes`, `starquant_shapes` and `transform_tensors`."""
    model = meta_model(checkpoint.model_config)
    checkpoint.starquant_shapes = starquant_tensor_shapes(model, checkpoint.starquant, checkpoint.config_path)
    if checkpoint.quantized:
        quantizer = _quantizer(checkpoint)
        with _no_progress_bars():
            quantizer.preprocess_model(
                model=model, dtype=torch.float32, device_map=None, checkpoint_files=None, use_kernels=False
            )
        checkpoint.schemes = {
            name: module.quantization_scheme.model_dump(mode="json")
            for name, module in model.named_modules()
            if getattr(module, "quantization_scheme", None) is not None
        }
        _check_activation_schemes(checkpoint)
        checkpoint.packed_shapes = {
            name: _weight_shape(module) for name, module in model.named_modules() if hasattr(module, "weight_packed") and hasattr(module, "weight_shape")
        }
    expected = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in model.state_dict().items()}
    online = online_transform_config(checkpoint.config, checkpoint.config_path)
    if online is not None:
        from compressed_tensors.transform import apply_transform_config

        rotated = meta_model(checkpoint.model_config)
        with _no_progress_bars():
            apply_transform_config(rotated, online)
        suffixes = transform_suffixes(online)
        transforms = {n: p for n, p in rotated.named_parameters() if any(s in n for s in suffixes)}
        checkpoint.transform_tensors = frozenset(transforms)
        expected.update({name: (tuple(p.shape), p.dtype) for name, p in transforms.items()})
    expected.update({name: (shape, torch.float32) for name, shape in checkpoint.starquant_shapes.items()})
    return expected


@contextlib.contextmanager
def _no_progress_bars():
    # compressed-tensors draws progress bars (on stderr, no switch) for this meta-device pass of a
    # few milliseconds; a refused checkpoint should print its one error line only.
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _quantizer(checkpoint: ValidatedCheckpoint):
    """transformers' compressed-tensors quantizer for the checkpoint's `quantization_config`."""
    from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    block = checkpoint.config["quantization_config"]
    where = f"{checkpoint.config_path}: quantization_config"
    if not isinstance(block, dict) or block.get("quant_method") != "compressed-tensors":
        found = block.get("quant_method") if isinstance(block, dict) else block
        raise InputError(f"{where}.quant_method is {found!r}; only compressed-tensors checkpoints are read")
    try:
        quantizer = CompressedTensorsHfQuantizer(CompressedTensorsConfig.from_dict(block), pre_quantized=True)
    except ValidationError as error:
        raise InputError(f"{where}.{describe_validation_error(error)}") from None
    except (ValueError, TypeError, KeyError) as error:
        raise InputError(f"{where}: {error}".splitlines()[0]) from None
    quantizer.validate_environment(device_map=None, weights_only=True)
    return quantizer


def _check_activation_schemes(checkpoint: ValidatedCheckpoint) -> None:
    """Both loaders quantize activations per token, dynamically, to integers (the core's runtime,
    the plugin's vLLM method); another activation scheme would be computed differently than written."""
    from .schemes import describe_scheme

    for name, scheme in checkpoint.schemes.items():
        activations = scheme.get("input_activations")
        if activations is None:
            continue
        if activations.get("type") != "int" or not activations.get("dynamic") or activations.get("strategy") != "token":
            raise InputError(
                f"{checkpoint.config_path}: quantization_config quantizes {name} as {describe_scheme(scheme)}; "
                "only dynamic per-token integer activation quantization is supported"
            )


def _compare(checkpoint: ValidatedCheckpoint, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """One InputError for the first difference between the stored and the expected tensors, the
    config-level causes (no quantization_config, an `ignore` list that does not match) named first."""
    stored, source = checkpoint.tensors, checkpoint.weights_path
    quantization_parameters = sorted(n for n in stored if n.rsplit(".", 1)[-1] in _QUANTIZATION_SUFFIXES)
    if quantization_parameters and not checkpoint.quantized:
        name = quantization_parameters[0]
        raise InputError(f"{stored[name].file}: holds quantized tensors ({name}) but {checkpoint.config_path} "
                         "has no quantization_config")
    for name in sorted(set(stored) - set(expected), key=lambda n: (n.rsplit(".", 1)[-1] not in STARQUANT_SUFFIXES, n)):
        module, suffix = name.rsplit(".", 1) if "." in name else ("", name)
        if suffix in STARQUANT_SUFFIXES:
            raise InputError(
                f"{stored[name].file}: STaR-Quant tensors the starquant_config does not account for: {name}"
            )
        if suffix in _QUANTIZATION_SUFFIXES and module not in checkpoint.schemes:
            raise InputError(f"{stored[name].file}: {name} is a quantization parameter but quantization_config does "
                             f"not quantize {module} (it is in ignore, or no config group targets it)")
        raise InputError(f"{stored[name].file}: unexpected tensor {name} (not part of this model)")
    for name in sorted(set(expected) - set(stored)):
        module, suffix = name.rsplit(".", 1)
        if suffix in STARQUANT_SUFFIXES:
            raise InputError(f"{source}: missing STaR-Quant tensor {name}")
        weight = stored.get(f"{module}.weight")
        unquantized = weight is not None and _is_float(weight.dtype) and not any(
            f"{module}.{s}" in stored for s in _QUANTIZATION_SUFFIXES
        )
        if module in checkpoint.schemes and unquantized:
            from .schemes import describe_scheme

            raise InputError(
                f"{weight.file}: {module} is stored unquantized ({module}.weight is {weight.dtype}, no {suffix}) but "
                f"quantization_config quantizes it as {describe_scheme(checkpoint.schemes[module])}; "
                "is it missing from quantization_config.ignore?"
            )
        raise InputError(f"{source}: missing tensor {name} (shape {expected[name][0]})")
    for name, (shape, dtype) in expected.items():
        tensor = stored[name]
        if tensor.shape != shape:
            raise InputError(f"{tensor.file}: tensor {name} has shape {tensor.shape}, expected {shape}")
        # Floats may be stored at another precision; integer codes must have the exact type
        # (a packed tensor's words hold 32 / bits values; int8 codes are not int32 words).
        if _is_float(tensor.dtype) != dtype.is_floating_point or (
            not dtype.is_floating_point and _INTEGER_CODES.get(dtype, tensor.dtype) != tensor.dtype
        ):
            wanted = str(dtype).removeprefix("torch.")
            raise InputError(f"{tensor.file}: tensor {name} is {tensor.dtype}, expected {wanted}")


def _weight_shape(module: torch.nn.Module) -> tuple[int, int]:
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return module.out_features, module.in_features


_INTEGER_CODES = {torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8"}


def _check_packed_shapes(checkpoint: ValidatedCheckpoint) -> None:
    """Each `pack-quantized` module's stored `weight_shape` names its weight's shape (read from the
    file: two integers). A wrong one would unpack another number of values per row."""
    for module, shape in checkpoint.packed_shapes.items():
        tensor = checkpoint.tensors[f"{module}.weight_shape"]
        with open(tensor.file, "rb") as f:
            f.seek(tensor.offset)
            data = f.read(2 * _DTYPE_BYTES[tensor.dtype])
        stored = tuple(torch.frombuffer(bytearray(data), dtype=_TORCH_INTEGERS[tensor.dtype]).tolist())
        if stored != shape:
            raise InputError(f"{tensor.file}: tensor {module}.weight_shape holds {list(stored)}, expected "
                             f"{list(shape)} (the shape of {module}.weight, packed in {module}.weight_packed)")


_TORCH_INTEGERS = {code: dtype for dtype, code in _INTEGER_CODES.items()}


def _is_float(code: str) -> bool:
    return code.startswith(("F", "BF"))
