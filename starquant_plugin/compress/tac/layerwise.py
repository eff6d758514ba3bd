"""TAC layer by layer: hidden states of canvas batches cached between blocks, and the full-precision
reference read from its checkpoint one block at a time.

When TAC fits layer i, layers 0..i-1 are final, so each canvas's hidden state entering layer i is
known and stays valid: it is computed once per layer (advanced past layer i once its map is chosen)
instead of running layers 0..i again for every canvas. The model's own forward is reused for every
partial run: the blocks before the wanted one are swapped for a pass-through and a forward
pre-hook hands the wanted block the cached state, so embedding lookup, positions, token states and
the runtime's hooks run exactly as in a whole forward; a hook that raises stops the forward where
the wanted activation is. Nothing here names a model family's modules (`ModelFamily.block_list`).
"""

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from ...checkpoint.validate import StoredTensor, ValidatedCheckpoint, validate_checkpoint
from ...data import rows_per_batch
from ...errors import InputError
from ...models.family import family_of

__all__ = ["BlockwiseReference", "CanvasGroup", "Captured", "block_input", "capture", "check_reference", "entering",
           "equal_length_groups"]


class Captured(Exception):
    """Stops a forward once the wanted activation is captured."""


@dataclass
class CanvasGroup:
    """Canvases of one length as a batch [n, seq], their positions in the list they came from, and
    (once computed) hidden states entering the block being worked on: `hidden` of the model being
    quantized, `reference_hidden` of the full-precision reference."""

    canvases: torch.Tensor
    positions: list[int]
    hidden: torch.Tensor | None = None
    reference_hidden: torch.Tensor | None = field(default=None, repr=False)
    scored: torch.Tensor | None = field(default=None, repr=False)  # bool [n, seq]: positions whose logits are compared


def equal_length_groups(canvases: list[torch.Tensor], vocab_size: int) -> list[CanvasGroup]:
    """Batches of equal-length canvases (a trajectory's canvases share their row's length), each
    small enough that its float32 logits stay under `LOGITS_BUDGET_BYTES` (`rows_per_batch`)."""
    by_length: dict[int, list[int]] = {}
    for position, canvas in enumerate(canvases):
        by_length.setdefault(canvas.shape[1], []).append(position)
    groups = []
    for length, positions in by_length.items():
        size = rows_per_batch(length, vocab_size)
        for start in range(0, len(positions), size):
            chunk = positions[start:start + size]
            groups.append(CanvasGroup(torch.cat([canvases[p] for p in chunk]), chunk))
    return groups


class _PassThrough(torch.nn.Module):
    """Stands in for a block that has already run: returns its input hidden states."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def entering(model, index: int, hidden: torch.Tensor | None, end: int | None = None):
    """While inside, the model's forward starts at block `index` with `hidden` as that block's input
    (the blocks before it pass their input through; `hidden=None`: from the embedding, `index` 0)
    and, with `end`, stops after block `end - 1`: the blocks from `end` on pass their input through,
    so the final norm and head see block `end - 1`'s output. Everything else runs as usual."""
    if hidden is None and end is None:
        yield
        return
    blocks = family_of(model.config).block_list(model)
    skipped = [j for j in range(len(blocks)) if (hidden is not None and j < index) or (end is not None and j >= end)]
    kept = {j: blocks[j] for j in skipped}
    for j in skipped:
        blocks[j] = _PassThrough()
    # Block 0 is either the block `index` or a pass-through ahead of it: injecting there is the same.
    # The family's forward passes the hidden states as a block's first positional argument and takes
    # a tensor back (the `ModelFamily` block contract).
    def inject(module, args):
        if not args:
            raise TypeError(f"{type(module).__name__} got its hidden states as a keyword; TAC's layer-by-layer "
                            "runs need them as the first positional argument")
        return (hidden, *args[1:])

    handle = blocks[0].register_forward_pre_hook(inject) if hidden is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for j, block in kept.items():
            blocks[j] = block


def block_input(model, index: int, canvases: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The hidden states entering block `index` (`index` = the number of blocks: leaving the last)
    for `canvases` [n, seq]: from `hidden`, the states entering block `index - 1` (None for block 0:
    from the embedding). Blocks from `index` on are not run (they may be unloaded)."""
    blocks = family_of(model.config).block_list(model)
    captured = []

    def keep(value):
        captured.append((value[0] if isinstance(value, tuple) else value).detach())
        raise Captured

    if index == 0:
        handle = blocks[0].register_forward_pre_hook(lambda module, args: keep(args[0]))
    else:
        handle = blocks[index - 1].register_forward_hook(lambda module, args, output: keep(output))
    try:
        with entering(model, index - 1, hidden) if index else nullcontext():
            model(input_ids=canvases)
    except Captured:
        pass
    finally:
        handle.remove()
    return captured[0]


def capture(model, index: int, module, groups: list[CanvasGroup], state: Callable[[CanvasGroup], torch.Tensor | None],
            output: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [tokens, width] (float32, on the CPU) of `module`'s raw input (before any TAC/SGAT hook)
    or its output, for every canvas of `groups` in order, running block `index` (which holds
    `module`) from the cached state `state(group)`; the forward stops there. `rows`: the indices to
    keep of all those rows (None: all)."""
    kept, offset = [], 0

    def keep(value):
        value = value[0] if isinstance(value, tuple) else value
        value = value.reshape(-1, value.shape[-1])
        if rows is not None:
            wanted = rows[(rows >= offset) & (rows < offset + value.shape[0])] - offset
            value = value[wanted.to(value.device)]
        kept.append(value.float().cpu())
        raise Captured

    if output:
        handle = module.register_forward_hook(lambda m, args, result: keep(result))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: keep(args[0]), prepend=True)
    try:
        for group in groups:
            try:
                with entering(model, index, state(group)):
                    model(input_ids=group.canvases)
            except Captured:
                pass
            offset += group.canvases.numel()
    finally:
        handle.remove()
    return torch.cat(kept)


def check_reference(path: str | Path) -> ValidatedCheckpoint:
    """The full-precision checkpoint TAC compares with, validated (headers only); InputError naming
    the file and field otherwise."""
    try:
        checkpoint = validate_checkpoint(path, with_tokenizer=False)
    except InputError as error:
        raise InputError(f"TAC's full-precision reference (TACModifier.reference_model, default the model's own "
                         f"directory): {error}") from None
    if checkpoint.quantized:
        raise InputError(f"{checkpoint.config_path}: TAC's full-precision reference is a quantized checkpoint; "
                         "point TACModifier.reference_model at the full-precision one")
    return checkpoint


class BlockwiseReference:
    """The full-precision model of a checkpoint directory with only its non-block weights
    (embedding, final norm, head) in memory: `with reference.block(i):` reads block i's weights from
    the safetensors files and drops them on leaving. Runs through `entering` / `block_input` /
    `capture` like the model itself (blocks other than the loaded one are never run)."""

    def __init__(self, path: str | Path, dtype: torch.dtype, device: torch.device, share: torch.nn.Module | None = None):
        """`share`: a model of the same family whose non-block parameters (embedding, final norm,
        head) are used instead of a copy wherever they hold exactly the checkpoint's values (those
        the quantization left alone), so the reference adds no memory for them."""
        checkpoint = check_reference(path)
        self.device, self.stored = device, checkpoint.tensors
        self.files = {name: stored.file for name, stored in checkpoint.tensors.items()}
        with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) real
            self.model = AutoModelForCausalLM.from_config(checkpoint.model_config, dtype=dtype).eval()
        self.blocks = family_of(self.model.config).block_list(self.model)
        names = {id(module): name for name, module in self.model.named_modules()}
        self._prefixes = [names[id(block)] + "." for block in self.blocks]
        outside = [name for name, _ in self.model.named_parameters(remove_duplicate=False)
                   if not any(name.startswith(p) for p in self._prefixes)]
        for module in self.model.modules():
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)
        shared = {} if share is None else _resident_parameters(share, outside)
        self._load(self.model, "", [n for n in outside if n in self.files], shared)
        self.model.tie_weights()  # a tied head has no tensor of its own
        missing = [n for n, p in self.model.named_parameters() if p.is_meta and not any(n.startswith(x) for x in self._prefixes)]
        if missing:
            raise InputError(f"{checkpoint.directory}: the checkpoint holds no tensor {missing[0]}")

    @contextmanager
    def block(self, index: int):
        block = self.blocks[index]
        self._load(block, self._prefixes[index], [self._prefixes[index] + n for n, _ in block.named_parameters()])
        try:
            yield block
        finally:  # back to the meta device: parameters only (buffers are not in the checkpoint)
            for module in block.modules():
                for name, parameter in list(module._parameters.items()):
                    if parameter is not None:
                        module._parameters[name] = torch.nn.Parameter(parameter.to("meta"), requires_grad=False)

    def _load(self, module: torch.nn.Module, prefix: str, names: list[str], shared: dict | None = None) -> None:
        """Read `names` (checkpoint keys) into `module`'s parameters (names relative to `prefix`),
        converted to the dtype the module was built with; a tensor of `shared` (by name) that is
        equal to the one read is used instead of it."""
        absent = [name for name in names if name not in self.files]
        if absent:
            raise InputError(f"{Path(next(iter(self.files.values()))).parent}: the checkpoint holds no tensor {absent[0]}")
        dtypes = {n: p.dtype for n, p in module.named_parameters(remove_duplicate=False)}
        state = {}
        for name in names:
            same = (shared or {}).get(name)
            if same is not None and same.dtype == dtypes[name[len(prefix):]] and same.device == self.device \
                    and _equals_stored(same, self.stored[name]):
                state[name[len(prefix):]] = same
        rest = [name for name in names if name[len(prefix):] not in state]
        for file in dict.fromkeys(self.files[n] for n in rest):
            with safe_open(file, "pt", device="cpu") as f:
                for name in rest:
                    if self.files[name] == file:
                        relative = name[len(prefix):]
                        state[relative] = f.get_tensor(name).to(dtypes[relative]).to(self.device)
        module.load_state_dict(state, strict=False, assign=True)


def _resident_parameters(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """`names` of `model`'s parameters whose module holds them itself (not offloaded: reading an
    offloaded one makes a temporary copy, which sharing would keep)."""
    from compressed_tensors.offload.cache import OffloadCache

    resident = {}
    for name in names:
        owner, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        parameter = module._parameters.get(leaf) if not isinstance(module._parameters, OffloadCache) else None
        if parameter is not None:
            resident[name] = parameter.data
    return resident


_FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _equals_stored(tensor: torch.Tensor, stored: StoredTensor, chunk_bytes: int = 16 * 2**20) -> bool:
    """Whether `tensor` holds exactly the stored tensor's values (converted to its dtype), read in
    chunks with plain reads: nothing of the file stays mapped or resident."""
    dtype = _FLOAT_DTYPES.get(stored.dtype)
    if dtype is None or tuple(tensor.shape) != stored.shape or not tensor.is_contiguous():
        return False
    flat, itemsize = tensor.detach().reshape(-1), torch.empty((), dtype=dtype).element_size()
    step = max(1, chunk_bytes // itemsize)
    with open(stored.file, "rb") as file:
        file.seek(stored.offset)
        for start in range(0, flat.numel(), step):
            count = min(step, flat.numel() - start)
            chunk = torch.frombuffer(bytearray(file.read(count * itemsize)), dtype=dtype)
            if not torch.equal(chunk.to(flat.dtype), flat[start:start + count].cpu()):
                return False
    return True
