"""X-adapter modules: identity at init, frozen base, save/load, gates, parameter budget."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from xmodal.backbones import load_backbone  # noqa: E402
from xmodal.errors import CacheMismatchError, ShapeError, XmodalError  # noqa: E402
from xmodal.xadapter import (  # noqa: E402
    ContextBuilder,
    XAdapterConfig,
    XContext,
    add_xadapter,
    adapter_parameters,
    count_parameters,
    get_xadapter,
    load_xadapter,
    save_xadapter,
)
from xmodal.xadapter.modules import expected_param_count  # noqa: E402
from xmodal.xadapter.tiny import build_tiny_plm  # noqa: E402

CAPTIONS = Path("/work/shared/data/text/lxmert_train.jsonl")


def _texts(n=200):
    if CAPTIONS.is_file():
        return [json.loads(l)["text"] for l in CAPTIONS.read_text().splitlines()[:n]]
    return ["a red bus on the street", "green grass in a park", "a white dog on a brown sofa"]


@pytest.fixture(scope="module")
def plms(tmp_path_factory):
    root = tmp_path_factory.mktemp("plm")
    texts = _texts()
    return {arch: build_tiny_plm(root / arch, arch, texts, seed=1) for arch in ("bert", "roberta")}


@pytest.fixture(scope="module")
def clip():
    return load_backbone("tiny:clip")


def _load(path, head):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cls = AutoModelForMaskedLM if head == "mlm" else AutoModelForSequenceClassification
    kwargs = {} if head == "mlm" else {"num_labels": 3}
    torch.manual_seed(0)
    model = cls.from_pretrained(path, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(path)


SENTS = ["a red bus on the street", "green grass", "what is the color of a banana ?"]


def _ctx(stack, clip):
    return ContextBuilder(stack.config, clip).build(SENTS, ("t",)) if stack.config.experts == ("t",) else XContext(
        visual=torch.randn(3, 4, stack.config.clip_dim, generator=torch.Generator().manual_seed(0)),
        text=ContextBuilder(stack.config, clip).build(SENTS, ("t",)).text,
        text_mask=ContextBuilder(stack.config, clip).build(SENTS, ("t",)).text_mask)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("head", ["mlm", "cls"])
def test_identity_at_init(plms, clip, arch, head):
    model, tok = _load(plms[arch], head)
    enc = tok(SENTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**enc).logits.clone()
    stack = add_xadapter(model, XAdapterConfig.for_backbone(clip))
    with torch.no_grad(), stack.context(_ctx(stack, clip)):
        adapted = model(**enc).logits
    assert torch.allclose(adapted, base, atol=1e-6, rtol=0)
    # the hook really rewrites the layer output once W_o / W_up are non-zero
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    with torch.no_grad(), stack.context(_ctx(stack, clip)):
        changed = model(**enc).logits
    assert (changed - base).abs().max() > 1e-4
    # gates off -> exactly the base model again
    stack.set_gates(v=False, t=False)
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, base, atol=1e-6, rtol=0)


def test_only_adapters_train_and_base_is_untouched(plms, clip):
    model, tok = _load(plms["bert"], "mlm")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stack = add_xadapter(model, XAdapterConfig.for_backbone(clip, experts="v,t"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("xadapter.") for n in trainable)
    assert {id(p) for p in adapter_parameters(model)} == {id(p) for p in stack.parameters()}
    model.train()
    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    enc = tok(SENTS, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    for _ in range(2):
        with stack.context(_ctx(stack, clip)):
            loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if not n.startswith("xadapter."):
            assert torch.equal(p, before[n]), n
            assert p.grad is None
    assert any(p.abs().sum() > 0 for n, p in stack.named_parameters() if n.endswith("o.weight"))


def test_missing_context_and_bad_shapes_raise(plms, clip):
    model, tok = _load(plms["bert"], "mlm")
    stack = add_xadapter(model, XAdapterConfig.for_backbone(clip, experts="t"))
    enc = tok(SENTS, return_tensors="pt", padding=True)
    with pytest.raises(XmodalError, match="no text context"):
        model(**enc)
    with pytest.raises(ShapeError):
        stack.set_context(text=torch.zeros(3, 1, clip.embed_dim + 1))
    with pytest.raises(XmodalError, match="no V-expert"):
        stack.set_gates(v=True)
    # a sample with no valid context tokens gets no cross-attention (no NaN)
    ctx = XContext(text=torch.randn(3, 2, clip.embed_dim), text_mask=torch.tensor([[1, 1], [0, 0], [1, 0]]).bool())
    with torch.no_grad(), stack.context(ctx):
        assert torch.isfinite(model(**enc).logits).all()


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_save_load_roundtrip_and_mismatch(plms, clip, tmp_path, arch):
    model, tok = _load(plms[arch], "mlm")
    stack = add_xadapter(model, XAdapterConfig.for_backbone(clip, layers="all", bottleneck=16))
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    stack.set_gates(v=True, t=False)
    # pretend the PLM's MLM head transform was new: it must travel with the adapter
    head = "cls.predictions.transform.dense.weight" if arch == "bert" else "lm_head.dense.weight"
    from xmodal.xadapter import mark_new_head

    mark_new_head(model, [head])
    with torch.no_grad():
        dict(model.named_parameters())[head].add_(0.5)
    enc = tok(SENTS, return_tensors="pt", padding=True)
    ctx = _ctx(stack, clip)
    with torch.no_grad(), stack.context(ctx):
        expected = model(**enc).logits
    save_xadapter(model, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["xadapter.safetensors", "xadapter_config.json"]

    fresh, _ = _load(plms[arch], "mlm")
    loaded = load_xadapter(fresh, tmp_path / "ad")
    assert loaded.gates == {"v": True, "t": False}
    assert loaded.config.layers == [0, 1]
    with torch.no_grad(), loaded.context(ctx):
        assert torch.equal(fresh(**enc).logits, expected)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == (
        {f"xadapter.{n}" for n, _ in loaded.named_parameters()} | {head})

    other = plms["roberta" if arch == "bert" else "bert"]
    wrong, _ = _load(other, "mlm")
    with pytest.raises(CacheMismatchError, match="different PLM"):
        load_xadapter(wrong, tmp_path / "ad")


def test_mismatched_hidden_size(tmp_path, plms, clip):
    small = build_tiny_plm(tmp_path / "wide", "bert", ["a red bus"], hidden=48, heads=2)
    model, _ = _load(plms["bert"], "mlm")
    add_xadapter(model, XAdapterConfig.for_backbone(clip, experts="t"))
    save_xadapter(model, tmp_path / "ad")
    wide, _ = _load(small, "mlm")
    with pytest.raises(CacheMismatchError, match="hidden_size: adapter has 32, model has 48"):
        load_xadapter(wide, tmp_path / "ad")


def test_parameter_budget_minilm_default():
    """Default config on MiniLM-L6 (d=384, 6 layers) with the 1280-d offline VLM stays < 10% of the PLM."""
    from transformers import BertConfig, BertModel

    from xmodal.xadapter.plm import minilm_path

    cfg = BertConfig.from_pretrained(minilm_path())
    plm = BertModel(cfg, add_pooling_layer=False)
    n_plm = sum(p.numel() for p in plm.parameters())
    stack = add_xadapter(plm, XAdapterConfig(clip_dim=1280))
    assert stack.config.layers == [4, 5] and stack.config.bottleneck == 128 and stack.config.k == 4
    counts = count_parameters(plm)
    assert counts["adapter"] == expected_param_count(stack.config) == stack.num_parameters()
    assert counts["plm"] == n_plm
    # plus a fresh MLM head (transform + bias; decoder tied to embeddings)
    head = cfg.hidden_size ** 2 + 3 * cfg.hidden_size + cfg.vocab_size
    assert 100 * (counts["adapter"] + head) / n_plm < 10.0
    # the literal A.4 sizes on BERT-base with 512-d CLIP: ~2.96M per expert per layer
    lit = XAdapterConfig(clip_dim=512, experts="v", layers=[11], attn_dim=768, proj_dim=768, heads=12).resolved(768, 12, "bert")
    assert abs(expected_param_count(lit) - 2.96e6) < 0.01e6


def test_get_xadapter_errors_without_adapter(plms):
    model, _ = _load(plms["bert"], "mlm")
    with pytest.raises(XmodalError, match="no X-adapter"):
        get_xadapter(model)
