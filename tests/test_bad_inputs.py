"""Bad inputs and faults across every command, as a new user would meet them: one table, one outcome per row.

Each row runs the real ``xmodal`` command (``CliRunner`` on ``xmodal.cli.app``, the top-level error path
included) and asserts its outcome:

* ``code != 0`` -- a clear error: that exit code (2 usage, 3 input data, 4 environment/resources), no
  traceback, exactly one ``error:`` line on stderr (or, with ``--json``, exactly one JSON document with
  ``error``/``type``/``hint`` on stdout), a message matching ``match``, and every option the hint suggests
  exists on that command;
* ``code == 0`` -- handled: the command succeeds and ``check`` verifies what it did (skipped, recomputed,
  repaired, nothing lost or duplicated).

Permissions: the suite runs as root, where ``chmod`` blocks nothing, so a read-only folder is a read-only
bind mount and a full disk is a small tmpfs (both skipped, with the reason, where ``mount`` is not
allowed); "cannot create a folder" is a path under a regular file (``NotADirectoryError``).
Rows that fail because of a known gap in another part of the code are ``xfail(strict=True)`` with the
reason, so they turn into failures the moment the gap is closed and the mark is stale.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from xmodal.bench.testing import make_tiny_imagefolder

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TB = "tiny:clip"


# ---------------------------------------------------------------------------------------------- environment
@dataclass
class Env:
    """Clean inputs shared by every row (rows that damage something damage a copy)."""

    root: Path
    folder: Path  # tiny ImageFolder: 3 classes, train 6 / test 3 per class, 16 px
    plm: Path | None = None
    other_plm: Path | None = None
    bank: Path | None = None
    corpus: Path | None = None
    adapter_run: Path | None = None
    glue: Path | None = None
    colors: Path | None = None
    classifier: Path | None = None
    killed: "_KilledSweep | None" = None


def _app():
    from xmodal.cli import app

    return app


def _command(path: list[str]):
    import typer.main

    cmd = typer.main.get_command(_app())
    for name in path:
        commands = getattr(cmd, "commands", {})
        if name not in commands:
            return None
        cmd = commands[name]
    return cmd


def _options(path: list[str]) -> set[str]:
    cmd = _command(path)
    return {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)} if cmd is not None else set()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    e = Env(root=root, folder=make_tiny_imagefolder(root / "imgs", classes=3, train=6, test=3, size=16))
    e.killed = _KilledSweep(e)
    yield e
    e.killed.stop()


@pytest.fixture(scope="module")
def xa_env(env: Env) -> Env:
    """Tiny PLMs, a retrieval bank, a corpus and a 2-step adapter run (only for the X-adapter rows)."""
    if env.plm is not None:
        return env
    from xmodal.backbones import load_backbone
    from xmodal.xadapter.bank import RetrievalBank
    from xmodal.xadapter.tiny import build_tiny_plm

    texts = [f"the {c} {o} is on the table" for c in ("red", "blue", "green", "yellow") for o in
             ("car", "apple", "sky", "ball", "leaf")]
    env.corpus = env.root / "corpus.jsonl"
    env.corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    bb = load_backbone(TB)
    px = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    env.bank = env.root / "bank"
    RetrievalBank.from_embeddings(bb.encode_images(px).clone(), env.bank, tokens=bb.image_tokens(px).clone(),
                                  meta={"backbone": bb.spec, "fingerprint": bb.fingerprint()})
    env.plm = build_tiny_plm(env.root / "plm", "bert", texts, seed=2)
    env.other_plm = build_tiny_plm(env.root / "plm_other", "bert", texts, seed=5)  # same shapes, other weights
    env.adapter_run = env.root / "xa_run"
    res = CliRunner().invoke(_app(), ["xadapter", "train", "--plm", str(env.plm), "--backbone", TB, "--bank",
                                      str(env.bank), "--corpus", str(env.corpus), "--out", str(env.adapter_run),
                                      "--steps", "2", "--batch-size", "4", "--device", "cpu", "--save-every", "1",
                                      "--json"])
    assert res.exit_code == 0, res.output
    env.glue = env.root / "glue_rte"
    env.glue.mkdir()
    head = "index\tsentence1\tsentence2\tlabel\n"
    rows = [f"{i}\tthe {t} is red\tit is {t}\t{'entailment' if i % 2 else 'not_entailment'}\n"
            for i, t in enumerate(["car", "apple", "sky", "ball", "leaf", "tree", "cup", "dog"])]
    (env.glue / "train.tsv").write_text(head + "".join(rows))
    (env.glue / "dev.tsv").write_text(head + "".join(rows[:4]))
    env.colors = env.root / "colors.csv"
    env.colors.write_text("Index,Descriptor,Item,Color\n1,a ,sunflower,yellow\n2,the ,ocean,blue\n3,a ,leaf,green\n")
    return env


@pytest.fixture(scope="module")
def clf_env(env: Env) -> Env:
    """A classifier saved by ``xmodal fit`` (tip-adapter, 2 shots) for the predict / serve rows."""
    if env.classifier is None:
        out = env.root / "classifier"
        res = CliRunner().invoke(_app(), ["fit", "--backbone", TB, "--data", f"imagefolder:{env.folder}", "--shots",
                                          "2", "--method", "tip-adapter", "--augment-views", "0", "--out", str(out),
                                          "--cache-dir", str(env.root / "fit_cache"), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        env.classifier = out
    return env


# ---------------------------------------------------------------------------------------------- faults
def _copy_folder(env: Env, tmp: Path) -> Path:
    dst = tmp / "data"
    shutil.copytree(env.folder, dst)
    return dst


def _first(folder: Path, split: str = "test") -> Path:
    return sorted((folder / split / "class0").iterdir())[0]


def _dtd(tmp: Path, extra: list | None = None, raw: bytes | None = None) -> Path:
    """A CoOp DTD layout with 2 classes; ``extra`` rows are appended to the test list."""
    rows = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(["banded", "blotchy"]):
        for split, n in (("train", 3), ("val", 1), ("test", 2)):
            for i in range(n):
                rel = f"{cls}/{cls}_{split}_{i}.jpg"
                p = tmp / "dtd" / "images" / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), (label * 120, i * 40, 9)).save(p, format="JPEG")
                rows[split].append([rel, label, cls])
    rows["test"] += extra or []
    split = tmp / "dtd" / "split_zhou_DescribableTextures.json"
    split.write_bytes(raw if raw is not None else json.dumps(rows).encode())
    return tmp


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _cifar(tmp: Path, evil: bool = False, truncate: bool = False) -> Path:
    import numpy as np

    root = tmp / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = np.zeros((2, 3072), dtype=np.uint8)
        payload = {b"batch_label": name.encode(), b"data": data, b"labels": [0, 1]}
        if evil and name == "test_batch":
            payload[b"batch_label"] = _Evil(tmp / "pwned")
        raw = pickle.dumps(payload, protocol=2)
        (root / name).write_bytes(raw[: len(raw) // 2] if truncate and name == "test_batch" else raw)
    return tmp


@contextlib.contextmanager
def _mount(kind: str, path: Path, size: str = "64k"):
    """A read-only bind mount of ``path`` (kind "ro") or a ``size`` tmpfs at ``path`` (kind "tmpfs")."""
    path.mkdir(parents=True, exist_ok=True)
    if kind == "ro":
        cmds = [["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,ro,bind", str(path)]]
    else:
        cmds = [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]]
    mounted = False
    try:
        for c in cmds:
            proc = subprocess.run(c, capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.skip(f"cannot `{' '.join(c[:3])}` here ({proc.stderr.strip() or proc.returncode}): "
                            "needs root with mount rights")
            mounted = True
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ---------------------------------------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    command: list[str]  # the command path, e.g. ["xadapter", "train"]
    args: Callable[[Env, Path], list[str]]
    code: int  # expected exit code (0: handled)
    match: str = ""  # regex the error message (or, for code 0, stdout+stderr) must contain
    as_json: bool = False
    check: Callable[[Env, Path, object], None] | None = None
    xa: bool = False  # needs the X-adapter fixtures
    clf: bool = False  # needs a saved classifier
    mount: str | None = None  # "ro" / "tmpfs": wrap the run in that mount (at tmp/"mnt")
    mount_size: str = "64k"  # of the tmpfs
    xfail: str | None = None
    timeout: int = 60


def feats(*extra: str) -> Callable[[Env, Path], list[str]]:
    return lambda e, t: ["features", "--backbone", TB, "--device", "cpu", "--cache-dir", str(t / "cache"), *extra]


def zs(*extra: str) -> Callable[[Env, Path], list[str]]:
    return lambda e, t: ["zeroshot", "--backbone", TB, "--device", "cpu", "--cache-dir", str(t / "cache"), *extra]


def few(*extra: str) -> Callable[[Env, Path], list[str]]:
    return lambda e, t: ["fewshot", "--backbone", TB, "--device", "cpu", "--cache-dir", str(t / "cache"),
                         "--methods", "zeroshot", "--augment-views", "0", *extra]


def bench(*extra: str) -> Callable[[Env, Path], list[str]]:
    return lambda e, t: ["bench", "--backbone", TB, "--device", "cpu", "--cache-dir", str(t / "cache"),
                         "--methods", "zeroshot,tip-adapter", "--augment-views", "0", *extra]


def damaged(mutate: Callable[[Path], object], build: Callable[..., Callable], *extra: str, spec: str = "imagefolder"):
    """Copy the clean ImageFolder, damage it with ``mutate(folder)``, then run ``build(--data spec, *extra)``."""
    def args(e: Env, t: Path) -> list[str]:
        folder = _copy_folder(e, t)
        mutate(folder)
        return build("--data", f"{spec}:{folder}", *extra)(e, t)
    return args


def with_data(make: Callable[[Path], str], build: Callable[..., Callable], *extra: str):
    """``make(tmp)`` returns a dataset spec."""
    return lambda e, t: build("--data", make(t), *extra)(e, t)


def clean(build: Callable[..., Callable], *extra: str):
    return lambda e, t: build("--data", f"imagefolder:{e.folder}", *extra)(e, t)


def _garbage(p: Path) -> None:
    p.write_bytes(b"this is not an image at all" * 4)


def _zero(p: Path) -> None:
    p.write_bytes(b"")


def _truncate(p: Path) -> None:
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 3])


def _lines(path: Path) -> list[dict]:
    """Rows of a results file; the one deliberately garbled line of a row below is left out (and must survive)."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip() and x != "{not json"]


def _keys(rows: list[dict]) -> list[tuple]:
    return [(r["method"], r["dataset"], r["shots"], r["seed"], r.get("identity")) for r in rows]


# ----- checks of handled rows
def _check_skipped_one(e, t, res):
    doc = json.loads(res.stdout)
    assert doc["n"] == 8, doc  # 9 test images, the corrupt one skipped


def _check_recomputed_cache(e, t, res):
    doc = json.loads(res.stdout)
    assert doc["n"] == 9


def _tamper_cache(kind: str):
    def args(e: Env, t: Path) -> list[str]:
        base = feats("--data", f"imagefolder:{e.folder}", "--json")(e, t)
        first = CliRunner().invoke(_app(), base)
        assert first.exit_code == 0, first.output
        entries = sorted((t / "cache" / "features").glob("*.safetensors"))
        assert entries
        for p in entries:
            if kind == "zero":
                p.write_bytes(b"")
            elif kind == "garbage":
                p.write_bytes(b"\x00" * 64)
            elif kind == "ids":
                side = p.with_suffix(".json")
                meta = json.loads(side.read_text())
                meta["ids"] = meta["ids"][:-1]
                side.write_text(json.dumps(meta))
            elif kind == "values":  # same shape, other numbers: only a content check can tell
                from safetensors.torch import load_file, save_file

                tensors = load_file(str(p))
                save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, str(p))
        return base
    return args


def _check_features_not_zero(e, t, res):
    doc = json.loads(res.stdout)
    from xmodal.backbones import load_backbone
    from xmodal.data import load_dataset
    from xmodal.features import extract_features

    fs = extract_features(load_backbone(TB), load_dataset(f"imagefolder:{e.folder}"), "test",
                          cache_dir=str(t / "cache"), progress=False)
    assert doc and float(fs.features.abs().sum()) > 0, "tampered (zeroed) cache entry was served"


def _check_marker_absent(e, t, res):
    assert not (t / "pwned").exists(), "a user file executed code"


def _bench_grid(*extra: str) -> Callable[[Env, Path], list[str]]:
    return lambda e, t: bench("--data", f"imagefolder:{e.folder}", "--shots", "1", "--seeds", "1,2",
                              "--out", str(t / "out"), *extra)(e, t)


def _bench_first(prepare: Callable[[Path], None] | None = None, *rerun: str, data_change=None):
    """Run a 2-seed bench, optionally damage results.jsonl / the data, then rerun with ``rerun`` options."""
    def args(e: Env, t: Path) -> list[str]:
        folder = _copy_folder(e, t)
        base = bench("--data", f"imagefolder:{folder}", "--shots", "1", "--seeds", "1,2", "--out", str(t / "out"))
        first = CliRunner().invoke(_app(), base(e, t))
        assert first.exit_code == 0, first.output
        (t / "before.jsonl").write_bytes((t / "out" / "results.jsonl").read_bytes())
        if prepare is not None:
            prepare(t / "out" / "results.jsonl")
        if data_change is not None:
            data_change(folder)
        return base(e, t) + list(rerun) + ["--json"]
    return args


def _check_resumed_no_dup(expect_new: int):
    def check(e, t, res):
        doc = json.loads(res.stdout)
        assert doc["new_rows"] == expect_new, doc
        rows = _lines(t / "out" / "results.jsonl")
        keys = _keys(rows)
        assert len(keys) == len(set(keys)), "a row was duplicated"
        before = _keys(_lines(t / "before.jsonl"))
        assert set(before) <= set(keys), "a finished row was lost"
    return check


def _garbage_line(p: Path) -> None:
    lines = p.read_text().splitlines(keepends=True)
    p.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))


def _torn_tail(p: Path) -> None:
    with open(p, "ab") as fh:
        fh.write(b'{"method": "zeroshot", "backbone": "tin')


def _drop_last_row(p: Path) -> None:
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines[:-1]))


def _edit_row(**fields) -> Callable[[Path], None]:
    """Overwrite fields of the second row of a results file (as a user or a bad tool might)."""
    def edit(p: Path) -> None:
        lines = p.read_text().splitlines(keepends=True)
        row = json.loads(lines[1])
        row.update(fields)
        lines[1] = json.dumps(row) + "\n"  # Python writes NaN here, as an unchecked tool would
        p.write_text("".join(lines))
    return edit


def _check_bad_row_recomputed(e, t, res):
    """The bad row stays in the file (never deleted) but is neither reused nor shown: its cell is computed again."""
    doc = json.loads(res.stdout)
    assert doc["new_rows"] == 1, doc
    text = (t / "out" / "results.jsonl").read_text().splitlines()
    before = (t / "before.jsonl").read_text().splitlines()
    assert len(text) == len(before) + 1 and text[2:len(before)] == before[2:], "a finished row changed"
    cells = [c for s in doc["summary"] for c in s["cells"]]
    assert cells and all(0 <= c["mean"] <= 100 for c in cells), cells


def _refuse_constant(name: str):
    raise AssertionError(f"invalid JSON constant {name} in the output")


def _check_strict_json(e, t, res):
    doc = json.loads(res.stdout, parse_constant=_refuse_constant)  # NaN / Infinity are not JSON
    assert doc


def _edit_image(folder: Path) -> None:
    Image.new("RGB", (16, 16), (250, 0, 0)).save(_first(folder))


def _bench_disk_full(e: Env, t: Path) -> list[str]:
    return bench("--data", f"imagefolder:{e.folder}", "--shots", "1,2", "--seeds", "1,2,3",
                 "--out", str(t / "mnt" / "out"), "--cache-dir", str(t / "cache"))(e, t)


def _check_disk_full_then_resume(e, t, res):
    results = t / "mnt" / "out" / "results.jsonl"
    rows = _lines(results) if results.exists() else []  # every line parses: no torn row left behind
    assert 0 < len(rows) < 12, f"the disk should fill while rows are appended ({len(rows)} rows)"
    subprocess.run(["mount", "-o", "remount,size=4m", str(t / "mnt")], check=True, capture_output=True)
    again = CliRunner().invoke(_app(), _bench_disk_full(e, t) + ["--json"])
    assert again.exit_code == 0, again.output
    after = _lines(results)
    assert _keys(after)[: len(rows)] == _keys(rows) and len(set(_keys(after))) == len(after) == 12


def _check_no_partial_cache(e, t, res):
    leftovers = [p.name for p in (t / "mnt").rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    for st in (t / "mnt").rglob("*.safetensors"):  # whatever entry exists is whole (has its id list)
        assert st.with_suffix(".json").is_file()


def _xa_train(*extra: str, corpus: Callable[[Env, Path], Path] | None = None) -> Callable[[Env, Path], list[str]]:
    def args(e: Env, t: Path) -> list[str]:
        c = corpus(e, t) if corpus else e.corpus
        return ["xadapter", "train", "--plm", str(e.plm), "--backbone", TB, "--bank", str(e.bank), "--corpus",
                str(c), "--out", str(t / "run"), "--steps", "2", "--batch-size", "4", "--device", "cpu", *extra]
    return args


def _corpus(text: str | bytes) -> Callable[[Env, Path], Path]:
    def make(e: Env, t: Path) -> Path:
        p = t / "corpus.jsonl"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p
    return make


def _resume_with_evil_checkpoint(e: Env, t: Path) -> list[str]:
    run = t / "run"
    shutil.copytree(e.adapter_run, run)
    (run / "checkpoint.pt").write_bytes(pickle.dumps({"step": _Evil(t / "pwned")}, protocol=2))
    return _xa_train("--resume", "--steps", "3")(e, t)


def _resume_after_corpus_change(e: Env, t: Path) -> list[str]:
    run = t / "run"
    shutil.copytree(e.adapter_run, run)
    c = t / "changed.jsonl"
    c.write_text(e.corpus.read_text() + json.dumps({"text": "a brand new purple sentence"}) + "\n")
    return _xa_train("--resume", "--steps", "3", corpus=lambda e, t: c)(e, t)


def _bank_tampered(e: Env, t: Path) -> list[str]:
    bank = t / "bank"
    shutil.copytree(e.bank, bank)
    (bank / "index.faiss").write_bytes(b"garbage")
    args = _xa_train()(e, t)
    args[args.index("--bank") + 1] = str(bank)
    return args


def _probe(*extra: str, csv: Callable[[Env, Path], Path] | None = None, adapter=None):
    def args(e: Env, t: Path) -> list[str]:
        data = csv(e, t) if csv else e.colors
        out = ["probe", "colors", "--plm", str(e.plm), "--data", str(data), "--device", "cpu", *extra]
        if adapter is not None:
            out[out.index("--plm") + 1] = str(adapter(e, t)[1])
            out += ["--xadapter", str(adapter(e, t)[0]), "--bank", str(e.bank), "--backbone", TB]
        return out
    return args


def _csv(text: str) -> Callable[[Env, Path], Path]:
    def make(e: Env, t: Path) -> Path:
        p = t / "c.csv"
        p.write_text(text)
        return p
    return make


def _adapter_copy(mutate: Callable[[Path], None] | None = None, plm: str = "plm"):
    def make(e: Env, t: Path) -> tuple[Path, Path]:
        dst = t / "xadapter"
        if not dst.exists():
            shutil.copytree(e.adapter_run / "xadapter", dst)
            if mutate is not None:
                mutate(dst)
        return dst, (e.plm if plm == "plm" else e.other_plm)
    return make


def _corrupt_adapter_weights(d: Path) -> None:
    for p in d.glob("*.safetensors"):
        p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")


def _glue(*extra: str, data: Callable[[Env, Path], Path] | None = None, task: str = "RTE"):
    def args(e: Env, t: Path) -> list[str]:
        d = data(e, t) if data else e.glue
        return ["glue", "--task", task, "--data", str(d), "--plm", str(e.plm), "--epochs", "1", "--batch-size", "4",
                "--device", "cpu", *extra]
    return args


def _glue_dir(train_labels: str | None = None, dev_labels: str | None = None):
    def make(e: Env, t: Path) -> Path:
        d = t / "glue"
        shutil.copytree(e.glue, d)
        for name, lab in (("train.tsv", train_labels), ("dev.tsv", dev_labels)):
            if lab is None:
                continue
            lines = (d / name).read_text().splitlines()
            new = [lines[0]] + [ln.rsplit("\t", 1)[0] + "\t" + (lab if i % 2 == 0 or name == "train.tsv" else
                                                               ln.rsplit("\t", 1)[1])
                                for i, ln in enumerate(lines[1:])]
            (d / name).write_text("\n".join(new) + "\n")
        return d
    return make


def _check_dropped_reported(e, t, res):
    doc = json.loads(res.stdout)
    text = json.dumps(doc)
    assert re.search(r"(dropped|skipped|invalid)", text), f"dropped dev rows not reported: {text[:300]}"


def _serve(model: Callable[[Env, Path], Path]):
    return lambda e, t: ["serve", str(model(e, t)), "--device", "cpu", "--port", "0"]


class _KilledSweep:
    """A real ``xmodal bench`` process, started in the background as soon as the module's inputs exist and
    SIGKILLed by a watcher thread once its rows are landing (the import of a fresh interpreter then overlaps
    the other rows). The table row reruns the same command in the same folder and checks the resume."""

    # a trained method keeps the sweep busy well past its third row, so the kill always lands mid-sweep
    METHODS = "zeroshot,tip-adapter,tip-adapter-f"

    def __init__(self, env: Env) -> None:
        import threading

        self.dir = env.root / "killed"
        self.args = ["bench", "--backbone", TB, "--device", "cpu", "--cache-dir", str(self.dir / "cache"),
                     "--methods", self.METHODS, "--augment-views", "0", "--data", f"imagefolder:{env.folder}",
                     "--shots", "1,2", "--seeds", "1,2,3", "--out", str(self.dir / "out")]
        self.results = self.dir / "out" / "results.jsonl"
        self.proc = subprocess.Popen([sys.executable, "-m", "xmodal", *self.args], cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        self.done = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        import time

        deadline = time.monotonic() + 150
        try:
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self.results.exists() and self.results.read_bytes().count(b"\n") >= 3:
                    break
                time.sleep(0.01)
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        finally:
            self.done.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _model_copy(mutate: Callable[[Path], None]) -> Callable[[Env, Path], Path]:
    def make(e: Env, t: Path) -> Path:
        dst = t / "model"
        shutil.copytree(e.classifier, dst)
        mutate(dst)
        return dst
    return make


def _flip_bytes(d: Path) -> None:
    p = d / "adapter.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-8:] = bytes(b ^ 0xFF for b in raw[-8:])  # same size, other numbers
    p.write_bytes(bytes(raw))


def _edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Edit xmodal_classifier.json as a user with a text editor would (valid JSON, other content)."""
    def mutate(d: Path) -> None:
        p = d / "xmodal_classifier.json"
        doc = json.loads(p.read_text())
        change(doc)
        p.write_text(json.dumps(doc, indent=2))
    return mutate


def _swap_classes(doc: dict) -> None:
    doc["classes"][0], doc["classes"][1] = doc["classes"][1], doc["classes"][0]


def _change_alpha(doc: dict) -> None:
    selected = doc["method"]["selected"]
    assert "alpha" in selected, selected
    selected["alpha"] = float(selected["alpha"]) * 2 + 1


def _as_format_v1(doc: dict) -> None:
    doc["format_version"] = 1
    doc.pop("digest")


def _predict(model: Callable[[Env, Path], Path], *extra: str, images: Callable[[Env, Path], Path] | None = None):
    def args(e: Env, t: Path) -> list[str]:
        target = images(e, t) if images else e.folder / "test"
        return ["predict", str(model(e, t)), str(target), "--device", "cpu", *extra]
    return args


def _images_with_one_corrupt(e: Env, t: Path) -> Path:
    dst = t / "imgs"
    shutil.copytree(e.folder / "test", dst)
    _garbage(_first(dst, "."))
    return dst


def _assert_rows(res, rows: int, errors: int, skipped: int) -> list[dict]:
    doc = json.loads(res.stdout)
    bad = [r for r in doc["rows"] if r.get("error")]
    assert len(doc["rows"]) == rows and len(bad) == errors and doc["n_skipped"] == skipped, doc
    return bad


def _check_error_row(e, t, res):
    bad = _assert_rows(res, rows=9, errors=1, skipped=0)
    assert "img000" in bad[0]["path"], bad


def _check_missing_row(e, t, res):
    bad = _assert_rows(res, rows=10, errors=1, skipped=0)
    assert bad[0]["path"].endswith("nothere") and "no such file" in bad[0]["error"], bad


def _sigkill_then_resume(e: Env, t: Path) -> list[str]:
    assert e.killed is not None and e.killed.done.wait(150), "the background sweep neither wrote rows nor ended"
    assert e.killed.proc.returncode == -signal.SIGKILL, f"the sweep was not killed (exit {e.killed.proc.returncode})"
    (t / "before.jsonl").write_bytes(e.killed.results.read_bytes())
    return e.killed.args + ["--json"]


def _check_sigkill_resume(e, t, res):
    doc = json.loads(res.stdout)
    rows = _lines(e.killed.results)
    before = [json.loads(x) for x in (t / "before.jsonl").read_bytes().split(b"\n")[:-1] if x.strip()]
    total = len(_KilledSweep.METHODS.split(",")) * 2 * 3  # methods × shots × seeds
    assert 0 < len(before) < total, f"kill landed outside the sweep ({len(before)} rows before)"
    assert rows[: len(before)] == before, "finished rows changed"
    assert len(set(_keys(rows))) == len(rows) == total and doc["new_rows"] == total - len(before), (len(rows), doc)


CASES: list[Case] = [
    # ----- features: images, dataset specs and layouts, backbone specs, options
    Case("features-unknown-data-spec", ["features"], feats("--data", "nope:/x"), 3, "unknown dataset spec"),
    Case("features-missing-folder", ["features"], lambda e, t: feats("--data", f"imagefolder:{t}/missing")(e, t), 3,
         "does not exist"),
    Case("features-root-is-a-file", ["features"],
         lambda e, t: ((t / "f").write_text("x"), feats("--data", f"imagefolder:{t / 'f'}")(e, t))[1], 3, "is a file"),
    Case("features-no-split-folders", ["features"],
         lambda e, t: ((t / "empty").mkdir(), feats("--data", f"imagefolder:{t / 'empty'}")(e, t))[1], 3,
         "no train/val/test"),
    Case("features-split-without-classes", ["features"],
         lambda e, t: ((t / "d" / "test").mkdir(parents=True), feats("--data", f"imagefolder:{t / 'd'}")(e, t))[1], 3,
         "no class folders"),
    Case("features-classes-differ-between-splits", ["features"],
         damaged(lambda f: shutil.move(str(f / "test" / "class2"), str(f / "test" / "wolf")), feats), 3,
         "class folders differ"),
    Case("features-corrupt-image", ["features"], damaged(lambda f: _garbage(_first(f)), feats), 3,
         r"cannot (decode|read) image.*img000"),
    Case("features-zero-byte-image", ["features"], damaged(lambda f: _zero(_first(f)), feats), 3,
         r"cannot (decode|read) image"),
    Case("features-truncated-image", ["features"], damaged(lambda f: _truncate(_first(f)), feats), 3,
         r"(cannot (decode|read) image|truncated)"),
    Case("features-corrupt-image-json", ["features"], damaged(lambda f: _garbage(_first(f)), feats, "--json"), 3,
         r"cannot (decode|read) image", as_json=True),
    Case("features-skip-corrupt-handled", ["features"],
         damaged(lambda f: _garbage(_first(f)), feats, "--skip-corrupt", "--json"), 0, check=_check_skipped_one),
    Case("features-unknown-backbone", ["features"],
         lambda e, t: feats("--data", f"imagefolder:{e.folder}")(e, t)[:1] + ["--backbone", "nope:x"]
         + feats("--data", f"imagefolder:{e.folder}")(e, t)[3:], 3, "unknown backbone spec"),
    Case("features-hf-folder-missing", ["features"],
         lambda e, t: ["features", "--backbone", f"hf:{t}/no-such-model", "--data", f"imagefolder:{e.folder}",
                       "--device", "cpu", "--cache-dir", str(t / "c")], 4, r"no-such-model"),
    Case("features-openclip-weights-file-missing", ["features"],
         lambda e, t: ["features", "--backbone", f"openclip:RN50/{t}/RN50.pt", "--data", f"imagefolder:{e.folder}",
                       "--device", "cpu", "--cache-dir", str(t / "c")], 4, r"RN50"),
    Case("features-unknown-split", ["features"], clean(feats, "--split", "nope"), 3, "no split 'nope'"),
    Case("features-bad-dtype", ["features"], clean(feats, "--dtype", "fp7"), 2, "fp7"),
    Case("features-cuda-without-gpu", ["features"],
         lambda e, t: [a if a != "cpu" else "cuda" for a in clean(feats)(e, t)], 4, "no CUDA GPU"),
    Case("features-bad-device", ["features"], lambda e, t: [a if a != "cpu" else "tpu" for a in clean(feats)(e, t)],
         2, "tpu"),
    Case("features-cache-dir-under-a-file", ["features"],
         lambda e, t: ((t / "file").write_text("x"),
                       [a if a != str(t / "cache") else str(t / "file" / "cache") for a in clean(feats)(e, t)])[1],
         3, "not a directory"),
    Case("features-cache-entry-zero-bytes", ["features"], _tamper_cache("zero"), 0, check=_check_recomputed_cache),
    Case("features-cache-entry-garbage", ["features"], _tamper_cache("garbage"), 0, check=_check_recomputed_cache),
    Case("features-cache-ids-tampered", ["features"], _tamper_cache("ids"), 0, check=_check_recomputed_cache),
    Case("features-cache-values-replaced", ["features"], _tamper_cache("values"), 0, check=_check_features_not_zero),
    Case("features-cache-dir-read-only", ["features"],
         lambda e, t: [a if a != str(t / "cache") else str(t / "mnt") for a in clean(feats)(e, t)], 4,
         "read-only", mount="ro"),
    Case("features-disk-full", ["features"],
         lambda e, t: [a if a != str(t / "cache") else str(t / "mnt") for a in clean(feats, "--augment-views", "30")(e, t)],
         4, "no space left", mount="tmpfs", check=_check_no_partial_cache),
    # ----- zeroshot: split files and metadata, array datasets
    Case("zeroshot-coop-entry-dotdot", ["zeroshot"],
         with_data(lambda t: f"coop:DTD@{_dtd(t, [['../../../etc/hostname', 0, 'banded']])}", zs), 3, r"'\.\.'"),
    Case("zeroshot-coop-entry-absolute", ["zeroshot"],
         with_data(lambda t: f"coop:DTD@{_dtd(t, [['/etc/hostname', 0, 'banded']])}", zs), 3, "absolute path"),
    Case("zeroshot-coop-symlink-escapes", ["zeroshot"],
         with_data(lambda t: (_dtd(t), (t / "dtd" / "images" / "banded" / "x.jpg").symlink_to("/etc/hostname"),
                              _dtd(t, [["banded/x.jpg", 0, "banded"]]))[2] and f"coop:DTD@{t}", zs), 3,
         "symlink.*outside"),
    Case("zeroshot-coop-split-not-json", ["zeroshot"],
         with_data(lambda t: "coop:DTD@" + str(_dtd(t, raw=b'{"train": [[')), zs), 3, "not valid JSON"),
    Case("zeroshot-coop-split-binary", ["zeroshot"],
         with_data(lambda t: f"coop:DTD@{_dtd(t, raw=bytes(range(256)))}", zs), 3, "not UTF-8"),
    Case("zeroshot-coop-bad-row", ["zeroshot"],
         with_data(lambda t: f"coop:DTD@{_dtd(t, [['a.jpg', 'zero', 'banded']])}", zs), 3,
         r"\[relpath, label, classname\]"),
    Case("zeroshot-coop-missing-image", ["zeroshot"],
         with_data(lambda t: f"coop:DTD@{_dtd(t, [['banded/gone.jpg', 0, 'banded']])}", zs), 3, "gone.jpg"),
    Case("zeroshot-fgvc-line-escapes", ["zeroshot"],
         with_data(lambda t: (
             (t / "fgvc_aircraft").mkdir(),
             (t / "fgvc_aircraft" / "variants.txt").write_text("A300\n"),
             [(t / "fgvc_aircraft" / f"images_variant_{s}.txt").write_text("../../../etc/passwd A300\n")
              for s in ("train", "val", "test")],
             f"coop:FGVCAircraft@{t}")[-1], zs), 3, r"images_variant_train\.txt.*'\.\.'"),
    Case("zeroshot-imagenet-wnid-is-a-path", ["zeroshot"],
         with_data(lambda t: ((t / "imagenet" / "images").mkdir(parents=True),
                              (t / "imagenet" / "classnames.txt").write_text("../x tench\n"),
                              f"coop:ImageNet@{t}")[-1], zs), 3, "single folder name"),
    Case("zeroshot-cifar10-pickle-runs-no-code", ["zeroshot"],
         with_data(lambda t: f"cifar10:{_cifar(t, evil=True)}", zs), 3, "refusing to load",
         check=_check_marker_absent),
    Case("zeroshot-cifar10-truncated-batch", ["zeroshot"],
         with_data(lambda t: f"cifar10:{_cifar(t, truncate=True)}", zs), 3, "not a valid python batch"),
    Case("zeroshot-cifar10-missing-batch", ["zeroshot"],
         with_data(lambda t: f"cifar10:{t}", zs), 3, "data_batch_1 is missing"),
    Case("zeroshot-fashion-mnist-truncated", ["zeroshot"],
         with_data(lambda t: ((t / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00"),
                              f"fashion-mnist:{t}")[-1], zs), 3, "truncated|not found"),
    Case("zeroshot-bad-data-json", ["zeroshot"], zs("--data", "imagefolder:/definitely/not/here", "--json"), 3,
         "does not exist", as_json=True),
    Case("zeroshot-template-without-placeholder", ["zeroshot"], clean(zs, "--templates", "no placeholder"), 3,
         r"\{\}|placeholder|template"),
    # ----- fewshot: degenerate datasets and options
    Case("fewshot-one-class", ["fewshot"],
         damaged(lambda f: [shutil.rmtree(f / s / c) for s in ("train", "test") for c in ("class1", "class2")], few,
                 "--shots", "1"), 3, "at least 2"),
    Case("fewshot-empty-class-folder", ["fewshot"],
         damaged(lambda f: [p.unlink() for p in (f / "train" / "class1").iterdir()], few, "--shots", "1"), 3,
         "no training image.*class1"),
    Case("fewshot-class-too-small-for-val", ["fewshot"],
         damaged(lambda f: [p.unlink() for p in sorted((f / "train" / "class1").iterdir())[2:]], few, "--shots", "2"),
         3, "no validation image for class 'class1'"),
    Case("fewshot-no-test-split", ["fewshot"], damaged(lambda f: shutil.rmtree(f / "test"), few, "--shots", "1"), 3,
         "no test"),
    Case("fewshot-shots-zero", ["fewshot"], clean(few, "--shots", "0"), 2, "shots"),
    Case("fewshot-unknown-method", ["fewshot"],
         lambda e, t: [a if a != "zeroshot" else "zeroshot,bogus" for a in clean(few)(e, t)], 2, "bogus"),
    Case("fewshot-bad-augment-scope", ["fewshot"], clean(few, "--augment-scope", "galaxy"), 2, "augment-scope"),
    Case("fewshot-corrupt-image-json", ["fewshot"],
         damaged(lambda f: _garbage(_first(f, "test")), few, "--shots", "1", "--json"), 3,
         r"cannot (decode|read) image", as_json=True),
    # ----- bench: grids, results files, identity, permissions, disk full, SIGKILL
    Case("bench-duplicate-seeds", ["bench"], lambda e, t: _bench_grid()(e, t) + ["--seeds", "1,1,2"], 2,
         "more than once"),
    Case("bench-shots-zero", ["bench"], lambda e, t: _bench_grid()(e, t) + ["--shots", "0"], 2, "shots"),
    Case("bench-shots-larger-than-any-class", ["bench"], lambda e, t: _bench_grid()(e, t) + ["--shots", "1,16"], 2,
         "no class has 16 training images"),
    Case("bench-shots-not-int", ["bench"], lambda e, t: _bench_grid()(e, t) + ["--shots", "1,x"], 2, "integers"),
    Case("bench-duplicate-datasets", ["bench"],
         lambda e, t: _bench_grid()(e, t) + ["--data", f"imagefolder:{e.folder},imagefolder:{e.folder}"], 2,
         "more than once"),
    Case("bench-out-is-a-file", ["bench"],
         lambda e, t: ((t / "out").write_text("x"), _bench_grid()(e, t))[1], 3, "is a file"),
    Case("bench-out-under-a-file", ["bench"],
         lambda e, t: ((t / "f").write_text("x"), _bench_grid()(e, t) + ["--out", str(t / "f" / "out")])[1], 3,
         "not a directory"),
    Case("bench-results-is-a-folder", ["bench"],
         lambda e, t: ((t / "out" / "results.jsonl").mkdir(parents=True), _bench_grid()(e, t))[1], 3,
         "is a directory|results.jsonl"),
    Case("bench-garbage-line-in-results", ["bench"], _bench_first(_garbage_line), 0,
         check=lambda e, t, r: (_check_resumed_no_dup(0)(e, t, r),
                                "{not json" in (t / "out" / "results.jsonl").read_text().splitlines())[1] or
         pytest.fail("the unreadable line was deleted (it must be kept for the user to inspect)")),
    Case("bench-torn-tail-in-results", ["bench"], _bench_first(_torn_tail), 0, check=_check_resumed_no_dup(0)),
    Case("bench-resume-after-lost-row", ["bench"], _bench_first(_drop_last_row), 0,
         check=lambda e, t, r: _check_resumed_no_dup(1)(e, t, r)),
    Case("bench-rerun-other-augment-views", ["bench"], _bench_first(None, "--augment-views", "1"), 0,
         check=_check_resumed_no_dup(4)),
    Case("bench-rerun-after-data-changed", ["bench"], _bench_first(None, data_change=_edit_image), 0,
         check=_check_resumed_no_dup(4)),
    Case("bench-absurd-top1-in-results", ["bench"], _bench_first(_edit_row(top1=1e9)), 0,
         r"results\.jsonl:2: 'top1' must be a finite percentage", check=_check_bad_row_recomputed),
    Case("bench-non-numeric-top1-in-results", ["bench"], _bench_first(_edit_row(top1="high")), 0,
         r"results\.jsonl:2: 'top1' must be a finite percentage", check=_check_bad_row_recomputed),
    Case("bench-nan-top1-in-results", ["bench"], _bench_first(_edit_row(top1=float("nan"))), 0,
         r"results\.jsonl:2: 'top1'", check=_check_bad_row_recomputed),
    Case("bench-negative-count-in-results", ["bench"], _bench_first(_edit_row(n_correct=-3)), 0,
         r"results\.jsonl:2: 'n_correct' must be a whole number", check=_check_bad_row_recomputed),
    Case("bench-single-seed-json-is-strict-json", ["bench"],
         lambda e, t: _bench_grid()(e, t) + ["--seeds", "1", "--json"], 0, check=_check_strict_json),
    Case("fewshot-json-is-strict-json", ["fewshot"], clean(few, "--shots", "1", "--json"), 0,
         check=_check_strict_json),
    Case("bench-out-read-only", ["bench"],
         lambda e, t: _bench_grid()(e, t) + ["--out", str(t / "mnt")], 4, "read-only", mount="ro"),
    Case("bench-disk-full-then-resume", ["bench"], _bench_disk_full, 4, "no space left", mount="tmpfs",
         mount_size="8k", check=_check_disk_full_then_resume),
    Case("bench-sigkill-then-resume", ["bench"], _sigkill_then_resume, 0, check=_check_sigkill_resume, timeout=170),
    # ----- xadapter bank
    Case("bank-bad-data", ["xadapter", "bank"],
         lambda e, t: ["xadapter", "bank", "--backbone", TB, "--data", "nope:x", "--out", str(t / "b"),
                       "--device", "cpu"], 3, "unknown dataset spec"),
    Case("bank-bad-backbone", ["xadapter", "bank"],
         lambda e, t: ["xadapter", "bank", "--backbone", "nope:x", "--data", f"imagefolder:{e.folder}",
                       "--out", str(t / "b"), "--device", "cpu"], 3, "unknown backbone"),
    Case("bank-corrupt-image", ["xadapter", "bank"],
         damaged(lambda f: _garbage(_first(f, "train")),
                 lambda *a: (lambda e, t: ["xadapter", "bank", "--backbone", TB, *a, "--out", str(t / "b"),
                                           "--device", "cpu", "--cache-dir", str(t / "c")])), 3,
         r"cannot (decode|read) image"),
    Case("bank-out-under-a-file", ["xadapter", "bank"],
         lambda e, t: ((t / "f").write_text("x"),
                       ["xadapter", "bank", "--backbone", TB, "--data", f"imagefolder:{e.folder}", "--out",
                        str(t / "f" / "b"), "--device", "cpu", "--cache-dir", str(t / "c"), "--json"])[1], 3,
         "not a directory", as_json=True),
    # ----- xadapter train: corpora, banks, checkpoints
    Case("train-corpus-missing", ["xadapter", "train"],
         _xa_train(corpus=lambda e, t: t / "missing.jsonl"), 3, "missing.jsonl", xa=True),
    Case("train-corpus-missing-json", ["xadapter", "train"],
         _xa_train("--json", corpus=lambda e, t: t / "missing.jsonl"), 3, "missing.jsonl", xa=True, as_json=True),
    Case("train-corpus-empty", ["xadapter", "train"], _xa_train(corpus=_corpus("")), 3, "empty|no text", xa=True),
    Case("train-corpus-malformed-jsonl", ["xadapter", "train"], _xa_train(corpus=_corpus("{not json\n")), 3,
         "corpus|JSON|json", xa=True),
    Case("train-corpus-binary", ["xadapter", "train"], _xa_train(corpus=_corpus(bytes(range(256)) * 4)), 3,
         "UTF-8|text", xa=True),
    # corpus rows that are not non-empty strings are refused by file and line, never trained as "None" / "12345"
    Case("train-corpus-text-null", ["xadapter", "train"], _xa_train(corpus=_corpus('{"text": "ok"}\n{"text": null}\n')),
         3, r"corpus.jsonl:2: 'text' must be a string", xa=True),
    Case("train-corpus-number-row", ["xadapter", "train"], _xa_train(corpus=_corpus("12345\n")), 3,
         r"corpus.jsonl:1: expected a JSON object", xa=True),
    Case("train-corpus-list-row", ["xadapter", "train"], _xa_train(corpus=_corpus('["a"]\n')), 3,
         r"corpus.jsonl:1: expected a JSON object", xa=True),
    Case("train-corpus-image-outside-root", ["xadapter", "train"],
         _xa_train(corpus=_corpus('{"text": "a red bus", "image": "../../etc/passwd"}\n')), 3,
         r"corpus.jsonl:1: image path .* outside the image root", xa=True),
    Case("train-corpus-image-missing", ["xadapter", "train"],
         _xa_train(corpus=_corpus('{"text": "a red bus", "image": "nope.jpg"}\n')), 3,
         r"corpus.jsonl:1: image 'nope.jpg' not found", xa=True),
    Case("train-corpus-binary-names-file", ["xadapter", "train"], _xa_train(corpus=_corpus(b"ok\n\xff\xfe\n")), 3,
         r"corpus.jsonl: not UTF-8", xa=True),
    Case("train-head-not-a-head", ["xadapter", "train"],
         lambda e, t: _xa_train("--head", str(t))(e, t), 3, r"not a text-only head folder", xa=True),
    Case("train-bank-missing", ["xadapter", "train"],
         lambda e, t: [a if a != str(e.bank) else str(t / "nobank") for a in _xa_train()(e, t)], 3, "nobank", xa=True),
    Case("train-bank-index-tampered", ["xadapter", "train"], _bank_tampered, 3, "index|bank", xa=True),
    Case("train-checkpoint-pickle-runs-no-code", ["xadapter", "train"], _resume_with_evil_checkpoint, 3,
         "checkpoint", xa=True, check=_check_marker_absent),
    Case("train-resume-after-corpus-changed", ["xadapter", "train"], _resume_after_corpus_change, 3,
         "corpus.*changed|changed.*corpus", xa=True),
    Case("train-plm-missing", ["xadapter", "train"],
         lambda e, t: [a if a != str(e.plm) else str(t / "noplm") for a in _xa_train()(e, t)], 3, "noplm", xa=True),
    # ----- probe colors: CSV, adapters
    Case("probe-csv-missing", ["probe", "colors"], _probe(csv=lambda e, t: t / "none.csv"), 3, "not found", xa=True),
    Case("probe-csv-bad-header", ["probe", "colors"], _probe(csv=_csv("a,b\n1,2\n")), 3, "header", xa=True),
    Case("probe-csv-empty", ["probe", "colors"], _probe(csv=_csv("")), 3, "empty", xa=True),
    Case("probe-adapter-weights-corrupt", ["probe", "colors"], _probe(adapter=_adapter_copy(_corrupt_adapter_weights)),
         3, "adapter|safetensors|xadapter", xa=True),
    Case("probe-adapter-other-base-model", ["probe", "colors"], _probe(adapter=_adapter_copy(plm="other")), 3,
         "fingerprint|base model|different", xa=True),
    Case("probe-adapter-folder-missing", ["probe", "colors"],
         lambda e, t: _probe()(e, t) + ["--xadapter", str(t / "noadapter")], 3, "noadapter", xa=True),
    # ----- glue: TSV
    Case("glue-unknown-task", ["glue"], _glue(task="NOPE"), 3, "unknown GLUE task 'NOPE'", xa=True),
    Case("glue-data-missing", ["glue"], _glue(data=lambda e, t: t / "nothing"), 3, "no GLUE RTE files", xa=True),
    Case("glue-all-train-labels-invalid", ["glue"], _glue(data=_glue_dir(train_labels="maybe")), 3,
         "label", xa=True, timeout=10),
    Case("glue-invalid-dev-labels-reported", ["glue"], _glue("--json", data=_glue_dir(dev_labels="maybe")), 0,
         check=_check_dropped_reported, xa=True),
    Case("glue-wrong-header", ["glue"],
         _glue(data=lambda e, t: ((t / "g").mkdir(), (t / "g" / "train.tsv").write_text("a\tb\n1\t2\n"),
                                  (t / "g" / "dev.tsv").write_text("a\tb\n1\t2\n"), t / "g")[-1]), 3, "header",
         xa=True),
    # ----- serve (and fit / predict / fill-mask when they exist)
    Case("serve-model-folder-missing", ["serve"], _serve(lambda e, t: t / "nomodel"), 3, "nomodel"),
    Case("serve-model-folder-empty", ["serve"], _serve(lambda e, t: (t / "m").mkdir() or t / "m"), 3,
         "xmodal_classifier.json|not a saved|classifier"),
    Case("serve-adapter-tampered", ["serve"], _serve(_model_copy(_flip_bytes)), 3, "checksum", clf=True),
    Case("fit-bad-data", ["fit"], lambda e, t: ["fit", "--data", "nope:x", "--out", str(t / "m")], 3,
         "unknown dataset spec"),
    Case("fit-one-class", ["fit"],
         damaged(lambda f: [shutil.rmtree(f / s / c) for s in ("train", "test") for c in ("class1", "class2")],
                 lambda *a: (lambda e, t: ["fit", "--backbone", TB, *a, "--shots", "1", "--augment-views", "0",
                                           "--method", "tip-adapter", "--out", str(t / "m"), "--device", "cpu",
                                           "--cache-dir", str(t / "c")])), 3, "at least 2"),
    Case("fit-bad-param", ["fit"],
         lambda e, t: ["fit", "--backbone", TB, "--data", f"imagefolder:{e.folder}", "--param", "nonsense", "--out",
                       str(t / "m"), "--device", "cpu"], 2, "key=value"),
    Case("fit-out-under-a-file", ["fit"],
         lambda e, t: ((t / "f").write_text("x"),
                       ["fit", "--backbone", TB, "--data", f"imagefolder:{e.folder}", "--shots", "1", "--augment-views",
                        "0", "--method", "tip-adapter", "--out", str(t / "f" / "m"), "--device", "cpu",
                        "--cache-dir", str(t / "c"), "--json"])[1], 3, "not a directory|is a file|in the way", as_json=True),
    Case("predict-model-missing", ["predict"],
         lambda e, t: ["predict", str(t / "nomodel"), str(_first(e.folder))], 3, "nomodel"),
    Case("predict-adapter-tampered", ["predict"], _predict(_model_copy(_flip_bytes)), 3, "checksum", clf=True),
    Case("predict-config-class-names-edited", ["predict"], _predict(_model_copy(_edit_config(_swap_classes))), 3,
         "does not match its recorded digest", clf=True),
    Case("predict-config-alpha-edited", ["predict"], _predict(_model_copy(_edit_config(_change_alpha)), "--json"), 3,
         "does not match its recorded digest", as_json=True, clf=True),
    Case("predict-config-edited-force", ["predict"],
         _predict(_model_copy(_edit_config(_change_alpha)), "--force", "--format", "jsonl"), 0,
         r"warning: .*does not match its recorded digest.*--force", clf=True),
    Case("predict-config-format-v1-without-digest", ["predict"], _predict(_model_copy(_edit_config(_as_format_v1))),
         3, "format version 1, before the whole-classifier digest", clf=True),
    Case("serve-config-class-names-edited", ["serve"], _serve(_model_copy(_edit_config(_swap_classes))), 3,
         "does not match its recorded digest", clf=True),
    Case("predict-config-not-json", ["predict"],
         _predict(_model_copy(lambda d: (d / "xmodal_classifier.json").write_text("{"))), 3, "not valid JSON",
         clf=True),
    Case("predict-path-missing", ["predict"],
         lambda e, t: _predict(lambda e, t: e.classifier, "--json", images=lambda e, t: t / "nothere")(e, t)
         + [str(e.folder / "test")], 3, "1 of 10 input.* could not be classified", as_json=True,
         check=_check_missing_row, clf=True),
    Case("predict-path-missing-skip-corrupt", ["predict"],
         lambda e, t: _predict(lambda e, t: e.classifier, "--json", "--skip-corrupt",
                               images=lambda e, t: t / "nothere")(e, t) + [str(e.folder / "test")], 0,
         check=lambda e, t, res: _assert_rows(res, rows=9, errors=0, skipped=1), clf=True),
    Case("predict-corrupt-image-error-row", ["predict"],
         _predict(lambda e, t: e.classifier, "--json", images=_images_with_one_corrupt), 3,
         "could not be classified", as_json=True, check=_check_error_row, clf=True),
    Case("predict-corrupt-image-skip-corrupt", ["predict"],
         _predict(lambda e, t: e.classifier, "--json", "--skip-corrupt", images=_images_with_one_corrupt), 0,
         check=lambda e, t, res: _assert_rows(res, rows=8, errors=0, skipped=1), clf=True),
    Case("fill-mask-no-mask", ["fill-mask"],
         lambda e, t: ["fill-mask", "the sky is blue.", "--plm", str(e.plm), "--device", "cpu"], 3, r"no \[MASK\]",
         xa=True),
    Case("fill-mask-adapter-other-base", ["fill-mask"],
         lambda e, t: ["fill-mask", "the sky is [MASK].", "--plm", str(e.other_plm), "--xadapter",
                       str(e.adapter_run / "xadapter"), "--bank", str(e.bank), "--backbone", TB, "--device", "cpu"],
         3, "fingerprint|other weights|different", xa=True),
    Case("fill-mask-plm-missing", ["fill-mask"],
         lambda e, t: ["fill-mask", "the sky is [MASK].", "--plm", str(t / "noplm")], 3, "noplm"),
]

# Rows that fail because of a gap outside the data layer / bench harness; strict, so a fix shows up as XPASS.
KNOWN_GAPS: dict[str, str] = {}


def _param(case: Case):
    marks = []
    reason = case.xfail or KNOWN_GAPS.get(case.id)
    if reason:
        marks.append(pytest.mark.xfail(strict=True, reason=reason))
    return pytest.param(case, id=case.id, marks=marks)


@contextlib.contextmanager
def _deadline(seconds: int, what: str):
    """A hang becomes a test failure, not a stuck suite."""
    def alarm(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds} s (a loop over user data that never ends?)")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _assert_outcome(case: Case, result, env: Env, tmp: Path) -> None:
    out, err = result.stdout, result.stderr
    assert "Traceback" not in out + err, f"traceback printed:\n{err[-3000:]}"
    assert result.exit_code == case.code, (f"exit {result.exit_code}, expected {case.code}\n"
                                           f"stdout: {out[-1500:]}\nstderr: {err[-1500:]}")
    if case.code == 0:
        if case.match:
            assert re.search(case.match, out + err, flags=re.S), out + err
    else:
        if case.as_json:
            doc = json.loads(out)  # exactly one JSON document: trailing data would fail here
            assert {"error", "type", "hint"} <= set(doc) and doc["error"], doc
            message, hint = doc["error"], doc["hint"]
        else:
            # progress bars share stderr (carriage returns, no newline): the error starts its own segment
            lines = [m.group(0) for m in re.finditer(r"error: [^\r\n]*", err)]
            assert len(lines) == 1, f"expected one error line, got:\n{err}"
            assert "error" not in out.lower(), f"stdout should not carry the error, got {out[:500]!r}"
            message, _, hint = lines[0].partition(" — ")
        assert re.search(case.match, message + " " + hint, flags=re.S | re.I), f"{message!r} !~ {case.match!r}"
        own = re.sub(r"`[^`]*`|xmodal [a-z][\w-]*[^,;)—]*", "", hint)  # options of commands the hint names
        suggested = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", own))
        missing = suggested - _options(case.command) - {"--help", "--debug"}
        assert not missing, f"hint suggests options `xmodal {' '.join(case.command)}` lacks: {missing}"
    if case.check is not None:
        case.check(env, tmp, result)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, env: Env, tmp_path: Path, request, monkeypatch):
    if _command(case.command) is None:
        pytest.skip(f"`xmodal {' '.join(case.command)}` does not exist yet")
    if case.xa:
        request.getfixturevalue("xa_env")
    if case.clf:
        if _command(["fit"]) is None:
            pytest.skip("`xmodal fit` does not exist yet (needed to save a classifier)")
        request.getfixturevalue("clf_env")
    monkeypatch.delenv("XMODAL_DEBUG", raising=False)
    if case.command == ["serve"]:
        import uvicorn

        def no_server(*a, **k):
            raise AssertionError("the server would have started on a bad model folder")

        monkeypatch.setattr(uvicorn, "run", no_server)
    with contextlib.ExitStack() as stack:
        if case.mount:
            stack.enter_context(_mount(case.mount, tmp_path / "mnt", case.mount_size))
        with _deadline(case.timeout, case.id):
            args = case.args(env, tmp_path)
            result = CliRunner().invoke(_app(), args)
            _assert_outcome(case, result, env, tmp_path)


def test_table_covers_every_command_and_fifty_rows():
    commands = {" ".join(c.command) for c in CASES}
    assert len(CASES) >= 50
    for cmd in ("features", "zeroshot", "fewshot", "bench", "xadapter bank", "xadapter train", "probe colors",
                "glue", "serve", "fit", "predict", "fill-mask"):
        assert cmd in commands, cmd
    assert len({c.id for c in CASES}) == len(CASES)


def test_debug_prints_the_traceback(env, tmp_path, monkeypatch):
    """The same bad input with --debug / XMODAL_DEBUG=1 shows the traceback (and still exits 3)."""
    args = feats("--data", "nope:/x")(env, tmp_path)
    res = CliRunner().invoke(_app(), ["--debug", *args])
    assert res.exit_code == 3 and "Traceback" in res.stderr
    monkeypatch.setenv("XMODAL_DEBUG", "1")
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 3 and "Traceback" in res.stderr


# ---------------------------------------------------------------------------------------------- hints, run
# A hint that suggests a fix is only useful if the fix works: each one below is taken from the error output and run.
def _hint(res) -> str:
    doc = json.loads(res.stdout)
    assert res.exit_code != 0 and doc["hint"], res.output
    return doc["hint"]


@pytest.mark.parametrize("command", ["fewshot", "bench", "fit"])
def test_suggested_shots_then_works(command, env, tmp_path):
    base = {"fewshot": few("--data", f"imagefolder:{env.folder}"),
            "bench": bench("--data", f"imagefolder:{env.folder}", "--seeds", "1", "--out", str(tmp_path / "out"),
                           "--methods", "zeroshot"),
            "fit": lambda e, t: ["fit", "--backbone", TB, "--data", f"imagefolder:{env.folder}", "--method",
                                 "tip-adapter", "--augment-views", "0", "--out", str(t / "m"), "--device", "cpu",
                                 "--cache-dir", str(t / "cache")]}[command](env, tmp_path)
    with _deadline(120, f"{command} --shots"):
        res = CliRunner().invoke(_app(), [*base, "--shots", "20", "--json"])
        assert res.exit_code == 2, res.output
        shots = re.search(r"--shots (\d+)", _hint(res)).group(1)
        again = CliRunner().invoke(_app(), [*base, "--shots", shots, "--json"])
    assert again.exit_code == 0, f"the suggested --shots {shots} failed too:\n{again.output}"


def test_no_validation_image_hint_then_works(env, tmp_path):
    """A class with too few images for support + validation: the suggested --shots leaves one for validation."""
    folder = _copy_folder(env, tmp_path)
    for extra in sorted((folder / "train" / "class1").iterdir())[3:]:
        extra.unlink()  # class1: 3 training images, the others 6
    base = few("--data", f"imagefolder:{folder}")(env, tmp_path)
    with _deadline(120, "fewshot --shots"):
        res = CliRunner().invoke(_app(), [*base, "--shots", "6", "--json"])
        hint = _hint(res)
        assert "class1" in hint, hint
        shots = re.search(r"--shots (\d+)", hint).group(1)
        again = CliRunner().invoke(_app(), [*base, "--shots", shots, "--json"])
    assert again.exit_code == 0, f"the suggested --shots {shots} failed too:\n{again.output}"


def test_serve_token_hint_then_works(clf_env, tmp_path, monkeypatch):
    """The hint for exposing the server prints a command that creates a token; running it makes serve start."""
    import uvicorn

    monkeypatch.delenv("XMODAL_API_TOKEN", raising=False)
    args = ["serve", str(clf_env.classifier), "--host", "0.0.0.0", "--port", "0", "--device", "cpu"]
    res = CliRunner().invoke(_app(), args)  # serve has no --json: the hint is on the error line
    assert res.exit_code == 2, res.output
    hint = res.stderr.partition(" — ")[2]
    command = re.search(r"(python -c '[^']*' > token\.txt)", hint)
    assert command, f"no runnable command in the hint: {hint}"
    bin_dir = str(Path(sys.executable).parent)  # `python` as the user would have it on PATH
    done = subprocess.run(["bash", "-c", command.group(1)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"})
    assert done.returncode == 0, f"the hint's command failed: {done.stderr}"
    assert "--token-file token.txt" in hint
    started: list[object] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: started.append(sockets))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(_app(), [*args, "--token-file", "token.txt"])
    assert res.exit_code == 0 and started, res.output


# ---------------------------------------------------------------------------------------------- XMODAL_CACHE
def test_every_cache_dir_option_reads_xmodal_cache():
    """Each command with --cache-dir takes its default from $XMODAL_CACHE (X-adapter commands aside)."""
    import typer.main

    def walk(cmd, path):
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])
        for p in getattr(cmd, "params", []):
            if "--cache-dir" in getattr(p, "opts", ()):
                yield " ".join(path), p

    found = {name: p for name, p in walk(typer.main.get_command(_app()), []) if not name.startswith("xadapter")}
    assert {"features", "zeroshot", "fewshot", "bench", "fit", "predict"} <= set(found), sorted(found)
    wrong = sorted(name for name, p in found.items() if p.envvar != "XMODAL_CACHE")
    assert not wrong, f"--cache-dir ignores XMODAL_CACHE in: {wrong}"


def test_fit_writes_its_cache_under_xmodal_cache(env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "elsewhere"
    res = CliRunner().invoke(_app(), ["fit", "--backbone", TB, "--data", f"imagefolder:{env.folder}", "--shots", "2",
                                      "--method", "tip-adapter", "--augment-views", "0", "--out", str(tmp_path / "m"),
                                      "--device", "cpu", "--json"], env={"XMODAL_CACHE": str(cache)})
    assert res.exit_code == 0, res.output
    assert any(cache.rglob("*.safetensors")), "no feature-cache entry under $XMODAL_CACHE"
    assert not (tmp_path / ".xmodal-cache").exists()
