"""The Chinchilla calculator against hand-computed values, the fits on data with a known
answer, and IsoFLOP sweeps (a tiny one here, a realistic one marked slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lmarch.analysis.scaling import (
    CHINCHILLA,
    SWEEP_SHAPES,
    SweepConfig,
    chinchilla_loss,
    compute_optimal,
    fit_loss_law,
    fit_parabola_minimum,
    fit_power_law,
    plan,
    run_sweep,
)
from lmarch.errors import LmarchError

pytestmark = pytest.mark.usefixtures("one_thread")

CHINCHILLA_FLOPS = 5.76e23  # the budget of Chinchilla itself (Hoffmann et al. 2022, table 1)


def test_constants_are_the_papers() -> None:
    assert CHINCHILLA == {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def test_loss_by_hand() -> None:
    # 1.69 + 406.4 / (7e10)^0.34 + 410.7 / (1.4e12)^0.28, worked out term by term
    n_term = 406.4 / math.exp(0.34 * math.log(7e10))
    d_term = 410.7 / math.exp(0.28 * math.log(1.4e12))
    assert chinchilla_loss(7e10, 1.4e12) == pytest.approx(1.69 + n_term + d_term, rel=1e-12)
    assert chinchilla_loss(7e10, 1.4e12) == pytest.approx(1.9366, abs=1e-4)


def test_compute_optimal_by_hand() -> None:
    """Eq. 4 with G = (alpha A / (beta B))^(1 / (alpha + beta)) = 1.344710642772..."""
    g = (0.34 * 406.4 / (0.28 * 410.7)) ** (1 / 0.62)
    assert g == pytest.approx(1.34471064277253, rel=1e-12)
    n, d = compute_optimal(CHINCHILLA_FLOPS)
    assert n == pytest.approx(g * (CHINCHILLA_FLOPS / 6) ** (0.28 / 0.62), rel=1e-12)
    assert n == pytest.approx(32_189_859_151.37, rel=1e-9)
    assert d == pytest.approx(2_982_305_686_662.8, rel=1e-9)
    assert 6 * n * d == pytest.approx(CHINCHILLA_FLOPS, rel=1e-12)


def test_plan_twenty_tokens_rule_recovers_chinchilla() -> None:
    """D = 20 N and C = 6 N D give N = sqrt(C / 120): 69.3B parameters and 1.39T tokens for
    Chinchilla's budget (the paper trained 70B on 1.4T)."""
    p = plan(CHINCHILLA_FLOPS, n_params=7e10)
    assert p.n_rule == pytest.approx(math.sqrt(CHINCHILLA_FLOPS / 120), rel=1e-12)
    assert p.n_rule == pytest.approx(69_282_032_302.76, rel=1e-9)
    assert p.d_rule == pytest.approx(20 * p.n_rule, rel=1e-12)
    assert p.loss_rule == pytest.approx(1.9374102995, rel=1e-9)
    assert p.loss_opt == pytest.approx(1.9307481017, rel=1e-9)
    assert p.loss_opt < p.loss_rule  # eq. 4's optimum is the minimum of the law
    assert p.d_given == pytest.approx(CHINCHILLA_FLOPS / (6 * 7e10), rel=1e-12)
    with pytest.raises(LmarchError, match="FLOP budget must be a positive number"):
        plan(-1.0)


def test_power_law_and_parabola_fits_recover_known_answers() -> None:
    c = np.array([1e15, 1e16, 1e17, 1e18])
    exponent, k = fit_power_law(c, 0.3 * c**0.5)
    assert exponent == pytest.approx(0.5, abs=1e-9) and k == pytest.approx(0.3, rel=1e-6)
    x = np.log(np.array([1e4, 3e4, 1e5, 3e5, 1e6]))
    assert fit_parabola_minimum(x, (x - math.log(5e4)) ** 2 + 2.0) == pytest.approx(
        math.log(5e4), abs=1e-9
    )
    # a valley outside the sampled range: the best sampled point
    assert fit_parabola_minimum(x, -x) == pytest.approx(x[-1])
    # only the valley is fitted: a far point that would drag a global parabola is left out
    far = np.append(x, math.log(1e9))
    valley = np.append((x - math.log(5e4)) ** 2 + 2.0, 2.5)
    assert fit_parabola_minimum(far, valley) == pytest.approx(math.log(5e4), abs=1e-9)


def test_loss_law_fit_recovers_the_papers_constants_from_its_own_law() -> None:
    n = np.repeat([1e7, 3e7, 1e8, 3e8, 1e9], 4)
    d = np.tile([1e9, 3e9, 1e10, 3e10], 5)
    loss = [chinchilla_loss(a, b) for a, b in zip(n, d)]
    law = fit_loss_law(n, d, loss)
    for key, value in CHINCHILLA.items():
        assert law[key] == pytest.approx(value, rel=1e-6), key


def test_tiny_sweep_fits_plots_and_reports_each_budgets_best(
    tmp_path: Path, small_text_file: Path
) -> None:
    cfg = SweepConfig(
        data=str(small_text_file), budgets=(6e7, 1.2e8), shapes=SWEEP_SHAPES[1:5], block_size=16,
        batch_size=4, min_steps=4, val_chars=2000,
    )  # fmt: skip
    result = run_sweep(cfg, tmp_path / "out", log=lambda line: None)
    assert len(result.runs) == 7  # 3 shapes have >= 4 steps at 6e7 FLOPs, 4 at 1.2e8
    for run in result.runs:  # each run spends its budget, less than one step's worth
        assert run.flops <= run.budget and run.budget - run.flops < run.flops / run.steps
    for budget, best in result.optimum.items():
        mine = [r for r in result.runs if r.budget == budget]
        assert best["best_loss"] == min(r.val_loss for r in mine)
        assert best["best_params"] == min(mine, key=lambda r: r.val_loss).params
    assert all(math.isfinite(v) for v in (result.exponent_a, result.exponent_b))
    assert all(math.isfinite(v) for v in result.law.values())
    assert Path(result.plot).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(json.dumps(result.as_dict()))["note"] == result.note


def test_sweep_refuses_budgets_too_small_to_compare_sizes(small_text_file: Path) -> None:
    cfg = SweepConfig(data=str(small_text_file), budgets=(1e6, 2e6), block_size=16, batch_size=4)
    with pytest.raises(LmarchError, match="leave fewer than 3 model sizes"):
        run_sweep(cfg, "unused", log=lambda line: None)
    with pytest.raises(LmarchError, match="at least two budgets"):
        SweepConfig(budgets=(1e9,))


@pytest.mark.slow
def test_realistic_sweep_on_shakespeare(tmp_path: Path) -> None:
    """The default sweep (3e10, 1e11, 3e11 FLOPs; ~3 CPU-minutes) on the bundled corpus: more
    compute gives a lower loss, and N_opt grows with the budget (the exponent is positive)."""
    cfg = SweepConfig()
    result = run_sweep(cfg, tmp_path, log=lambda line: None)
    budgets = sorted(result.optimum)
    best = [result.optimum[b]["best_loss"] for b in budgets]
    assert best == sorted(best, reverse=True)  # more compute, lower loss
    assert result.exponent_a > 0
