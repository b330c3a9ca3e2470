"""LP++: data-driven step sizes and initialisation, epoch selection on validation, determinism."""
import pytest
import torch

from xmodal.fewshot import create_method
from xmodal.fewshot._synthetic import make_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    return make_task(num_classes=5, dim=24, shots=4, views=2, spread=2.5, text_noise=2.0, seed=22)


def _published_alpha_init(x, y, text, num_classes):
    """The official code's reading, computed with a one-hot mask: for each class, the mean over its support
    features of the similarity to its *own* text embedding; then the mean over classes, times 250."""
    one_hot = torch.nn.functional.one_hot(y, num_classes).float()              # (N, C)
    own_sim = (one_hot * (x @ text.T)).sum(0) / one_hot.sum(0)                  # (C,)
    return 250.0 * own_sim.mean().item()


def test_official_init_own_class_similarity_and_uniform_bias(task):
    support, val, test, text = task
    m = create_method("lp++", epochs=0, seed=5).fit(support, val, text)
    x, y = support.features, support.labels
    expected_alpha = _published_alpha_init(x, y, text, 5)
    assert m.selected_["alpha_init"] == pytest.approx(expected_alpha, rel=1e-5)
    all_pairs = 250 * torch.stack([(x @ text.T)[y == c].mean(0) for c in range(5)]).mean().item()
    assert abs(expected_alpha - all_pairs) > 1.0  # the task separates the two readings
    bound = 1 / x.shape[1] ** 0.5  # PyTorch's default Linear bias init: U(-1/sqrt(D), 1/sqrt(D))
    assert m.b_.abs().max().item() <= bound and m.b_.abs().min().item() > 0
    assert not torch.equal(m.b_, create_method("lp++", epochs=0, seed=6).fit(support, val, text).b_)
    sums = torch.stack([x[y == c].sum(0) for c in range(5)])
    expected = test.features @ sums.T + m.b_ + expected_alpha * test.features @ text.T
    assert torch.allclose(m.decision_scores(test.features), expected, atol=1e-4)


def _hand_alpha_trajectory(x, y, text, lr_w, lr_alpha, steps, seed, reset):
    """α after each step under the official update rule (reset=False: α's gradient never zeroed)."""
    c = int(y.max()) + 1
    w = torch.stack([x[y == k].sum(0) for k in range(c)]).requires_grad_(True)
    bound = x.shape[1] ** -0.5
    b = torch.empty(c).uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    alpha = torch.full((c,), _published_alpha_init(x, y, text, c), requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=lr_w, momentum=0.9)
    history = [alpha.detach().clone()]
    for step in range(1, steps + 1):
        loss = torch.nn.functional.cross_entropy(x @ w.T + b + alpha * (x @ text.T), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            alpha.data -= lr_alpha * alpha.grad
            if reset:
                alpha.grad = None
        history.append(alpha.detach().clone())
    return history


@pytest.mark.parametrize("rule", ["accumulate", "window"])
def test_alpha_gradient_rule_matches_a_hand_run(task, rule):
    """The default re-runs the official optimiser (α's gradient summed since the start); 'window' resets it
    after each α step. Validation = support makes the selected epoch late enough for the rules to differ."""
    support, _, _, text = task
    x, y = support.features.float(), support.labels
    m = create_method("lp++", epochs=40, seed=1, alpha_grad=rule).fit(support, support, text)
    chosen = m.selected_["epoch"]
    assert chosen >= 20, "test precondition: the two rules only differ from the second α step on"
    runs = {r: _hand_alpha_trajectory(x, y, text, m.selected_["lr_w"], m.selected_["lr_alpha"], 40, 1,
                                      reset=(r == "window")) for r in ("accumulate", "window")}
    assert not torch.allclose(runs["accumulate"][chosen], runs["window"][chosen], rtol=1e-3)
    assert torch.allclose(m.alpha_, runs[rule][chosen], rtol=1e-4, atol=1e-4)


def test_deviation_options_reproduce_the_previous_reading(task):
    support, val, test, text = task
    m = create_method("lp++", epochs=0, alpha_init_rule="all-pairs", bias_init="zeros").fit(support, val, text)
    x, y = support.features, support.labels
    n = len(x)
    assert m.selected_["lr_w"] == pytest.approx(4 * n / torch.linalg.eigvalsh((x.T @ x).double())[-1].item(), rel=1e-5)
    xt = x @ text.T
    assert m.selected_["lr_alpha"] == pytest.approx(n / (4 * (xt ** 2).sum(0).max().item()), rel=1e-5)
    class_means = torch.stack([xt[y == c].mean(0) for c in range(5)])
    assert m.selected_["alpha_init"] == pytest.approx(250 * class_means.mean().item(), rel=1e-5)
    sums = torch.stack([x[y == c].sum(0) for c in range(5)])
    expected = test.features @ sums.T + m.selected_["alpha_init"] * test.features @ text.T
    assert torch.allclose(m.decision_scores(test.features), expected, atol=1e-4)


def test_epoch_selected_on_validation_and_deterministic(task):
    support, val, test, text = task
    m = create_method("lp++", epochs=40, seed=3).fit(support, val, text)
    sel = m.selected_
    assert 0 <= sel["epoch"] <= 40
    assert (m.predict(val.features) == val.labels).float().mean().item() == pytest.approx(sel["val_acc"])
    again = create_method("lp++", epochs=40, seed=3).fit(support, val, text)
    assert torch.equal(m.decision_scores(test.features), again.decision_scores(test.features))
    assert m.decision_scores(test.features).shape == (len(test), 5)
    for bad in ({"samples": "nope"}, {"alpha_init_rule": "mean"}, {"alpha_grad": "reset"}, {"bias_init": "normal"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            create_method("lp++", **bad).fit(support, val, text)
