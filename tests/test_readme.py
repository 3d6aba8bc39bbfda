"""The README's commands, run in order in a fresh clone, each doing what the README says without a
traceback or a warning, and the clone unchanged after them (benchmarks/readme_walk.py, small settings)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import readme_walk  # noqa: E402


@pytest.mark.slow
def test_every_runnable_readme_command_does_what_the_readme_says(tmp_path):
    results = readme_walk.walk(tmp_path / "clone", small=True)
    failed = [(command, outcome) for command, outcome in results if not outcome.startswith(("ok", "skipped"))]
    assert not failed, failed
    ran = [command for command, outcome in results if outcome.startswith("ok")]
    # the demo, the figure, the Python lines, print_config, reconstruct x3, generate, compose, the
    # pictures (two scripts), evaluate, and the clone's git status
    assert len(ran) >= 13, results
    assert any("--model.edit" in command for command in ran)  # the edit after a reconstruction is new work
    assert any("reconstruct(" in command for command in ran)  # the README's Python lines, as written
