"""Evaluation a practitioner can act on, and readable results.

Per-class precision / recall / F1 / support against hand-computed numbers; the abstain threshold chosen on
held-out images; ``predict --eval`` rows with true/correct, ``--min-score`` (number and ``auto``) and
``--eval-unknown`` through the real command; ``min_score`` in the Python API and the HTTP API; the model card
naming what a method became; the ``fewshot`` table showing chosen settings only.
"""
from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from xmodal import FewShotClassifier
from xmodal.classifier.abstain import UNKNOWN, suggest_min_score
from xmodal.classifier.evaluation import abstention, confusion_matrix, per_class_report
from xmodal.cli import app
from xmodal.errors import UsageError
from xmodal.fewshot.selection import became, chosen_settings, fixed_settings, summary_line
from xmodal.serve.app import create_app
from xmodal.serve.testing import png_bytes


def _run(args: list[str]):
    return CliRunner().invoke(app, args)


def test_per_class_report_matches_hand_computed_numbers():
    m = confusion_matrix([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert m.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    rep = per_class_report(m, ["a", "b", "c"])
    a, b, c = rep["per_class"]
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((50, 50, 50, 2))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((200 / 3, 100, 80, 2))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0, 0, 0, 1)  # never predicted: 0, not NaN
    assert rep["top1"] == pytest.approx(60) and rep["n"] == 5 and rep["n_correct"] == 3
    assert rep["macro"]["precision"] == pytest.approx((50 + 200 / 3) / 3)
    assert rep["macro"]["recall"] == pytest.approx(50) and rep["macro"]["f1"] == pytest.approx(130 / 3)


def test_suggested_threshold_is_the_lowest_meeting_the_target():
    # top probabilities 0.9 (right), 0.8 (right), 0.7 (wrong), 0.6 (right)
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1, 1])
    s = suggest_min_score(probs, labels, 0.9)
    assert s["min_score"] == pytest.approx(0.8) and s["coverage"] == 0.5 and s["accuracy"] == 1.0
    s = suggest_min_score(probs, labels, 0.75)   # all four are 75 % right: no need to abstain
    assert s["min_score"] == 0.0 and s["coverage"] == 1.0
    wrong_first = suggest_min_score(probs, torch.tensor([1, 1, 1, 1]), 1.0)
    assert wrong_first["min_score"] is None and wrong_first["coverage"] == 0.0
    ties = suggest_min_score(torch.tensor([[0.8, 0.2], [0.8, 0.2]]), torch.tensor([0, 1]), 0.9)
    assert ties["min_score"] is None  # equal scores cannot be split by a threshold
    ab = abstention([0.9, 0.5, 0.2], [True, False, True], 0.5)
    assert ab["abstained"] == 1 and ab["coverage"] == pytest.approx(200 / 3) and ab["accuracy_on_accepted"] == 50


def test_became_names_the_kept_stage_and_why():
    sel = {"alpha": 1.5, "beta": 2.0, "gamma": 1.0, "epoch": 20, "kept": "tip-adapter-f", "sign_test_p": 0.75,
           "val_images_won_lost": [3, 2], "val_acc_per_epoch": [0.1] * 300, "lr": 0.001, "n_alpha": 20,
           "val_acc": 0.9, "stage1": {"alpha": 1.5}}
    assert became("xmadapter", sel) == ("kept Tip-Adapter-F stage (sign test p = 0.75, stage 2 won 3 / lost 2 "
                                        "validation images)")
    assert chosen_settings(sel) == {"alpha": 1.5, "beta": 2.0, "gamma": 1.0, "epoch": 20, "kept": "tip-adapter-f"}
    assert fixed_settings(sel) == {"lr": 0.001, "n_alpha": 20}  # no curves, scores or nested stages
    assert summary_line("xmadapter", sel).startswith("alpha=1.5, beta=2, gamma=1, epoch=20; xmadapter → kept")
    assert became("tip-adapter", {"alpha": 1.0}) is None
    folds = {"per_fold": [{"kept": "xmadapter", "sign_test_p": 0.01}, {"kept": "tip-adapter-f", "sign_test_p": 0.5}]}
    assert "in 1 of 2 folds" in became("xmadapter", folds)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from xmodal.bench.testing import make_tiny_imagefolder

    base = tmp_path_factory.mktemp("evalcli")
    root = make_tiny_imagefolder(base / "imgs", classes=3, train=8, test=4)
    other = make_tiny_imagefolder(base / "other", classes=2, train=1, test=3, seed=7)
    res = _run(["fit", "--backbone", "tiny:clip", "--data", str(root), "--shots", "4", "--method", "tip-adapter",
                "--out", str(base / "model"), "--cache-dir", str(base / "cache"), "--device", "cpu",
                "--abstain-target", "0.9", "--json"])
    assert res.exit_code == 0, res.output
    return base, root, other / "test", json.loads(res.stdout)


def test_fit_reports_selection_and_a_threshold_chosen_on_validation(model):
    _, _, _, out = model
    assert out["selection"] == "validation set" and out["method_label"] == "tip-adapter"
    ab = out["abstain"]
    assert ab["target_accuracy"] == 0.9 and ab["on"] == "validation images" and ab["n"] == out["n_val"]
    assert ab["min_score"] is None or 0.0 <= ab["min_score"] <= 1.0


def _predict(base, *args):
    return _run(["predict", str(base / "model"), *map(str, args), "--cache-dir", str(base / "cache"),
                 "--device", "cpu"])


def test_predict_eval_per_class_rows_and_titled_confusion(model):
    base, root, _, _ = model
    png = base / "cm.png"
    res = _predict(base, root / "test", "--eval", "--json", "--confusion", png)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    ev = doc["eval"]
    assert [r["class"] for r in ev["per_class"]] == ["class0", "class1", "class2"]
    assert [r["support"] for r in ev["per_class"]] == [4, 4, 4] and set(ev["macro"]) >= {"precision", "recall", "f1"}
    rows = doc["rows"]
    assert all(r["true"] == r["path"].split("/")[-2] and r["correct"] == (r["label"] == r["true"]) for r in rows)
    assert ev["n_correct"] == sum(r["correct"] for r in rows)
    assert "tip-adapter" in ev["title"] and str(root / "test") in ev["title"] and png.stat().st_size > 0
    table = _predict(base, root / "test", "--eval", "--confusion", png)
    assert table.exit_code == 0 and "precision" in table.stdout and "macro (3 classes)" in table.stdout


def test_min_score_labels_unknown_below_the_threshold_everywhere(model):
    base, root, other, out = model
    plain = json.loads(_predict(base, root / "test", "--json").stdout)["rows"]
    scores = sorted(r["score"] for r in plain)
    t = (scores[5] + scores[6]) / 2  # half the images fall below
    doc = json.loads(_predict(base, root / "test", "--eval", "--json", "--confusion", base / "c2.png",
                              "--min-score", t).stdout)
    for r, p in zip(doc["rows"], plain):
        assert r["label"] == (UNKNOWN if p["score"] < t else p["label"]) and r["score"] == p["score"]
    assert doc["eval"]["abstain"]["abstained"] == 6 and doc["min_score"] == t
    clf = FewShotClassifier.load(base / "model", device="cpu", cache_dir=base / "cache")
    assert clf.predict(str(root / "test"), min_score=t) == [r["label"] for r in doc["rows"]]
    # out-of-set images: the share abstained on is the share scoring below the threshold
    far = json.loads(_predict(base, other, "--json").stdout)["rows"]
    doc = json.loads(_predict(base, root / "test", "--json", "--min-score", t, "--eval-unknown", other).stdout)
    below = sum(r["score"] < t for r in far)
    assert doc["eval_unknown"]["abstained"] == below and doc["eval_unknown"]["n"] == len(far) == 6
    assert doc["eval_unknown"]["abstention_rate"] == pytest.approx(100 * below / 6)
    # 'auto' is the threshold saved at fit time (or a clear error when none reached the target)
    auto = _predict(base, root / "test", "--json", "--min-score", "auto")
    if out["abstain"]["min_score"] is None:
        assert auto.exit_code == 2 and "no suggested min_score" in auto.output
    else:
        assert auto.exit_code == 0 and json.loads(auto.stdout)["min_score"] == out["abstain"]["min_score"]
    for bad in ("2", "abc", "-0.1"):
        res = _predict(base, root / "test", "--min-score", bad)
        assert res.exit_code == 2 and "min_score" in res.output, res.output
    with pytest.raises(UsageError):
        clf.predict(str(root / "test"), min_score=1.5)


def test_serve_min_score_and_card_name_what_the_method_became(model):
    base, _, _, _ = model
    clf = FewShotClassifier.load(base / "model", device="cpu", cache_dir=base / "cache")
    with TestClient(create_app(clf)) as client:
        card = client.get("/v1/model").json()
        assert card["method_label"] == "tip-adapter" and card["selection"] == "validation set"
        assert "abstain" in card["details"]
        img = png_bytes()
        top = client.post("/v1/classify", files={"file": ("a.png", img, "image/png")}).json()["results"][0]
        above = client.post(f"/v1/classify?min_score={top['score'] - 1e-6}",
                            files={"file": ("a.png", img, "image/png")}).json()["results"][0]
        below = client.post(f"/v1/classify?min_score={min(1.0, top['score'] + 1e-6)}",
                            files={"file": ("a.png", img, "image/png")}).json()["results"][0]
        assert above["label"] == top["label"] and below["label"] == UNKNOWN and below["top_k"] == top["top_k"]
        bad = client.post("/v1/classify?min_score=2", files={"file": ("a.png", img, "image/png")})
        assert bad.status_code == 422 and "error" in bad.json()
        page = client.get("/").text
        assert 'id="min_score"' in page and "min_score=" in page


def test_fewshot_table_shows_chosen_settings_once_and_no_curves(tmp_path):
    from xmodal.bench.testing import make_tiny_imagefolder

    root = make_tiny_imagefolder(tmp_path / "imgs", classes=3, train=6, test=3)
    res = CliRunner().invoke(app, ["fewshot", "--backbone", "tiny:clip", "--data", f"imagefolder:{root}", "--shots",
                                   "2", "--methods", "tip-adapter,tip-adapter-f", "--augment-views", "0",
                                   "--cache-dir", str(tmp_path / "c"), "--device", "cpu"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "per_epoch" not in res.stdout and "[0." not in res.stdout and "0.0, " not in res.stdout
    assert "→ kept" in res.stdout  # Tip-Adapter-F says whether its trained or its training-free cache was kept
    assert res.stdout.count("fixed tip-adapter:") == 1 and res.stdout.count("fixed tip-adapter-f:") == 1
    assert "lr=0.001" not in res.stdout.split("fixed tip-adapter")[0]  # fixed settings are not in the table
    assert len(res.stdout.splitlines()) < 40


def test_min_score_is_refused_when_a_class_is_named_unknown(model):
    base, root, _, _ = model
    clf = FewShotClassifier.load(base / "model", device="cpu", cache_dir=base / "cache")
    clf.classes_ = [UNKNOWN, *clf.classes_[1:]]
    assert clf.resolve_min_score(None) is None  # without abstaining the name is harmless
    with pytest.raises(UsageError, match="a class is named 'unknown'") as err:
        clf.predict(str(root / "test"), min_score=0.5)
    assert "rename" in err.value.hint


def test_xmadapter_card_says_which_stage_it_kept_everywhere(tmp_path, one_thread):
    from xmodal.bench.testing import make_tiny_imagefolder

    root = make_tiny_imagefolder(tmp_path / "imgs", classes=3, train=6, test=2)
    clf = FewShotClassifier(backbone="tiny:clip", method="xmadapter", shots=3, seed=0, cache_dir=tmp_path / "c",
                            device="cpu", augment_views=0, epochs=3).fit(root)
    kept = clf.selected_["kept"]
    stage = "Tip-Adapter-F stage" if kept == "tip-adapter-f" else "stage 2 (text cache)"
    label = clf.card()["method_label"]
    assert label.startswith(f"xmadapter → kept {stage} (sign test p = ") and clf.card()["method"] == "xmadapter"
    saved = clf.save(tmp_path / "m")
    assert json.loads((saved / "xmodal_classifier.json").read_text())["method"]["label"] == label
    loaded = FewShotClassifier.load(saved, device="cpu", cache_dir=tmp_path / "c")
    with TestClient(create_app(loaded)) as client:
        assert client.get("/v1/model").json()["method_label"] == label
        assert "card.method_label" in client.get("/").text  # the page shows it as the method
