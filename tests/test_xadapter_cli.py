"""`xmodal xadapter train`, `xmodal probe colors`, `xmodal glue` end to end on tiny models (CliRunner)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

torch.set_num_threads(1)

from xmodal.backbones import load_backbone  # noqa: E402
from xmodal.xadapter.bank import RetrievalBank  # noqa: E402
from xmodal.xadapter.cli import register  # noqa: E402
from xmodal.xadapter.glue import compute_metrics, read_glue  # noqa: E402
from xmodal.xadapter.probe import fill_template, read_color_csv  # noqa: E402
from xmodal.xadapter.tiny import build_tiny_plm  # noqa: E402

DATA = Path("/work/shared/data")
COLORS = DATA / "color" / "memory_colors.csv"
GLUE = DATA / "glue"
CAPTIONS = DATA / "text" / "lxmert_train.jsonl"
needs_data = pytest.mark.skipif(not (COLORS.is_file() and GLUE.is_dir() and CAPTIONS.is_file()),
                                reason="shared data not present")


@pytest.fixture(scope="module")
def app():
    from xmodal.cli import app as xmodal_app  # the real command, with its one error path

    return xmodal_app


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("xa_cli")
    texts = [json.loads(l)["text"] for l in CAPTIONS.read_text().splitlines()[:200]] if CAPTIONS.is_file() else []
    if COLORS.is_file():
        texts += [f"{it.descriptor} {it.item}" for it in read_color_csv(COLORS)]
    corpus = root / "captions.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:200]))
    bb = load_backbone("tiny:clip")
    px = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    RetrievalBank.from_embeddings(bb.encode_images(px).clone(), root / "bank", tokens=bb.image_tokens(px).clone(),
                                  meta={"backbone": bb.spec, "fingerprint": bb.fingerprint()})
    return {"root": root, "corpus": corpus, "bank": root / "bank",
            "bert": build_tiny_plm(root / "bert", "bert", texts, seed=2),
            "roberta": build_tiny_plm(root / "roberta", "roberta", texts, seed=3),
            "bare": build_tiny_plm(root / "bare", "bert", texts, head="none", seed=4)}


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_commands_registered(app):
    runner = CliRunner()
    out = runner.invoke(app, ["xadapter", "--help"]).output
    assert "train" in out and "bank" in out
    assert "colors" in runner.invoke(app, ["probe", "--help"]).output
    assert "--freeze-plm" in runner.invoke(app, ["glue", "--help"]).output


@needs_data
def test_train_then_probe_with_and_without_adapter(app, env):
    runner = CliRunner()
    out = env["root"] / "run"
    res = _json(runner.invoke(app, [
        "xadapter", "train", "--plm", str(env["bare"]), "--backbone", "tiny:clip", "--bank", str(env["bank"]),
        "--corpus", str(env["corpus"]), "--out", str(out), "--steps", "6", "--batch-size", "8", "--lr", "1e-3",
        "--device", "cpu", "--json"]))
    assert res["finished"] and res["new_mlm_head"] and res["params"]["trainable"] > 0
    assert "ships without an MLM head" in res["new_head_note"]

    base = ["probe", "colors", "--data", str(COLORS), "--device", "cpu", "--json"]
    # bare PLM without a trained head: clear refusal
    bad = runner.invoke(app, base + ["--plm", str(env["bare"])])
    assert bad.exit_code == 3 and "no trained MLM head" in json.loads(bad.stdout)["error"]
    # through the adapter (V+T experts, retrieval from the bank)
    r = _json(runner.invoke(app, base + ["--plm", str(env["bare"]), "--xadapter", str(out / "xadapter"),
                                         "--bank", str(env["bank"])]))
    assert r["experts"] == ["v", "t"] and r["n_objects"] == 109 and r["predictions"] == 981
    assert len(r["per_template"]) == 9 and len(r["candidates"]) == 11
    assert 0 <= r["accuracy"] <= 100
    assert r["accuracy"] == pytest.approx(sum(t["accuracy"] for t in r["per_template"]) / 9, abs=0.02)
    # T-expert only needs no bank; V on without a bank is refused
    r_t = _json(runner.invoke(app, base + ["--plm", str(env["bare"]), "--xadapter", str(out / "xadapter"),
                                           "--experts", "t", "--templates", "norlund"]))
    assert r_t["experts"] == ["t"] and r_t["n_templates"] == 13
    no_bank = runner.invoke(app, base + ["--plm", str(env["bare"]), "--xadapter", str(out / "xadapter")])
    assert no_bank.exit_code == 3 and "--bank" in json.loads(no_bank.stdout)["error"]


@needs_data
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_probe_plain_plm(app, env, arch):
    r = _json(CliRunner().invoke(app, ["probe", "colors", "--data", str(COLORS), "--plm", str(env[arch]),
                                       "--device", "cpu", "--trailing-period", "--json"]))
    assert r["experts"] == [] and r["predictions"] == 981 and r["trailing_period"]


def test_color_terms_csv_and_templates(tmp_path, env):
    from transformers import AutoTokenizer

    path = tmp_path / "terms.csv"
    path.write_text("object,color\nbanana,yellow\ncoal,black\n")
    items = read_color_csv(path)
    assert [(i.item, i.color, i.descriptor) for i in items] == [("banana", "yellow", ""), ("coal", "black", "")]
    tok = AutoTokenizer.from_pretrained(env["roberta"])
    prompt, query = fill_template("[DESCRIPTOR] [ITEM] usually has the color of", items[0], tok)
    assert prompt == "banana usually has the color of <mask>" and query == "banana usually has the color of"
    tok_b = AutoTokenizer.from_pretrained(env["bert"])
    prompt, query = fill_template("What is the color of [DESCRIPTOR] [ITEM]? [SEP] [MASK].", items[1], tok_b)
    assert prompt == "What is the color of coal? [SEP] [MASK]." and "[" not in query


@needs_data
def test_glue_cola_and_stsb(app, env):
    runner = CliRunner()
    common = ["--data", str(GLUE), "--epochs", "1", "--batch-size", "8", "--max-train", "32", "--max-eval", "40",
              "--max-length", "32", "--lr", "1e-3", "--device", "cpu", "--json"]
    r = _json(runner.invoke(app, ["glue", "--task", "CoLA", "--plm", str(env["bert"])] + common))
    assert r["task"] == "CoLA" and r["main_metric"] == "matthews" and r["train_size"] == 32
    assert set(r["metrics"]["dev"]) == {"accuracy", "matthews"} and r["mode"] == "full"
    # with the adapter (T-expert, the GLUE default) and a frozen PLM
    out = env["root"] / "run_t"
    _json(runner.invoke(app, ["xadapter", "train", "--plm", str(env["bert"]), "--backbone", "tiny:clip",
                              "--experts", "t", "--corpus", str(env["corpus"]), "--out", str(out), "--steps", "2",
                              "--batch-size", "4", "--device", "cpu", "--json"]))
    r = _json(runner.invoke(app, ["glue", "--task", "STS-B", "--plm", str(env["bert"]), "--xadapter",
                                  str(out / "xadapter"), "--freeze-plm"] + common))
    assert r["experts"] == ["t"] and r["mode"] == "frozen-plm" and set(r["metrics"]["dev"]) == {"pearson", "spearman"}
    trainable = r["params"]["trainable"]
    assert 0 < trainable < r["params"]["plm"]


@needs_data
def test_glue_readers_on_shared_files():
    cola, skipped = read_glue(GLUE / "CoLA" / "dev.tsv", "CoLA")
    assert len(cola) == 1043 and skipped == 0 and cola[0].label == 1
    mrpc, _ = read_glue(GLUE / "MRPC" / "dev.tsv", "MRPC")
    assert len(mrpc) == 408 and len(mrpc[0].texts) == 2 and mrpc[0].texts[1].startswith('"')
    rte, _ = read_glue(GLUE / "RTE" / "dev.tsv", "RTE")
    assert len(rte) == 277 and rte[0].label == 1
    sst, _ = read_glue(GLUE / "SST-2" / "dev.tsv", "sst2")
    assert len(sst) == 872
    sts, _ = read_glue(GLUE / "STS-B" / "dev.tsv", "STS-B")
    assert len(sts) == 1500 and sts[0].label == 5.0


def test_metrics():
    m = compute_metrics("CoLA", torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0]))
    assert m["accuracy"] == 75.0 and m["matthews"] == pytest.approx(57.74, abs=0.01)
    m = compute_metrics("MRPC", torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0]))
    assert m == {"accuracy": 50.0, "f1": 50.0}
    m = compute_metrics("STS-B", torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 2.0]))
    assert m["spearman"] == pytest.approx(31.62, abs=0.01)
