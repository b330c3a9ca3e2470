import math

import pytest

from xmodal.bench.table import Stat, markdown_table, summarize


def _rows(values, backbone="tiny:clip"):
    """values: {(dataset, shots, method): {seed: top1}}"""
    return [{"method": m, "backbone": backbone, "dataset": d, "shots": k, "seed": s, "top1": acc,
             "backbone_fingerprint": "fp", "stand_in": True, "backbone_name": backbone}
            for (d, k, m), per_seed in values.items() for s, acc in per_seed.items()]


VALUES = {
    ("A", 1, "m1"): {1: 40.0, 2: 50.0, 3: 60.0},   # mean 50, sample std 10
    ("A", 1, "m2"): {1: 30.0, 2: 30.0, 3: 30.0},   # std 0
    ("A", 4, "m1"): {1: 70.0, 2: 72.0, 3: 74.0},   # mean 72, std 2
    ("A", 4, "m2"): {1: 60.0, 2: 61.0, 3: 62.0},
    ("B", 1, "m1"): {1: 20.0, 2: 30.0, 3: 40.0},   # mean 30, std 10
    ("B", 1, "m2"): {1: 10.0, 2: 20.0, 3: 30.0},
    ("B", 4, "m1"): {1: 80.0, 2: 80.0, 3: 80.0},
    ("B", 4, "m2"): {1: 50.0, 2: 55.0, 3: 60.0},
}


def test_stat_is_mean_and_sample_std():
    st = Stat.of({1: 40.0, 2: 50.0, 3: 60.0})
    assert st.mean == pytest.approx(50.0) and st.std == pytest.approx(10.0) and st.n == 3
    assert math.isnan(Stat.of({7: 3.0}).std)


def test_summary_cells_and_average_over_datasets():
    (s,) = summarize(_rows(VALUES))
    assert s.datasets == ["A", "B"] and s.shots == [1, 4] and s.methods == ["m1", "m2"] and s.seeds == [1, 2, 3]
    assert s.cells[("A", 1, "m1")].mean == pytest.approx(50.0)
    assert s.cells[("A", 1, "m1")].std == pytest.approx(10.0)
    assert s.cells[("A", 4, "m1")].std == pytest.approx(2.0)
    # average: per seed over datasets -> m1 1-shot = (30, 40, 50) -> 40 ± 10
    avg = s.average[(1, "m1")]
    assert (avg.mean, avg.std, avg.n) == (pytest.approx(40.0), pytest.approx(10.0), 3)
    # m2 4-shot: per seed (55, 58, 61) -> 58 ± 3
    assert s.average[(4, "m2")].mean == pytest.approx(58.0) and s.average[(4, "m2")].std == pytest.approx(3.0)
    assert s.complete


def test_markdown_table_content():
    md = markdown_table(_rows(VALUES), methods=["m1", "m2"])
    assert "over **3 seeds** (1, 2, 3)" in md
    assert "### A" in md and "### B" in md and "### Average over 2 datasets" in md
    assert "| method | 1-shot | 4-shot |" in md
    assert "| m1 | **50.00 ± 10.00** | **72.00 ± 2.00** |" in md
    assert "| m2 | 30.00 ± 0.00 | 61.00 ± 1.00 |" in md
    assert "| m1 | **40.00 ± 10.00** |" in md  # average block
    assert "offline stand-in" in md and "Warning" not in md


def test_few_seeds_and_missing_cells_are_flagged():
    values = {k: dict(v) for k, v in VALUES.items()}
    del values[("B", 4, "m2")][3]          # one seed missing in one cell
    md = markdown_table(_rows(values))
    assert "(n=2)" in md and "fewer seeds" in md
    (s,) = summarize(_rows(values))
    assert s.average[(4, "m2")].n == 2      # seed 3 incomplete over datasets -> left out of the average
    two_seeds = {k: {1: v[1], 2: v[2]} for k, v in VALUES.items()}
    assert "Warning: only 2 seeds" in markdown_table(_rows(two_seeds))


def test_empty_and_multi_backbone():
    assert "no results" in markdown_table([])
    rows = _rows(VALUES) + _rows(VALUES, backbone="other:bb")
    md = markdown_table(rows)
    assert md.count("## Few-shot top-1 accuracy (%): backbone") == 2
