"""The vLLM backend refuses a corrupted checkpoint, or one it cannot serve, in the calling process
before an engine starts: one error naming the file and the tensor, field or layer, in seconds."""

import json
import os
import subprocess
import sys
import time

import pytest

from starquant_plugin.checkpoint import validate_checkpoint
from starquant_plugin.errors import InputError
from starquant_plugin.serving.servable import tensor_parallel_problem
from tests.checkpoint_corruptions import CORRUPTIONS, copy_checkpoint, edit_config

vllm = pytest.importorskip("vllm", reason="the serve environment (.venv/serve) runs these")

from starquant_plugin.serving import DiffusionLLM  # noqa: E402


class EngineStarted(AssertionError):
    pass


@pytest.fixture
def no_engine(monkeypatch):
    """`vllm.LLM` replaced by a stand-in that fails the test if anything tries to start an engine."""
    import vllm.platforms  # imported before the clock starts

    def start(*args, **kwargs):
        raise EngineStarted("the vLLM engine was started")

    monkeypatch.setattr(vllm, "LLM", start)


def refused_before_the_engine(directory, message: str, **options) -> str:
    started = time.monotonic()
    with pytest.raises(InputError, match=message) as error:
        DiffusionLLM(directory, **options)
    assert time.monotonic() - started < 10, "validation must not wait for an engine"
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_checkpoint_is_refused_before_the_engine_starts(starquant_w8a8_checkpoint, tmp_path, no_engine,
                                                                  corruption):
    corrupt, message = CORRUPTIONS[corruption]
    directory = copy_checkpoint(starquant_w8a8_checkpoint, tmp_path / "checkpoint")
    corrupt(directory)
    refused_before_the_engine(directory, message)


def test_intact_checkpoint_reaches_the_engine(starquant_w8a8_checkpoint, no_engine):
    with pytest.raises(EngineStarted):
        DiffusionLLM(starquant_w8a8_checkpoint)


def test_tensor_parallel_slices_must_fit_the_rotation_block(starquant_w8a8_checkpoint, no_engine):
    """d_model 128, SGAT rotation block 128: at TP 2 each rank's slice of attn_out's input is 64."""
    message = refused_before_the_engine(
        starquant_w8a8_checkpoint,
        r"config\.json: tensor_parallel_size=2: model\.transformer\.blocks\.0\.attn_out \(and every block's\) input "
        r"slice 64 \(128 / 2\) is not a multiple of its SGAT rotation block 128; sizes that work: 1$",
        tensor_parallel_size=2,
    )
    assert "Engine core" not in message
    checkpoint = validate_checkpoint(starquant_w8a8_checkpoint)
    assert tensor_parallel_problem(checkpoint, 1) is None
    assert "num_attention_heads=4 is not divisible by 3" in tensor_parallel_problem(checkpoint, 3)


def test_tensor_parallel_check_on_the_brief_shape(starquant_w8a8_checkpoint, tmp_path, no_engine):
    """The shape vLLM failed on inside a worker: d_model 192 (rotation block 64), GQA, TP 2 -> slice 96."""
    directory = copy_checkpoint(starquant_w8a8_checkpoint, tmp_path / "checkpoint")
    checkpoint = validate_checkpoint(directory)
    checkpoint.model_config.d_model, checkpoint.model_config.n_heads = 192, 4
    assert tensor_parallel_problem(checkpoint, 2) == (
        "model.transformer.blocks.0.attn_out (and every block's) input slice 96 (192 / 2) is not a multiple of its "
        "SGAT rotation block 64"
    )


@pytest.mark.parametrize(
    "scheme, reason",
    [
        ({"num_bits": 4}, r"W8A4 .*int4 activations are served with int4 weights only"),
        ({"type": "float"}, r"W8A8 .*float8 activations .*only dynamic per-token integer activation quantization"),
    ],
)
def test_schemes_the_plugin_cannot_serve_are_named(starquant_w8a8_checkpoint, tmp_path, no_engine, scheme, reason):
    directory = copy_checkpoint(starquant_w8a8_checkpoint, tmp_path / "checkpoint")
    edit_config(directory, lambda c: [g["input_activations"].update(scheme)
                                      for g in c["quantization_config"]["config_groups"].values()])
    refused_before_the_engine(directory, rf"config\.json: quantization_config quantizes "
                                         rf"model\.transformer\.blocks\.0\.q_proj as {reason}")


def test_weight_only_sgat_sites_are_not_served(starquant_w8a8_checkpoint, tmp_path, no_engine):
    directory = copy_checkpoint(starquant_w8a8_checkpoint, tmp_path / "checkpoint")
    edit_config(directory, lambda c: [g.update(input_activations=None)
                                      for g in c["quantization_config"]["config_groups"].values()])
    refused_before_the_engine(directory, r"quantizes model\.transformer\.blocks\.0\.q_proj as W8A16 .*which the vLLM "
                                         r"backend cannot serve: weight-only quantization of an SGAT site")
    assert json.loads((directory / "config.json").read_text())["starquant_config"]["sgat"] is not None


def test_vllm_without_the_plugin_refuses_the_checkpoint(starquant_w8a8_checkpoint, tmp_path):
    """Plain vLLM (no starquant plugin loaded) must refuse a STaR-Quant checkpoint, not serve garbage."""
    script = tmp_path / "plain_vllm.py"
    script.write_text(
        "import sys\nfrom vllm import LLM\n"
        "try:\n    LLM(sys.argv[1], enforce_eager=True, max_model_len=128)\n"
        "except Exception as error:\n    print('REFUSED', error)\n    sys.exit(3)\n"
        "print('LOADED')\n"
    )
    environment = {**os.environ, "VLLM_PLUGINS": "no-such-plugin", "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([sys.executable, str(script), str(starquant_w8a8_checkpoint)], capture_output=True,
                          text=True, timeout=300, env=environment)
    assert done.returncode == 3 and "REFUSED" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert "llada" in done.stdout  # vLLM names the architecture it does not know
