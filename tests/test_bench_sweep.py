"""A sweep killed midway resumes without duplicates, without touching finished rows or recomputing features."""
import json

import pytest

from xmodal.bench.store import ResultStore, row_key
from xmodal.bench.sweep import PLOT_FILE, RESULTS_FILE, TABLE_FILE, run_sweep
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

    # a third run has nothing to do: no feature extraction, same file
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


def test_rows_from_older_files_or_other_weights_are_not_reused(tmp_path, data_spec):
    out = tmp_path / "out"
    ResultStore(out / RESULTS_FILE).append({"method": "zeroshot", "backbone": "tiny:clip", "dataset": data_spec,
                                            "shots": 1, "seed": 1, "top1": 1.0,
                                            "backbone_fingerprint": "older-weights", "augment_views": 0})
    with pytest.warns(UserWarning, match="1 row.*predate data identities.*not reused"):
        res = run_sweep("tiny:clip", [data_spec], [1], [1, 2], ["zeroshot"], out, cache_dir=str(tmp_path / "c"),
                        augment_views=0, progress=False)
    assert res.new_rows == 2 and all(r["top1"] != 1.0 for r in res.rows) and len(res.stale) == 1
    assert len(ResultStore(out / RESULTS_FILE)) == 3  # the old row is kept in the file, nothing lost
    # another backbone seed = other weights under a spec whose rows exist: recomputed, and said so
    with pytest.warns(UserWarning, match="backbone weights"):
        res2 = _sweep_with_other_weights(out, data_spec, tmp_path)
    assert res2.new_rows == 2


def _sweep_with_other_weights(out, data_spec, tmp_path):
    from xmodal.backbones import load_backbone

    bb = load_backbone("tiny:clip:7")
    bb.spec = "tiny:clip"  # same spec string, different weights
    return run_sweep(bb, [data_spec], [1], [1, 2], ["zeroshot"], out, cache_dir=str(tmp_path / "c"),
                     augment_views=0, progress=False)


def test_finished_folder_rerun_with_other_options_or_changed_data_recomputes(tmp_path):
    root = make_tiny_imagefolder(tmp_path / "data", classes=3, train=6, test=4)
    spec = f"imagefolder:{root}"
    out, kw = tmp_path / "out", dict(cache_dir=str(tmp_path / "c"), progress=False)
    first = run_sweep("tiny:clip", [spec], [1], [1, 2, 3], ["zeroshot", "tip-adapter"], out, augment_views=1, **kw)
    assert first.new_rows == 6 and not first.stale
    ident = first.rows[0]["identity"]
    assert all(r["identity"] == ident for r in first.rows)
    assert first.rows[0]["identity_detail"]["features"]["augment_views"] == 1
    same = run_sweep("tiny:clip", [spec], [1], [1, 2, 3], ["zeroshot", "tip-adapter"], out, augment_views=1, **kw)
    assert same.new_rows == 0 and same.rows == first.rows  # same options, same data: rows reused

    with pytest.warns(UserWarning, match="augment_views 1 -> 2"):
        views = run_sweep("tiny:clip", [spec], [1], [1, 2, 3], ["zeroshot", "tip-adapter"], out, augment_views=2,
                          **kw)
    assert views.new_rows == 6 and {r["identity"] for r in views.rows} != {ident}
    assert all(r["augment_views"] == 2 for r in views.rows)

    # one test image replaced by another picture (same name): content identity changes, rows recomputed
    from PIL import Image

    victim = sorted((root / "test" / "class0").iterdir())[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(victim)
    with pytest.warns(UserWarning, match="dataset content of split.*test"):
        changed = run_sweep("tiny:clip", [spec], [1], [1, 2, 3], ["zeroshot", "tip-adapter"], out, augment_views=1,
                            **kw)
    assert changed.new_rows == 6 and {r["identity"] for r in changed.rows}.isdisjoint({ident})
    # the table is made from this run's rows only
    assert all(r["identity"] == changed.rows[0]["identity"] for r in changed.rows)
    assert len(ResultStore(out / RESULTS_FILE)) == 18  # nothing lost, nothing duplicated


@pytest.mark.parametrize("kwargs, match", [
    (dict(seeds=[1, 1, 2]), "--seeds lists 1 more than once"),
    (dict(shots=[2, 2]), "--shots lists 2 more than once"),
    (dict(shots=[0]), "shots must be integers >= 1"),
    (dict(shots="1,x"), "shots: expected comma-separated"),
    (dict(seeds=[]), "at least one"),
    (dict(shots=[1, 50]), "no class has 50 training images"),
])
def test_bad_grids_fail_before_any_work(tmp_path, data_spec, kwargs, match):
    from xmodal.errors import UsageError

    def boom(*a, **k):
        raise AssertionError("no feature may be computed for a bad grid")

    args = {"shots": [1], "seeds": [1], **kwargs}
    with pytest.raises(UsageError, match=match):
        run_sweep("tiny:does-not-matter", [data_spec], args["shots"], args["seeds"], ["zeroshot"], tmp_path / "o",
                  extract_fn=boom, progress=False)
    assert not (tmp_path / "o").exists()


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


def test_two_concurrent_sweeps_into_one_folder_never_duplicate(tmp_path, data_spec):
    """Two sweeps of the same grid racing on one --out folder: every row once, both see the full grid."""
    import threading

    out, results, errors = tmp_path / "out", [], []

    def sweep():
        try:
            results.append(run_sweep("tiny:clip", [data_spec], [1, 2], [1, 2, 3], ["zeroshot", "tip-adapter"], out,
                                     cache_dir=str(tmp_path / "c"), augment_views=0, progress=False,
                                     write_report=False))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    rows = [json.loads(x) for x in (out / RESULTS_FILE).read_text().splitlines()]
    keys = [row_key(r) for r in rows]
    assert len(keys) == len(set(keys)) == 12
    assert sum(r.new_rows for r in results) == 12 and all(len(r.rows) == 12 for r in results)


def test_rows_made_with_other_method_settings_are_recomputed(tmp_path, data_spec, monkeypatch):
    """A changed default (an upgrade) must not reuse rows fitted under the old one: the row key carries a
    digest of the method's parameters."""
    from xmodal.fewshot.tip_adapter import TipAdapter

    out, kw = tmp_path / "out", dict(cache_dir=str(tmp_path / "c"), augment_views=0, progress=False)
    first = run_sweep("tiny:clip", [data_spec], [1], [1], ["tip-adapter", "zeroshot"], out, **kw)
    assert first.new_rows == 2 and all(r["method_config"] for r in first.rows)
    again = run_sweep("tiny:clip", [data_spec], [1], [1], ["tip-adapter", "zeroshot"], out, **kw)
    assert again.new_rows == 0 and again.skipped_rows == 2
    init = TipAdapter.__init__
    monkeypatch.setattr(TipAdapter, "__init__",
                        lambda self, *a, n_beta=7, **k: init(self, *a, n_beta=n_beta, **k))  # "new default"
    with pytest.warns(UserWarning, match="1 row.*tip-adapter.*other or unrecorded method settings"):
        changed = run_sweep("tiny:clip", [data_spec], [1], [1], ["tip-adapter", "zeroshot"], out, **kw)
    assert changed.new_rows == 1 and changed.skipped_rows == 1
    tip = [r for r in changed.rows if r["method"] == "tip-adapter"][0]
    assert tip["hparams"]["n_beta"] == 7 and tip["method_config"] != first.rows[0]["method_config"]
