"""The README's Python snippets for the serve environment run as written."""

import pytest

from tests.conftest import readme_snippets, run_readme_snippet

SNIPPETS = readme_snippets("serve")


def test_the_readme_has_the_snippets():
    assert len(SNIPPETS) == 2  # DiffusionLLM, core generation


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path):
    assert "4269" in run_readme_snippet(SNIPPETS[index], tmp_path)  # 0417+3852 on the shipped model
