"""`ph2p invert` and `ph2p reconstruct` through LightningCLI: the parser (config files, one-line
errors, the order of --help), the run, the table of prompts. The Python API (api.invert) runs the
same parser on a dict of settings."""

import argparse
import contextlib
import io
import os
import pickle
import textwrap
from pathlib import Path

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from .cli import COMMANDS, HELP_FILES, quiet_libraries
from .configs import with_packaged_configs
from .data import ImageDataModule, PromptedImages
from .errors import InputError, argument_error
from .inversion import PromptInversion
from .reconstruction import Reconstruction
from .runs import RunFolder
from .terminal import one_line

IMAGE_SOURCES = ("root", "files", "dataset", "prompts", "prompt")  # data.* keys that say which images
INVERT_SOURCES = ("root", "files", "dataset")  # ImageDataModule's
INVERT_RUN_DIR = "runs/invert"  # the run folder when no config names one

# The results writer is not listed: the module adds it itself (PromptInversion.configure_callbacks).
DEFAULT_CALLBACKS = [
    {"class_path": "ph2p_lit.callbacks.PromptLogger"},
    {"class_path": "ph2p_lit.callbacks.PromptProgressBar"},
    {"class_path": "ph2p_lit.report.HTMLReport"},
]


class ParsingCLI(LightningCLI):
    """LightningCLI whose parse errors are one line (see argument_error) and whose --help is a
    screenful of our options (BriefHelp; --help-all adds Lightning's trainer)."""

    command = "invert"

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, dict):  # the Python API's settings: parsed as a config file would be
            try:
                self.config = parser.parse_object(args)
            except argparse.ArgumentError as e:
                raise argument_error(self.command, e, list(parser._option_string_actions)) from None
            quiet_libraries()
            return
        # A source of images named on the command line replaces the config's: `--config
        # configs/demo.yaml --data.files list.txt` means these files, not the demo folder too.
        args = with_packaged_configs(args)
        if HELP_ALL in args:
            args = ["--help" if a == HELP_ALL else a for a in args]
        elif "-h" in args or "--help" in args:
            brief_help(parser)
        named = named_sources(args)
        if named:
            args = args + [f"--data.{key}=null" for key in IMAGE_SOURCES
                           if key not in named and f"--data.{key}" in parser._option_string_actions]
        try:
            self.config = parser.parse_args(args)
        except argparse.ArgumentError as e:
            raise argument_error(self.command, e, list(parser._option_string_actions)) from None
        quiet_libraries()  # only now: it loads diffusers, which --help must not wait for

    def before_instantiate_classes(self) -> None:
        # `--trainer.enable_progress_bar=false` means no bar: drop ours rather than let Lightning
        # refuse the combination with a traceback.
        trainer = self.config["trainer"]
        if trainer.get("enable_progress_bar") is False and trainer.get("callbacks"):
            trainer["callbacks"] = [c for c in trainer["callbacks"] if not str(c.get("class_path", "")).endswith("ProgressBar")]

    def instantiate_classes(self) -> None:
        # A settings dataclass that refuses its values (Refinement, Selection) raises inside
        # jsonargparse's handling of `X | None`, which wraps it in a traceback: show our line.
        try:
            super().instantiate_classes()
        except ValueError as e:
            cause = e
            while cause is not None and not isinstance(cause, InputError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None


HELP_ALL = "--help-all"


def _is_trainers(group) -> bool:
    return any(a.dest.startswith("trainer") for a in group._group_actions)


def named_sources(args: list[str]) -> set[str]:
    """The data.* image sources named on the command line."""
    return {a[len("--data."):].split("=")[0] for a in args if a.startswith("--data.")} & set(IMAGE_SOURCES)


def own_run_folder(config_run_dir: str, config_data, data) -> str:
    """The run folder of `data`'s images: the config's when they are the config's own images; for
    others the config's folder, a dash and their name (runs/demo and my_images/: runs/demo-my_images).
    In a shared folder an image of the second source would count as done because an image of the
    first had its file name, and config.yaml would describe the other run."""
    if image_source(data) == image_source(config_data):
        return str(config_run_dir)
    return f"{os.path.normpath(config_run_dir)}-{source_name(data)}"


def image_source(data) -> dict:
    """data.root, data.files and data.dataset, their paths normalised ("my_images/" is "my_images")."""
    def normal(value):
        if isinstance(value, str):
            return os.path.normpath(value)
        return [os.path.normpath(str(f)) for f in value] if value else value

    return {key: normal(data.get(key)) for key in INVERT_SOURCES}


def source_name(data) -> str:
    """A short name for a run's images: the folder's, the list file's, the listed images' folder's,
    or the dataset's."""
    root, files, dataset = (data.get(key) for key in INVERT_SOURCES)
    if root:
        name = Path(os.path.abspath(root)).name
    elif isinstance(files, str):
        name = Path(files).stem
    elif files:
        name = Path(os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])).name
    else:
        name = Path(str(dataset or "")).name
    return name or "images"


class RunConfig(SaveConfigCallback):
    """config.yaml in the run folder, written through RunFolder when the first batch starts: by then
    the run holds the folder's lock and has images to invert. (Lightning's writes it at set-up, so a
    run the lock refuses, or a rerun with new settings that finds every image done, rewrote the
    config of the prompts already there.)"""

    def setup(self, trainer, pl_module, stage) -> None:
        pass

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            RunFolder(trainer.default_root_dir).write_config(self.parser.dump(self.config, skip_none=False))


def options_before_trainer(parser) -> None:
    """--help-all lists the model's and data's options first, Lightning's trainer flags after them."""
    parser._action_groups.sort(key=_is_trainers)
    for group in filter(_is_trainers, parser._action_groups):
        group.title = "Lightning's Trainer (--trainer.*): devices, precision, callbacks, the run folder"


def brief_help(parser) -> None:
    """Make --help print our options only, each in a line or two (BriefHelp): Lightning's trainer
    (360 lines) and the linked settings' internals wait behind --help-all. `ph2p` prints this text
    from HELP_FILES, written by write_help_files, so that it need not load Lightning first."""
    parser._action_groups = [g for g in parser._action_groups if not _is_trainers(g) and g.title != "Linked arguments"]
    parser.formatter_class = BriefHelp
    parser.epilog = (f"{HELP_ALL}: every option in full, with Lightning's Trainer (--trainer.*: devices, "
                     "precision, callbacks, the run folder, checkpoints).")


class BriefHelp(DefaultHelpFormatter):
    """An option a line: `--key=default` and the first sentence of its meaning, wrapped to two
    lines at most (the whole text is in --help-all), for 80 columns (it is printed from a file)."""

    column = 34

    def __init__(self, prog: str, **kwargs):
        super().__init__(prog, **{**kwargs, "width": 78})

    def start_section(self, heading: str | None) -> None:
        super().start_section(heading and textwrap.shorten(heading, self._width - 1, placeholder=" …"))

    def _format_action(self, action) -> str:
        name = next((o for o in action.option_strings if o.startswith("--") and not o.endswith("+")), "")
        if not name or name.endswith(".help") or action.dest == "seed_everything" or (
                name.count(".") == 0 and name[2:] in ("model", "data")):  # a group's own config file
            return ""  # seed_everything: Lightning's global seed; our draws are seeded per image
        if action.nargs != 0 and action.default is not argparse.SUPPRESS and action.dest != "config":
            name += f"={_as_yaml(action.default)}"
        text = (action.help or "").strip()
        first = text.split(". ", 1)[0].rstrip(".") + "." if text else ""
        room = max(self._width - self.column, 20)
        lines = textwrap.wrap(first, room) or [""]
        if len(lines) > 2:
            lines = [lines[0], textwrap.shorten(" ".join(lines[1:]), room, placeholder=" …")]
        head = f"  {name}"
        if len(head) + 2 > self.column:
            return "\n".join([head] + [" " * self.column + line for line in lines]) + "\n"
        return "\n".join([head.ljust(self.column) + lines[0]] + [" " * self.column + line for line in lines[1:]]) + "\n"


def _as_yaml(value) -> str:
    """A default as one would type it on the command line."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return f'"{value}"' if isinstance(value, str) and " " in value else str(value)


def parser_settings(command: str) -> dict:
    return {"prog": f"ph2p {command}", "exit_on_error": False, "description": COMMANDS[command].text,
            "usage": f"ph2p {command} [--config FILE] [--{{model,data,trainer}}.KEY VALUE ...]"}


class InversionCLI(ParsingCLI):
    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, dict) or not named_sources(args) or any(
                a.split("=")[0] == "--trainer.default_root_dir" for a in args):
            # The API resolves its own run folder (api.invert); a folder named is used as named.
            return super().parse_arguments(parser, args)
        # Images other than the config's own get their own run folder (own_run_folder), named
        # before the parse that counts, so that --print_config shows it too.
        super().parse_arguments(parser, [a for a in args if not a.startswith("--print_config")])
        config_alone = parser.parse_args([f"--config={path}" for path in self.config.get("config") or []])
        folder = own_run_folder(config_alone.trainer.default_root_dir, config_alone.data, self.config.data)
        super().parse_arguments(parser, [*args, f"--trainer.default_root_dir={folder}"])

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="checkpoint to resume from: a file, or 'last' for the run folder's newest")
        # One source of truth for values the model and the data both need.
        parser.link_arguments("model.steps", "data.steps")
        parser.link_arguments("data.batch_size", "model.batch_size")
        parser.link_arguments("model.model", "data.model")
        parser.link_arguments("model.local_files_only", "data.local_files_only")
        parser.set_defaults(
            {
                "trainer.max_epochs": 1,
                "trainer.default_root_dir": INVERT_RUN_DIR,
                # Checkpoints whole or not at all, a full disk in one line (a ModelCheckpoint added
                # to trainer.callbacks writes through it).
                "trainer.plugins": [{"class_path": "ph2p_lit.callbacks.AtomicCheckpointIO"}],
                "trainer.callbacks": DEFAULT_CALLBACKS,
                "trainer.enable_checkpointing": False,
                "trainer.logger": False,
                "trainer.enable_model_summary": False,  # the soft prompt is the only parameter: nothing to summarise
                "trainer.num_sanity_val_steps": 0,
                "trainer.use_distributed_sampler": False,  # the DataModule shards images by rank itself
            }
        )
        options_before_trainer(parser)


class ReconstructionCLI(ParsingCLI):
    command = "reconstruct"

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.model")
        parser.link_arguments("model.local_files_only", "data.local_files_only")
        parser.set_defaults(
            {
                "trainer.default_root_dir": "runs/reconstruct",
                "trainer.callbacks": [{"class_path": "ph2p_lit.reconstruction.ReconstructionProgressBar"},
                                      {"class_path": "ph2p_lit.reconstruction.ReconstructionWriter"}],
                "trainer.logger": False,
                "trainer.enable_model_summary": False,  # the soft prompt is the only parameter: nothing to summarise
                "trainer.enable_checkpointing": False,
                "trainer.use_distributed_sampler": False,  # PromptedImages shards images by rank itself
            }
        )
        options_before_trainer(parser)




def print_table(run_dir: Path) -> None:
    """Image, true caption and recovered prompt of every finished image."""
    path = run_dir / "prompts.jsonl"
    if not path.is_file():
        return
    rows = [{k: one_line(r.get(k, "")) for k in ("image_id", "caption", "prompt")}
            for r in sorted(RunFolder(run_dir).rows("prompts"), key=lambda r: r["image_id"])]
    width = max([len(r["image_id"]) for r in rows] + [5])
    cap = min(max([len(r["caption"]) for r in rows] + [7]), 60)
    print(f"\n{'image':<{width}}  {'caption':<{cap}}  prompt")
    for r in rows:
        print(f"{r['image_id']:<{width}}  {r['caption'][:cap]:<{cap}}  {r['prompt']}")
    print(f"\n{len(rows)} prompts in {path}")
    if (run_dir / "report.html").is_file():
        print(f"report: {run_dir / 'report.html'} (images, prompts and images generated from them)")


def run_inversion(args: list[str] | dict, table: bool = True) -> tuple[Path, list[str], list[dict]]:
    """Parse (command-line arguments, or the API's settings as a dict), invert, print the table;
    returns the run folder, the ids of the images this call stands for (inverted now or before)
    and the failures of those that could not be read."""
    cli = InversionCLI(
        PromptInversion,
        ImageDataModule,
        args=args,
        run=False,
        save_config_callback=RunConfig,
        subclass_mode_model=False,
        parser_kwargs=parser_settings("invert"),
        auto_configure_optimizers=False,  # the module has its own optimiser (model.optimizer)
        seed_everything_default=False,  # every random draw is seeded by image id (sampler.py); no global seed to set
    )
    ckpt_path = cli.config.get("ckpt_path")
    if ckpt_path not in (None, "last", "best", "hpc", "registry") and not Path(ckpt_path).is_file():
        raise InputError(f"--ckpt_path={ckpt_path}: no such file; give a checkpoint, or 'last' for the run folder's newest")
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    except (RuntimeError, KeyError, EOFError, OSError, pickle.UnpicklingError) as e:
        if ckpt_path is None or not _is_checkpoint_error(e):
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--ckpt_path={ckpt_path}: cannot resume from it ({reason[:200]}); it is not a checkpoint "
                         "of this run's settings (prompt_length, batch_size, optimizer)") from None
    if ckpt_path is not None and cli.datamodule.todo_indices():
        # The checkpoint's epoch had ended, so Lightning considers the run done; images added to
        # the folder since are inverted by a fresh run on the same folder (finished ones are skipped).
        trainer = cli.instantiate_trainer()
        trainer.fit(cli.model, datamodule=cli.datamodule)
    run_dir = Path(cli.trainer.default_root_dir)
    if table and cli.trainer.is_global_zero:
        print_table(run_dir)
    return run_dir, cli.datamodule.images.image_ids(), cli.datamodule.failures


def _is_checkpoint_error(e: Exception) -> bool:
    """Errors torch.load and load_state_dict raise for a file that is not this run's checkpoint."""
    text = str(e).lower()
    return isinstance(e, (EOFError, KeyError, pickle.UnpicklingError)) or any(
        s in text for s in ("size mismatch", "state_dict", "unpickl", "invalid load key", "zip archive", "pytorchstreamreader")
    )


def run_reconstruction(args: list[str] | dict) -> tuple[Path, set[tuple[str, str]]]:
    """Parse (command-line arguments, or the API's settings), reconstruct; returns the run folder
    and the (image id, settings key) of every result this call stands for (made now or before)."""
    cli = ReconstructionCLI(Reconstruction, PromptedImages, args=args, run=False,
                            save_config_kwargs={"overwrite": True}, subclass_mode_model=False,
                            parser_kwargs=parser_settings("reconstruct"), auto_configure_optimizers=False,
                            seed_everything_default=False)
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    return Path(cli.trainer.default_root_dir), cli.datamodule.result_keys()


def help_text(command: str) -> str:
    """What `ph2p COMMAND --help` prints, from the parser itself (invert, reconstruct)."""
    run = {"invert": run_inversion, "reconstruct": run_reconstruction}[command]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        run(["--help"])
    return out.getvalue()


def write_help_files() -> None:
    """HELP_FILES from the parsers; `python -m ph2p_lit.lightning_cli` after changing an option
    (tests/test_newcomer.py says when they are out of date)."""
    for command in ("invert", "reconstruct"):
        (HELP_FILES / f"{command}.txt").write_text(help_text(command))


if __name__ == "__main__":
    write_help_files()
