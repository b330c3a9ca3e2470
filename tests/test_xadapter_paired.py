"""Paired image-text adaptation, the text-only head stage and validated corpus rows (tiny random models)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)

from xmodal.errors import CacheMismatchError, InputError  # noqa: E402
from xmodal.xadapter.model.modules import load_xadapter, resolve_adapter_dir  # noqa: E402
from xmodal.xadapter.model.plm import load_mlm  # noqa: E402
from xmodal.xadapter.model.tiny import build_tiny_plm  # noqa: E402
from xmodal.xadapter.tasks.corpus import read_corpus_rows  # noqa: E402
from xmodal.xadapter.tasks.head import HeadArgs, load_head, plateaued, train_head  # noqa: E402
from xmodal.xadapter.tasks.probe import candidate_probs  # noqa: E402
from xmodal.xadapter.tasks.train import TrainArgs, train_mlm  # noqa: E402

COLOURS = {"red": (200, 30, 30), "blue": (30, 40, 210)}
TEXTS = ["the color of this is red .", "the color of this is blue .", "a red bus near a house",
         "a blue car on the road", "the sky is blue and the bus is red"] * 8


def _image(path: Path, rgb, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("xa_paired")
    pool = root / "pool"
    for c, rgb in COLOURS.items():
        for i in range(12):
            _image(pool / "train" / f"{c}thing" / f"{i}.png", rgb, seed=hash((c, i)) % 1000)
    rows = []
    for c in COLOURS:
        for i in range(8):        # images 8..11 of each class are held out for the probe
            rows.append({"text": f"the color of this is {c} .", "image": f"train/{c}thing/{i}.png"})
    corpus = pool / "paired.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text_corpus = root / "text.txt"
    text_corpus.write_text("\n".join(TEXTS) + "\n")
    plm = build_tiny_plm(root / "bare", "bert", TEXTS, head="none", seed=0)
    return {"root": root, "pool": pool, "corpus": corpus, "text": text_corpus, "plm": plm}


# ----- corpus rows ---------------------------------------------------------------------------------
@pytest.mark.parametrize("line, needle", [
    ('{"text": null}', "'text' must be a string"),
    ("12345", "expected a JSON object"),
    ('["a"]', "expected a JSON object"),
    ('{"text": "   "}', "'text' is empty"),
    ('{"words": "a"}', "no 'text' field"),
    ('{"text": "a", "image": "missing.png"}', "not found"),
    ('{"text": "a", "image": "../outside.png"}', "outside the image root"),
    ('{"text": "a", "image": 7}', "path string"),
    ('{"text": "a", "image": "x.png", "images": ["x.png"]}', "not both"),
    ("{not json", "not valid JSON"),
])
def test_bad_corpus_rows_are_named_by_file_and_line(tmp_path, line, needle):
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path.parent / "outside.png").write_bytes(b"")
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(InputError, match=needle) as err:
        read_corpus_rows([path])
    assert f"{path}:2:" in str(err.value) and "--skip-bad-rows" in err.value.hint
    corpus = read_corpus_rows([path], skip_bad_rows=True)
    assert corpus.texts == ["fine"] and corpus.skipped == 1


def test_non_utf8_corpus_names_the_file(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(InputError, match=str(path)):
        read_corpus_rows([path])


def test_image_paths_resolve_against_the_root(world, tmp_path):
    rows = read_corpus_rows([world["corpus"]]).rows
    assert rows[0].images and Path(rows[0].images[0]).is_file()
    moved = tmp_path / "c.jsonl"
    moved.write_text(world["corpus"].read_text())
    with pytest.raises(InputError, match="not found"):
        read_corpus_rows([moved])                                   # relative to the corpus file's folder
    assert read_corpus_rows([moved], image_root=world["pool"]).paired


# ----- text-only head ------------------------------------------------------------------------------
def test_plateau_rule():
    assert plateaued([3.0] * 10, 5, 0.01)
    assert not plateaued([4.0] * 5 + [3.0] * 5, 5, 0.01)
    assert not plateaued([3.0] * 9, 5, 0.01)                     # only at window boundaries


def test_head_trains_stops_resumes_and_is_verified(world, tmp_path):
    common = dict(plm=str(world["plm"]), corpus=[str(world["text"])], max_steps=60, batch_size=8, lr=1e-2,
                  window=10, min_improvement=0.0, progress=False)
    full = train_head(HeadArgs(out=str(tmp_path / "full"), **common), log=lambda m: None)
    curve = full["loss_per_window"]
    assert full["finished"] and curve[-1] < curve[0] - 0.2, curve
    part = train_head(HeadArgs(out=str(tmp_path / "part"), stop_after=25, **common), log=lambda m: None)
    assert not part["finished"] and (tmp_path / "part" / "head_checkpoint.pt").is_file()
    train_head(HeadArgs(out=str(tmp_path / "part"), resume=True, **common), log=lambda m: None)
    a = json.loads((tmp_path / "full" / "head.json").read_text())
    b = json.loads((tmp_path / "part" / "head.json").read_text())
    assert a["tensor_sha256"] == b["tensor_sha256"]                # resumed == uninterrupted
    # the flattening rule stops early
    flat = train_head(HeadArgs(out=str(tmp_path / "flat"), **{**common, "min_improvement": 0.5, "max_steps": 500}),
                      log=lambda m: None)
    assert flat["steps"] < 500 and "flattened" in flat["stopped"]
    # verified on load: tampered tensors and another PLM are refused
    model, _, _, _ = load_mlm(str(world["plm"]))
    assert load_head(model, tmp_path / "full")
    meta = a | {"tensor_sha256": "0" * 64}
    (tmp_path / "full" / "head.json").write_text(json.dumps(meta))
    with pytest.raises(CacheMismatchError, match="digest"):
        load_head(model, tmp_path / "full")
    other = build_tiny_plm(tmp_path / "other", "bert", TEXTS, head="none", seed=1)
    model2, _, _, _ = load_mlm(str(other))
    with pytest.raises(CacheMismatchError, match="another PLM"):
        load_head(model2, tmp_path / "part")


# ----- paired adaptation: the V-expert reads the picture ---------------------------------------------
@pytest.fixture(scope="module")
def trained(world):
    head = world["root"] / "head"
    train_head(HeadArgs(plm=str(world["plm"]), corpus=[str(world["text"])], out=str(head), max_steps=60,
                        batch_size=8, lr=1e-2, window=20, progress=False), log=lambda m: None)
    runs = {}
    for visual in ("real", "zero"):
        out = world["root"] / f"run-{visual}"
        train_mlm(TrainArgs(plm=str(world["plm"]), backbone="tiny:clip", corpus=[str(world["corpus"])],
                            image_root=str(world["pool"]), out=str(out), steps=80, batch_size=8, lr=1e-2,
                            experts="v", k=1, visual=visual, focus_words="red,blue", head=str(head),
                            device="cpu", progress=False), log=lambda m: None)
        runs[visual] = out
    return {"head": head, "runs": runs}


def _probe(world, run, visual_mode="real"):
    from xmodal.backbones import load_backbone
    from xmodal.xadapter.retrieval.paired import PairedImages

    model, tok, _, _ = load_mlm(str(world["plm"]))
    load_xadapter(model, run)                                      # the run folder is accepted
    paths = [str(world["pool"] / "train" / f"{c}thing" / f"{i}.png") for c in COLOURS for i in range(8, 12)]
    gold = [c for c in COLOURS for _ in range(8, 12)]
    paired = PairedImages.embed(paths, load_backbone("tiny:clip"))
    feats, mask = paired.features([(p,) for p in paths], visual_mode)
    prompts = [f"the color of this is {tok.mask_token} ." for _ in paths]
    probs = candidate_probs(model, tok, prompts, list(COLOURS), feats, mask)
    return float(np.mean([list(COLOURS)[p] == g for p, g in zip(probs.argmax(-1).tolist(), gold)]))


def test_paired_images_carry_the_answer_the_text_does_not(world, trained):
    """The text never says which colour; only the paired picture does. Trained on real pictures the model
    answers held-out pictures' colours; the zero-input arm (same text, same steps) cannot beat chance."""
    real = _probe(world, trained["runs"]["real"])
    zero = _probe(world, trained["runs"]["zero"], "zero")
    swapped = _probe(world, trained["runs"]["real"], "shuffled")
    assert real >= 0.9, real
    assert zero <= 0.5 + 1e-9, zero
    assert swapped <= 0.2, swapped                                  # images of the other class: the answer flips


def test_base_head_is_frozen_and_shipped_with_the_adapter(world, trained):
    from safetensors.torch import load_file

    base = load_file(str(trained["head"] / "head.safetensors"))
    saved = load_file(str(resolve_adapter_dir(trained["runs"]["real"]) / "xadapter.safetensors"))
    for name, tensor in base.items():
        assert torch.equal(saved[f"head.{name}"], tensor), name
    summary = json.loads((trained["runs"]["real"] / "summary.json").read_text())
    assert summary["head"] == str(trained["head"]) and summary["head_trained"] is False


def test_fill_mask_image_moves_the_answer(world, trained):
    from typer.testing import CliRunner

    from xmodal.cli import app

    answers = {}
    for c in COLOURS:
        img = world["pool"] / "train" / f"{c}thing" / "10.png"
        res = CliRunner().invoke(app, ["fill-mask", "the color of this is [MASK] .", "--plm", str(world["plm"]),
                                       "--xadapter", str(trained["runs"]["real"]), "--image", str(img),
                                       "--compare", "--json"])
        assert res.exit_code == 0, res.output
        doc = json.loads(res.stdout)
        on = [p["token"] for p in doc["compare"]["experts_on"] if p["token"] in COLOURS]
        answers[c] = on[0]
    assert answers == {"red": "red", "blue": "blue"}
    res = CliRunner().invoke(app, ["fill-mask", "the color of this is [MASK] .", "--plm", str(world["plm"]),
                                   "--xadapter", str(trained["runs"]["real"]), "--image", "nope.png", "--json"])
    assert res.exit_code != 0 and "nope.png" in res.output


def test_paired_training_refuses_missing_images_before_loading_models(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the color of this is red .", "image": "gone.png"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: image 'gone.png' not found"):
        train_mlm(TrainArgs(plm=str(world["plm"]), backbone="tiny:clip", corpus=[str(bad)], out=str(tmp_path / "o"),
                            steps=2, experts="v", device="cpu", progress=False), log=lambda m: None)


def test_head_and_adaptation_report_progress_on_stderr_only(world, tmp_path, capsys):
    train_head(HeadArgs(plm=str(world["plm"]), corpus=[str(world["text"])], out=str(tmp_path / "h"), max_steps=6,
                        batch_size=4, window=3, progress=True), log=lambda m: None)
    train_mlm(TrainArgs(plm=str(world["plm"]), backbone="tiny:clip", corpus=[str(world["corpus"])],
                        image_root=str(world["pool"]), out=str(tmp_path / "r"), steps=3, batch_size=4, experts="v",
                        head=str(tmp_path / "h"), device="cpu", progress=True), log=lambda m: None)
    out, err = capsys.readouterr()
    assert out == ""
    assert "text-only head: 6/6 step" in err and "xadapter mlm: 3/3 step · loss" in err
