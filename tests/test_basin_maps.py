"""Basin maps on a loop whose basins are known exactly: h -> tanh(3 h) on R^2 (four stable fixed
points, one per quadrant), answer = the sign of the first coordinate."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch

from loopscope import FnLoop
from loopscope.core.errors import LoopscopeError
from loopscope.experiments.basin_maps import _orthonormal, basin_map

matplotlib.use("Agg")

H0 = torch.tensor([0.05, 0.05], dtype=torch.float64)


class _Toy:
    name, splits = "toy", ("ood",)

    def sample(self, n, split, seed=0):
        return SimpleNamespace(
            tokens=torch.zeros(n, 1, dtype=torch.float64),
            targets=torch.ones(n, 1, dtype=torch.long),  # the right answer: h[0] > 0
            length=1,
        )


def _loop() -> FnLoop:
    return FnLoop(
        step=lambda h: torch.tanh(3.0 * h),
        init_state=H0,
        decode=lambda h, ctx: torch.stack([-h[:, 0], h[:, 0]], -1).unsqueeze(1),
    )


@pytest.fixture(scope="module")
def toy_map():
    return basin_map(
        _loop(), _Toy(), n_inputs=2, n_inits=64, radii=(0.3, 1.0, 3.0), resolution=21, n_iter=40
    )


def test_the_map_is_the_true_basin_of_each_grid_point(toy_map):
    bm = toy_map
    scale = float(H0.norm())
    assert bm.meta["scale"] == pytest.approx(scale)
    u, v = _orthonormal(2, torch.Generator().manual_seed(0 + 1))
    g = bm.grid
    states = H0.numpy() + scale * (np.outer(g["alpha"], u.numpy()) + np.outer(g["beta"], v.numpy()))
    truth = states[:, 0] > 0  # tanh(3 h) keeps the sign of every coordinate
    away = np.abs(states[:, 0]) > 1e-9
    assert (g["correct"].to_numpy()[away] == truth[away]).all()
    assert truth.any() and (~truth).any()  # the slice crosses the boundary h[0] = 0


def test_every_colour_is_named_with_its_attractor_and_shares_have_cis(toy_map):
    bm = toy_map
    labels = set(bm.answers["label"])
    assert labels == {"correct (fixed point)", "wrong at 1/1 (fixed point)"}
    fr = bm.fractions
    assert ((fr["ci_low"] <= fr["fraction"]) & (fr["fraction"] <= fr["ci_high"])).all()
    # the own init is on the right side; the share of the correct basin falls with the radius
    right = bm.answers.loc[bm.answers["correct"], "answer_id"].item()
    share = fr[fr["answer_id"] == right].set_index("radius")["fraction"]
    assert share[0.0] == 1.0 and share[0.3] == 1.0
    # on the circle of radius rho = r ||h_0|| the wrong side is the arc acos(0.05 / rho) / pi
    for r in (1.0, 3.0):
        exact = 1 - np.arccos(0.05 / (r * float(H0.norm()))) / np.pi  # 0.75, 0.576
        assert abs(share[r] - exact) <= 3 * np.sqrt(exact * (1 - exact) / 64), r
    # the map spans the largest radius here: at r = 3 the own basin keeps over half the circle
    assert bm.meta["map_radius"] == 3.0
    assert bm.summary()["n_answers_on_map"] == 2.0


def test_basin_map_figure_draws_a_legend_entry_per_answer(toy_map):
    from loopscope import figures

    bm = toy_map
    fig = figures.basin_maps(
        bm.grid.assign(model="toy"),
        bm.fractions.assign(model="toy"),
        bm.answers.assign(model="toy"),
    )
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "correct (fixed point)" in texts and "wrong at 1/1 (fixed point)" in texts
    assert "h_0 (own init)" in texts


def test_bad_settings_are_one_line_errors():
    with pytest.raises(LoopscopeError, match="radii"):
        basin_map(_loop(), _Toy(), radii=(0.0, 1.0))
    with pytest.raises(LoopscopeError, match="resolution"):
        basin_map(_loop(), _Toy(), resolution=2)
    with pytest.raises(LoopscopeError, match="no split 'id'"):
        basin_map(_loop(), _Toy(), split="id")
