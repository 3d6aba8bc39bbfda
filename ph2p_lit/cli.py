"""The `ph2p` command: one subcommand per job, each a thin door to its module.

Usage: ph2p invert --config configs/demo.yaml [--model.* ...] [--data.* ...] [--trainer.* ...]
"""

import argparse
import inspect
import sys

from jsonargparse import CLI
from lightning.fabric.utilities.exceptions import MisconfigurationException

from .compose import compose as compose_concepts
from .configs import with_packaged_configs
from .demo.caption_lm import train_caption_lm as train_caption_model
from .demo.train import train_demo as train_demo_model
from .errors import InputError
from .evaluation import evaluate as evaluate_run
from .export import export as export_prompts
from .app import app as serve_app
from .generate import generate_grids
from .lightning_cli import (
    DESCRIPTIONS,
    argument_error,
    run_inversion,
    run_reconstruction,
)


def call(command: str, function, args: list[str]) -> None:
    """Run a function command through jsonargparse, its parse errors as one line."""
    try:
        CLI(function, args=with_packaged_configs(args), prog=f"ph2p {command}", exit_on_error=False)
    except argparse.ArgumentError as e:
        options = [f"--{name}" for name in inspect.signature(function).parameters] + ["--config"]
        raise argument_error(command, e, options) from None


def function_command(name: str, function):
    return lambda args: call(name, function, args)


# One registry: each command's line for `ph2p --help` and what runs it.
COMMANDS = {
    "invert": (DESCRIPTIONS["invert"], run_inversion),
    "reconstruct": (DESCRIPTIONS["reconstruct"], run_reconstruction),
    "generate": ("images from prompts, several seeds each, one grid per prompt",
                 function_command("generate", generate_grids)),
    "evaluate": ("measure a run's prompts: CLIP, LPIPS, BERTScore (and the demo world's oracle)",
                 function_command("evaluate", evaluate_run)),
    "export": ("a run's prompts as caption files: a .txt per image, an imagefolder metadata.jsonl, or a CSV",
               function_command("export", export_prompts)),
    "app": ("a web page: drop images, watch their prompts being found, generate and edit (Gradio)",
            function_command("app", serve_app)),
    "compose": ("compose concepts: invert A and B, join prompts, generate, invert again, add C (HTML)",
                function_command("compose", compose_concepts)),
    "train-demo": ("train the demo model and its oracle on the procedural world",
                   function_command("train-demo", train_demo_model)),
    "train-caption-lm": ("train the demo world's caption language model (the demo's language prior)",
                         function_command("train-caption-lm", train_caption_model)),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: ph2p COMMAND [--config FILE] [options]\n\ncommands:")
        for name, (text, _) in COMMANDS.items():
            print(f"  {name:<12} {text}")
        print("\n`ph2p COMMAND --help` lists a command's options; --print_config shows its full config.")
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"ph2p: unknown command {argv[0]!r}")
        return
    try:
        _, run = COMMANDS[argv[0]]
        run(argv[1:])
    except InputError as e:
        raise SystemExit(f"ph2p {argv[0]}: error: {e}") from None
    except MisconfigurationException as e:  # Lightning's word on the trainer settings, e.g. a GPU on a CPU-only machine
        reason = " ".join(str(e).split())[:300]
        raise SystemExit(f"ph2p {argv[0]}: error: trainer: {reason} (set --trainer.accelerator cpu, or fix the trainer.* key)") from None


if __name__ == "__main__":
    main()
