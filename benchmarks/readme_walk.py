"""Walk the README as a newcomer would: run its command blocks in order in a fresh folder (not a
clone: the configs come from the package) and check that each produced what the README says.

python benchmarks/readme_walk.py [--small] [--folder DIR]

Commands come from the README's ```bash blocks, so the walk follows the README as it changes.
A command that needs what this machine lacks (your images, SD weights, a GPU, 45 minutes of
training) is listed as skipped, with why. --small appends settings that make each command take
seconds (fewer steps and images); the suite runs it so (tests/test_readme.py).
"""

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
DEMO_IMAGES = Path(__file__).resolve().parents[1] / "ph2p_lit" / "demo" / "images"

# Why a README command cannot run here; matched against the command text.
CANNOT_RUN = {
    "my_images/": "needs your images",
    "/path/to/": "needs SD weights on disk",
    "configs/sd15.yaml": "needs SD 1.5 weights and a GPU",
    "configs/sd21.yaml": "needs SD 2.1 weights and a GPU",
    "configs/sdxl.yaml": "needs SDXL weights and a GPU",
    "runs/mine/": "needs your run",
    "targets/": "needs your target and negative images",
    "train-demo": "trains for 45 minutes",
    "make test": "is the test suite itself",
}

# Extra settings that keep each command to seconds (--small); the checks do not depend on them.
SMALL = {
    "invert": ["--model.steps=2", "--model.refinement.draws=4", "--model.refinement.screen_draws=2",
               "--model.refinement.budget=40"],
    "reconstruct": ["--model.steps=3"],
    "generate": ["--steps=2", "--images_per_prompt=2"],
    "evaluate": ["--steps=2", "--images_per_prompt=1"],
    "compose": ["--steps=2", "--images_per_prompt=1", "--invert_settings={model: {steps: 2, refinement: null}}"],
}


def readme_commands() -> list[str]:
    """Each command line of the README's bash blocks, comments dropped, continuations joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    lines = [line.split("   #")[0].split("  #")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def check(command: str, folder: Path, before: dict) -> str:
    """What the README says the command does, checked in `folder`; '' if it did."""
    n_demo = len(list(DEMO_IMAGES.glob("*.png")))
    if command.startswith(("make demo", "ph2p invert --config configs/demo.yaml")) and "--print_config" not in command:
        rows = lines(folder / "runs/demo/prompts.jsonl")
        if len(rows) != n_demo or not all(r["prompt"] for r in rows):
            return f"runs/demo/prompts.jsonl has {len(rows)} prompts, not {n_demo}"
        return "" if (folder / "runs/demo/report.html").is_file() else "no runs/demo/report.html"
    if "--print_config > my.yaml" in command:
        text = (folder / "my.yaml").read_text() if (folder / "my.yaml").is_file() else ""
        return "" if "model:" in text and "data:" in text else "my.yaml is not a full config"
    if command.startswith("ph2p reconstruct"):
        rows = lines(folder / "runs/reconstruct/reconstructions.jsonl")
        added = len(rows) - before.get("reconstructions", 0)
        return "" if added == n_demo else f"{added} reconstructions added, not {n_demo} (was every image skipped?)"
    if command.startswith("ph2p generate"):
        grids = list((folder / "runs/generate").glob("*.png"))
        return "" if len(grids) == n_demo else f"{len(grids)} grids in runs/generate, not {n_demo}"
    if command.startswith("ph2p compose"):
        return "" if (folder / "runs/compose/compose.html").is_file() else "no runs/compose/compose.html"
    if command.startswith("ph2p evaluate"):
        metrics = folder / "runs/demo/metrics.json"
        return "" if metrics.is_file() and json.loads(metrics.read_text()) else "no runs/demo/metrics.json"
    return "no check for this command"


def walk(folder: Path, small: bool) -> list[tuple[str, str]]:
    """(command, outcome) for every README command, run in order in `folder`."""
    for name, k in (("a", 0), ("b", 1), ("c", 2)):  # the compose example's a.png, b.png, c.png
        (folder / f"{name}.png").write_bytes(sorted(DEMO_IMAGES.glob("*.png"))[k].read_bytes())
    results = []
    for command in readme_commands():
        why = next((why for key, why in CANNOT_RUN.items() if key in command), None)
        if why:
            results.append((command, f"skipped: {why}"))
            continue
        args = shlex.split(command.replace("make demo", "ph2p invert --config configs/demo.yaml"))
        out = None
        if ">" in args:  # a redirection, as the shell would do it
            out, args = args[args.index(">") + 1], args[: args.index(">")]
        if small and args[1] in SMALL and "--print_config" not in args:
            args += SMALL[args[1]]
        before = {"reconstructions": len(lines(folder / "runs/reconstruct/reconstructions.jsonl"))}
        done = subprocess.run([sys.executable, "-m", "ph2p_lit.cli", *args[1:]], cwd=folder, capture_output=True,
                              text=True)
        if out:
            (folder / out).write_text(done.stdout)
        if done.returncode != 0:
            results.append((command, f"FAILED (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"))
            continue
        problem = check(command, folder, before)
        results.append((command, f"FAILED: {problem}" if problem else "ok"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="fewer steps and images: seconds per command")
    parser.add_argument("--folder", help="where to run (default: a new temporary folder)")
    args = parser.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="readme_walk_"))
    folder.mkdir(parents=True, exist_ok=True)
    results = walk(folder, args.small)
    print("| README command | outcome |\n|---|---|")
    for command, outcome in results:
        print(f"| `{command}` | {outcome} |")
    if any(outcome.startswith("FAILED") for _, outcome in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
