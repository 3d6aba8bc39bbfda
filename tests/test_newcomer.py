"""The README as a newcomer walks it (issue 28): help that prints before the libraries load, the
README's lines running as written, a repository left as it was, one line for what is missing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a run needs and `--help` must not load (seconds each on 2 cores).
RUN_ONLY_LIBRARIES = ("diffusers", "transformers", "datasets", "lpips", "accelerate")


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
    import ph2p_lit
    from ph2p_lit import invert
    from ph2p_lit.api import invert as defined

    _, modules = _modules_after("import ph2p_lit")
    assert "torch" not in modules
    assert invert is defined and all(getattr(ph2p_lit, name) for name in ph2p_lit.__all__)


@pytest.mark.parametrize("command", ["invert", "reconstruct"])
def test_help_is_our_options_in_a_screenful_before_torch_loads(command):
    text, modules = _modules_after(f"from ph2p_lit.cli import main; main(['{command}', '--config', 'demo', '--help'])")
    lines = text.splitlines()
    assert len(lines) <= 120, len(lines)
    assert "--model.model=demo" in text and "--data.root" in text and "--help-all" in text
    assert "--trainer.devices" not in text and "Linked arguments" not in text
    assert max(map(len, lines)) <= 80  # a terminal's width
    assert not {"torch", "lightning", *RUN_ONLY_LIBRARIES} & modules
    if command == "invert":
        assert "--model.prompt_length=15" in text


def test_the_help_printed_before_torch_loads_is_the_parsers():
    """ph2p_lit/help/*.txt are what the parsers print; after changing an option or its docstring,
    `python -m ph2p_lit.lightning_cli` writes them again."""
    from ph2p_lit.cli import HELP_FILES
    from ph2p_lit.lightning_cli import help_text

    for command in ("invert", "reconstruct"):
        assert (HELP_FILES / f"{command}.txt").read_text() == help_text(command), \
            f"{command}: run `python -m ph2p_lit.lightning_cli`"


def test_invert_help_all_adds_the_trainer(capsys):
    from ph2p_lit.cli import main

    with pytest.raises(SystemExit):
        main(["invert", "--help-all"])
    text = capsys.readouterr().out
    assert text.startswith("usage: ph2p invert")
    assert text.index("--model.prompt_length") < text.index("--data.root") < text.index("--trainer.devices")
    assert "applied on parse" in text  # the linked settings, which only --help-all explains
    assert "--optimizer " not in text  # Lightning's optimiser flags, which the model does not use


# ---------------------------------------------------------------- weights not on this machine (items 2, 8)
@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No hub (HF_HUB_OFFLINE) and an empty torch hub cache (no LPIPS backbone weights)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def _one_line_quickly(call, *named: str) -> str:
    import time

    from ph2p_lit.errors import InputError

    start = time.monotonic()
    with pytest.raises(InputError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in named), message
    assert time.monotonic() - start < 10  # no retries, no model loaded
    return message


def test_invert_names_every_missing_weight_at_once_before_loading(offline):
    from ph2p_lit.inversion import PromptInversion
    from ph2p_lit.refine import Refinement
    from ph2p_lit.selection import Selection

    message = _one_line_quickly(lambda: PromptInversion(
        model="nobody/no-such-sd", refinement=Refinement(language_model="nobody/no-such-lm"),
        selection=Selection(clip_model="nobody/no-such-clip")),
        "model.model='nobody/no-such-sd'", "model.refinement.language_model='nobody/no-such-lm'",
        "model.selection.clip_model='nobody/no-such-clip'", "HF_HUB_OFFLINE")
    assert "hf download nobody/no-such-lm" in message


def test_reconstruct_names_the_model_and_lpips_weights_at_once(offline):
    from ph2p_lit.reconstruction import Reconstruction

    _one_line_quickly(lambda: Reconstruction(model="nobody/no-such-sd"),
                      "model.model='nobody/no-such-sd'", "alexnet-owt-7be5be79.pth", "model.lpips_backbone=random")


def test_evaluate_names_every_missing_weight_at_once(offline, tmp_path):
    from ph2p_lit.evaluation import evaluate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"image_id": "a.png", "source": "a.png", "prompt": "a red star"}\n')
    _one_line_quickly(lambda: evaluate(str(prompts), model="nobody/no-such-sd", clip_model="nobody/no-such-clip",
                                       bert_model="nobody/no-such-bert"),
                      "model='nobody/no-such-sd'", "clip_model='nobody/no-such-clip'",
                      "bert_model='nobody/no-such-bert'", "lpips_backbone=random")


def test_a_missing_lpips_weight_from_python_is_the_message_not_lightnings_stack(offline, tmp_path, tiny_model):
    """The README's `reconstruct(...)` offline: the InputError with what to set, raised from the
    API's own frame (not 40 lines through LightningCLI and jsonargparse)."""
    import traceback

    from ph2p_lit import reconstruct
    from ph2p_lit.errors import InputError

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"image_id": "a.png", "source": "a.png", "prompt": "a red star"}\n')
    with pytest.raises(InputError, match="model.lpips_backbone=random") as e:
        reconstruct(prompts, model={"model": tiny_model}, run_dir=tmp_path / "run")
    frames = traceback.extract_tb(e.tb)
    assert [f.name for f in frames[1:]] == ["reconstruct"], [f"{f.filename}:{f.name}" for f in frames]


# ---------------------------------------------------------------- noise (item 6)
def _noise(output: str) -> list[str]:
    """Lines a library printed that the user did not ask for: warnings (file:line: ...), weight
    loading bars, Lightning's tips and notes."""
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines()]
    return [line for line in lines if "site-packages" in line or "Warning" in line or "Loading weights" in line
            or "Tip:" in line or line.startswith(("GPU available", "TPU available", "Seed set"))]


def _ph2p(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ph2p_lit.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_the_readme_checkpoint_recipe_and_its_resume_warn_of_nothing(tiny_model, image_folder, tmp_path, recwarn):
    from ph2p_lit.cli import main

    run = ["invert", f"--model.model={tiny_model}", "--model.prompt_length=2", "--model.steps=2", "--model.max_iter=1",
           "--model.refinement=null", f"--data.root={image_folder}", "--data.limit=1",
           f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.enable_checkpointing=true",
           "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=1",
           "--trainer.callbacks.save_last=true"]
    main(run)
    assert (tmp_path / "run/checkpoints/last.ckpt").is_file()
    main(run + ["--ckpt_path=last"])  # the README's "killed? the same command with --ckpt_path=last"
    shown = [w for w in recwarn if not issubclass(w.category, DeprecationWarning)]  # Python hides those from users
    assert [f"{w.filename}: {str(w.message)[:100]}" for w in shown] == []


def test_generate_prints_no_weight_loading_bars(tiny_model, tmp_path):
    result = _ph2p("generate", "--prompts=[a red star]", f"--model={tiny_model}", "--steps=1", "--images_per_prompt=1",
                   f"--out={tmp_path / 'gen'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert _noise(result.stdout + result.stderr) == []


def test_the_reconstruct_bar_ends_before_the_table(tiny_model, image_folder, tmp_path, capsys):
    import json

    from ph2p_lit.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"image_id": "img0.png", "source": f"{image_folder}/img0.png",
                                   "source_root": image_folder, "prompt": "a"}) + "\n")
    main(["reconstruct", f"--model.model={tiny_model}", "--model.steps=2", "--model.lpips_backbone=random",
          f"--data.prompts={prompts}", f"--trainer.default_root_dir={tmp_path / 'rec'}"])
    out = capsys.readouterr().out
    assert "Predicting" not in out and "DataLoader 0" not in out
    assert out.rindex("reconstruct:") < out.index("PSNR")  # the bar's last frame, then the table


def test_train_demo_prints_no_model_summary():
    from lightning.pytorch.callbacks import ModelSummary

    from ph2p_lit.demo.train import _trainer

    assert not any(isinstance(c, ModelSummary) for c in _trainer(1, "x").callbacks)


# ---------------------------------------------------------------- the README, read before it is run (items 4, 5)
sys.path.insert(0, str(ROOT / "benchmarks"))
import readme_walk  # noqa: E402


def test_the_walk_takes_every_readme_step_in_order():
    steps = readme_walk.readme_steps()
    texts = [s.text for s in steps]
    assert texts[0] == "make demo" and "source .venv/bin/activate" in texts
    python = [s.text for s in steps if s.kind == "python"]
    assert python and all("import" in code for code in python)  # whole blocks, run as written
    inline = [t for t in texts if t.startswith("python benchmarks/")]
    assert {"demo_figure.py", "demo_npi.py", "npi_figures.py"} <= {t.split()[1].split("/")[-1] for t in inline}
    order = [texts.index(next(t for t in texts if key in t)) for key in
             ("make demo", "demo_figure.py", "ph2p reconstruct", "demo_npi.py", "npi_figures.py", "ph2p evaluate")]
    assert order == sorted(order)


def test_every_place_a_readme_command_writes_is_ignored_by_git():
    """A README command's output lands in runs/ (ignored), never in a tracked file or a new folder
    in the clone (the figure scripts wrote docs/*.png, the pictures' line a W/ folder)."""
    written = {path for step in readme_walk.readme_steps() for path in readme_walk.written_paths(step.text)
               if not any(key in step.text for key in ("--out_dir ph2p_lit/", "train-caption-lm"))}
    assert written
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(written),
                             capture_output=True, text=True).stdout.split()
    assert sorted(written - set(ignored)) == []


def test_no_benchmark_writes_into_docs_unless_told():
    import ast

    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        calls = [n for n in ast.walk(ast.parse(script.read_text())) if isinstance(n, ast.Call)
                 and getattr(n.func, "attr", "") == "add_argument"]
        defaults = [k.value.value for c in calls for k in c.keywords if k.arg == "default"
                    and isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)]
        assert not [d for d in defaults if d.startswith("docs")], script.name


def test_the_readme_puts_ph2p_on_the_path_before_using_it():
    """After `make demo` the commands are in .venv/bin, not on PATH: the README says so before its
    first bare `ph2p` or `python benchmarks/` line."""
    text = [s.text for s in readme_walk.readme_steps()]
    first_bare = next(k for k, t in enumerate(text) if t.startswith(("ph2p ", "python ")))
    assert "source .venv/bin/activate" in text[:first_bare]


# ---------------------------------------------------------------- what the numbers cover (item 9)
def test_the_report_says_what_each_mean_covers_and_that_lpips_is_random(tmp_path):
    import json
    from types import SimpleNamespace

    from ph2p_lit import report
    from ph2p_lit.runs import append_line

    for k in range(3):
        append_line(tmp_path / "prompts.jsonl", {"image_id": f"i{k}.png", "prompt": "a red star"})
    (tmp_path / "metrics.json").write_text(json.dumps({"settings": {"lpips": "alex, random backbone"}}))
    metrics = {"i0.png": {"lpips_to_target": 0.2, "word_f1": 1.0}, "i1.png": {"lpips_to_target": 0.4}}
    page = report.write_report(tmp_path, SimpleNamespace(resolution=16), {}, images_per_prompt=0,
                               metrics=metrics).read_text()
    assert "<td>lpips_to_target</td><td>0.300</td><td>lower is better</td><td>2 of 3 images</td>" in page
    assert "<td>word_f1</td><td>1.000</td><td>higher is better</td><td>1 of 3 images</td>" in page
    assert "alex, random backbone" in page and "not the published metric" in page
