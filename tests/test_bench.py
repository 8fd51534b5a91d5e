"""The benchmark commands run end to end (marked slow: they time things; figures go in the notes)."""

import pytest
from typer.testing import CliRunner

from edge2dexit.cli import app


@pytest.mark.slow
@pytest.mark.llama
def test_engine_benchmark_prints_every_ratio(smollm2_path):
    res = CliRunner().invoke(app, ["bench", "engine", "--model", smollm2_path, "--rounds", "1"])
    assert res.exit_code == 0, res.output
    for words in ("stopped after 7/30", "read ahead to 64 tokens", "eval-callback overhead", "sentence splitter share"):
        assert words in res.stdout
