"""XMAdapter: reduction to Tip-Adapter(-F), hard-sample weights, γ modes, text-cache sources."""
import json

import pytest
import torch
import torch.nn.functional as F

from xmodal.errors import ShapeError
from xmodal.fewshot import create_method
from xmodal.fewshot._synthetic import make_task
from xmodal.fewshot.xmadapter import hard_sample_weights


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    return make_task(num_classes=4, dim=32, shots=8, views=4, spread=2.0, text_noise=2.0, seed=7)


def test_training_free_with_text_off_is_tip_adapter(task):
    support, val, test, text = task
    tip = create_method("tip-adapter", seed=0).fit(support, val, text)
    xm = create_method("xmadapter-tf", seed=0, gamma_mode="fixed", gamma=1.0).fit(support, val, text)
    assert (xm.selected_["alpha"], xm.selected_["beta"]) == (tip.selected_["alpha"], tip.selected_["beta"])
    assert xm.selected_["gamma"] == 1.0
    assert torch.allclose(xm.decision_scores(test.features), tip.decision_scores(test.features), atol=1e-5, rtol=0)


def test_trained_with_text_off_and_no_weighting_is_tip_adapter_f(task):
    support, val, test, text = task
    tipf = create_method("tip-adapter-f", seed=3, epochs=5).fit(support, val, text)
    xm = create_method("xmadapter", seed=3, epochs=5, gamma_mode="fixed", gamma=1.0, lam=0.0).fit(support, val, text)
    for key in ("alpha", "beta", "epoch", "val_acc", "val_loss"):
        assert xm.selected_[key] == tipf.selected_[key], key
    assert torch.allclose(xm.model_.keys, tipf.model_.keys, atol=1e-6, rtol=0)
    assert torch.allclose(xm.decision_scores(test.features), tipf.decision_scores(test.features), atol=1e-5, rtol=0)


def test_hard_sample_weights_zero_disagreement_gives_one():
    p = torch.randn(6, 4)
    w = hard_sample_weights(p, p.clone(), torch.zeros(6, dtype=torch.long), lam=2.0)
    assert torch.equal(w, torch.ones(6))
    w = hard_sample_weights(p, p.clone(), torch.zeros(6, dtype=torch.long), lam=2.0, mode="topq")
    assert torch.equal(w, torch.ones(6))


def test_hard_sample_weights_values_and_no_gradient():
    p_img = torch.tensor([[5.0, 0.0], [0.0, 0.0]], requires_grad=True)
    p_txt = torch.tensor([[0.0, 5.0], [0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    w = hard_sample_weights(p_img, p_txt, y, lam=1.0)
    d0 = 0.5 * (p_img.softmax(-1)[0] - p_txt.softmax(-1)[0]).abs().sum()
    assert w[0].item() == pytest.approx(1 + d0.item()) and w[1].item() == 1.0
    assert not w.requires_grad and w.grad_fn is None
    # the weighted loss's gradient w.r.t. the affinities flows only through the CE term, never through d
    logits = p_img + p_txt
    loss = (hard_sample_weights(p_img, p_txt, y, lam=1.0) * F.cross_entropy(logits, y, reduction="none")).sum()
    loss.backward()
    ref_img = p_img.detach().clone().requires_grad_(True)
    (w * F.cross_entropy(ref_img + p_txt.detach(), y, reduction="none")).sum().backward()
    assert torch.allclose(p_img.grad, ref_img.grad)
    # true-class measure and top-q variant
    wt = hard_sample_weights(p_img, p_txt, y, lam=1.0, measure="true-class")
    assert wt[0].item() == pytest.approx(1 + abs(p_img.softmax(-1)[0, 0] - p_txt.softmax(-1)[0, 0]).item())
    wq = hard_sample_weights(torch.randn(10, 3), torch.randn(10, 3), torch.zeros(10, dtype=torch.long),
                             lam=3.0, mode="topq", q=0.7)
    assert set(wq.tolist()) <= {1.0, 4.0} and 1 <= int((wq == 4.0).sum()) <= 4


@pytest.mark.parametrize("mode", ["learned", "search", "per-sample", "fixed"])
def test_gamma_modes_fit_and_record(task, mode):
    support, val, test, text = task
    m = create_method("xmadapter", seed=0, epochs=4, gamma_mode=mode, gamma=0.3).fit(support, val, text)
    sel = m.selected_
    json.dumps(sel)
    assert sel["gamma_mode"] == mode and 0.0 <= sel["gamma"] <= 1.0
    if mode == "fixed":
        assert sel["gamma"] == pytest.approx(0.3)
    if mode == "search":
        assert sel["gamma"] in [i / 10 for i in range(11)]
    if mode == "learned":
        assert sel["gamma"] != pytest.approx(0.3, abs=1e-6)          # θ_γ was trained
    assert m.decision_scores(test.features).shape == (len(test), 4)


def test_text_only_and_weighting_options(task):
    support, val, test, text = task
    m = create_method("xmadapter", seed=0, epochs=3, gamma_mode="fixed", gamma=0.0, weighting="topq",
                      net_arch="linear", disagreement="true-class").fit(support, val, text)
    assert m.selected_["gamma"] == 0.0 and m.selected_["net_arch"] == "linear"
    assert m.selected_["text_dim"] == 16                                 # D = C/2 by default


def test_external_class_text_features(task):
    support, val, test, text = task
    ext = torch.randn(4, 20, generator=torch.Generator().manual_seed(0))  # another width: needs MetaNet
    m = create_method("xmadapter", seed=0, epochs=2, class_text_features=ext, text_source="coop-16shot",
                      text_dim=8).fit(support, val, text)
    assert m.selected_["text_source"] == "coop-16shot" and m.selected_["text_dim"] == 8
    tf = create_method("xmadapter-tf").fit(support, val, text)
    assert tf.selected_["text_source"] == "zeroshot-classifier"
    with pytest.raises(ShapeError, match=r"\(4, 20\)"):
        create_method("xmadapter-tf", class_text_features=ext).fit(support, val, text)
    with pytest.raises(ShapeError, match="class_text_features"):
        create_method("xmadapter", class_text_features=ext[:3]).fit(support, val, text)


def test_training_free_gamma_search_covers_text_cache(task):
    support, val, test, text = task
    m = create_method("xmadapter-tf", gamma_grid=[0.0, 0.5, 1.0]).fit(support, val, text)
    assert m.selected_["gamma"] in (0.0, 0.5, 1.0) and m.selected_["gamma_grid"] == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="nothing to train"):
        create_method("xmadapter-tf", gamma_mode="learned")


def test_trained_default_searches_gamma_on_validation(task):
    support, val, _, text = task
    m = create_method("xmadapter", seed=0, epochs=3).fit(support, val, text)
    assert m.selected_["gamma_mode"] == "search"
    assert min(abs(m.selected_["gamma"] - 0.1 * i) for i in range(11)) < 1e-6  # a grid point, not a learned value


@pytest.mark.parametrize("margin", [0, 1, 50])
def test_xmadapter_never_below_its_tip_adapter_f_stage_on_validation(task, margin):
    support, val, test, text = task
    tipf = create_method("tip-adapter-f", seed=2, epochs=4).fit(support, val, text)
    xm = create_method("xmadapter", seed=2, epochs=4, fallback_margin=margin).fit(support, val, text)
    sel = xm.selected_
    assert sel["stage1"]["val_acc"] == tipf.selected_["val_acc"]
    assert sel["val_acc"] >= sel["stage1"]["val_acc"]
    assert sel["val_acc"] >= tipf.selected_["val_acc_training_free"]         # ≥ Tip-Adapter on validation too
    if margin == 50:                                                        # unreachable margin: always falls back
        assert sel["kept"] == "tip-adapter-f" and sel["gamma"] == 1.0
    if sel["kept"] == "tip-adapter-f":                                      # the fallback *is* Tip-Adapter-F
        assert torch.allclose(xm.decision_scores(test.features), tipf.decision_scores(test.features), atol=1e-5)


def test_sign_test_p_is_the_one_sided_binomial_tail():
    from scipy.stats import binomtest

    from xmodal.fewshot.xmadapter import sign_test_p
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(5, 0) == pytest.approx(1 / 32)
    for won, lost in [(3, 1), (7, 2), (12, 11), (1, 9), (30, 12)]:
        assert sign_test_p(won, lost) == pytest.approx(binomtest(won, won + lost, 0.5, alternative="greater").pvalue)


@pytest.mark.parametrize("train_keys", [True, False])
def test_sign_test_rule_keeps_stage_two_only_when_its_wins_are_significant(task, train_keys):
    from xmodal.fewshot.xmadapter import sign_test_p
    support, val, test, text = task
    tipf = create_method("tip-adapter-f", seed=2, epochs=4).fit(support, val, text)
    free = create_method("xmadapter", seed=2, epochs=4, fallback=False, train_keys=train_keys).fit(support, val, text)
    won, lost = free.selected_["val_images_won_lost"]
    for p in (1e-12, 0.05, 1.0):
        xm = create_method("xmadapter", seed=2, epochs=4, fallback_rule="sign-test", fallback_p=p,
                           train_keys=train_keys).fit(support, val, text)
        keep = won > lost and sign_test_p(won, lost) <= p
        assert xm.selected_["kept"] == ("xmadapter" if keep else "tip-adapter-f")
        reference = free if keep else tipf
        assert torch.allclose(xm.decision_scores(test.features), reference.decision_scores(test.features), atol=1e-5)
    with pytest.raises(ValueError, match="fallback_rule"):
        create_method("xmadapter", fallback_rule="coin")
    with pytest.raises(ValueError, match="fallback_p"):
        create_method("xmadapter", fallback_p=0)


def test_frozen_stage_two_keys_stay_those_of_tip_adapter_f(task):
    support, val, test, text = task
    tipf = create_method("tip-adapter-f", seed=4, epochs=4).fit(support, val, text)
    xm = create_method("xmadapter", seed=4, epochs=4, fallback=False, train_keys=False).fit(support, val, text)
    assert not xm.model_.keys.requires_grad
    assert torch.equal(xm.model_.keys, tipf.model_.keys)


def test_keeps_stage_two_is_the_decision_the_fitted_method_takes(task):
    from xmodal.fewshot.xmadapter import keeps_stage_two
    assert keeps_stage_two(5, 0, False) and not keeps_stage_two(4, 0, True)      # sign test: 1/32 vs 1/16
    assert keeps_stage_two(3, 2, False, "margin", 1) and not keeps_stage_two(3, 3, False, "margin", 1)
    assert keeps_stage_two(3, 3, True, "margin", 0) and not keeps_stage_two(3, 3, False, "margin", 0)
    with pytest.raises(ValueError, match="fallback_rule"):
        keeps_stage_two(1, 0, True, "coin")
    support, val, _, text = task
    for kw in ({"fallback_rule": "sign-test", "fallback_p": 0.5}, {"fallback_rule": "margin", "fallback_margin": 0}):
        xm = create_method("xmadapter", seed=2, epochs=4, **kw).fit(support, val, text)
        sel = xm.selected_
        won, lost = sel["val_images_won_lost"]
        keep = keeps_stage_two(won, lost, sel["stage2_val_loss"] < sel["stage1"]["val_loss"], kw["fallback_rule"],
                               kw.get("fallback_margin", 1), kw.get("fallback_p", 0.05))
        assert sel["kept"] == ("xmadapter" if keep else "tip-adapter-f")
