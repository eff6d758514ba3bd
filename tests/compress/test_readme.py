"""The README's Python snippets for this environment run as written."""

import json

import pytest

from tests.conftest import readme_snippets, run_readme_snippet

SNIPPETS = readme_snippets("compress")


def test_the_readme_has_the_snippets():
    assert len(SNIPPETS) == 2  # oneshot, core generation


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path):
    stdout = run_readme_snippet(SNIPPETS[index], tmp_path)
    if "oneshot(" in SNIPPETS[index]:
        config = json.loads((tmp_path / "results" / "oneshot_starquant_w8a8" / "config.json").read_text())
        assert config["starquant_config"]["sgat"]["weight_bits"] == 8 and config["starquant_config"]["tac"]
    else:
        assert "4269" in stdout  # the shipped model adds
