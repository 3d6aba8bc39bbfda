"""The one error type for bad input (a config key, a file, a model name), and the range checks of
numeric settings that raise it.

Its message names the key or file and what to do; the CLI prints it as one line, without a
traceback. Everything else is a bug and keeps its traceback.
"""

import argparse
import difflib
import re

from .terminal import one_line


class InputError(ValueError):
    def __init__(self, message: str):
        # Messages name files and captions from folders someone else made: shown escaped, a name
        # cannot break the line or send the terminal an escape sequence.
        super().__init__(one_line(message))


def at_least(section: str, low: float, **settings) -> None:
    """Each setting (None: unset) is at least `low`, else a one-line error naming its key.
    Written `not value >= low` so that NaN is refused too."""
    for key, value in settings.items():
        if value is not None and not value >= low:
            raise InputError(f"{section}.{key}={value}: must be at least {low}")


def above(section: str, low: float, **settings) -> None:
    """Each setting (None: unset) is more than `low`, else a one-line error naming its key."""
    for key, value in settings.items():
        if value is not None and not value > low:
            raise InputError(f"{section}.{key}={value}: must be above {low}")


def argument_error(command: str, e: argparse.ArgumentError, options: list[str]) -> InputError:
    """A parser's error as one line: what was wrong, the nearest option to a mistyped one, where
    the options are listed (not sixty lines of usage first)."""
    text = " ".join(str(e).split())  # jsonargparse puts the reason on the lines after the key
    text = text if len(text) <= 300 else text[:300] + " ..."
    typed = re.search(r"unrecognized arguments: (--[^\s=]+)", text)
    near = difflib.get_close_matches(typed.group(1), options, n=1) if typed else []
    hint = f" (did you mean {near[0]}?)" if near else ""
    return InputError(f"{text}{hint}; `ph2p {command} --help` lists the options")
