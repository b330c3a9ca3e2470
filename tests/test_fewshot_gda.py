"""GDA closed form against a direct numpy / scikit-learn computation."""
import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf

from xmodal.fewshot import create_method
from xmodal.fewshot._synthetic import make_task
from xmodal.fewshot.gda import gda_classifier, ledoit_wolf_shrinkage


pytestmark = pytest.mark.usefixtures("one_thread")


def _numpy_gda(x, y, c, shrinkage=None):
    x = x.astype(np.float64)
    means = np.stack([x[y == k].mean(0) for k in range(c)])
    xc = x - means[y]
    if shrinkage is None:
        cov, s = ledoit_wolf(xc, assume_centered=True)
    else:
        s = shrinkage
        emp = xc.T @ xc / len(x)
        cov = (1 - s) * emp + s * np.trace(emp) / x.shape[1] * np.eye(x.shape[1])
    w = np.linalg.solve(cov, means.T).T
    prior = np.bincount(y, minlength=c) / len(y)
    b = np.array([-0.5 * means[k] @ np.linalg.solve(cov, means[k]) for k in range(c)]) + np.log(prior)
    return w, b, s


@pytest.mark.parametrize("n,d", [(30, 8), (12, 20)])  # n > p and n < p (Gram-matrix branch)
def test_ledoit_wolf_matches_sklearn(n, d):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d))
    assert ledoit_wolf_shrinkage(torch.tensor(x)) == pytest.approx(ledoit_wolf(x, assume_centered=True)[1], rel=1e-9)


@pytest.mark.parametrize("shrinkage", [None, 0.3])
def test_gda_closed_form_matches_numpy(shrinkage):
    rng = np.random.default_rng(1)
    c, d = 3, 6
    y = np.array([0] * 5 + [1] * 7 + [2] * 4)                       # unequal priors
    x = rng.normal(size=(len(y), d)) + 2 * np.eye(c, d)[y]
    w_ref, b_ref, s_ref = _numpy_gda(x, y, c, shrinkage)
    w, b, s = gda_classifier(torch.tensor(x, dtype=torch.float32), torch.tensor(y), c,
                             "ledoit-wolf" if shrinkage is None else shrinkage)
    assert s == pytest.approx(s_ref, rel=1e-5)
    assert np.allclose(w.numpy(), w_ref, rtol=1e-4, atol=1e-5)
    assert np.allclose(b.numpy(), b_ref, rtol=1e-4, atol=1e-5)


def test_gda_method_scores_and_views_as_samples():
    support, val, test, text = make_task(num_classes=4, dim=16, shots=6, views=3, seed=5)
    m = create_method("gda", preset="ledoit-wolf").fit(support, val, text)
    assert m.selected_["samples_per_image"] == 4 and m.selected_["samples"] == "features+views"
    x = torch.cat([support.features, support.views.reshape(-1, 16)]).numpy()
    y = support.labels.repeat(4).numpy()
    w_ref, b_ref, _ = _numpy_gda(x, y, 4)
    f = test.features
    expected = 100 * f.double() @ text.double().T + m.alpha_ * (f.double() @ torch.tensor(w_ref).T + torch.tensor(b_ref))
    assert torch.allclose(m.decision_scores(f).double(), expected, rtol=1e-4, atol=1e-3)
    assert torch.allclose(m.gda_scores(f).double(), f.double() @ torch.tensor(w_ref).T + torch.tensor(b_ref),
                          rtol=1e-4, atol=1e-3)
    plain = create_method("gda", preset="ledoit-wolf", use_views=False).fit(support, val, text)
    assert plain.selected_["samples_per_image"] == 1


def test_gda_rejects_empty_class():
    support, val, _, text = make_task(num_classes=3, dim=8, shots=2, views=0)
    keep = [i for i, label in zip(support.ids, support.labels.tolist()) if label != 2]
    with pytest.raises(ValueError, match="per class"):
        create_method("gda").fit(support.subset(keep), val, text)


def _numpy_published_gda(x, y, c):
    """The published estimator written out independently: D·pinv((N−1)·cov(X_c) + tr(cov(X_c))·I), uniform prior."""
    x = x.astype(np.float64)
    mus = np.stack([x[y == k].mean(0) for k in range(c)])
    centred = np.concatenate([x[y == k] - mus[k] for k in range(c)])
    cov = np.cov(centred, rowvar=False)                               # ddof = 1, as torch.Tensor.cov
    d = x.shape[1]
    prec = d * np.linalg.pinv((len(centred) - 1) * cov + np.trace(cov) * np.eye(d))
    w = mus @ prec
    b = np.log(np.full(c, 1.0 / c)) - 0.5 * np.einsum("nd,dc,nc->n", mus, prec, mus)
    return w, b


@pytest.mark.parametrize("n_views,d", [(3, 6), (2, 40)])  # N > D and N < D
def test_published_gda_matches_numpy_on_views_only(n_views, d):
    support, val, test, text = make_task(num_classes=4, dim=d, shots=5, views=n_views, seed=7)
    m = create_method("gda").fit(support, val, text)               # default = published
    sel = m.selected_
    assert sel["preset"] == "published" and sel["samples"] == "views" and sel["prior"] == "uniform"
    assert sel["samples_per_image"] == n_views
    x = support.views.reshape(-1, d).numpy()                      # views only: the plain features are not used
    y = support.labels.repeat(n_views).numpy()
    w_ref, b_ref = _numpy_published_gda(x, y, 4)
    assert np.allclose(m.w_.double().numpy(), w_ref, rtol=1e-4, atol=1e-4 * np.abs(w_ref).max())
    assert np.allclose(m.b_.double().numpy(), b_ref, rtol=1e-4, atol=1e-4 * np.abs(b_ref).max())
    # α from the published grid {1e-4, ..., 1e2}, chosen on validation only
    assert sel["alpha_grid"] == [-4.0, 2.0, 7] and any(abs(sel["alpha"] - 10.0 ** e) < 1e-12 for e in range(-4, 3))
    f = test.features.double()
    expected = 100 * f @ text.double().T + m.alpha_ * (f @ torch.tensor(w_ref).T + torch.tensor(b_ref))
    assert torch.allclose(m.decision_scores(test.features).double(), expected, rtol=1e-4, atol=1e-3)


def test_published_gda_differs_from_ledoit_wolf_and_falls_back_to_features():
    support, val, _, text = make_task(num_classes=4, dim=16, shots=6, views=3, seed=5)
    pub = create_method("gda").fit(support, val, text)
    lw = create_method("gda", preset="ledoit-wolf").fit(support, val, text)
    assert not torch.allclose(pub.w_, lw.w_)
    no_views = support.subset(support.ids)
    no_views.views = None
    m = create_method("gda").fit(no_views, val, text)
    assert m.selected_["samples"] == "features" and m.selected_["samples_per_image"] == 1
    with pytest.raises(ValueError, match="preset"):
        create_method("gda", preset="nope").fit(support, val, text)
