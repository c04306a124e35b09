"""The measured quality curve the planner reads (memwrap/planning/quality.json) and docs/quality.md agree; the
planner's note for a fine compression quotes it."""

from __future__ import annotations

import os

import pytest

from memwrap.errors import BudgetTooSmallError
from memwrap.planning import planner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_curve_has_both_horizons_and_three_compressions():
    curve = planner.quality_curve()
    assert set(curve["heldout_loss_ratio"]) >= {"600", "2000"}
    for ratios in curve["heldout_loss_ratio"].values():
        assert {"1/8", "1/16", "1/32"} <= set(ratios)
        assert all(0.8 < mean < 1.5 and 0 <= spread < 0.2 for mean, spread in ratios.values())
    assert curve["seeds"] >= 3 and curve["commands"]


def test_docs_table_shows_the_numbers_the_planner_reads():
    text = open(os.path.join(ROOT, "docs", "quality.md"), encoding="utf-8").read()
    table = text[text.index("<!-- quality table"):text.index("<!-- end of quality table -->")]
    rows = {line.split("|")[1].strip().split(" ")[0]: line for line in table.splitlines() if line.startswith("| 1/")}
    curve = planner.quality_curve()["heldout_loss_ratio"]
    horizons = sorted(curve, key=int)
    for level in ("1/8", "1/16", "1/32"):
        cells = [c.strip() for c in rows[level].split("|")[2:2 + len(horizons)]]
        for cell, horizon in zip(cells, horizons):
            mean, spread = curve[horizon][level]
            assert cell == f"{mean:.3f}× ± {spread:.3f}", (level, horizon, cell)


def test_quality_cost_grows_as_compression_gets_finer():
    costs = [planner.quality_cost(1 / k) for k in (4, 8, 16, 32, 64, 128)]
    values = [c for c, _ in costs]
    assert values == sorted(values)
    assert [extrapolated for _, extrapolated in costs] == [False, False, False, False, True, True]
    worst = max(max(0.0, m - 1) for m, _ in (r["1/32"] for r in planner.quality_curve()["heldout_loss_ratio"].values()))
    assert costs[3][0] == pytest.approx(worst)


def test_plan_note_quotes_the_measured_cost():
    """A budget that forces 1/32 gets a note with the measured cost at 1/32 (formatted as the note prints it)."""
    cost, extrapolated = planner.quality_cost(1 / 32)
    text = f"{cost:.1%} above a tuned AdamW's ({'extrapolated from' if extrapolated else 'measured:'} docs/quality.md)"
    plan = _plan_at_level(1 / 32)
    assert any(text in note for note in plan.notes), plan.notes


def _plan_at_level(level):
    """The smallest budget of llama-2-7b at batch 1 × 512 whose plan is at `level` (found by bisection)."""
    lo, hi = 1.0, 40.0
    for _ in range(30):
        mid = (lo + hi) / 2
        try:
            plan = planner.plan("llama-2-7b", budget_gb=mid, batch_size=1, seq_len=512, verify=False)  # the notes' logic
        except BudgetTooSmallError:
            lo = mid
            continue
        got = min(lp.compression for lp in plan.layers)
        if abs(got - level) / level < 0.05:
            return plan
        if got < level:
            lo = mid
        else:
            hi = mid
    raise AssertionError(f"no budget plans llama-2-7b at {level}")
