"""The README's commands, run in order in a fresh folder outside the clone, each doing what the
README says (benchmarks/readme_walk.py with small settings)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import readme_walk  # noqa: E402


@pytest.mark.slow
def test_every_runnable_readme_command_does_what_the_readme_says(tmp_path):
    results = readme_walk.walk(tmp_path, small=True)
    failed = [(command, outcome) for command, outcome in results if not outcome.startswith(("ok", "skipped"))]
    assert not failed, failed
    ran = [command for command, outcome in results if outcome == "ok"]
    assert len(ran) >= 8  # the demo, print_config, reconstruct x3, generate, compose, evaluate
    assert any("--model.edit" in command for command in ran)  # the edit after a reconstruction is new work
