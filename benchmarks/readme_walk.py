"""Walk the README as a newcomer would: clone this checkout into a fresh folder, run every command
of the README there in order, and check that each did what the README says, printed no traceback
or warning nobody asked for, and left the clone as it was (`git status --porcelain` empty).

python benchmarks/readme_walk.py [--small] [--folder DIR]

The steps come from the README itself, in the order they appear: its ```bash blocks, the
`python benchmarks/...` commands in its text, and its ```python blocks (run as written). The clone
holds this checkout's uncommitted changes too (committed in the clone), and the commands run its
code with this Python. A command that needs what this machine lacks (your images, SD weights, a
GPU, an hour of training) is listed as skipped, with why. --small appends settings that make each
command take seconds (fewer steps and images; the Python lines stay as written); the suite runs
it so (tests/test_readme.py).
"""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO_IMAGES = ROOT / "ph2p_lit" / "demo" / "images"
INPUTS = {"a.png": 0, "b.png": 1, "c.png": 2}  # the user's own images the README's examples name: demo renders

# Why a README command cannot run here; matched against the command text.
CANNOT_RUN = {
    "my_images/": "needs your images",
    "/path/to/": "needs SD weights on disk",
    "configs/sd15.yaml": "needs SD 1.5 weights and a GPU",
    "configs/sd21.yaml": "needs SD 2.1 weights and a GPU",
    "configs/sdxl.yaml": "needs SDXL weights and a GPU",
    "stable-diffusion-v1-5/": "needs SD 1.5 weights",
    "targets/": "needs your target and negative images",
    "train-demo": "trains for about an hour",
    "train-caption-lm": "trains the caption model into the package",
    "ablation.py": "runs for hours",
    "readme_walk.py": "is this walk",
    "make test": "is the test suite itself",
    "pytest": "is the test suite itself",
    "source .venv/bin/activate": "the walk runs in this environment already",
    "app_figure.py": "needs Chromium (apt-get install chromium)",
    "bookkeeping.py": "writes 111,000 files and takes minutes (tests/test_benchmarks.py runs it small)",
}

# Extra settings that keep each command to seconds (--small); the checks do not depend on them.
SMALL = {
    "invert": ["--model.steps=2", "--model.refinement.draws=4", "--model.refinement.screen_draws=2",
               "--model.refinement.budget=40"],
    "reconstruct": ["--model.steps=3"],
    "generate": ["--steps=2", "--images_per_prompt=2"],
    "evaluate": ["--steps=2", "--images_per_prompt=1"],
    "compose": ["--steps=2", "--images_per_prompt=1", "--invert_settings={model: {steps: 2, refinement: null}}"],
    "benchmarks/demo_figure.py": ["--samples", "1"],
    "benchmarks/demo_npi.py": ["--n", "2"],
}

# Output no one asked for: a traceback, a library's warning (printed as path:line: ...), its tips
# and notes, weight-loading bars.
UNASKED = re.compile(r"Traceback \(most recent call last\)|Warning|site-packages|Loading weights|Tip:"
                     r"|^(GPU|TPU) available|^Seed set")


@dataclass
class Step:
    kind: str  # "bash" or "python"
    text: str


def readme_steps(text: str | None = None) -> list[Step]:
    """Every command of the README in order: bash lines (comments dropped, continuations joined,
    `a && b` as two), `python benchmarks/...` in the prose, and each python block whole."""
    text = README.read_text() if text is None else text
    found = []  # (offset, step)
    for block in re.finditer(r"```(bash|python)\n(.*?)```", text, flags=re.S):
        kind, body = block.groups()
        if kind == "python":
            found.append((block.start(), Step("python", body)))
            continue
        for k, line in enumerate(body.replace("\\\n", " ").splitlines()):
            line = line.split("   #")[0].split("  #")[0].strip()
            if line and not line.startswith("#"):
                found += [(block.start() + k, Step("bash", part.strip())) for part in line.split("&&")]
    prose = re.sub(r"```.*?```", lambda m: " " * len(m.group()), text, flags=re.S)  # keeps the offsets
    for span in re.finditer(r"`(python benchmarks/[^`]+)`", prose):
        found += [(span.start(), Step("bash", part.strip())) for part in span.group(1).split("&&")]
    return [step for _, step in sorted(found, key=lambda item: item[0])]


def unasked_output(output: str) -> list[str]:
    """The lines of a command's output that nobody asked for (see UNASKED)."""
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines()]
    return [line for line in lines if UNASKED.search(line)]


def written_paths(command: str) -> list[str]:
    """Where a README command writes, as it names them: --out, --out_dir, --folder,
    --trainer.default_root_dir, run_dir=, and a shell redirection."""
    found = re.findall(r"(?:--out|--out_dir|--folder|--trainer\.default_root_dir|--plot)[ =](\S+)", command)
    found += re.findall(r"run_dir=\"([^\"]+)\"", command) + re.findall(r"(?:^|\s)>\s*(\S+)", command)
    return found


def clone(folder: Path) -> Path:
    """A fresh clone of this checkout, with its uncommitted changes (and files git does not ignore)
    committed in the clone, so that `git status` there starts empty."""
    git = ["git", "-c", "user.name=readme walk", "-c", "user.email=walk@localhost"]
    subprocess.run(["git", "clone", "-q", str(ROOT), str(folder)], check=True)
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=ROOT, capture_output=True, check=True).stdout
    if diff:
        subprocess.run(["git", "apply", "--whitespace=nowarn"], cwd=folder, input=diff, check=True)
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, untracked):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, folder / name)
    subprocess.run(git + ["add", "-A"], cwd=folder, check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "the checkout's uncommitted changes"], cwd=folder,
                   check=True)
    return folder


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def check(command: str, folder: Path, before: dict) -> str:
    """What the README says the command does, checked in `folder`; '' if it did, else what is wrong.
    A reconstruction's mean PSNR is returned after 'ok: ' for the table."""
    n_demo = len(list(DEMO_IMAGES.glob("*.png")))
    if command.startswith(("make demo", "ph2p invert --config configs/demo.yaml")) and "--print_config" not in command:
        rows = lines(folder / "runs/demo/prompts.jsonl")
        if len(rows) != n_demo or not all(r["prompt"] for r in rows):
            return f"runs/demo/prompts.jsonl has {len(rows)} prompts, not {n_demo}"
        return "" if (folder / "runs/demo/report.html").is_file() else "no runs/demo/report.html"
    if "--print_config >" in command:
        out = folder / written_paths(command)[-1]
        text = out.read_text() if out.is_file() else ""
        return "" if "model:" in text and "data:" in text else f"{out.name} is not a full config"
    if command.startswith("ph2p reconstruct"):
        rows = lines(folder / "runs/reconstruct/reconstructions.jsonl")
        added = rows[before.get("reconstructions", 0):]
        if len(added) != n_demo:
            return f"{len(added)} reconstructions added, not {n_demo} (was every image skipped?)"
        return f"ok: mean PSNR {sum(r['psnr'] for r in added) / len(added):.2f} dB"
    if command.startswith("ph2p generate"):
        grids = list((folder / "runs/generate").glob("*.png"))
        return "" if len(grids) == n_demo else f"{len(grids)} grids in runs/generate, not {n_demo}"
    if command.startswith("ph2p compose"):
        return "" if (folder / "runs/compose/compose.html").is_file() else "no runs/compose/compose.html"
    if command.startswith("ph2p evaluate"):
        metrics = folder / "runs/demo/metrics.json"
        return "" if metrics.is_file() and json.loads(metrics.read_text()) else "no runs/demo/metrics.json"
    if command.startswith("python benchmarks/demo_figure.py"):
        return "" if (folder / "runs/figures/demo.png").is_file() else "no runs/figures/demo.png"
    if command.startswith("python benchmarks/demo_npi.py"):
        out = folder / written_paths(command)[0]
        return "" if (out / "rec_prompt_g7.5" / "reconstructions.jsonl").is_file() else f"no reconstructions in {out}"
    if command.startswith("python benchmarks/npi_figures.py"):
        made = [name for name in ("reconstruct", "attention", "generate", "compose")
                if (folder / "runs/figures" / f"{name}.png").is_file()]
        return "" if len(made) == 4 else f"runs/figures has only {made}"
    if command.startswith("ph2p export"):
        out = {"txt": folder / "runs/demo/captions", "imagefolder": folder / "runs/demo/imagefolder",
               "csv": folder / "runs/demo/prompts.csv"}[command.split("--format ")[1].split()[0]]
        count = (len(list(out.rglob("*.txt"))) if out.name == "captions" else
                 len(lines(out / "metadata.jsonl")) if out.name == "imagefolder" else
                 len(out.read_text(encoding="utf-8").splitlines()) - 1 if out.is_file() else 0)
        return "" if count == n_demo else f"{out.relative_to(folder)} holds {count} prompts, not {n_demo}"
    return "no check for this command"


def check_python(code: str, folder: Path) -> str:
    """The README's Python lines: the rows they return are the run folders' lines."""
    problems = []
    if "invert(" in code and len(lines(folder / "runs/mine/prompts.jsonl")) != 2:
        problems.append("runs/mine/prompts.jsonl has not 2 prompts")
    if "reconstruct(" in code and not any(r.get("edit") == "red->blue"
                                          for r in lines(folder / "runs/reconstruct/reconstructions.jsonl")):
        problems.append("no red->blue edit in runs/reconstruct")
    return "; ".join(problems)


def argv(command: str, small: bool) -> tuple[list[str], str | None]:
    """The process a README command starts here (this Python, the clone's code), and the file its
    shell redirection names."""
    makefile = (ROOT / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n\t\$\(VENV\)/bin/(.+)$", makefile, flags=re.M).group(1)  # what `make demo` runs
    args = shlex.split(command.replace("make demo", demo))
    out = None
    if ">" in args:
        out, args = args[args.index(">") + 1], args[: args.index(">")]
    key = args[1] if args[0] == "ph2p" else args[1] if args[0] == "python" else ""
    if small and key in SMALL and "--print_config" not in args:
        args += SMALL[key]
    if args[0] == "ph2p":
        return [sys.executable, "-m", "ph2p_lit.cli", *args[1:]], out
    return [sys.executable, *args[1:]], out


def walk(folder: Path, small: bool) -> list[tuple[str, str]]:
    """(step, outcome) for every README step, run in order in a fresh clone at `folder`, then one
    row for the state of the clone afterwards."""
    clone(folder)
    for name, k in INPUTS.items():
        shutil.copy(sorted(DEMO_IMAGES.glob("*.png"))[k], folder / name)
    env = {**os.environ, "PYTHONPATH": str(folder)}
    results = []
    for step in readme_steps():
        shown = step.text.strip().replace("\n", "; ")
        why = next((why for key, why in CANNOT_RUN.items() if key in step.text), None)
        if why:
            results.append((shown, f"skipped: {why}"))
            continue
        before = {"reconstructions": len(lines(folder / "runs/reconstruct/reconstructions.jsonl"))}
        if step.kind == "python":
            args, out = [sys.executable, "-c", step.text], None
        else:
            args, out = argv(step.text, small)
        start = time.monotonic()
        done = subprocess.run(args, cwd=folder, capture_output=True, text=True, env=env)
        took = f" ({time.monotonic() - start:.0f} s)"
        if out:
            (folder / out).write_text(done.stdout)
        output = done.stderr + ("" if out else done.stdout)
        if done.returncode != 0:
            results.append((shown, f"FAILED (exit {done.returncode}){took}: {done.stderr.strip().splitlines()[-1:]}"))
            continue
        noise = unasked_output(output)
        problem = check_python(step.text, folder) if step.kind == "python" else check(step.text, folder, before)
        if noise:
            problem = f"printed what nobody asked for: {noise[:3]}" + (f"; {problem}" if problem else "")
        results.append((shown, (problem if problem.startswith("ok") else f"FAILED: {problem}" if problem else "ok") + took))
    for name in INPUTS:  # the user's images, not something a command wrote
        (folder / name).unlink()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=folder, capture_output=True, text=True).stdout
    results.append(("git status --porcelain, after all of them", f"FAILED: {status.split()}" if status else "ok: empty"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="fewer steps and images: seconds per command")
    parser.add_argument("--folder", help="where to clone (a new folder; default: a new temporary one)")
    args = parser.parse_args()
    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="readme_walk_")) / "ph2p-lit"
    results = walk(folder, args.small)
    print("| README step | outcome |\n|---|---|")
    for step, outcome in results:
        print(f"| `{step}` | {outcome} |")
    if any(outcome.startswith("FAILED") for _, outcome in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
