"""Mazes on square grids: reachability (flood fill) and shortest path.

``maze_reach``: random walls (probability ``p_wall``, default 0.37) on an ``n x n`` grid, a start
cell S; label = 1 if the open cell is 4-connected to S. The flood fill R_{t+1} = R_t ∪ N(R_t)
converges in exactly ecc(S) iterations; intermediates ``bfs_distance`` (-1 for walls and
unreachable cells) and ``reach_round`` (= BFS distance). Tokens: 0 wall, 1 open, 2 start, 3 goal.

``maze_path``: perfect maze (DFS backtracker on an odd wall grid), S and G at a sampled path
length; label = 1 on the shortest S-G path (d_S(v) + d_G(v) = d_S(G)).

Splits: train/id 9x9, ood 13x13, ood_17 17x17 (size OOD needs a size-agnostic mixer).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from loopscope.core.errors import LoopscopeError
from loopscope.tasks.base import Batch, Task

__all__ = ["MazeReachTask", "MazePathTask", "bfs"]

WALL, OPEN, START, GOAL = 0, 1, 2, 3


def bfs(open_: np.ndarray, start: tuple[int, int]) -> np.ndarray:
    """BFS distances from ``start`` over open cells (4-neighbourhood); -1 where unreachable."""
    H, W = open_.shape
    d = np.full((H, W), -1, dtype=np.int64)
    d[start] = 0
    q = deque([start])
    while q:
        r, c = q.popleft()
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            rr, cc = r + dr, c + dc
            if 0 <= rr < H and 0 <= cc < W and open_[rr, cc] and d[rr, cc] < 0:
                d[rr, cc] = d[r, c] + 1
                q.append((rr, cc))
    return d


_SIZES = {"train": 9, "id": 9, "ood": 13, "ood_17": 17}


class MazeReachTask(Task):
    """Reachability from S by flood fill on a random-wall grid."""

    name = "maze_reach"
    vocab_size = 4
    n_classes = 2
    causal = False
    grid = True

    def __init__(self, p_wall: float = 0.37, sizes: dict[str, int] | None = None) -> None:
        if not 0.0 <= p_wall < 1.0:
            raise LoopscopeError(f"p_wall must be in [0, 1), got {p_wall!r}")
        self.p_wall = float(p_wall)
        self.sizes = dict(_SIZES if sizes is None else sizes)
        self.splits = tuple(self.sizes)

    def _sample(self, n: int, split: str, rng: np.random.Generator) -> Batch:
        S = self.sizes[split]
        toks = np.zeros((n, S, S), dtype=np.int64)
        lab = np.zeros((n, S, S), dtype=np.int64)
        dist = np.zeros((n, S, S), dtype=np.int64)
        for i in range(n):
            open_ = rng.random((S, S)) >= self.p_wall
            r, c = (int(x) for x in rng.integers(0, S, size=2))
            open_[r, c] = True
            d = bfs(open_, (r, c))
            toks[i] = np.where(open_, OPEN, WALL)
            toks[i, r, c] = START
            lab[i] = (d >= 0).astype(np.int64)
            dist[i] = d
        targets = np.where(toks.reshape(n, -1) == WALL, -100, lab.reshape(n, -1))
        d = torch.from_numpy(dist.reshape(n, -1)).long()
        return Batch(
            tokens=torch.from_numpy(toks.reshape(n, -1)).long(),
            targets=torch.from_numpy(targets).long(),
            intermediates={
                "bfs_distance": d,
                "reach_round": d.clone(),
                "reachable": torch.from_numpy(lab.reshape(n, -1)).long(),
            },
            meta={"grid": (S, S), "length": S, "split": split, "depth": d.clamp_min(0)},
        )


def _perfect_maze(cells: int, rng: np.random.Generator) -> np.ndarray:
    """DFS-backtracker perfect maze on a (2*cells+1)^2 wall grid; True = open."""
    S = 2 * cells + 1
    g = np.zeros((S, S), dtype=bool)
    seen = np.zeros((cells, cells), dtype=bool)
    stack = [(int(rng.integers(cells)), int(rng.integers(cells)))]
    seen[stack[0]] = True
    g[2 * stack[0][0] + 1, 2 * stack[0][1] + 1] = True
    while stack:
        r, c = stack[-1]
        nbrs = [
            (r + dr, c + dc)
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
            if 0 <= r + dr < cells and 0 <= c + dc < cells and not seen[r + dr, c + dc]
        ]
        if not nbrs:
            stack.pop()
            continue
        nr, nc = nbrs[int(rng.integers(len(nbrs)))]
        seen[nr, nc] = True
        g[2 * nr + 1, 2 * nc + 1] = True
        g[r + nr + 1, c + nc + 1] = True
        stack.append((nr, nc))
    return g


class MazePathTask(Task):
    """Shortest S-G path in a perfect maze (label = on the path)."""

    name = "maze_path"
    vocab_size = 4
    n_classes = 2
    causal = False
    grid = True

    def __init__(self, sizes: dict[str, int] | None = None, min_path: int = 4) -> None:
        self.sizes = dict(_SIZES if sizes is None else sizes)
        for k, v in self.sizes.items():
            if v % 2 == 0 or v < 5:
                raise LoopscopeError(f"maze_path sizes must be odd and >= 5, got {k}={v}")
        self.min_path = int(min_path)
        self.splits = tuple(self.sizes)

    def _sample(self, n: int, split: str, rng: np.random.Generator) -> Batch:
        S = self.sizes[split]
        toks = np.zeros((n, S, S), dtype=np.int64)
        lab = np.zeros((n, S, S), dtype=np.int64)
        dS_all = np.zeros((n, S, S), dtype=np.int64)
        for i in range(n):
            g = _perfect_maze((S - 1) // 2, rng)
            cells = np.argwhere(g)
            s = tuple(int(x) for x in cells[int(rng.integers(len(cells)))])
            dS = bfs(g, s)
            far = np.argwhere(dS >= min(self.min_path, int(dS.max())))
            goal = tuple(int(x) for x in far[int(rng.integers(len(far)))])
            dG = bfs(g, goal)
            on = (dS >= 0) & (dS + dG == dS[goal])
            toks[i] = np.where(g, OPEN, WALL)
            toks[i][s] = START
            toks[i][goal] = GOAL
            lab[i] = on
            dS_all[i] = dS
        targets = np.where(toks.reshape(n, -1) == WALL, -100, lab.reshape(n, -1))
        d = torch.from_numpy(dS_all.reshape(n, -1)).long()
        return Batch(
            tokens=torch.from_numpy(toks.reshape(n, -1)).long(),
            targets=torch.from_numpy(targets).long(),
            intermediates={"bfs_distance": d},
            meta={"grid": (S, S), "length": S, "split": split, "depth": d.clamp_min(0)},
        )
