"""Shared fixtures: tiny LLaDA- and Dream-format checkpoints written in the hub layout."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]
COMPRESS_CLI = Path(os.environ.get("STARQUANT_COMPRESS_CLI", ROOT / ".venv" / "compress" / "bin" / "starquant"))


def reference_config() -> dict:
    """LLaDA-8B-Instruct's public config.json (auto_map included)."""
    return json.loads((DATA / "llada-8b-config.json").read_text())


def tiny_config(**overrides) -> dict:
    """The public config with small dimensions and non-default special ids."""
    config = reference_config()
    config.update(
        d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=96, vocab_size=50,
        embedding_size=64, mask_token_id=49, eos_token_id=47, pad_token_id=47, max_sequence_length=256,
        rope_theta=10000.0,
    )
    config.update(overrides)
    return config


def random_hub_tensors(config: dict, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights under LLaDA's hub tensor names (written independently of the model code)."""
    g = torch.Generator().manual_seed(seed)
    d, h, kv = config["d_model"], config["n_heads"], config["n_kv_heads"]
    head_dim, mlp, vocab = d // h, config["mlp_hidden_size"], config["embedding_size"]

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.2).to(dtype)

    tensors = {"model.transformer.wte.weight": w(vocab, d), "model.transformer.ln_f.weight": 1 + w(d)}
    if not config.get("weight_tying"):
        tensors["model.transformer.ff_out.weight"] = w(vocab, d)
    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        tensors.update({
            p + "attn_norm.weight": 1 + w(d), p + "ff_norm.weight": 1 + w(d),
            p + "q_proj.weight": w(h * head_dim, d), p + "k_proj.weight": w(kv * head_dim, d),
            p + "v_proj.weight": w(kv * head_dim, d), p + "attn_out.weight": w(d, h * head_dim),
            p + "ff_proj.weight": w(mlp, d), p + "up_proj.weight": w(mlp, d), p + "ff_out.weight": w(d, mlp),
        })
    return tensors


DREAM_7B_CONFIG = ROOT / "starquant_plugin" / "bench" / "dream-7b-config.json"


def tiny_dream_config(**overrides) -> dict:
    """Dream-7B's public config.json (auto_map included) with small dimensions, GQA and
    non-default special ids (pad/bos/eos share one id, as in Dream)."""
    config = json.loads(DREAM_7B_CONFIG.read_text())
    config.update(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=256,
        vocab_size=50, mask_token_id=49, eos_token_id=47, pad_token_id=47, bos_token_id=47,
        max_position_embeddings=256, rope_theta=10000.0, torch_dtype="float32",
    )
    config.update(overrides)
    return config


def random_dream_tensors(config: dict, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights under Dream's (Qwen2) hub tensor names, q/k/v biases included (written
    independently of the model code)."""
    g = torch.Generator().manual_seed(seed)
    d, h, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, mlp, vocab = d // h, config["intermediate_size"], config["vocab_size"]

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.2).to(dtype)

    tensors = {"model.embed_tokens.weight": w(vocab, d), "model.norm.weight": 1 + w(d)}
    if not config.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = w(vocab, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": 1 + w(d), p + "post_attention_layernorm.weight": 1 + w(d),
            p + "self_attn.q_proj.weight": w(h * head_dim, d), p + "self_attn.q_proj.bias": w(h * head_dim),
            p + "self_attn.k_proj.weight": w(kv * head_dim, d), p + "self_attn.k_proj.bias": w(kv * head_dim),
            p + "self_attn.v_proj.weight": w(kv * head_dim, d), p + "self_attn.v_proj.bias": w(kv * head_dim),
            p + "self_attn.o_proj.weight": w(d, h * head_dim),
            p + "mlp.gate_proj.weight": w(mlp, d), p + "mlp.up_proj.weight": w(mlp, d), p + "mlp.down_proj.weight": w(d, mlp),
        })
    return tensors


TINY_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 +-="


def tiny_tokenizer(config: dict):
    """Character tokenizer whose special ids are the config's (BOS just below EOS)."""
    from starquant_plugin.models.char_tokenizer import build_char_tokenizer

    eos, mask = config["eos_token_id"], config["mask_token_id"]
    return build_char_tokenizer(
        TINY_CHARACTERS, config["vocab_size"], ("<|startoftext|>", eos - 1), ("<|endoftext|>", eos), ("<|mdm_mask|>", mask)
    )


def write_hub_checkpoint(directory: Path, config: dict, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """config.json + model.safetensors (or N shards with an index) + tokenizer files, as on the hub."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer(config).save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, directory / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.fixture
def tiny_dream_checkpoint(tmp_path) -> tuple[Path, dict, dict]:
    """A tiny GQA Dream checkpoint in two shards (float32)."""
    config = tiny_dream_config()
    tensors = random_dream_tensors(config)
    return write_hub_checkpoint(tmp_path / "tiny-dream", config, tensors, shards=2), config, tensors


@pytest.fixture
def tiny_checkpoint(tmp_path) -> tuple[Path, dict, dict]:
    config = tiny_config()
    tensors = random_hub_tensors(config)
    return write_hub_checkpoint(tmp_path / "tiny-llada", config, tensors), config, tensors


def oneshot_tiny(tmp: Path, recipe: str, seed: int) -> tuple[Path, torch.Tensor, tuple[torch.Tensor, ...], dict]:
    """A tiny GQA checkpoint quantized by llm-compressor's `oneshot` with `recipe` (YAML text or
    path) on masked calibration canvases (compress environment). Returns (output directory,
    probe canvas [1, seq], (full-precision, in-memory quantized, in-memory with activation
    quantization off) logits on the probe, config)."""
    from compressed_tensors.quantization import disable_quantization
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from starquant_plugin.data import CalibrationRecord, masked_calibration_samples

    config = tiny_config(d_model=128, mlp_hidden_size=256, n_kv_heads=2)
    directory = write_hub_checkpoint(tmp / "tiny", config, random_hub_tensors(config, seed=seed))
    tokenizer = tiny_tokenizer(config)
    records = [CalibrationRecord(f"abc{i}=", f"answer number {i}") for i in range(6)]
    dataset = Dataset.from_list(masked_calibration_samples(tokenizer, records, config["mask_token_id"], 2))
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    probe = torch.tensor(dataset[3]["input_ids"])[None]
    with torch.no_grad():
        full_precision = model(probe).logits
    output = tmp / "quantized"
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=12,
            shuffle_calibration_samples=False, output_dir=str(output))
    with torch.no_grad():
        in_memory = model(probe).logits  # compressed-tensors' activation quantizer (our clip riding along)
        model.apply(disable_quantization)
        weights_only = model(probe).logits
    return output, probe, (full_precision, in_memory, weights_only), config


def reloaded_logits(directory: Path, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(logits, logits with activation quantization off, the int8-activation linears) of a
    checkpoint reloaded by the core as fake-quant."""
    from starquant_plugin import load as load_checkpoint

    model, _ = load_checkpoint(directory)
    linears = [m for m in model.modules() if getattr(m, "starquant_activation_bits", None) == 8]
    with torch.no_grad():
        logits = model(probe).logits
        for linear in linears:
            linear.starquant_activation_bits = None
        weights_only = model(probe).logits
    return logits, weights_only, linears


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippets(environment: str) -> list[str]:
    """The README's Python blocks whose first line says they run in `environment` (or either)."""
    import re

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if b.startswith(f"# {environment} environment") or b.startswith("# either environment")]


def run_readme_snippet(snippet: str, tmp_path: Path) -> str:
    """Run a README block as written, as a script in a fresh process, from a directory that looks
    like the repository root (its `recipes/`); returns stdout, fails with the stderr tail."""
    import subprocess
    import sys

    (tmp_path / "recipes").symlink_to(README.parent / "recipes")
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def quantize_with_cli(model_dir: Path, recipe: str, output: Path, *extra: str) -> Path:
    """`starquant quantize MODEL --recipe recipes/RECIPE --output OUTPUT [extra]`: in this process
    where llm-compressor is installed (compress environment), else with the compress environment's
    CLI (the serve environment cannot write checkpoints itself)."""
    recipe_path = ROOT / "recipes" / recipe
    arguments = ["quantize", str(model_dir), "--recipe", str(recipe_path), "--output", str(output), *extra]
    if find_spec("llmcompressor") is not None:
        from starquant_plugin.cli import main

        assert main(arguments) == 0
        return output
    assert COMPRESS_CLI.is_file(), f"the compress environment writes checkpoints: {COMPRESS_CLI} (make setup)"
    done = subprocess.run([str(COMPRESS_CLI), *arguments], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return output


@pytest.fixture(scope="session")
def starquant_w8a8_checkpoint(tmp_path_factory) -> Path:
    """A real STaR-Quant W8A8 checkpoint written by `starquant quantize` (recipes/starquant_w8a8.yaml)
    from a tiny GQA model (d_model 128, 2 KV heads: SGAT smoothing online at the attention output;
    TAC), once per session. Read only: copy it before changing it."""
    tmp = tmp_path_factory.mktemp("starquant-w8a8")
    config = tiny_config(d_model=128, mlp_hidden_size=256, n_kv_heads=2)
    directory = write_hub_checkpoint(tmp / "tiny", config, random_hub_tensors(config, seed=3))
    dataset = tmp / "calibration.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"abc{i}=", "answer": f"answer {i}"}) + "\n" for i in range(8)))
    return quantize_with_cli(directory, "starquant_w8a8.yaml", tmp / "w8a8", "--dataset", str(dataset),
                             "--num-samples", "16")


@contextlib.contextmanager
def serve_subprocess(directory: Path, *arguments: str, timeout: float = 240):
    """`starquant serve DIRECTORY --port P [arguments]` in a subprocess on loopback; yields the base
    URL once `/health` answers, and stops the server on exit."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "starquant_plugin.cli", "serve", str(directory), "--port",
                                str(port), *arguments], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}: {process.stderr.read()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"server did not become healthy in {timeout:.0f} s")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        yield base
    finally:
        import psutil

        engine = [child for child in (psutil.Process(process.pid).children(recursive=True) if process.poll() is None else [])
                  if child.name().startswith("VLLM")]  # not the multiprocessing resource tracker
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        # SIGTERM must stop the engine's processes too (they hold the model): none may outlive the server.
        _, alive = psutil.wait_procs(engine, timeout=30)
        for leftover in alive:
            leftover.kill()
        assert not alive, f"starquant serve left {len(alive)} engine process(es) running after SIGTERM"


def eval_exact_match(directory: Path, out: Path, *extra: str) -> float:
    """`starquant eval DIRECTORY --batch-size 100 --json OUT [extra]` in this process; its exact match."""
    from starquant_plugin.cli import main

    assert main(["eval", str(directory), "--batch-size", "100", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())["exact_match"]


def exact_match_by_backend(directory: Path, tmp_path: Path, *extra: str) -> dict[str, float]:
    """Exact match of `starquant eval` on the core and on the vLLM backend (same arguments)."""
    return {backend: eval_exact_match(directory, tmp_path / f"{backend}.json", "--backend", backend, *extra)
            for backend in ("core", "vllm")}
