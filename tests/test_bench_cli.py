"""`xmodal fewshot` / `xmodal bench` through Typer's test runner (stdout and stderr kept apart)."""
import json

import pytest
import typer
from typer.testing import CliRunner

from xmodal.bench.cli import register
from xmodal.bench.testing import make_tiny_imagefolder


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture(scope="module")
def data_spec(tmp_path_factory):
    root = make_tiny_imagefolder(tmp_path_factory.mktemp("cli") / "data", classes=3, train=6, test=4)
    return f"imagefolder:{root}"


def _run(app, args):
    result = CliRunner().invoke(app, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_fewshot_json_is_one_document(app, data_spec, tmp_path):
    res = _run(app, ["fewshot", "--backbone", "tiny:clip", "--data", data_spec, "--shots", "2", "--seed", "1",
                     "--methods", "zeroshot", "--cache-dir", str(tmp_path), "--device", "cpu",
                     "--augment-views", "1", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["context"]["backbone"] == "tiny:clip" and doc["context"]["n_test"] == 12
    assert [r["method"] for r in doc["rows"]] == ["zeroshot"] and "top1" in doc["rows"][0]


def test_fewshot_table(app, data_spec, tmp_path):
    res = _run(app, ["fewshot", "--backbone", "tiny:clip", "--data", data_spec, "--shots", "1",
                     "--methods", "zeroshot", "--cache-dir", str(tmp_path), "--device", "cpu",
                     "--augment-views", "0"])
    assert res.exit_code == 0, res.output
    assert "zeroshot" in res.stdout and "top-1" in res.stdout and "stand-in" in res.stdout


def test_unknown_method_is_a_clear_error(app, data_spec):
    res = _run(app, ["fewshot", "--backbone", "tiny:clip", "--data", data_spec, "--methods", "zeroshot,bogus"])
    assert res.exit_code == 2
    assert "bogus" in res.output and "available" in res.output and "zeroshot" in res.output


def test_bench_writes_results_table_and_plot(app, data_spec, tmp_path):
    out = tmp_path / "run"
    args = ["bench", "--backbone", "tiny:clip", "--data", data_spec, "--shots", "1,2", "--seeds", "1,2,3",
            "--methods", "zeroshot", "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--device", "cpu",
            "--augment-views", "1"]
    res = _run(app, args)
    assert res.exit_code == 0, res.output
    assert "over **3 seeds**" in res.stdout and "| zeroshot |" in res.stdout
    assert (out / "results.jsonl").exists() and (out / "table.md").exists()
    assert (out / "accuracy_vs_shots.png").read_bytes()[:4] == b"\x89PNG"
    res = _run(app, args + ["--json"])
    doc = json.loads(res.stdout)
    assert doc["new_rows"] == 0 and doc["skipped_rows"] == 6 and doc["rows_total"] == 6
    assert len(doc["summary"][0]["cells"]) == 2 and doc["summary"][0]["seeds"] == [1, 2, 3]


def test_bench_engine_option_reaches_the_sweep_and_its_row_identity(app, data_spec, tmp_path):
    base = ["bench", "--backbone", "tiny:clip", "--data", data_spec, "--shots", "1", "--seeds", "1",
            "--methods", "zeroshot", "--cache-dir", str(tmp_path / "c"), "--device", "cpu", "--augment-views", "0"]
    engines = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / engine
        _run(app, base + ["--out", str(out), "--engine", engine, "--json"])
        rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
        engines[engine] = {r["identity_detail"]["features"]["engine"] for r in rows}
    assert engines == {"torch": {"torch"}, "onnx": {"onnx"}}
