import matplotlib.image

from xmodal.bench.plot import plot_accuracy_vs_shots


def test_plot_writes_a_valid_png(tmp_path):
    rows = [{"method": m, "backbone": "tiny:clip", "dataset": d, "shots": k, "seed": s,
             "top1": 10.0 * k ** 0.5 + s + (5 if m == "a" else 0)}
            for m in ("a", "b") for d in ("D1", "D2") for k in (1, 2, 4, 8, 16) for s in (1, 2, 3)]
    path = plot_accuracy_vs_shots(rows, tmp_path / "sub" / "acc.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not list(path.parent.glob(".*.tmp"))  # written atomically, no temp left behind
