"""The `qwenmlx` command: a thin Typer layer over the library, one file per command group, each command a plain function.

common.py holds the app, one-line errors and the options the commands share. Importing each group registers its
commands on the app, in the order `qwenmlx --help` lists them.
"""

# isort: off
from . import models, generation, serving, summarizing, conversion, benchmarks  # noqa: F401  (they register commands)
# isort: on
from .common import app

__all__ = ["app"]
