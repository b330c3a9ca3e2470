"""LP++: data-driven step sizes and initialisation, epoch selection on validation, determinism."""
import pytest
import torch

from xmodal.fewshot import create_method
from xmodal.fewshot._synthetic import make_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    return make_task(num_classes=5, dim=24, shots=4, views=2, spread=2.5, text_noise=2.0, seed=22)


def test_step_sizes_and_init_follow_the_formulas(task):
    support, val, test, text = task
    m = create_method("lp++", epochs=0).fit(support, val, text)
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
    with pytest.raises(ValueError, match="samples"):
        create_method("lp++", samples="nope").fit(support, val, text)
