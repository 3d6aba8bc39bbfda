"""The README as a newcomer walks it (issue 28): help that prints before the libraries load, the
README's lines running as written, a repository left as it was, one line for what is missing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a run needs and `--help` must not load (measured: 1-2 s each on 2 cores).
RUN_ONLY_LIBRARIES = ("diffusers", "datasets", "lpips", "accelerate", "transformers.modeling_utils")


def _modules_after(code: str, columns: int = 80) -> tuple[str, set[str]]:
    """Run `code` in a fresh interpreter; its stdout and the modules it loaded."""
    script = f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\nprint('\\nMODULES', *sorted(sys.modules))"
    env = {**os.environ, "COLUMNS": str(columns), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300, check=True).stdout
    text, _, modules = out.rpartition("\nMODULES ")
    return text, set(modules.split())


def test_ph2p_help_loads_no_torch():
    text, modules = _modules_after("from ph2p_lit.cli import main; main(['--help'])")
    assert "invert" in text and "train-demo" in text
    assert not {"torch", "lightning", *RUN_ONLY_LIBRARIES} & modules


def test_the_package_loads_its_parts_when_named():
    _, modules = _modules_after("import ph2p_lit")
    assert "torch" not in modules
    _, modules = _modules_after("from ph2p_lit import invert, Vocabulary; assert callable(invert)")
    assert "ph2p_lit.api" in modules and "ph2p_lit.vocab" in modules


def test_invert_help_is_our_options_in_a_screenful_without_the_run_libraries():
    text, modules = _modules_after("from ph2p_lit.cli import main; main(['invert', '--help'])")
    lines = text.splitlines()
    assert len(lines) <= 120, len(lines)
    assert "--model.prompt_length" in text and "--data.root" in text and "--help-all" in text
    assert "--trainer.devices" not in text and "Linked arguments" not in text
    assert max(map(len, lines)) <= 80  # the terminal's width
    assert not set(RUN_ONLY_LIBRARIES) & modules


def test_invert_help_all_adds_the_trainer(capsys):
    from ph2p_lit.cli import main

    with pytest.raises(SystemExit):
        main(["invert", "--help-all"])
    text = capsys.readouterr().out
    assert text.startswith("usage: ph2p invert")
    assert text.index("--model.prompt_length") < text.index("--data.root") < text.index("--trainer.devices")
    assert "applied on parse" in text  # the linked settings, which only --help-all explains
    assert "--optimizer " not in text  # Lightning's optimiser flags, which the model does not use
