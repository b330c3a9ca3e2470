"""Harness pieces the few-shot tables rely on: the fixed test subset, extracting only the needed train
images, the Tiny-ImageNet caveat and fit-time block in tables, and the plot's panels."""
import pytest

from xmodal.backbones import load_backbone
from xmodal.bench.plot import plot_accuracy_vs_shots
from xmodal.bench.run import FeatureBank, fixed_test_subset, run_episode
from xmodal.bench.sweep import run_sweep
from xmodal.bench.table import markdown_table
from xmodal.bench.testing import make_tiny_imagefolder
from xmodal.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench_outputs")
    root = make_tiny_imagefolder(base / "data", classes=3, train=8, test=6)
    return {"spec": f"imagefolder:{root}", "cache": str(base / "cache"),
            "backbone": load_backbone("tiny:clip"), "dataset": load_dataset(f"imagefolder:{root}")}


def _recording_extract(calls):
    from xmodal.features import extract_features

    def extract(backbone, dataset, split, samples=None, **kw):
        calls.append((split, None if samples is None else len(samples)))
        return extract_features(backbone, dataset, split, samples=samples, **kw)

    return extract


def test_test_subset_is_fixed_per_class_and_only_it_is_extracted(tiny):
    ds = tiny["dataset"]
    sub = fixed_test_subset(ds.samples("test"), 2)
    assert len(sub) == 6 and sorted({s.label for s in sub}) == [0, 1, 2]
    assert [s.id for s in sub] == [s.id for s in fixed_test_subset(list(reversed(ds.samples("test"))), 2)]
    calls = []
    bank = FeatureBank(tiny["backbone"], ds, augment_views=0, augment_scope="support", cache_dir=tiny["cache"],
                       progress=False, test_per_class=2, extract_fn=_recording_extract(calls))
    rows = run_episode(bank, 2, 1, "zeroshot", dataset_spec=tiny["spec"])
    assert rows[0]["n_test"] == 6 and rows[0]["test_per_class"] == 2
    # no whole-split extraction: support (6) and val (6) of this episode and the 6-image test subset only
    assert ("test", None) not in calls and ("train", None) not in calls
    assert ("test", 6) in calls


def test_union_without_views_extracts_the_grid_once(tiny, tmp_path):
    calls = []
    result = run_sweep(tiny["backbone"], [tiny["dataset"]], [1, 2], [1, 2], ["zeroshot", "tip-adapter"],
                       tmp_path / "out", cache_dir=tiny["cache"], augment_views=0, augment_scope="union",
                       progress=False, extract_fn=_recording_extract(calls))
    train_calls = [n for split, n in calls if split == "train"]
    assert len(result.rows) == 8 and None not in train_calls
    assert len(train_calls) == 1 and train_calls[0] <= 24          # one extraction of the union (≤ whole split)


def _rows(datasets):
    return [{"method": m, "backbone": "b", "dataset": d, "shots": k, "seed": s, "top1": 50.0 + s + k,
             "fit_time_s": 0.5 if m == "a" else 2.0, "n_test": 100, "test_per_class": 10 if "tiny" in d else None}
            for m in ("a", "b") for d in datasets for k in (1, 16) for s in (1, 2, 3)]


def test_table_flags_tiny_imagenet_and_reports_fit_time():
    text = markdown_table(_rows(["cifar", "imagefolder:../shared/data/tiny-imagenet"]))
    assert text.count("flatter") >= 3                       # its block, the average and the fit-time table
    assert "fixed seeded subset of 10 per class" in text
    assert "### Fit time per method" in text and "| a | 0.50 | 0.50 |" in text
    plain = markdown_table(_rows(["cifar"]))
    assert "flatter" not in plain


def test_plot_has_no_average_panel_for_one_dataset(tmp_path):
    import matplotlib.image  # noqa: F401  (the PNG must be readable)
    from matplotlib.figure import Figure

    seen = []
    orig = Figure.add_subplot

    def spy(self, *args, **kw):
        seen.append(args)
        return orig(self, *args, **kw)

    Figure.add_subplot = spy
    try:
        plot_accuracy_vs_shots(_rows(["cifar"]), tmp_path / "one.png")
        one = len(seen)
        seen.clear()
        plot_accuracy_vs_shots(_rows(["cifar", "fmnist"]), tmp_path / "two.png")
        two = len(seen)
    finally:
        Figure.add_subplot = orig
    assert one == 1 and two == 3
