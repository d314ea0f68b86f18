"""The ``loopscope`` command line.

Every command has ``--help`` with an example, shows a progress bar on long work, writes
machine-readable output (``--json`` or files) and turns bad input into a one-line error with exit
code 2 (no traceback; set ``LOOPSCOPE_DEBUG=1`` to see one). The app and its shared helpers are
in :mod:`loopscope.cli.app`; each module below registers its commands on it. Command bodies
import torch, TransformerLens and the analyses late, so ``--help`` starts fast.
"""

from loopscope.cli import circuits, dynamics, paper, self_improve, sweep, train, zoo  # noqa: F401  (register commands)
from loopscope.cli.app import app, main, model_and_task

__all__ = ["app", "main", "model_and_task"]

if __name__ == "__main__":  # pragma: no cover
    main()
