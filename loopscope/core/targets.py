"""Targets and correctness: the ``-100`` convention in one place.

Task targets are ``[B, pos]`` integer tensors in which :data:`IGNORE_INDEX` (``-100``, PyTorch's
``cross_entropy`` default) marks a position with no label (a prompt token, BOS, padding). A
sequence is correct when every labelled position is predicted right.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["IGNORE_INDEX", "labelled", "token_correct", "sequence_correct", "n_labelled"]

#: Target value of a position that carries no label.
IGNORE_INDEX = -100


def labelled(targets: Tensor) -> Tensor:
    """Boolean mask of the positions that carry a label (``targets != IGNORE_INDEX``)."""
    return targets != IGNORE_INDEX


def token_correct(pred: Tensor, targets: Tensor) -> Tensor:
    """Per position: ``pred == targets`` where labelled, ``True`` where not.

    ``pred`` may carry extra leading axes (e.g. ``[T, B, pos]`` against ``[B, pos]`` targets).
    """
    return (pred == targets) | ~labelled(targets).expand_as(pred)


def sequence_correct(pred: Tensor, targets: Tensor) -> Tensor:
    """Per sequence: every labelled position right. ``pred [..., B, pos]`` -> ``[..., B]`` bool.

    >>> sequence_correct(torch.tensor([[1, 2], [1, 3]]), torch.tensor([[-100, 2], [-100, 2]]))
    tensor([ True, False])
    """
    return token_correct(pred, targets).all(dim=-1)


def n_labelled(targets: Tensor) -> Tensor:
    """Number of labelled positions per sequence, ``[B]``."""
    return labelled(targets).sum(dim=-1)
