"""The one error type for bad input (a config key, a file, a model name), and the range checks of
numeric settings that raise it.

Its message names the key or file and what to do; the CLI prints it as one line, without a
traceback. Everything else is a bug and keeps its traceback.
"""

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
