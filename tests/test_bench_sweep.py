"""A sweep killed midway resumes without duplicates, without touching finished rows or recomputing features."""
import json

import pytest

from xmodal.bench.store import ResultStore, row_key
from xmodal.bench.sweep import PLOT_FILE, RESULTS_FILE, TABLE_FILE, StaleResultsError, run_sweep
from xmodal.bench.testing import SpyMethod, make_tiny_imagefolder, registered


@pytest.fixture(scope="module")
def data_spec(tmp_path_factory):
    root = make_tiny_imagefolder(tmp_path_factory.mktemp("sweep") / "data", classes=3, train=6, test=4)
    return f"imagefolder:{root}"


def _snapshot(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_killed_sweep_resumes(tmp_path, data_spec):
    out, cache = tmp_path / "out", tmp_path / "cache"
    kw = dict(cache_dir=str(cache), augment_views=2, progress=False)

    class Flaky(SpyMethod):
        calls = []
        fail_after = 3  # the 4th fit "kills" the process

    with registered("spy-flaky", Flaky):
        with pytest.raises(KeyboardInterrupt):
            run_sweep("tiny:clip", [data_spec], [1, 2], [1, 2, 3], ["zeroshot", "spy-flaky"], out, **kw)
        first = ResultStore(out / RESULTS_FILE).rows
        assert len(first) == 7  # 3 full episodes + zeroshot of the 4th
        with open(out / RESULTS_FILE, "ab") as fh:  # and the kill tore a line
            fh.write(b'{"method": "spy-fla')
        cache_before = _snapshot(cache)

        Flaky.fail_after = None
        with pytest.warns(UserWarning, match="torn"):
            result = run_sweep("tiny:clip", [data_spec], [1, 2], [1, 2, 3], ["zeroshot", "spy-flaky"], out, **kw)
    assert result.repaired and result.new_rows == 5 and result.skipped_rows == 7 and not result.missing
    assert _snapshot(cache) == cache_before  # features came from the on-disk cache
    lines = (out / RESULTS_FILE).read_text().splitlines()
    rows = [json.loads(x) for x in lines]  # every line parses: the torn one is gone
    keys = [row_key(r) for r in rows]
    assert len(keys) == len(set(keys)) == 12
    assert {(k[3], k[4]) for k in keys} == {(k, s) for k in (1, 2) for s in (1, 2, 3)}
    assert rows[:7] == first  # finished rows untouched, timestamps included
    assert all(r["timestamp"] > first[-1]["timestamp"] for r in rows[7:])
    assert (out / TABLE_FILE).read_text().startswith("## Few-shot top-1 accuracy")
    assert (out / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"

    # a third run has nothing to do: no backbone work, no feature extraction, same file
    before = (out / RESULTS_FILE).read_bytes()

    def boom(*a, **k):
        raise AssertionError("features requested although every row exists")

    again = run_sweep("tiny:clip", [data_spec], [1, 2], [1, 2, 3], ["zeroshot"], out, extract_fn=boom, **kw)
    assert again.new_rows == 0 and len(again.rows) == 6
    assert (out / RESULTS_FILE).read_bytes() == before


def test_sweep_table_and_union_scope(tmp_path, data_spec):
    out = tmp_path / "out"
    res = run_sweep("tiny:clip", data_spec, "1,2", "1,2,3", "zeroshot", out, cache_dir=str(tmp_path / "c"),
                    augment_views=1, augment_scope="union", progress=False)
    assert len(res.rows) == 6 and res.new_rows == 6
    assert all(r["augment_scope"] == "union" for r in res.rows)
    assert "over **3 seeds**" in res.table and f"### {data_spec}" in res.table
    assert json.loads((out / "sweep.json").read_text())["methods"] == ["zeroshot"]


def test_changed_weights_are_refused(tmp_path, data_spec):
    out = tmp_path / "out"
    ResultStore(out / RESULTS_FILE).append({"method": "zeroshot", "backbone": "tiny:clip", "dataset": data_spec,
                                            "shots": 1, "seed": 1, "top1": 1.0,
                                            "backbone_fingerprint": "older-weights", "augment_views": 0})
    with pytest.raises(StaleResultsError, match="different weights"):
        run_sweep("tiny:clip", [data_spec], [1], [1, 2], ["zeroshot"], out, cache_dir=str(tmp_path / "c"),
                  augment_views=0, progress=False)


KILLER = r"""
import os, signal, sys
from xmodal.bench.testing import SpyMethod, registered
from xmodal.bench.sweep import run_sweep

class Killer(SpyMethod):
    calls = []
    def fit(self, support, val, text_classifier):
        if sum(1 for c in type(self).calls if c["event"] == "fit") == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a real crash
        return super().fit(support, val, text_classifier)

with registered("spy-killer", Killer):
    run_sweep("tiny:clip", [sys.argv[1]], [1, 2], [1, 2], ["zeroshot", "spy-killer"], sys.argv[2],
              cache_dir=sys.argv[3], augment_views=1, progress=False)
"""


def test_sigkilled_sweep_resumes(tmp_path, data_spec):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import xmodal

    repo = str(Path(list(xmodal.__path__)[0]).parent)
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", KILLER, data_spec, str(out), str(cache)], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    first = ResultStore(out / RESULTS_FILE).rows
    assert [(r["method"], r["shots"], r["seed"]) for r in first] == [
        ("zeroshot", 1, 1), ("spy-killer", 1, 1), ("zeroshot", 1, 2), ("spy-killer", 1, 2), ("zeroshot", 2, 1)]

    class Healthy(SpyMethod):
        calls = []

    with registered("spy-killer", Healthy):
        result = run_sweep("tiny:clip", [data_spec], [1, 2], [1, 2], ["zeroshot", "spy-killer"], out,
                           cache_dir=str(cache), augment_views=1, progress=False)
    assert result.new_rows == 3 and len(result.rows) == 8 and not result.missing
    rows = ResultStore(out / RESULTS_FILE).rows
    assert rows[:5] == first and len({row_key(r) for r in rows}) == 8
