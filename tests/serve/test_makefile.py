"""`make setup` rebuilds the serve environment when its requirements change, including a switch
to the CUDA vLLM wheel (its stamp names the requirements file and a hash of it). In the serve
suite: `make test-serve` has built (and stamped) that environment before it runs."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def dry_run(*arguments: str) -> str:
    if shutil.which("make") is None:
        pytest.fail("make is needed (the README's set-up runs it)")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    done = subprocess.run(["make", "-n", "setup-serve", *arguments], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_up_to_date_serve_environment_is_left_alone():
    """The suite runs after `make setup`, which stamped the environment it built."""
    assert "pip install" not in dry_run()


def test_switching_to_the_cuda_requirements_rebuilds_from_scratch():
    commands = dry_run("SERVE_REQUIREMENTS=requirements/serve-cuda.txt")
    assert commands.index("rm -rf .venv/serve") < commands.index("-m venv .venv/serve")
    assert "pip install -q -r requirements/serve-cuda.txt" in commands
    assert "touch .venv/serve/.installed-serve-cuda-" in commands


def test_an_edited_requirements_file_rebuilds(tmp_path):
    edited = tmp_path / "serve-cpu.txt"
    edited.write_text((ROOT / "requirements" / "serve-cpu.txt").read_text() + "# edited\n")
    commands = dry_run(f"SERVE_REQUIREMENTS={edited}")
    assert "rm -rf .venv/serve" in commands and f"pip install -q -r {edited}" in commands
