"""The one error type for bad input (a config key, a file, a model name).

Its message names the key or file and what to do; the CLI prints it as one line, without a
traceback. Everything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    pass
