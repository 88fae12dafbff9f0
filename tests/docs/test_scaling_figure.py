"""docs/scaling.md's tables are the saved default sweep (docs/figures/scaling_sweep.json, which
docs/make_figures.py draws the page's figure from): refitting its runs gives the page's numbers."""

from __future__ import annotations

import pytest
from doc_blocks import REPO

from lmarch.analysis.scaling import load_sweep
from lmarch.errors import LmarchError

SAVED = REPO / "docs" / "figures" / "scaling_sweep.json"


def test_scaling_page_tables_are_the_saved_sweep():
    result = load_sweep(SAVED)
    page = (REPO / "docs" / "scaling.md").read_text(encoding="utf-8")
    for budget, best in sorted(result.optimum.items()):
        runs = sum(1 for r in result.runs if r.budget == budget)
        layers, width, _ = best["best_shape"]
        row = (
            f"| {budget:.0e}".replace("e+", "e") + f" | {runs} | {layers} x {width} "
            f"| {best['best_params']:,} | {best['best_tokens']:,} | {best['best_loss']:.3f} "
            f"| {best['n_opt']:,.0f} | {best['d_opt'] / best['n_opt']:.0f} |"
        )
        assert row in page
    law = result.law
    assert f"| a in N_opt ∝ C^a | {result.exponent_a:.2f} |" in page
    assert f"| b in D_opt ∝ C^b | {result.exponent_b:.2f} |" in page
    assert (
        f"| {law['alpha']:.2f}, {law['beta']:.2f} (E = {law['E']:.2f}, A = {law['A']:.1f}, B = {law['B']:.1f})"
        in page
    )


def test_load_sweep_refuses_a_file_that_is_not_a_sweep(tmp_path):
    bad = tmp_path / "runs.json"
    bad.write_text('{"runs": [{"budget": 1}]}', encoding="utf-8")
    with pytest.raises(LmarchError, match="cannot read the sweep"):
        load_sweep(bad)
