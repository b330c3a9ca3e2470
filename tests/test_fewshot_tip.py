"""Tip-Adapter / Tip-Adapter-F: hand-computed logits, cache construction, grid search on val."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xmodal.featureset import FeatureSet
from xmodal.fewshot import create_method
from xmodal.fewshot._common import cache_grid_search, cache_keys, tip_grid
from xmodal.fewshot._synthetic import make_task


pytestmark = pytest.mark.usefixtures("one_thread")


def _fs(feats, labels, views=None, name="s"):
    feats = torch.tensor(feats, dtype=torch.float32)
    return FeatureSet(features=feats, labels=torch.tensor(labels), ids=[f"{name}#{i}" for i in range(len(labels))],
                      classnames=["a", "b", "c"], views=views)


def _toy():
    support = _fs(np.eye(3), [0, 1, 2])                                   # keys e1, e2, e3; values I
    val = _fs(np.eye(3), [0, 1, 2], name="v")
    w = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.8, 0.0, 0.6]])  # unit rows
    return support, val, w


def test_tip_adapter_logits_hand_computed():
    support, val, w = _toy()
    m = create_method("tip-adapter").fit(support, val, w)
    m.alpha_, m.beta_ = 2.0, 3.0
    s = 1 / math.sqrt(2)
    f = torch.tensor([[s, s, 0.0]])
    # zero-shot: 100·f·w_c ; cache: α·exp(−β(1 − f·e_c)) for the one entry of class c
    zs = [100 * (0.6 * s + 0.8 * s), 100 * (0.6 * s), 100 * (0.8 * s)]
    aff = [math.exp(-3 * (1 - s)), math.exp(-3 * (1 - s)), math.exp(-3 * (1 - 0))]
    expected = [zs[c] + 2.0 * aff[c] for c in range(3)]
    assert expected == pytest.approx([99.82561, 43.25707, 56.66812], abs=1e-4)
    assert m.decision_scores(f)[0].tolist() == pytest.approx(expected, abs=1e-4)


def test_tip_adapter_one_point_grid_and_logit_scale():
    support, val, w = _toy()
    m = create_method("tip-adapter", logit_scale=50.0, n_beta=1, n_alpha=1).fit(support, val, w)
    # one-point grids: β = 0.1, α = 0.1 · logit_scale/100
    assert m.selected_["beta"] == pytest.approx(0.1) and m.selected_["alpha"] == pytest.approx(0.05)
    f = F.normalize(torch.tensor([[0.2, 0.9, 0.3]]), dim=-1)
    expected = 50 * f @ w.T + 0.05 * torch.exp(-0.1 * (1 - f))
    assert torch.allclose(m.decision_scores(f), expected, atol=1e-5)


def test_tip_grid_matches_reference_formula():
    assert tip_grid(7.0, 200)[:3] == pytest.approx([0.1, 0.1 + 6.9 / 200, 0.1 + 2 * 6.9 / 200])
    assert len(tip_grid(3.0, 20)) == 20 and tip_grid(3.0, 20)[-1] == pytest.approx(0.1 + 19 * 2.9 / 20)


def test_cache_keys_are_normalised_view_means():
    torch.manual_seed(0)
    views = F.normalize(torch.randn(5, 3, 3), dim=-1)
    support = _fs(np.eye(3), [0, 1, 2], views=views)
    keys = cache_keys(support)
    assert torch.allclose(keys, F.normalize(views.mean(0), dim=-1))
    assert torch.allclose(keys.norm(dim=-1), torch.ones(3))
    assert torch.equal(cache_keys(_fs(np.eye(3), [0, 1, 2])), torch.eye(3))


def test_grid_search_is_exhaustive_argmax_on_val():
    support, val, _, w = make_task(num_classes=4, dim=16, shots=4, text_noise=2.0, spread=2.0, seed=3)
    m = create_method("tip-adapter", n_beta=12, n_alpha=8).fit(support, val, w)
    keys, fv, yv = cache_keys(support), val.features, val.labels
    best, best_pair = -1.0, None
    for b in m._betas():                           # Tip-Adapter's loop: β outer, α inner, strict '>'
        for a in m._alphas():
            logits = 100 * fv @ w.T + a * torch.exp(-b * (1 - fv @ keys.T)) @ F.one_hot(support.labels, 4).float()
            acc = (logits.argmax(1) == yv).float().mean().item()
            if acc > best:
                best, best_pair = acc, (b, a)
    assert (m.beta_, m.alpha_) == pytest.approx(best_pair)
    assert m.selected_["val_acc"] == pytest.approx(best)


def test_grid_search_chunking_does_not_change_result():
    support, val, _, w = make_task(num_classes=4, dim=16, shots=4, seed=1)
    zs, keys = 100 * val.features @ w.T, cache_keys(support)
    args = (zs, val.labels, val.features @ keys.T, F.one_hot(support.labels, 4).float(), tip_grid(7, 30), tip_grid(3, 10))
    big = cache_grid_search(*args)
    small = cache_grid_search(*args, chunk_elems=1)
    assert big[:3] == small[:3] and torch.equal(big[3], small[3])


def test_tip_adapter_f_trains_and_selects_on_val():
    torch.manual_seed(0)
    support, val, test, w = make_task(num_classes=4, dim=24, shots=8, spread=2.0, text_noise=2.0, seed=2)
    m = create_method("tip-adapter-f", epochs=6, seed=0).fit(support, val, w)
    sel = m.selected_
    # epoch 0 (the training-free keys) is a candidate; the chosen epoch has the lowest val log-loss
    assert 0 <= sel["epoch"] <= 6 and len(sel["val_acc_per_epoch"]) == 7 and len(sel["val_loss_per_epoch"]) == 7
    if sel["kept"] == "trained":
        assert sel["val_loss_per_epoch"][sel["epoch"]] == min(sel["val_loss_per_epoch"])
        assert not torch.equal(m.model_.keys.detach(), cache_keys(support))   # keys moved
    assert sel["val_acc"] >= sel["val_acc_training_free"]
    tip = create_method("tip-adapter", seed=0).fit(support, val, w)
    # training starts from Tip-Adapter's searched (α, β), not from fixed constants
    assert (sel["init_alpha"], sel["init_beta"]) == (tip.selected_["alpha"], tip.selected_["beta"])
    assert torch.equal(m.model_.values, F.one_hot(support.labels, 4).float())


def test_constant_terms_give_the_same_logits_as_computing_them_each_step():
    """The training loop passes per-input constants (frozen-key affinities, APE-T's base products) back to
    forward; the logits must equal those computed from scratch."""
    from xmodal.fewshot._cache import CacheModel, constant_terms
    from xmodal.fewshot.ape_t import APETModel
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=-1)
    keys = torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=-1)
    labels = torch.arange(3).repeat_interleave(3)
    text = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)
    frozen = CacheModel(keys, labels, text, 100.0, train_keys=False)
    trained = CacheModel(keys, labels, text, 100.0, train_keys=True)
    assert constant_terms(trained, f, 2.0) == {}
    apet = APETModel(keys, labels, text, torch.tensor([1, 4, 7]), 100.0)
    with torch.no_grad():
        apet.res.normal_(generator=g)
    for model in (frozen, apet):
        consts = constant_terms(model, f, 2.0)
        assert consts
        direct = model(f, 1.5, 2.0)[0]
        cached = model(f, 1.5, 2.0, **consts)[0]
        assert torch.allclose(direct, cached, atol=1e-5, rtol=0)


def test_adamw_helper_uses_the_fused_kernel_and_matches_the_reference_step():
    from xmodal.fewshot._common import adamw
    g = torch.Generator().manual_seed(1)
    start, grad = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    out = []
    for make in (lambda p: adamw([p], lr=1e-2, weight_decay=0.01, eps=1e-4),
                 lambda p: torch.optim.AdamW([p], lr=1e-2, weight_decay=0.01, eps=1e-4)):
        p = torch.nn.Parameter(start.clone())
        opt = make(p)
        for _ in range(5):
            p.grad = grad.clone()
            opt.step()
        out.append((opt, p.detach()))
    assert out[0][0].defaults.get("fused") is True
    assert torch.allclose(out[0][1], out[1][1], atol=1e-6, rtol=0)
