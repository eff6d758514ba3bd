"""`starquant quantize`: end to end on a tiny checkpoint, summary, recipe errors, atomicity."""

import json
from pathlib import Path

import pytest
import torch

from starquant_plugin.cli import main
from starquant_plugin.data import CalibrationRecord, masked_calibration_samples
from tests.conftest import random_hub_tensors, tiny_config, write_hub_checkpoint

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("q")
    config = tiny_config(d_model=128, mlp_hidden_size=256)
    directory = write_hub_checkpoint(tmp / "tiny", config, random_hub_tensors(config, seed=3))
    dataset = tmp / "calibration.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"abc{i}=", "answer": f"answer {i}"}) + "\n" for i in range(8)))
    tasks = tmp / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"abc{i}=", "answer": f"answer {i}"}) + "\n" for i in range(4)))
    return directory, dataset, tasks


def test_quantize_starquant_w8a8_then_eval(tiny_model, tmp_path, capsys):
    directory, dataset, tasks = tiny_model
    output = tmp_path / "w8a8"
    assert main(["quantize", str(directory), "--recipe", str(RECIPES / "starquant_w8a8.yaml"), "--output", str(output),
                 "--dataset", str(dataset), "--num-samples", "16"]) == 0
    printed = capsys.readouterr().out
    assert "schemes W8A8; STaR-Quant sgat+tac" in printed and "smaller" in printed
    config = json.loads((output / "config.json").read_text())
    assert config["starquant_config"]["sgat"]["activation_bits"] == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    result = tmp_path / "eval.json"
    assert main(["eval", str(output), "--tasks", str(tasks), "--json", str(result)]) == 0
    assert json.loads(result.read_text())["n"] == 4
    # Quantizing an already quantized checkpoint is refused.
    assert main(["quantize", str(output), "--recipe", str(RECIPES / "starquant_w8a8.yaml"), "--output",
                 str(tmp_path / "again"), "--dataset", str(dataset)]) == 2
    assert "already quantized" in capsys.readouterr().err


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("s_stage:\n  s_modifiers:\n    SGATModifier: {rotation_block_size: 48}\n", "power of two"),
        ("s_stage:\n  s_modifiers:\n    SGATModifier: {not_a_field: 1}\n", "not_a_field"),
        ("s_stage:\n  s_modifiers:\n    NoSuchModifier: {}\n", "NoSuchModifier"),
        ("SGATModifier: {rotation_block_size: 32}\n", "no modifiers found"),
        ("s_stage: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_recipes_read_clearly(tiny_model, tmp_path, capsys, recipe, message):
    directory, dataset, _ = tiny_model
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    output = tmp_path / "out"
    assert main(["quantize", str(directory), "--recipe", str(path), "--output", str(output), "--dataset", str(dataset)]) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_failed_run_leaves_no_checkpoint(tiny_model, tmp_path, capsys):
    directory, dataset, _ = tiny_model
    recipe = tmp_path / "bad.yaml"
    # TAC fails inside oneshot (the output staged): its reference checkpoint does not exist.
    recipe.write_text(
        (RECIPES / "starquant_w8a8.yaml").read_text().replace("ridge: 0.01", f"ridge: 0.01\n      reference_model: {tmp_path / 'missing'}")
    )
    output = tmp_path / "out"
    assert main(["quantize", str(directory), "--recipe", str(recipe), "--output", str(output), "--dataset", str(dataset),
                 "--num-samples", "8"]) == 2
    assert "TACModifier.reference_model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [recipe]


def test_existing_output_is_refused(tiny_model, tmp_path, capsys):
    directory, dataset, _ = tiny_model
    (tmp_path / "out").mkdir()
    assert main(["quantize", str(directory), "--recipe", str(RECIPES / "baselines" / "rtn_w8a8.yaml"), "--output",
                 str(tmp_path / "out"), "--dataset", str(dataset)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_same_seed_same_checkpoint(tiny_model, tmp_path):
    """Calibration order comes from --seed alone (llm-compressor's own shuffle is unseeded)."""
    from safetensors.torch import load_file

    directory, dataset, _ = tiny_model
    tensors = []
    for name in ("a", "b"):
        assert main(["quantize", str(directory), "--recipe", str(RECIPES / "starquant_w4a4.yaml"), "--output",
                     str(tmp_path / name), "--dataset", str(dataset), "--num-samples", "16", "--seed", "7"]) == 0
        tensors.append(load_file(tmp_path / name / "model.safetensors"))
    assert tensors[0].keys() == tensors[1].keys()
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


def test_embedding_in_int8_is_stored_packed_and_reloads_as_codes_times_scale(tiny_model, tmp_path):
    """recipes/starquant_w4a8_head_embed_int8.yaml: the embedding is written as compressed-tensors
    writes weight-only int8 (packed int32, one scale per token row) and the core reload looks
    tokens up in the dequantized matrix."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    from starquant_plugin import load as load_checkpoint

    directory, dataset, tasks = tiny_model
    output = tmp_path / "q"
    assert main(["quantize", str(directory), "--recipe", str(RECIPES / "starquant_w4a8_head_embed_int8.yaml"),
                 "--output", str(output), "--dataset", str(dataset), "--num-samples", "16"]) == 0
    groups = json.loads((output / "config.json").read_text())["quantization_config"]["config_groups"]
    (embedding_group,) = [g for g in groups.values() if g["targets"] == ["re:^model\\.(transformer\\.wte|embed_tokens)$"]]
    assert embedding_group["weights"]["num_bits"] == 8 and embedding_group["input_activations"] is None
    stored = load_file(output / "model.safetensors")
    original = load_file(directory / "model.safetensors")["model.transformer.wte.weight"]
    packed, scale = stored["model.transformer.wte.weight_packed"], stored["model.transformer.wte.weight_scale"]
    assert packed.dtype == torch.int32 and packed.shape == (original.shape[0], original.shape[1] // 4)
    assert scale.shape == (original.shape[0], 1)
    dequantized = unpack_from_int32(packed, 8, original.shape).float() * scale.float()
    # Round to nearest: within half a step of the original weights, per row.
    assert ((dequantized - original).abs() <= scale.float() / 2 + 1e-6).all()
    model, _ = load_checkpoint(output)
    torch.testing.assert_close(model.get_input_embeddings().weight.float(), dequantized.to(model.dtype).float())
    result = tmp_path / "eval.json"
    assert main(["eval", str(output), "--tasks", str(tasks), "--json", str(result)]) == 0


def test_embedding_quantization_of_a_tied_model_is_refused(tmp_path, capsys):
    config = tiny_config(d_model=128, mlp_hidden_size=256, weight_tying=True)
    directory = write_hub_checkpoint(tmp_path / "tied", config, random_hub_tensors(config, seed=4))
    dataset = tmp_path / "calibration.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"abc{i}=", "answer": f"answer {i}"}) + "\n" for i in range(4)))
    output = tmp_path / "out"
    assert main(["quantize", str(directory), "--recipe", str(RECIPES / "starquant_w4a8_head_embed_int8.yaml"),
                 "--output", str(output), "--dataset", str(dataset), "--num-samples", "8"]) == 2
    error = capsys.readouterr().err
    assert "model.transformer.wte" in error and "tied word embeddings" in error
    assert not output.exists()


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_that_would_destroy_the_input_is_refused_before_loading(tiny_model, tmp_path, capsys, monkeypatch, where):
    import starquant_plugin.compress.quantize as module

    directory, dataset, _ = tiny_model
    output = {"same": directory, "inside": directory / "q", "parent": directory.parent}[where]
    monkeypatch.setattr(module, "load_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["quantize", str(directory), "--recipe", str(RECIPES / "starquant_w8a8.yaml"), "--output", str(output),
                 "--dataset", str(dataset), "--overwrite"]) == 2
    assert "the input model" in capsys.readouterr().err
    assert (directory / "model.safetensors").is_file() and not (directory / "q").exists()


def test_overwrite_replaces_only_checkpoints_and_keeps_the_old_one_on_failure(tiny_model, tmp_path, capsys):
    directory, dataset, _ = tiny_model
    not_a_checkpoint = tmp_path / "notes"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "todo.txt").write_text("keep me")
    assert main(["quantize", str(directory), "--recipe", str(RECIPES / "baselines" / "rtn_w8a8.yaml"), "--output",
                 str(not_a_checkpoint), "--dataset", str(dataset), "--overwrite"]) == 2
    assert "without config.json" in capsys.readouterr().err and (not_a_checkpoint / "todo.txt").is_file()
    output = tmp_path / "out"
    arguments = ["--output", str(output), "--dataset", str(dataset), "--num-samples", "8", "--overwrite"]
    assert main(["quantize", str(directory), "--recipe", str(RECIPES / "baselines" / "rtn_w8a8.yaml"), *arguments]) == 0
    first = (output / "model.safetensors").read_bytes()
    broken = tmp_path / "broken.yaml"  # fails inside oneshot (output staged): TAC's reference is missing
    broken.write_text((RECIPES / "starquant_w8a8.yaml").read_text().replace(
        "ridge: 0.01", f"ridge: 0.01\n      reference_model: {tmp_path / 'missing'}"))
    capsys.readouterr()
    assert main(["quantize", str(directory), "--recipe", str(broken), *arguments]) == 2
    assert "TACModifier.reference_model" in capsys.readouterr().err
    assert (output / "model.safetensors").read_bytes() == first  # the old checkpoint is intact
    assert main(["quantize", str(directory), "--recipe", str(RECIPES / "starquant_w8a8.yaml"), *arguments]) == 0
    assert "starquant_config" in json.loads((output / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml", "notes", "out"]  # nothing staged left


def test_atomic_output_swaps_without_a_moment_of_neither(tmp_path, monkeypatch):
    """Where the atomic exchange is unavailable, the old checkpoint is moved aside, never deleted first."""
    from starquant_plugin.checkpoint import writer

    output = tmp_path / "out"
    real_rmtree = writer.shutil.rmtree
    for exchange in (writer._exchange, lambda a, b: False):
        monkeypatch.setattr(writer, "_exchange", exchange)
        output.mkdir(exist_ok=True)
        (output / "config.json").write_text("old")
        removed = []
        monkeypatch.setattr(writer.shutil, "rmtree", lambda path, **k: (removed.append(
            (path.name, (output / "config.json").read_text())), real_rmtree(path, **k)))
        with writer.atomic_output_dir(output, overwrite=True) as staging:
            (staging / "config.json").write_text("new")
        # When the old checkpoint is removed, the new one is already in place.
        assert len(removed) == 1 and removed[0][1] == "new"
        assert (output / "config.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_signal_cleans_up_staging_and_exits_with_one_line(tiny_model, tmp_path, signal_name):
    import signal
    import subprocess
    import sys
    import time

    directory, dataset, _ = tiny_model
    output = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "starquant_plugin.cli", "quantize", str(directory), "--recipe",
         str(RECIPES / "starquant_w8a8.yaml"), "--output", str(output), "--dataset", str(dataset), "--num-samples", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert list(tmp_path.glob(".out.partial-*")), "staging never appeared"
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + getattr(signal, signal_name)
    assert stderr.strip().splitlines()[-1] == f"starquant quantize: interrupted by {signal_name}; nothing was written"
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_calibration_records_longer_than_the_model_are_truncated_with_a_named_warning(tiny_model):
    from starquant_plugin.data import CalibrationTruncatedWarning
    from tests.conftest import tiny_tokenizer

    directory, _, _ = tiny_model
    config = json.loads((directory / "config.json").read_text())
    records = [CalibrationRecord("abc=", "a" * 3 * config["max_sequence_length"]), CalibrationRecord("abc=", "short")]
    with pytest.warns(CalibrationTruncatedWarning, match=f"1 of 2 calibration records .*{config['max_sequence_length']} tokens"):
        samples = masked_calibration_samples(tiny_tokenizer(config), records, config["mask_token_id"], 2,
                                             max_length=config["max_sequence_length"])
    assert max(len(s["input_ids"]) for s in samples) == config["max_sequence_length"]


def test_rotation_blocks_that_rule_out_tensor_parallel_sizes_are_named(tmp_path, capsys):
    """d_model 192 with 64-wide rotation blocks: a rank's slice at TP 2 (96) or 4 (48) does not hold
    whole blocks; the checkpoint is written, with a named warning per size and a summary line."""
    from starquant_plugin.compress.quantize import TensorParallelWarning

    config = tiny_config(d_model=192, n_heads=4, n_kv_heads=2, mlp_hidden_size=256)
    directory = write_hub_checkpoint(tmp_path / "m", config, random_hub_tensors(config, seed=6))
    dataset = tmp_path / "calibration.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"abc{i}=", "answer": f"answer {i}"}) + "\n" for i in range(4)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((RECIPES / "starquant_w8a8.yaml").read_text().replace("rotation_block_size: 128", "rotation_block_size: 64"))
    with pytest.warns(TensorParallelWarning, match="tensor_parallel_size=2: .*input slice 96 .*rotation block 64"):
        assert main(["quantize", str(directory), "--recipe", str(recipe), "--output", str(tmp_path / "q"),
                     "--dataset", str(dataset), "--num-samples", "8"]) == 0
    printed = capsys.readouterr().out
    assert "not servable with --tensor-parallel-size 2" in printed and "--tensor-parallel-size 4" in printed


def test_quantize_reports_time_and_memory_per_stage(tiny_model, tmp_path, capsys):
    directory, dataset, _ = tiny_model
    output = tmp_path / "q"
    assert main(["quantize", str(directory), "--recipe", str(RECIPES / "starquant_w8a8.yaml"), "--output", str(output),
                 "--dataset", str(dataset), "--num-samples", "32"]) == 0  # TAC has held-out rows
    printed = capsys.readouterr().out
    stages = json.loads((output / "quantize_report.json").read_text())["stages"]
    names = [s["name"] for s in stages]
    assert names == ["load model", "calibration data", "SGAT statistics and clip search", "weight quantizer",
                     "TAC trajectories", "TAC reference", "TAC fit", "TAC validation", "save", "other"]
    assert all(s["seconds"] >= 0 and s["peak_memory_bytes"] > 0 for s in stages)
    assert all(s["seconds"] > 0 for s in stages if s["name"] != "other")
    total = float(printed.split(" s\n")[0].rsplit("; ", 1)[1])  # the summary line's total
    assert sum(s["seconds"] for s in stages) == pytest.approx(total, abs=0.5)  # the stages add up
    assert "TAC validation" in printed and "peak memory" in printed
    # A recipe without SGAT or TAC has no such stages.
    output = tmp_path / "rtn"
    assert main(["quantize", str(directory), "--recipe", str(RECIPES / "baselines" / "rtn_w8a8.yaml"), "--output",
                 str(output), "--dataset", str(dataset), "--num-samples", "16"]) == 0
    names = [s["name"] for s in json.loads((output / "quantize_report.json").read_text())["stages"]]
    assert names == ["load model", "calibration data", "weight quantizer", "save", "other"]


def test_dtype_sets_the_precision_the_model_is_calibrated_and_written_in(tiny_model, tmp_path, capsys):
    directory, dataset, _ = tiny_model
    output = tmp_path / "bf16"
    assert main(["quantize", str(directory), "--recipe", str(RECIPES / "baselines/rtn_w8a8.yaml"), "--output",
                 str(output), "--dataset", str(dataset), "--num-samples", "8", "--dtype", "bfloat16"]) == 0
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(output / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16", "I8"}  # float tensors in bf16, int8 codes
    assert "weights on disk" in capsys.readouterr().out


@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda:0", "--device cuda:0: no such CUDA device here (0 visible)"),
        ("gpu0", "--device: 'gpu0' is not a device (auto, cpu, cuda, cuda:N)"),
        ("meta", "--device: 'meta': cpu or cuda[:N]"),
    ],
)
def test_a_device_that_is_not_here_is_refused_before_loading(tiny_model, tmp_path, capsys, device, message):
    directory, dataset, _ = tiny_model
    assert main(["quantize", str(directory), "--recipe", str(RECIPES / "baselines/rtn_w8a8.yaml"), "--output",
                 str(tmp_path / "out"), "--dataset", str(dataset), "--device", device]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_device_chooses_where_llm_compressor_calibrates_each_block(tiny_model, tmp_path, monkeypatch):
    """--device cpu: the sequential pipeline onloads blocks to the CPU (what `get_main_device` says
    during oneshot), and llm-compressor's own choice is back afterwards."""
    from llmcompressor.pipelines.sequential import pipeline as sequential

    directory, dataset, _ = tiny_model
    seen, original = [], sequential.get_main_device
    monkeypatch.setattr(sequential, "set_onload_device", lambda model, device: seen.append(device))
    assert main(["quantize", str(directory), "--recipe", str(RECIPES / "baselines/gptq_w8a8.yaml"), "--output",
                 str(tmp_path / "out"), "--dataset", str(dataset), "--num-samples", "8", "--device", "cpu"]) == 0
    assert seen == [torch.device("cpu")] and sequential.get_main_device is original
