"""The `ph2p` command: one subcommand per job, each a thin door to its module.

Usage: ph2p invert --config configs/demo.yaml [--model.* ...] [--data.* ...] [--trainer.* ...]
"""

import argparse
import importlib
import inspect
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from jsonargparse import CLI

from .configs import with_packaged_configs
from .errors import InputError, argument_error


@dataclass(frozen=True)
class Command:
    """A subcommand: its line in `ph2p --help` and the function that runs it, named rather than
    imported, so that `ph2p --help` prints before torch, Lightning and diffusers load (seconds
    each) and a command loads only what it uses."""

    text: str
    function: str  # "module:function" in ph2p_lit
    parses_itself: bool = False  # a LightningCLI command (lightning_cli.py); the others go through jsonargparse.CLI

    def run(self, name: str, args: list[str]) -> None:
        module, function = self.function.split(":")
        function = getattr(importlib.import_module(f"ph2p_lit.{module}"), function)
        function(args) if self.parses_itself else call(name, function, args)


def quiet_libraries() -> None:
    """Between the command and its progress bar, nothing the user did not ask for: no notes on
    which accelerators exist, no tips, no per-file weight-loading bars (the command's own bar,
    table and errors stay). Called once the command line is parsed, as it loads diffusers, which
    `--help` must not wait for."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()  # e.g. a note per part when a float16 pipeline is saved
    # Lightning's own use of a torch API it has not moved off yet; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # A rerun that finds every image done plans no batch; the data module has said so in its words.
    warnings.filterwarnings("ignore", message=r"Total length of `\w+` across ranks is zero\. ")
    # Lightning's advice for checkpoints of manually optimised modules (13 lines): a checkpoint of
    # the state after the step is what `--ckpt_path=last` resumes from here. A run folder that
    # already holds checkpoints, and a checkpoint taken mid-epoch, are how resuming works here (the
    # DataModule skips finished images and the module restores the one in flight).
    for message in ("Using ModelCheckpoint with manual optimization", r"Checkpoint directory .* exists and is not empty",
                    "You're resuming from a checkpoint that ended before the epoch ended"):
        warnings.filterwarnings("ignore", message=message)


def call(command: str, function, args: list[str]) -> None:
    """Run a function command through jsonargparse, its parse errors as one line."""
    quiet_libraries()
    try:
        CLI(function, args=with_packaged_configs(args), prog=f"ph2p {command}", exit_on_error=False)
    except argparse.ArgumentError as e:
        options = [f"--{name}" for name in inspect.signature(function).parameters] + ["--config"]
        raise argument_error(command, e, options) from None


COMMANDS = {
    "invert": Command("recover a prompt per image (PH2P); writes prompts.jsonl in the run folder",
                      "lightning_cli:run_inversion", parses_itself=True),
    "reconstruct": Command("rebuild or edit images from their prompts (negative-prompt inversion), with PSNR/LPIPS",
                           "lightning_cli:run_reconstruction", parses_itself=True),
    "generate": Command("images from prompts, several seeds each, one grid per prompt", "generate:generate_grids"),
    "evaluate": Command("measure a run's prompts: CLIP, LPIPS, BERTScore (and the demo world's oracle)",
                        "evaluation:evaluate"),
    "export": Command("a run's prompts as caption files: a .txt per image, an imagefolder metadata.jsonl, or a CSV",
                      "export:export"),
    "merge": Command("fold a sharded run's files (data.shard i/N jobs) into one prompts.jsonl", "runs:merge_run"),
    "app": Command("a web page: drop images, watch their prompts being found, generate and edit (Gradio)",
                   "app:app"),
    "compose": Command("compose concepts: invert A and B, join prompts, generate, invert again, add C (HTML)",
                       "compose:compose"),
    "train-demo": Command("train the demo model and its oracle on the procedural world", "demo.train:train_demo"),
    "train-caption-lm": Command("train the demo world's caption language model (the demo's language prior)",
                                "demo.caption_lm:train_caption_lm"),
}


# `ph2p invert --help` and `reconstruct --help` as their parsers print them (lightning_cli.BriefHelp),
# kept as text: building those parsers loads Lightning (~5 s) just to print what is known in advance.
HELP_FILES = Path(__file__).parent / "help"


def _is_trainer_misconfiguration(e: Exception) -> bool:
    """Lightning's word on the trainer settings (e.g. a GPU on a CPU-only machine). Looked up, not
    imported: a command that never loaded Lightning cannot have raised it."""
    exceptions = sys.modules.get("lightning.fabric.utilities.exceptions")
    return exceptions is not None and isinstance(e, exceptions.MisconfigurationException)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: ph2p COMMAND [--config FILE] [options]\n\ncommands:")
        for name, command in COMMANDS.items():
            print(f"  {name:<{max(map(len, COMMANDS))}}  {command.text}")
        print("\n`ph2p COMMAND --help` lists a command's options (invert, reconstruct: --help-all adds Lightning's"
              "\nTrainer options); --print_config shows its full config.")
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"ph2p: unknown command {argv[0]!r}")
        return
    help_file = HELP_FILES / f"{argv[0]}.txt"
    if help_file.is_file() and ("-h" in argv or "--help" in argv):
        print(help_file.read_text(), end="")
        return
    try:
        COMMANDS[argv[0]].run(argv[0], argv[1:])
    except InputError as e:
        raise SystemExit(f"ph2p {argv[0]}: error: {e}") from None
    except Exception as e:
        if not _is_trainer_misconfiguration(e):
            raise
        reason = " ".join(str(e).split())[:300]
        raise SystemExit(f"ph2p {argv[0]}: error: trainer: {reason} (set --trainer.accelerator cpu, or fix the trainer.* key)") from None


if __name__ == "__main__":
    main()
