"""The configs shipped with the package (demo, sd15, sd21, sdxl, reconstruct, evaluate_demo,
train_demo), so `--config demo` works from any folder, not only in a clone."""

from pathlib import Path

FOLDER = Path(__file__).parent


def packaged_config(path: str) -> str:
    """`path` itself where it is a file; else the shipped config of that name (`demo`,
    `demo.yaml`, or `configs/demo.yaml` run outside a clone); else `path` unchanged, for the
    parser to report."""
    if Path(path).is_file():
        return path
    name = Path(path).name
    for candidate in (FOLDER / name, FOLDER / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    return path


def with_packaged_configs(args: list[str]) -> list[str]:
    """Command-line arguments with each --config value resolved by packaged_config."""
    out, take_next = [], False
    for arg in args:
        if take_next:
            arg, take_next = packaged_config(arg), False
        elif arg in ("--config", "-c"):
            take_next = True
        elif arg.startswith("--config="):
            arg = "--config=" + packaged_config(arg[len("--config="):])
        out.append(arg)
    return out
