"""APE / APE-T: the channel criterion against a brute-force loop, the training-free search, the trained variant's
start from Tip-Adapter, determinism and validation-only selection."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from xmodal.fewshot import create_method
from xmodal.fewshot._synthetic import make_task
from xmodal.fewshot.ape import ape_criterion, kl_to_text, select_channels

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    return make_task(num_classes=5, dim=24, shots=4, views=2, spread=2.5, text_noise=2.0, seed=21)


def test_criterion_matches_the_published_pairwise_loop():
    g = torch.Generator().manual_seed(0)
    c, k, d = 3, 2, 5
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    keys = F.normalize(torch.randn(c * k, d, generator=g), dim=-1)
    labels = torch.arange(c).repeat_interleave(k)
    feats = torch.stack([torch.cat([text[i:i + 1], keys[labels == i]]) for i in range(c)])   # (C, 1+K, D)
    total, count = torch.zeros(d, dtype=torch.float64), 0
    for i, j in itertools.product(range(c), range(c)):
        if i != j:
            for m, n in itertools.product(range(k + 1), range(k + 1)):
                total += (feats[i, m] * feats[j, n]).double()
                count += 1
    expected = -0.7 * total / count + 0.3 * text.double().var(dim=0)
    assert torch.allclose(ape_criterion(text, keys, labels, (0.7, 0.3)).double(), expected, atol=1e-6)
    assert select_channels(expected.float(), 2).tolist() == sorted(torch.topk(expected, 2).indices.tolist())


def test_ape_search_is_the_best_validation_point(task):
    support, val, test, text = task
    m = create_method("ape", n_beta=6, n_alpha=5, n_gamma=3, feat_fracs=(0.5, 1.0)).fit(support, val, text)
    sel = m.selected_
    scores = m.decision_scores(val.features)
    assert (scores.argmax(1) == val.labels).float().mean().item() == pytest.approx(sel["val_acc"])
    # brute force over the same grid with an independent scorer: nothing scores better on validation
    keys = F.normalize(support.views.mean(0), dim=-1)
    crit = ape_criterion(text, keys, support.labels, (0.7, 0.3))
    best = 0.0
    for q in sel["feat_num_grid"]:
        idx = select_channels(crit, q)
        fk, fv, ft = (F.normalize(x[:, idx], dim=-1) for x in (keys, val.features, text))
        div = kl_to_text(fk, ft, support.labels)
        for beta, alpha, gamma in itertools.product(m._grids()[0], m._grids()[1], m._grids()[2]):
            values = F.one_hot(support.labels, 5).float() * torch.exp(gamma * div)[:, None]
            logits = 100 * val.features @ text.T + alpha * torch.exp(-beta * (1 - fv @ fk.T)) @ values
            best = max(best, (logits.argmax(1) == val.labels).float().mean().item())
    assert sel["val_acc"] == pytest.approx(best)
    assert m.decision_scores(test.features).shape == (len(test), 5)


def test_ape_selection_ignores_test_data_and_is_deterministic(task):
    support, val, test, text = task
    a = create_method("ape", seed=0).fit(support, val, text)
    b = create_method("ape", seed=5).fit(support, val, text)                 # training-free: seed irrelevant
    assert a.selected_ == b.selected_
    assert torch.equal(a.decision_scores(test.features), b.decision_scores(test.features))
    flipped = val.subset(val.ids)
    flipped.labels = (val.labels + 1) % 5                                   # selection follows val labels
    assert create_method("ape").fit(support, flipped, text).selected_ != a.selected_


def test_ape_t_starts_from_tip_adapter_and_never_loses_val_accuracy(task):
    support, val, test, text = task
    tip = create_method("tip-adapter").fit(support, val, text)
    m = create_method("ape-t", seed=1, epochs=8).fit(support, val, text)
    sel = m.selected_
    assert (sel["init_alpha"], sel["init_beta"]) == (tip.selected_["alpha"], tip.selected_["beta"])
    assert sel["val_acc_training_free"] == pytest.approx(tip.selected_["val_acc"])
    assert sel["val_acc"] >= sel["val_acc_training_free"]
    assert len(sel["val_loss_per_epoch"]) == 9                               # epoch 0 = untrained = Tip-Adapter
    untrained = create_method("ape-t", seed=1, epochs=0).fit(support, val, text)
    assert torch.allclose(untrained.decision_scores(test.features), tip.decision_scores(test.features), atol=1e-4)
    again = create_method("ape-t", seed=1, epochs=8).fit(support, val, text)
    assert torch.equal(again.decision_scores(test.features), m.decision_scores(test.features))
    if sel["kept"] == "trained":
        assert sel["val_loss_per_epoch"][sel["epoch"]] == min(sel["val_loss_per_epoch"])
