"""Dream on transformers 5 (no remote code): Qwen2 tensor names, exact logits against a hand-written
float64 forward, padding, tied embeddings, Auto-class loading of saved checkpoints, config checks."""

import json
import math

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import starquant_plugin  # noqa: F401  (registers Dream with the Auto classes)
from starquant_plugin.models.dream import DreamConfig, DreamDecoderLayer, DreamModel

MASK = 39
PAD = 38

# Dream-v0-Instruct-7B's public config.json (the remote-code auto_map included).
DREAM_7B_CONFIG = {
    "architectures": ["DreamModel"],
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "mask_token_id": 151666,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "Dream",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "pad_token_id": 151643,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2",
    "use_cache": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}


def tiny_config(**overrides) -> dict:
    """The public config.json with small dimensions, a non-default rotary base and small special ids."""
    config = dict(DREAM_7B_CONFIG)
    config.update(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=96,
        vocab_size=40, mask_token_id=MASK, pad_token_id=PAD, bos_token_id=PAD, eos_token_id=PAD,
        max_position_embeddings=256, max_window_layers=2, rope_theta=5000.0,
    )
    config.update(overrides)
    return config


def qwen2_tensor_names(config: dict) -> set[str]:
    """Dream's checkpoint tensor names (Qwen2's), written out independently of the model code."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        names.add("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.o_proj.weight"}
        names |= {f"{p}self_attn.{x}_proj.{kind}" for x in "qkv" for kind in ("weight", "bias")}
        names |= {f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    return names


def random_tensors(config: dict, seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Random weights under the Qwen2 names, with non-zero q/k/v biases and non-unit norms."""
    g = torch.Generator().manual_seed(seed)
    d, h, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd, mlp, vocab = d // h, config["intermediate_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h * hd, d), p + "self_attn.q_proj.bias": (h * hd,),
            p + "self_attn.k_proj.weight": (kv * hd, d), p + "self_attn.k_proj.bias": (kv * hd,),
            p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.v_proj.bias": (kv * hd,),
            p + "self_attn.o_proj.weight": (d, h * hd),
            p + "mlp.gate_proj.weight": (mlp, d), p + "mlp.up_proj.weight": (mlp, d),
            p + "mlp.down_proj.weight": (d, mlp),
        })
    tensors = {}
    for name in sorted(qwen2_tensor_names(config)):
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            tensors[name] = 1 + 0.2 * torch.randn(d, generator=g, dtype=torch.float64)
        else:
            tensors[name] = 0.2 * torch.randn(shapes[name], generator=g, dtype=torch.float64)
    return {name: t.to(dtype) for name, t in tensors.items()}


def reference_logits(config: dict, t: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Dream's forward (Qwen2 with bidirectional attention) in float64 from the raw tensors, unbatched."""
    t = {name: tensor.to(torch.float64) for name, tensor in t.items()}
    d, h, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd, eps, seq = d // h, config["rms_norm_eps"], ids.shape[0]

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], -1)

    def rope(x):  # x: [heads, seq, hd]; Qwen2's rotate_half splits the head in two halves
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()

    def linear(x, name):
        out = x @ t[name + ".weight"].T
        return out + t[name + ".bias"] if name + ".bias" in t else out

    x = t["model.embed_tokens.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        n = rms(x, t[p + "input_layernorm.weight"])
        q = rope(linear(n, p + "self_attn.q_proj").view(seq, h, hd).transpose(0, 1))
        k = rope(linear(n, p + "self_attn.k_proj").view(seq, kv, hd).transpose(0, 1))
        v = linear(n, p + "self_attn.v_proj").view(seq, kv, hd).transpose(0, 1)
        k, v = k.repeat_interleave(h // kv, 0), v.repeat_interleave(h // kv, 0)
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1) @ v  # no causal mask
        x = x + linear(attention.transpose(0, 1).reshape(seq, d), p + "self_attn.o_proj")
        n = rms(x, t[p + "post_attention_layernorm.weight"])
        mlp = F.silu(linear(n, p + "mlp.gate_proj")) * linear(n, p + "mlp.up_proj")
        x = x + linear(mlp, p + "mlp.down_proj")
    x = rms(x, t["model.norm.weight"])
    head = t["model.embed_tokens.weight"] if config["tie_word_embeddings"] else t["lm_head.weight"]
    return x @ head.T  # raw logits: no shift


def build(config: dict, tensors: dict[str, torch.Tensor], dtype=torch.float64, **options) -> DreamModel:
    """A DreamModel of `config` holding exactly `tensors` (every one of them, nothing else)."""
    model = DreamModel(DreamConfig(**config, **options)).to(dtype)
    model.load_state_dict(tensors, strict=True)
    return model.eval()


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_logits_match_float64_reference(kv_heads, implementation):
    config = tiny_config(num_key_value_heads=kv_heads)
    tensors = random_tensors(config, seed=kv_heads)
    assert all(tensors[n].abs().min() > 0 for n in tensors if n.endswith(".bias"))
    model = build(config, tensors, attn_implementation=implementation)
    assert model.config._attn_implementation == implementation
    ids = torch.randint(0, config["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    ids[0, 4:8] = MASK
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.float64 and logits.shape == (2, 11, config["vocab_size"])
    for row in range(2):
        expected = reference_logits(config, tensors, ids[row])
        # The model keeps RMSNorm, rotary and softmax in float32 (as Qwen2/Dream do): 1e-5, not 1e-12.
        torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=1e-5)
    # The rotary base is read from the config: the default base gives other logits.
    other_theta = reference_logits({**config, "rope_theta": 1000000.0}, tensors, ids[0])
    assert (other_theta - logits[0]).abs().max() > 1e-3
    # Bidirectional: changing the last token changes the first position's logits.
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % config["vocab_size"]
    with torch.no_grad():
        assert not torch.allclose(model(changed).logits[:, 0], logits[:, 0])


def test_layers_receive_token_states_and_outputs_follow_transformers_conventions():
    """Every decoder layer gets (hidden_states, attention_bias, position_embeddings, token_states)
    positionally, token_states = 1 at mask tokens (quantization hooks read args[3])."""
    config = tiny_config()
    tensors = random_tensors(config, seed=7)
    model = build(config, tensors)
    ids = torch.randint(0, MASK, (2, 9), generator=torch.Generator().manual_seed(3))
    ids[0, 2:5] = MASK
    ids[1, -1] = MASK
    seen = []

    def hook(module, args, kwargs):
        assert not kwargs
        seen.append(args)

    layers = list(model.model.layers)
    assert all(isinstance(layer, DreamDecoderLayer) for layer in layers) and len(layers) == 2
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == 2
    for args in seen:
        assert len(args) == 4
        hidden, bias, (cos, sin), states = args
        assert hidden.shape == (2, 9, config["hidden_size"]) and bias is None
        assert cos.shape == sin.shape == (2, 9, config["hidden_size"] // config["num_attention_heads"])
        assert torch.equal(states, (ids == MASK).long())
    # hidden_states: each layer's input, then the final normed state; logits_to_keep as in transformers.
    assert len(out.hidden_states) == 3
    assert torch.equal(out.hidden_states[0], tensors["model.embed_tokens.weight"][ids])
    torch.testing.assert_close(out.hidden_states[-1] @ tensors["lm_head.weight"].T, out.logits, atol=1e-10, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=3).logits, out.logits[:, -3:], atol=1e-12, rtol=0)
        torch.testing.assert_close(model(ids, logits_to_keep=slice(2, 5)).logits, out.logits[:, 2:5],
                                   atol=1e-12, rtol=0)
        # inputs_embeds instead of input_ids: same logits (no token states to route then).
        embedded = model(inputs_embeds=tensors["model.embed_tokens.weight"][ids]).logits
    torch.testing.assert_close(embedded, out.logits, atol=1e-12, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_left_padding_equals_unpadded(implementation):
    config = tiny_config()
    model = build(config, random_tensors(config, seed=4, dtype=torch.float32), torch.float32,
                  attn_implementation=implementation)
    short = torch.tensor([[5, 6, MASK, MASK]])
    long = torch.tensor([[1, 2, 3, 4, 9, MASK, 11]])
    batch = torch.cat([torch.cat([torch.full((1, 3), PAD), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        batched = model(batch, attention_mask=mask).logits
        alone = model(short).logits
        long_alone = model(long).logits
        unmasked = model(batch).logits
    torch.testing.assert_close(batched[0, 3:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], long_alone[0], atol=1e-5, rtol=1e-5)
    # The mask matters: without it the pads are attended to (and shift the positions).
    assert (unmasked[0, 3:] - alone[0]).abs().max() > 1e-3


def _saved_tensor_names(directory) -> set[str]:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    names = set()
    for file in files:
        with safe_open(directory / file, "pt") as f:
            names |= set(f.keys())
    return names


def _add_remote_code_pointer(directory) -> None:
    """What a hub checkpoint carries: an auto_map to remote code (absent here, so using it would fail)."""
    path = directory / "config.json"
    saved = json.loads(path.read_text())
    saved["auto_map"] = DREAM_7B_CONFIG["auto_map"]
    path.write_text(json.dumps(saved, indent=2))


LOADERS = {
    "transformers": lambda directory: DreamModel.from_pretrained_unrouted(directory),
    "AutoModelForCausalLM": lambda directory: AutoModelForCausalLM.from_pretrained(directory),
    "AutoModel": lambda directory: AutoModel.from_pretrained(directory),
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_bf16_sharded_save_pretrained_reloads_with_qwen2_names(tmp_path, loader):
    config = tiny_config()
    model = build(config, random_tensors(config, seed=5, dtype=torch.float32), torch.float32).to(torch.bfloat16)
    directory = tmp_path / "dream"
    model.save_pretrained(directory, max_shard_size="20KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == _saved_tensor_names(directory) == qwen2_tensor_names(config)
    saved = json.loads((directory / "config.json").read_text())
    assert saved["model_type"] == "Dream" and saved["architectures"] == ["DreamModel"]
    assert saved["mask_token_id"] == MASK and saved["rope_theta"] == 5000.0 and "auto_map" not in saved
    _add_remote_code_pointer(directory)
    assert isinstance(AutoConfig.from_pretrained(directory), DreamConfig)

    reloaded = LOADERS[loader](directory).eval()  # no trust_remote_code: the auto_map is ignored
    assert type(reloaded) is DreamModel
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.config.mask_token_id == MASK and reloaded.config.rope_theta == 5000.0
    ids = torch.randint(0, config["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_tied_word_embeddings_have_no_lm_head(tmp_path):
    """tie_word_embeddings: true: no lm_head tensor (nor module); the logits read embed_tokens;
    save_pretrained writes no lm_head and the reload matches."""
    config = tiny_config(tie_word_embeddings=True)
    tensors = random_tensors(config, seed=8)
    assert "lm_head.weight" not in tensors
    model = build(config, tensors)  # strict: the model holds exactly the checkpoint's tensors
    assert model.get_output_embeddings() is None
    ids = torch.randint(0, config["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits[0], reference_logits(config, tensors, ids[0]), atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "tied")
    assert _saved_tensor_names(tmp_path / "tied") == qwen2_tensor_names(config)
    assert json.loads((tmp_path / "tied" / "config.json").read_text())["tie_word_embeddings"] is True
    _add_remote_code_pointer(tmp_path / "tied")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tied", dtype=torch.float64).eval()
    assert type(reloaded) is DreamModel and reloaded.get_output_embeddings() is None
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[name], loaded[name]) for name in saved)
    with torch.no_grad():
        # The same weights; float64 logits equal up to the GEMM's summation order (1e-15 apart on
        # an AMD EPYC, where the two models' matmuls took different kernels).
        torch.testing.assert_close(reloaded(ids).logits, logits, atol=1e-12, rtol=1e-12)


def test_dream_7b_config_shapes():
    config = AutoConfig.for_model(**{k: v for k, v in DREAM_7B_CONFIG.items() if k != "model_type"},
                                  model_type="Dream")
    assert isinstance(config, DreamConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (3584, 28, 28)
    assert (config.num_key_value_heads, config.head_dim, config.mask_token_id) == (4, 128, 151666)
    with torch.device("meta"):
        model = DreamModel(config)
    assert {n for n, _ in model.named_parameters()} == qwen2_tensor_names(DREAM_7B_CONFIG)
    d, kv_dim, mlp, vocab = 3584, 4 * 128, 18944, 152064
    per_layer = 2 * d + (d * d + d) + 2 * (d * kv_dim + kv_dim) + d * d + 3 * d * mlp
    assert sum(p.numel() for p in model.parameters()) == 2 * vocab * d + d + 28 * per_layer  # ~7.6 B


def test_config_without_mask_token_id_is_refused(tmp_path):
    config = tiny_config()
    del config["mask_token_id"]
    with pytest.raises(ValueError, match="mask_token_id"):
        DreamConfig(**config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mask_token_id"):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_act": "gelu"}, r"DreamConfig\.hidden_act='gelu'"),
        ({"num_key_value_heads": 3}, r"DreamConfig\.num_key_value_heads=3"),
        ({"hidden_size": 66}, r"DreamConfig\.hidden_size=66"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, r"DreamConfig\.rope_scaling="),
        ({"use_sliding_window": True}, r"DreamConfig\.use_sliding_window=True"),
        ({"head_dim": 32}, r"DreamConfig\.head_dim=32"),
        ({"mask_token_id": 40}, r"DreamConfig\.mask_token_id=40"),
    ],
)
def test_unsupported_config_value_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        DreamConfig(**tiny_config(**overrides))
