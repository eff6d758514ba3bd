"""LLaDA on transformers 5: hub-layout loading, exact logits, GQA, padding, dtypes, shards."""

import json
import math

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import starquant_plugin  # noqa: F401  (registers LLaDA with the Auto classes)
from starquant_plugin import LLaDAConfig, LLaDAModelLM
from starquant_plugin.models import read_model_config
from tests.conftest import random_hub_tensors, reference_config, tiny_config, write_hub_checkpoint


def reference_logits(config: dict, t: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's forward written from its published description (OLMo-style blocks), unbatched."""
    d, h, kv = config["d_model"], config["n_heads"], config["n_kv_heads"]
    hd, eps, seq = d // h, config["rms_norm_eps"], ids.shape[0]

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.outer(torch.arange(seq).float(), inv_freq)
    angles = torch.cat([angles, angles], -1)

    def rope(x):  # x: [heads, seq, hd]; OLMo's rotate_half splits the head in two halves
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()

    x = t["model.transformer.wte.weight"][ids]
    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        n = rms(x, t[p + "attn_norm.weight"])
        q = rope((n @ t[p + "q_proj.weight"].T).view(seq, h, hd).transpose(0, 1))
        k = rope((n @ t[p + "k_proj.weight"].T).view(seq, kv, hd).transpose(0, 1))
        v = (n @ t[p + "v_proj.weight"].T).view(seq, kv, hd).transpose(0, 1)
        k, v = k.repeat_interleave(h // kv, 0), v.repeat_interleave(h // kv, 0)
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1) @ v  # no causal mask
        x = x + attention.transpose(0, 1).reshape(seq, d) @ t[p + "attn_out.weight"].T
        n = rms(x, t[p + "ff_norm.weight"])
        x = x + (F.silu(n @ t[p + "ff_proj.weight"].T) * (n @ t[p + "up_proj.weight"].T)) @ t[p + "ff_out.weight"].T
    x = rms(x, t["model.transformer.ln_f.weight"])
    head = t["model.transformer.wte.weight"] if config.get("weight_tying") else t["model.transformer.ff_out.weight"]
    return x @ head.T


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_hub_checkpoint_matches_reference_logits(tmp_path, n_kv_heads):
    config = tiny_config(n_kv_heads=n_kv_heads)
    tensors = random_hub_tensors(config, seed=n_kv_heads)
    directory = write_hub_checkpoint(tmp_path / "ckpt", config, tensors)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()  # auto_map present, no trust_remote_code
    assert isinstance(model, LLaDAModelLM)
    ids = torch.randint(0, config["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    for row in range(2):
        torch.testing.assert_close(logits[row], reference_logits(config, tensors, ids[row]), atol=2e-5, rtol=2e-5)
    # Bidirectional: changing the last token changes the first position's logits.
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % config["vocab_size"]
    with torch.no_grad():
        assert not torch.allclose(model(changed).logits[:, 0], logits[:, 0])


def test_weight_tied_checkpoint_reads_its_head_from_the_embedding(tmp_path):
    """weight_tying: true checkpoints have no ff_out tensor; they load, match the reference and
    round-trip through save_pretrained without one."""
    from safetensors import safe_open

    config = tiny_config(weight_tying=True)
    tensors = random_hub_tensors(config, seed=5)
    assert "model.transformer.ff_out.weight" not in tensors
    model = AutoModelForCausalLM.from_pretrained(write_hub_checkpoint(tmp_path / "tied", config, tensors)).eval()
    ids = torch.randint(0, config["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits[0], reference_logits(config, tensors, ids[0]), atol=2e-5, rtol=2e-5)
    model.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(tensors)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()(ids).logits, logits)


def test_eager_and_sdpa_agree(tiny_checkpoint):
    directory, config, _ = tiny_checkpoint
    ids = torch.randint(0, config["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=implementation).eval()
        with torch.no_grad():
            outputs[implementation] = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], atol=1e-5, rtol=1e-5)


def test_left_padding_equals_unpadded(tiny_checkpoint):
    directory, config, _ = tiny_checkpoint
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    short = torch.tensor([[5, 6, 7, 8]])
    long = torch.tensor([[1, 2, 3, 4, 9, 10, 11]])
    pad = config["pad_token_id"]
    batch = torch.cat([torch.cat([torch.full((1, 3), pad), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        batched = model(batch, attention_mask=mask).logits
        alone = model(short).logits
        long_alone = model(long).logits
    torch.testing.assert_close(batched[0, 3:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], long_alone[0], atol=1e-5, rtol=1e-5)
    # The mask matters: without it the pads are attended to and the logits move.
    with torch.no_grad():
        unmasked = model(batch).logits
    assert (unmasked[0, 3:] - alone[0]).abs().max() > 1e-3


def test_sharded_bf16_checkpoint(tmp_path):
    config = tiny_config(n_kv_heads=2)
    tensors = random_hub_tensors(config, seed=3, dtype=torch.bfloat16)
    single = write_hub_checkpoint(tmp_path / "single", config, tensors)
    sharded = write_hub_checkpoint(tmp_path / "sharded", config, tensors, shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, config["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(4))
    a = AutoModelForCausalLM.from_pretrained(single, dtype=torch.bfloat16).eval()
    b = AutoModelForCausalLM.from_pretrained(sharded, dtype="auto").eval()
    assert b.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=0, rtol=0)
        fp32 = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval()(ids).logits
    expected = reference_logits(config, {k: v.float() for k, v in tensors.items()}, ids[0])
    torch.testing.assert_close(fp32[0], expected, atol=2e-5, rtol=2e-5)
    # bf16 arithmetic stays near the fp32 result.
    assert (b(ids).logits[0].float() - expected).abs().max() < 0.1 * expected.abs().max()


def test_auto_classes_and_config_aliases(tiny_checkpoint):
    directory, config, _ = tiny_checkpoint
    loaded = AutoConfig.from_pretrained(directory)
    assert isinstance(loaded, LLaDAConfig)
    assert (loaded.hidden_size, loaded.num_attention_heads, loaded.num_hidden_layers) == (64, 4, 2)
    assert loaded.mask_token_id == 49
    assert isinstance(AutoModel.from_pretrained(directory), LLaDAModelLM)


def test_llada_8b_reference_config_shapes():
    config = LLaDAConfig(**{k: v for k, v in reference_config().items() if k != "architectures"})
    assert (config.d_model, config.n_layers, config.n_kv_heads, config.mask_token_id) == (4096, 32, 32, 126336)
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    names = {n for n, _ in model.named_parameters()}
    assert "model.transformer.blocks.31.ff_out.weight" in names
    assert "model.transformer.ff_out.weight" in names
    parameters = sum(p.numel() for p in model.parameters())
    assert 7.9e9 < parameters < 8.1e9  # the published ~8.0 B


def test_save_pretrained_round_trip_keeps_hub_names(tmp_path, tiny_checkpoint):
    directory, config, tensors = tiny_checkpoint
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path / "saved")
    from safetensors import safe_open

    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(tensors)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "llada" and saved["d_model"] == 64


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama"})), "model_type 'llama' is not a supported diffusion LLM family"),
        (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    ],
)
def test_not_a_llada_directory_is_a_clear_error(tiny_checkpoint, mutate, message):
    directory = tiny_checkpoint[0]
    mutate(directory)
    with pytest.raises(ValueError, match=message):
        read_model_config(directory)


def test_unsupported_config_value_names_the_field():
    with pytest.raises(ValueError, match="layer_norm_type='layer'"):
        LLaDAConfig(layer_norm_type="layer")
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        LLaDAConfig(d_model=64, n_heads=4, n_kv_heads=3)
