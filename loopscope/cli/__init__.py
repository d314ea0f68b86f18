"""The ``loopscope`` command line.

Every command has ``--help`` with an example, shows a progress bar on long work, writes
machine-readable output (``--json`` or files) and turns bad input into a one-line error with exit
code 2 (no traceback; set ``LOOPSCOPE_DEBUG=1`` to see one). Each command module imports the
heavy libraries (torch, TransformerLens) inside its functions, so ``--help`` starts fast.
"""

from loopscope.cli import commands  # noqa: F401  (registers the commands on ``app``)
from loopscope.cli.app import app, main

__all__ = ["app", "main"]


def __getattr__(name: str):  # the commands module's helpers, e.g. for tests
    return getattr(commands, name)


if __name__ == "__main__":  # pragma: no cover
    main()
