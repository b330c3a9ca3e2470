"""X-adapter: visual-input controls, focus masking, safe checkpoints, refused resumes, PLM fingerprints,
GLUE label checks, fill-mask, and the multi-process loss (tiny models, no downloads)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

torch.set_num_threads(1)

from xmodal.backbones import load_backbone  # noqa: E402
from xmodal.errors import CacheMismatchError, InputError, XmodalError  # noqa: E402
from xmodal.xadapter import FillMask, XAdapterConfig, add_xadapter, load_xadapter, save_xadapter  # noqa: E402
from xmodal.xadapter.masking import mask_tokens  # noqa: E402
from xmodal.xadapter.plm import load_mlm  # noqa: E402
from xmodal.xadapter.retrieval.bank import RetrievalBank  # noqa: E402
from xmodal.xadapter.retrieval.context import ContextBuilder, row_classes, shuffle_map  # noqa: E402
from xmodal.xadapter.tasks.train import TrainArgs, _loss, _masked_batch, _EpochPerm, load_checkpoint, train_mlm  # noqa: E402
from xmodal.xadapter.tiny import build_tiny_plm  # noqa: E402

TEXTS = [f"a {c} {o} near the {p}" for c in ("red", "blue", "green", "white", "yellow")
         for o in ("bus", "car", "dog", "cat") for p in ("house", "tree", "road")]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("xa_controls")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    clip = load_backbone("tiny:clip")
    px = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = [f"train/{c}/{i}.jpg" for c in ("bus", "car", "dog", "cat") for i in range(3)]
    RetrievalBank.from_embeddings(clip.encode_images(px).clone(), root / "bank", ids=ids,
                                  meta={"backbone": clip.spec, "fingerprint": clip.fingerprint()})
    return {"root": root, "corpus": corpus, "clip": clip, "bank": root / "bank",
            "mlm": build_tiny_plm(root / "mlm", "bert", TEXTS, seed=0),
            "mlm_other": build_tiny_plm(root / "mlm_other", "bert", TEXTS, seed=1),
            "bare": build_tiny_plm(root / "bare", "bert", TEXTS, head="none", seed=0)}


def _args(env, out, **kw):
    base = dict(plm=str(env["bare"]), bank=str(env["bank"]), corpus=[str(env["corpus"])], out=str(out), steps=4,
                batch_size=8, lr=1e-2, device="cpu", progress=False, seed=0, experts="v,t")
    base.update(kw)
    return TrainArgs(**base)


# ----- visual-input controls ------------------------------------------------------------------------
def test_shuffle_map_moves_every_row_to_another_class():
    classes = [c for c in "abcde" for _ in range(3)] + ["f"]
    m = shuffle_map(classes, seed=0)
    assert all(classes[int(m[r])] != classes[r] for r in range(len(classes)))
    # one cycle over classes: every class is the target of exactly one class
    targets = {classes[r]: classes[int(m[r])] for r in range(len(classes))}
    assert sorted(targets.values()) == sorted(set(classes))
    assert torch.equal(m, shuffle_map(classes, seed=0)) and not torch.equal(m, shuffle_map(classes, seed=1))
    with pytest.raises(XmodalError):
        shuffle_map(["a", "a"])


def test_context_builder_visual_modes(env):
    bank = RetrievalBank.load(env["bank"], env["clip"])
    cfg = XAdapterConfig.for_backbone(env["clip"], experts="v", k=2).resolved(32, 2, "bert")
    texts = ["a red bus", "a white cat"]
    real = ContextBuilder(cfg, env["clip"], bank, visual="real")
    ctx_real = real.build(texts, ("v",))
    shuffled = ContextBuilder(cfg, env["clip"], bank, visual="shuffled")
    ctx_shuf = shuffled.build(texts, ("v",))
    classes = row_classes(bank)
    assert torch.equal(shuffled.last_rows, real.last_rows)          # same retrieval ...
    for got, fed in zip(shuffled.last_rows.tolist(), shuffled.last_fed_rows.tolist()):
        assert all(classes[a] != classes[b] for a, b in zip(got, fed))   # ... but other classes' images fed
    assert not torch.equal(ctx_real.visual, ctx_shuf.visual)
    zero = ContextBuilder(cfg, env["clip"], None, visual="zero").build(texts, ("v",))
    assert zero.visual.shape == ctx_real.visual.shape and not zero.visual.any()
    with pytest.raises(XmodalError, match="visual input"):
        ContextBuilder(cfg, env["clip"], bank, visual="noise")


def test_focus_words_always_masked_and_default_unchanged(env):
    _, tok, _, _ = load_mlm(str(env["mlm"]))
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    plain = mask_tokens(enc["input_ids"], enc["attention_mask"], tok, 0.15, torch.Generator().manual_seed(3))
    again = mask_tokens(enc["input_ids"], enc["attention_mask"], tok, 0.15, torch.Generator().manual_seed(3),
                        focus_ids=None)
    assert all(torch.equal(a, b) for a, b in zip(plain, again))
    colour_ids = torch.tensor([tok.convert_tokens_to_ids(c) for c in ("red", "blue", "green", "white", "yellow")])
    _, labels, _ = mask_tokens(enc["input_ids"], enc["attention_mask"], tok, 0.15, torch.Generator().manual_seed(3),
                               focus_ids=colour_ids)
    is_colour = torch.isin(enc["input_ids"], colour_ids)
    assert is_colour.sum() == len(TEXTS) and bool((labels[is_colour] != -100).all())


# ----- checkpoints and resume ----------------------------------------------------------------------
class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_payload_is_refused_and_never_runs(env, tmp_path):
    victim = tmp_path / "created-by-unpickling"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"step": 1, "evil": _Payload(str(victim))}, out / "checkpoint.pt")
    with pytest.raises(InputError, match="refused without running"):
        load_checkpoint(out / "checkpoint.pt")
    with pytest.raises(InputError):
        train_mlm(_args(env, out, resume=True), log=lambda m: None)
    assert not victim.exists()


def test_resume_refuses_changed_corpus_and_names_it(env, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "run"
    train_mlm(_args(env, out, corpus=[str(corpus)], stop_after=2), log=lambda m: None)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)      # tensors and plain containers only
    assert ckpt["step"] == 2
    corpus.write_text("\n".join(reversed(TEXTS)) + "\n")
    with pytest.raises(XmodalError, match="corpus_sha256") as info:
        train_mlm(_args(env, out, corpus=[str(corpus)], resume=True), log=lambda m: None)
    assert "settings changed" in str(info.value)


# ----- adapters record the PLM they were trained on ---------------------------------------------------
def test_adapter_refuses_same_shape_plm_with_other_weights(env, tmp_path):
    model, _, _, _ = load_mlm(str(env["mlm"]))
    add_xadapter(model, XAdapterConfig.for_backbone(env["clip"], experts="t"))
    save_xadapter(model, tmp_path / "ad")
    same, _, _, _ = load_mlm(str(env["mlm"]))
    load_xadapter(same, tmp_path / "ad")                              # same weights: fine
    other, _, _, _ = load_mlm(str(env["mlm_other"]))
    with pytest.raises(CacheMismatchError, match="other weights") as info:
        load_xadapter(other, tmp_path / "ad")
    assert "--force" in info.value.hint
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_xadapter(other, tmp_path / "ad", force=True, log=notes.append)
    assert notes and any("other weights" in str(w.message) for w in caught)


# ----- GLUE label checks ------------------------------------------------------------------------------
def _glue(tmp_path, train_labels, dev_labels):
    d = tmp_path / "RTE"
    d.mkdir(parents=True)
    rows = lambda labels: "index\tsentence1\tsentence2\tlabel\n" + "".join(  # noqa: E731
        f"{i}\tthe {w} is red\tthe {w} is not blue\t{lab}\n" for i, (w, lab) in enumerate(zip(["bus", "car", "dog", "cat"] * 3, labels)))
    (d / "train.tsv").write_text(rows(train_labels))
    (d / "dev.tsv").write_text(rows(dev_labels))
    return tmp_path


def test_glue_invalid_labels(env, tmp_path):
    from xmodal.cli import app

    runner = CliRunner()
    bad = _glue(tmp_path / "a", ["yes"] * 8, ["entailment"] * 4)
    r = runner.invoke(app, ["glue", "--task", "RTE", "--data", str(bad), "--plm", str(env["mlm"]), "--epochs", "1",
                            "--device", "cpu", "--json"])
    assert r.exit_code == 3 and "no usable RTE example" in json.loads(r.stdout)["error"]
    mixed = _glue(tmp_path / "b", ["entailment", "not_entailment"] * 4, ["entailment", "maybe", "not_entailment", "??"])
    args = ["glue", "--task", "RTE", "--data", str(mixed), "--plm", str(env["mlm"]), "--epochs", "1",
            "--batch-size", "4", "--device", "cpu", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["dev_skipped"] == {"dev": 2} and res["dev_size"] == {"dev": 2}
    r = runner.invoke(app, args + ["--strict"])
    assert r.exit_code == 3 and "invalid label" in json.loads(r.stdout)["error"]


# ----- fill-mask ----------------------------------------------------------------------------------------
def test_fill_mask_api_and_cli(env, tmp_path):
    from xmodal.cli import app

    fill = FillMask(str(env["mlm"]), top_k=3)
    top = fill("the bus is [MASK] .")
    assert len(top) == 3 and top[0]["score"] >= top[1]["score"] >= top[2]["score"] > 0
    # a trained adapter (V and T experts), compared on and off on the same weights
    out = tmp_path / "run"
    train_mlm(_args(env, out, plm=str(env["bare"]), steps=3), log=lambda m: None)
    fill = FillMask(str(env["bare"]), str(out / "xadapter"), str(env["bank"]), top_k=4)
    both = fill("a [MASK] bus near the house", compare=True)
    assert len(both["experts_on"]) == 4 and len(both["experts_off"]) == 4 and both["experts"] == ["v", "t"]
    assert both["query"] == "a bus near the house"
    runner = CliRunner()
    r = runner.invoke(app, ["fill-mask", "--plm", str(env["bare"]), "--xadapter", str(out / "xadapter"), "--bank",
                            str(env["bank"]), "--compare", "--top-k", "2", "--json", "a [MASK] bus near the house"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [p["token"] for p in doc["compare"]["experts_on"]] == [p["token"] for p in both["experts_on"][:2]]
    r = runner.invoke(app, ["fill-mask", "--plm", str(env["mlm"]), "--json", "no mask here"])
    assert r.exit_code == 3 and "[MASK]" in json.loads(r.stdout)["error"]


# ----- multi-process: the split batch gives the one-process gradient -----------------------------------
def test_two_process_split_matches_one_process_gradient(env):
    model, tok, new_head, _ = load_mlm(str(env["mlm"]))
    model.eval()                                                      # no dropout
    perm = _EpochPerm(len(TEXTS), 0)
    one = TrainArgs(batch_size=8, seed=0, max_length=16, mask_ratio=0.3)
    half = TrainArgs(batch_size=4, seed=0, max_length=16, mask_ratio=0.3)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return model.cls.predictions.transform.dense.weight.grad.clone()

    enc, ids, labels, n = _masked_batch(TEXTS, perm, 1, one, tok, 0, 1, None)
    g1 = grads(_loss(model, {**enc, "input_ids": ids}, labels, n, 1)[0])
    g2 = torch.zeros_like(g1)
    for rank in range(2):
        enc, ids, labels, n2 = _masked_batch(TEXTS, perm, 1, half, tok, rank, 2, None)
        assert n2 == n
        g2 += grads(_loss(model, {**enc, "input_ids": ids}, labels, n2, 2)[0]) / 2   # DDP averages
    assert torch.allclose(g1, g2, atol=1e-6, rtol=1e-4)
