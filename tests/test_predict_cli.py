"""``xmodal fit`` / ``xmodal predict``: streamed rows, error rows, formats, exit codes, and the same top-1 as
``xmodal fewshot`` for the same method, shots and seed on real CIFAR-10 images."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xmodal.cli import app


def _run(args: list[str]):
    return CliRunner().invoke(app, args)


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from xmodal.bench.testing import make_tiny_imagefolder

    base = tmp_path_factory.mktemp("cli")
    root = make_tiny_imagefolder(base / "imgs", classes=3, train=8, test=4)
    res = _run(["fit", "--backbone", "tiny:clip", "--data", str(root), "--shots", "4", "--method", "tip-adapter",
                "--seed", "1", "--out", str(base / "model"), "--cache-dir", str(base / "cache"), "--device", "cpu",
                "--json"])
    assert res.exit_code == 0, res.output
    return base, root, json.loads(res.stdout)


def test_fit_reports_accuracy_choice_and_folder(model):
    base, _, out = model
    assert out["out"] == str(base / "model") and (base / "model" / "adapter.safetensors").is_file()
    assert 0 <= out["val_accuracy"] <= 1 and "alpha" in out["selected"] and "beta" in out["selected"]
    assert out["stand_in"] is True and "stand-in" in out["backbone_name"]


def test_predict_jsonl_rows_with_an_error_row(model, tmp_path):
    base, root, _ = model
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["predict", str(base / "model"), str(root / "test" / "class1"), str(bad), "--format", "jsonl",
            "--top-k", "2", "--batch-size", "3", "--cache-dir", str(base / "cache"), "--device", "cpu"]
    res = _run(args)
    assert res.exit_code == 3, res.output  # every image has its row, and the exit code says one failed
    rows = _jsonl(res.stdout)
    assert len(rows) == 5 and res.stdout.count("\n") == 5           # one line per image, nothing else
    good, err = rows[:4], rows[4]
    for r in good:
        assert set(r) == {"path", "label", "score", "top_k"} and len(r["top_k"]) == 2
        assert r["label"] == r["top_k"][0]["label"] and r["score"] == r["top_k"][0]["score"]
    assert err["path"] == str(bad) and "broken.png" in err["error"]
    res = _run(args + ["--skip-corrupt"])
    assert res.exit_code == 0, res.output
    assert [r["path"] for r in _jsonl(res.stdout)] == [r["path"] for r in good]


def test_predict_goes_on_past_a_missing_path_and_exits_3(model, tmp_path):
    base, root, _ = model
    common = ["--cache-dir", str(base / "cache"), "--device", "cpu"]
    gone = tmp_path / "gone.png"
    args = ["predict", str(base / "model"), str(gone), str(root / "test" / "class0"), *common]
    res = _run(args + ["--format", "jsonl"])
    rows = _jsonl(res.stdout)
    assert res.exit_code == 3 and len(rows) == 5, res.output
    assert rows[0]["path"] == str(gone) and "no such file" in rows[0]["error"]
    assert all("label" in r for r in rows[1:])
    assert "1 of 5 input(s) could not be classified" in res.stderr and "--skip-corrupt" in res.stderr
    doc = json.loads(_run(args + ["--json"]).stdout)  # still one document, which says why the exit code is 3
    assert doc["exit_code"] == 3 and doc["n_errors"] == 1 and len(doc["rows"]) == 5 and doc["hint"]
    res = _run(args + ["--skip-corrupt", "--json"])
    doc = json.loads(res.stdout)
    assert res.exit_code == 0 and doc["n_skipped"] == 1 and len(doc["rows"]) == 4 and "error" not in doc


def test_predict_glob_csv_table_and_json(model):
    base, root, _ = model
    common = ["--cache-dir", str(base / "cache"), "--device", "cpu"]
    res = _run(["predict", str(base / "model"), str(root / "test" / "**" / "*.png"), "--format", "csv", *common])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(rows) == 12 and set(rows[0]) == {"path", "label", "score", "top_k", "error"}
    table = _run(["predict", str(base / "model"), str(root / "test"), *common]).stdout
    assert table.splitlines()[0].split()[:3] == ["path", "label", "score"] and len(table.splitlines()) == 13
    doc = json.loads(_run(["predict", str(base / "model"), str(root / "test"), "--json", *common]).stdout)
    assert doc["n_inputs"] == 12 and len(doc["rows"]) == 12 and doc["stand_in"] is True


def test_predict_errors_follow_the_contract(model, tmp_path):
    base, root, _ = model
    res = _run(["predict", str(tmp_path / "no-model"), str(root / "test"), "--json"])
    assert res.exit_code == 3 and json.loads(res.stdout)["type"] == "InputError"
    res = _run(["predict", str(base / "model"), str(root / "test"), "--format", "xml", "--json"])
    assert res.exit_code == 2 and "--format" in json.loads(res.stdout)["error"]
    res = _run(["predict", str(base / "model"), str(tmp_path / "nothing-here.png"), "--json"])
    assert res.exit_code == 3 and "no such file" in json.loads(res.stdout)["rows"][0]["error"]
    res = _run(["fit", "--data", str(root), "--backbone", "tiny:clip", "--method", "nope", "--out",
                str(tmp_path / "m"), "--json"])
    assert res.exit_code == 2 and "unknown few-shot method" in json.loads(res.stdout)["error"]
    assert not (tmp_path / "m").exists()


def _assert_same_choices(a, b, where="selected"):
    """Equal hyper-parameter records: discrete values exactly, floats (validation losses) to 1e-5 relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same_choices(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_choices(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), where
    else:
        assert a == b, where


def _cifar_subset(shared: Path, root: Path, train: int = 6, test: int = 12) -> Path:
    """The first ``train``/``test`` images (sorted) of each class of the shared CIFAR-10 subset, symlinked."""
    for split, n in (("train", train), ("test", test)):
        for cls_dir in sorted((shared / "cifar10" / split).iterdir()):
            dest = root / split / cls_dir.name
            dest.mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                (dest / f.name).symlink_to(f.resolve())
    return root


def test_fit_predict_eval_matches_the_fewshot_harness(shared_data, tmp_path):
    """Same method, shots and seed: saved-classifier top-1 on the test split == `xmodal fewshot` top-1."""
    data = _cifar_subset(shared_data, tmp_path / "cifar")
    spec = f"cifar10:{data}"
    common = ["--backbone", "tiny:clip", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    methods = ["tip-adapter", "xmadapter-tf"]
    ref = _run(["fewshot", "--data", spec, "--shots", "2", "--seed", "1", "--methods", ",".join(methods), "--json",
                *common])
    assert ref.exit_code == 0, ref.output
    rows = {r["method"]: r for r in json.loads(ref.stdout)["rows"]}
    for method in methods:
        out = tmp_path / f"model-{method}"
        fit = _run(["fit", "--data", spec, "--shots", "2", "--seed", "1", "--method", method, "--out", str(out),
                    "--json", *common])
        assert fit.exit_code == 0, fit.output
        _assert_same_choices(json.loads(fit.stdout)["selected"], rows[method]["hparams"])
        png = tmp_path / f"confusion-{method}.png"
        res = _run(["predict", str(out), str(data / "test"), "--eval", "--confusion", str(png), "--json",
                    "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        ev = json.loads(res.stdout)["eval"]
        assert ev["n"] == rows[method]["n_test"] == 120
        assert ev["n_correct"] == rows[method]["n_correct"] and ev["top1"] == pytest.approx(rows[method]["top1"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
