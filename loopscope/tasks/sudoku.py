"""4x4 Sudoku (2x2 boxes) with uniqueness-checked puzzles and a difficulty label.

All 288 solution grids are enumerated; a puzzle is carved by blanking cells in random order while
exactly one grid still matches the givens. Difficulty = the number of naked/hidden-singles
propagation rounds a constraint solver needs (intermediate ``round`` per cell: 0 for givens, the
round at which singles fill it, -1 if singles never do). Tokens: 0 blank, 1..4 digits (row-major);
targets: solution digit - 1 at every cell. Splits are by difficulty and clue pattern, never by grid:
``train`` / ``id`` = puzzles solvable in <= ``easy_rounds`` rounds (clue patterns divided 80/20),
``ood`` = harder puzzles.
"""

from __future__ import annotations

import hashlib
import itertools
from functools import lru_cache

import numpy as np
import torch

from loopscope.core.errors import LoopscopeError
from loopscope.tasks.base import Batch, Task

__all__ = ["Sudoku4Task", "all_grids", "count_solutions", "propagation_rounds"]

N, BR, BC = 4, 2, 2


def _units() -> list[list[tuple[int, int]]]:
    rows = [[(r, c) for c in range(N)] for r in range(N)]
    cols = [[(r, c) for r in range(N)] for c in range(N)]
    boxes = [
        [(br + r, bc + c) for r in range(BR) for c in range(BC)]
        for br in range(0, N, BR)
        for bc in range(0, N, BC)
    ]
    return rows + cols + boxes


UNITS = _units()


@lru_cache(maxsize=1)
def all_grids() -> np.ndarray:
    """All 288 valid 4x4 grids ``[288, 4, 4]`` (digits 1..4)."""
    perms = list(itertools.permutations(range(1, N + 1)))
    out = []
    for rows in itertools.product(perms, repeat=N):
        g = np.array(rows)
        if all(len({g[r, c] for r, c in u}) == N for u in UNITS):
            out.append(g)
    return np.stack(out)


def count_solutions(puzzle: np.ndarray, limit: int = 2) -> int:
    """Backtracking solution count of a 4x4 puzzle (0 = blank), stopping at ``limit``."""
    g = puzzle.copy()
    empties = [(r, c) for r in range(N) for c in range(N) if g[r, c] == 0]

    def ok(r: int, c: int, v: int) -> bool:
        return all(g[rr, cc] != v for u in UNITS if (r, c) in u for rr, cc in u)

    def rec(k: int) -> int:
        if k == len(empties):
            return 1
        r, c = empties[k]
        total = 0
        for v in range(1, N + 1):
            if ok(r, c, v):
                g[r, c] = v
                total += rec(k + 1)
                g[r, c] = 0
                if total >= limit:
                    return total
        return total

    return rec(0)


def propagation_rounds(puzzle: np.ndarray) -> np.ndarray:
    """Round at which naked/hidden singles fill each cell (0 givens, -1 never)."""
    g = puzzle.copy()
    rnd = np.where(g > 0, 0, -1)
    k = 0
    while (g == 0).any():
        k += 1
        cand = {
            (r, c): {
                v
                for v in range(1, N + 1)
                if all(g[rr, cc] != v for u in UNITS if (r, c) in u for rr, cc in u)
            }
            for r in range(N)
            for c in range(N)
            if g[r, c] == 0
        }
        fills = {cell: next(iter(s)) for cell, s in cand.items() if len(s) == 1}
        for u in UNITS:
            for v in range(1, N + 1):
                spots = [cell for cell in u if cell in cand and v in cand[cell]]
                if len(spots) == 1 and not any(g[rr, cc] == v for rr, cc in u):
                    fills.setdefault(spots[0], v)
        if not fills:
            break
        for (r, c), v in fills.items():
            g[r, c] = v
            rnd[r, c] = k
    return rnd


@lru_cache(maxsize=4)
def _pool(n_puzzles: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    grids = all_grids()
    rng = np.random.default_rng(seed)
    puzzles, sols, rounds = [], [], []
    seen = set()
    flat = grids.reshape(len(grids), -1)
    while len(puzzles) < n_puzzles:
        sol = grids[rng.integers(len(grids))]
        p = sol.copy()
        for cell in rng.permutation(N * N):
            r, c = divmod(int(cell), N)
            keep = p[r, c]
            p[r, c] = 0
            mask = p.reshape(-1) > 0
            if int((flat[:, mask] == p.reshape(-1)[mask]).all(axis=1).sum()) != 1:
                p[r, c] = keep
        key = p.tobytes()
        if key in seen:
            continue
        seen.add(key)
        puzzles.append(p)
        sols.append(sol)
        rounds.append(propagation_rounds(p))
    P, S, R = np.stack(puzzles), np.stack(sols), np.stack(rounds)
    difficulty = np.where((R < 0).any(axis=(1, 2)), 99, R.max(axis=(1, 2)))
    return P, S, R, difficulty


class Sudoku4Task(Task):
    """4x4 Sudoku; OOD = harder (more propagation rounds)."""

    name = "sudoku4"
    vocab_size = 5
    n_classes = 4
    causal = False
    grid = True

    def __init__(self, easy_rounds: int = 2, pool_size: int = 1500) -> None:
        if easy_rounds < 1:
            raise LoopscopeError(f"easy_rounds must be >= 1, got {easy_rounds!r}")
        self.easy_rounds = int(easy_rounds)
        self.pool_size = int(pool_size)
        self.splits = ("train", "id", "ood")

    def _pool(self) -> tuple:
        return _pool(self.pool_size, 0)

    def _index(self, split: str) -> np.ndarray:
        P, _, _, diff = self._pool()
        pattern = np.array([int(hashlib.sha256((p > 0).tobytes()).hexdigest(), 16) % 5 for p in P])
        easy = diff <= self.easy_rounds
        if split == "train":
            return np.flatnonzero(easy & (pattern != 0))
        if split == "id":
            return np.flatnonzero(easy & (pattern == 0))
        return np.flatnonzero(~easy)

    def _sample(self, n: int, split: str, rng: np.random.Generator) -> Batch:
        P, S, R, diff = self._pool()
        side = P.shape[1]
        idx = self._index(split)
        if len(idx) == 0:
            raise LoopscopeError(
                f"{self.name} split {split!r} is empty with easy_rounds={self.easy_rounds}"
            )
        pick = idx[rng.integers(0, len(idx), size=n)]
        # relabel digits by a random permutation per example: same clue pattern, new surface form
        perm = np.stack([np.concatenate([[0], rng.permutation(side) + 1]) for _ in range(n)])
        puz = np.take_along_axis(perm, P[pick].reshape(n, -1), axis=1)
        sol = np.take_along_axis(perm, S[pick].reshape(n, -1), axis=1)
        return Batch(
            tokens=torch.from_numpy(puz).long(),
            targets=torch.from_numpy(sol - 1).long(),
            intermediates={
                "given": torch.from_numpy((puz > 0).astype(np.int64)),
                "round": torch.from_numpy(R[pick].reshape(n, -1)).long(),
            },
            meta={
                "grid": (side, side),
                "length": side,
                "split": split,
                "difficulty": torch.from_numpy(diff[pick]).long(),
            },
        )


# -- 6x6 (2x3 boxes) ---------------------------------------------------------------------------
def _units_n(n: int, br: int, bc: int) -> list[list[tuple[int, int]]]:
    rows = [[(r, c) for c in range(n)] for r in range(n)]
    cols = [[(r, c) for r in range(n)] for c in range(n)]
    boxes = [
        [(r0 + r, c0 + c) for r in range(br) for c in range(bc)]
        for r0 in range(0, n, br)
        for c0 in range(0, n, bc)
    ]
    return rows + cols + boxes


UNITS6 = _units_n(6, 2, 3)
_PEERS6 = {
    (r, c): {p for u in UNITS6 if (r, c) in u for p in u} - {(r, c)}
    for r in range(6)
    for c in range(6)
}


def _solve6(
    g: np.ndarray, rng: np.random.Generator | None, limit: int
) -> tuple[int, np.ndarray | None]:
    """Backtracking (most-constrained cell first); returns (#solutions up to limit, first solution)."""
    empties = [(r, c) for r in range(6) for c in range(6) if g[r, c] == 0]
    if not empties:
        return 1, g.copy()
    best, cand = None, None
    for cell in empties:
        opts = [v for v in range(1, 7) if all(g[p] != v for p in _PEERS6[cell])]
        if cand is None or len(opts) < len(cand):
            best, cand = cell, opts
        if not opts:
            return 0, None
    if rng is not None:
        cand = list(rng.permutation(cand))
    total, first = 0, None
    for v in cand:
        g[best] = v
        k, sol = _solve6(g, rng, limit - total)
        g[best] = 0
        if k and first is None:
            first = sol
        total += k
        if total >= limit:
            break
    return total, first


def count_solutions6(puzzle: np.ndarray, limit: int = 2) -> int:
    """Number of solutions of a 6x6 puzzle (0 = blank), stopping at ``limit``."""
    return _solve6(puzzle.copy(), None, limit)[0]


def propagation_rounds6(puzzle: np.ndarray) -> np.ndarray:
    """Round at which naked/hidden singles fill each 6x6 cell (0 givens, -1 never)."""
    g = puzzle.copy()
    rnd = np.where(g > 0, 0, -1)
    k = 0
    while (g == 0).any():
        k += 1
        cand = {
            cell: {v for v in range(1, 7) if all(g[p] != v for p in _PEERS6[cell])}
            for cell in zip(*np.nonzero(g == 0), strict=True)
        }
        fills = {cell: next(iter(s)) for cell, s in cand.items() if len(s) == 1}
        for u in UNITS6:
            for v in range(1, 7):
                spots = [cell for cell in u if cell in cand and v in cand[cell]]
                if len(spots) == 1 and not any(g[p] == v for p in u):
                    fills.setdefault(spots[0], v)
        if not fills:
            break
        for cell, v in fills.items():
            g[cell] = v
            rnd[cell] = k
    return rnd


@lru_cache(maxsize=2)
def _pool6(n_puzzles: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    P, S, R = [], [], []
    while len(P) < n_puzzles:
        _, sol = _solve6(np.zeros((6, 6), dtype=np.int64), rng, 1)
        p = sol.copy()
        for cell in rng.permutation(36):
            r, c = divmod(int(cell), 6)
            keep = p[r, c]
            p[r, c] = 0
            if count_solutions6(p) != 1:
                p[r, c] = keep
        P.append(p)
        S.append(sol)
        R.append(propagation_rounds6(p))
    P, S, R = np.stack(P), np.stack(S), np.stack(R)
    difficulty = np.where((R < 0).any(axis=(1, 2)), 99, R.max(axis=(1, 2)))
    return P, S, R, difficulty


class Sudoku6Task(Sudoku4Task):
    """6x6 Sudoku (2x3 boxes): backtracking generator + uniqueness counter; OOD = harder puzzles."""

    name = "sudoku6"
    vocab_size = 7
    n_classes = 6

    def __init__(self, easy_rounds: int = 3, pool_size: int = 120) -> None:
        super().__init__(easy_rounds=easy_rounds, pool_size=pool_size)

    def _pool(self) -> tuple:
        return _pool6(self.pool_size, 0)
