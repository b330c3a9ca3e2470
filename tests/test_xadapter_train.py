"""MLM adaptation: loss falls, exact resume, no leakage of masked words into CLIP."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import re
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from safetensors.torch import load_file  # noqa: E402

from xmodal.backbones import load_backbone  # noqa: E402
from xmodal.errors import XmodalError  # noqa: E402
from xmodal.xadapter import masking  # noqa: E402
from xmodal.xadapter.bank import RetrievalBank  # noqa: E402
from xmodal.xadapter.context import ContextBuilder  # noqa: E402
from xmodal.xadapter.plm import load_mlm  # noqa: E402
from xmodal.xadapter.tiny import build_tiny_plm  # noqa: E402
from xmodal.xadapter.train import TrainArgs, read_corpus, train_mlm  # noqa: E402

CAPTIONS = Path("/work/shared/data/text/lxmert_train.jsonl")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("xa_train")
    if CAPTIONS.is_file():
        corpus = root / "captions.jsonl"
        corpus.write_text("\n".join(CAPTIONS.read_text().splitlines()[:300]) + "\n")
    else:  # pragma: no cover - outside the project machine
        corpus = root / "captions.txt"
        corpus.write_text("\n".join(f"a {c} bus near a {d} house" for c in ("red", "blue", "green") for d in ("white", "brown")) * 20)
    texts = read_corpus([corpus])
    bare = build_tiny_plm(root / "bare", "bert", texts, head="none", seed=0)
    bb = load_backbone("tiny:clip")
    px = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    bank = root / "bank"
    RetrievalBank.from_embeddings(bb.encode_images(px).clone(), bank, tokens=bb.image_tokens(px).clone(),
                                  meta={"backbone": bb.spec, "fingerprint": bb.fingerprint()})
    return {"root": root, "corpus": corpus, "bare": bare, "bank": bank, "texts": texts}


def _args(setup, out, **kw):
    base = dict(plm=str(setup["bare"]), bank=str(setup["bank"]), corpus=[str(setup["corpus"])], out=str(out),
                steps=50, batch_size=16, lr=1e-2, device="cpu", progress=False, seed=0)
    base.update(kw)
    return TrainArgs(**base)


def _losses(out):
    return [json.loads(l)["loss"] for l in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def test_loss_falls_and_outputs(setup):
    out = setup["root"] / "run_loss"
    messages = []
    summary = train_mlm(_args(setup, out), log=messages.append)
    losses = _losses(out)
    assert len(losses) == 50
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.1, (first, last)
    assert summary["finished"] and summary["new_mlm_head"]
    assert any("ships without an MLM head" in m for m in messages)
    assert any(m.startswith("trainable params:") and "% of the PLM" in m for m in messages)
    assert (out / "xadapter" / "xadapter.safetensors").is_file() and (out / "summary.json").is_file()
    meta = json.loads((out / "xadapter" / "xadapter_config.json").read_text())
    assert meta["head_params"] and all(n.startswith("cls.predictions") for n in meta["head_params"])
    # the base PLM weights never change: the adapter file holds only adapter and head tensors
    keys = load_file(str(out / "xadapter" / "xadapter.safetensors")).keys()
    assert all(k.startswith(("adapter.", "head.cls.predictions")) for k in keys)
    with pytest.raises(XmodalError, match="--resume"):
        train_mlm(_args(setup, out), log=lambda m: None)


def test_resume_gives_identical_weights(setup):
    full, split = setup["root"] / "run_full", setup["root"] / "run_split"
    kw = dict(steps=10, save_every=3)
    train_mlm(_args(setup, full, **kw), log=lambda m: None)
    part = train_mlm(_args(setup, split, stop_after=4, **kw), log=lambda m: None)
    assert not part["finished"] and part["steps_done"] == 4
    ckpt = torch.load(split / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["optimizer"]["state"]
    done = train_mlm(_args(setup, split, resume=True, **kw), log=lambda m: None)
    assert done["finished"] and done["resumed_from"] == 4
    a = load_file(str(full / "xadapter" / "xadapter.safetensors"))
    b = load_file(str(split / "xadapter" / "xadapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(full) == _losses(split)
    with pytest.raises(XmodalError, match="settings changed"):
        train_mlm(_args(setup, split, resume=True, steps=10, batch_size=8), log=lambda m: None)


def test_no_leakage_into_clip(setup, monkeypatch):
    """Every word replaced by the mask token is absent from the text given to retrieval and the T-expert."""
    # sentences whose words are unique within the sentence, so absence is a clean check
    texts = [t for t in setup["texts"] if len(set(t.lower().split())) == len(t.split()) and len(t.split()) >= 5][:40]
    corpus = setup["root"] / "unique.txt"
    corpus.write_text("\n".join(texts) + "\n")
    seen = []
    real_mask, real_build = masking.mask_tokens, ContextBuilder.build

    def spy_mask(ids, attn, tok, ratio, gen):
        out = real_mask(ids, attn, tok, ratio, gen)
        seen.append({"masked": out[0], "labels": out[1], "to_mask": out[2], "attn": attn, "tok": tok})
        return out

    def spy_build(self, queries, experts):
        seen[-1]["queries"] = list(queries)
        return real_build(self, queries, experts)

    monkeypatch.setattr("xmodal.xadapter.train.mask_tokens", spy_mask)
    monkeypatch.setattr(ContextBuilder, "build", spy_build)
    train_mlm(_args(setup, setup["root"] / "run_leak", corpus=[str(corpus)], steps=3, mask_ratio=0.4),
              log=lambda m: None)
    assert len(seen) == 3
    hidden_words = 0
    for rec in seen:
        tok = rec["tok"]
        for row, query in enumerate(rec["queries"]):
            assert tok.mask_token not in query
            words = set(re.findall(r"\w+", query.lower()))
            for pos in rec["to_mask"][row].nonzero().flatten().tolist():
                word = tok.convert_ids_to_tokens(int(rec["labels"][row, pos]))
                if word.startswith("##") or word == tok.unk_token:
                    continue
                hidden_words += 1
                assert word not in words, (word, query)
    assert hidden_words > 20


def test_bert_masking_ratio(setup):
    _, tok, _, _ = load_mlm(str(setup["bare"]))
    enc = tok(setup["texts"][:200], padding=True, return_tensors="pt")
    gen = torch.Generator().manual_seed(0)
    ids, labels, to_mask = masking.mask_tokens(enc["input_ids"], enc["attention_mask"], tok, 0.3, gen)
    real = enc["attention_mask"].bool() & ~masking.special_tokens_mask(enc["input_ids"], tok)
    selected = labels != -100
    assert not (selected & ~real).any()
    frac = selected.sum() / real.sum()
    assert 0.27 < frac < 0.36
    share_mask = to_mask.sum() / selected.sum()
    assert 0.72 < share_mask < 0.88
    kept = (selected & (ids == enc["input_ids"])).sum() / selected.sum()
    assert 0.05 < kept < 0.16
    assert torch.equal(labels[selected], enc["input_ids"][selected])


def test_read_corpus_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one  two"}\n\n{"text": "three"}\n')
    (tmp_path / "b.txt").write_text("four\n\nfive six\n")
    assert read_corpus([tmp_path / "a.jsonl", tmp_path / "b.txt"]) == ["one two", "three", "four", "five six"]
    (tmp_path / "bad.jsonl").write_text('{"nope": 1}\n')
    with pytest.raises(XmodalError, match="'text' field"):
        read_corpus([tmp_path / "bad.jsonl"])
