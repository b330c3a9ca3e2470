"""Progress of slow work: lines on a piped stderr (a bar on a terminal), nothing on stdout, nothing when off.

The CLI rows run the real commands with stderr captured (a pipe): extraction, each method's fit and every
trained method's epochs report there, while ``--json`` keeps stdout to exactly one JSON document.
"""
from __future__ import annotations

import io
import json
import re

import pytest
from typer.testing import CliRunner

from xmodal.progress import Progress, epoch_reporter


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_progress_prints_one_line_per_step():
    out = io.StringIO()
    with Progress(3, "fit demo", unit="epoch", stream=out, min_interval=0) as bar:
        for _ in range(3):
            bar.update(1, note="x")
    assert out.getvalue().splitlines() == [f"fit demo: {i}/3 epoch · x" for i in (1, 2, 3)]


def test_fast_loops_are_throttled_but_the_last_step_always_shows():
    out = io.StringIO()
    with Progress(1000, "embed", unit="img", stream=out, min_interval=3600) as bar:
        for _ in range(1000):
            bar.update(1)
    assert out.getvalue().splitlines() == ["embed: 1/1000 img", "embed: 1000/1000 img"]


def test_disabled_progress_writes_nothing_and_a_terminal_gets_a_bar():
    out = io.StringIO()
    with Progress(5, "quiet", stream=out, enabled=False) as bar:
        bar.update(5)
        bar.write("note")
    assert out.getvalue() == ""
    tty = _Tty()
    with Progress(2, "shown", stream=tty) as bar:
        bar.update(2)
    assert "shown" in tty.getvalue() and "\r" in tty.getvalue()  # tqdm redraws in place


def test_epoch_reporter_restarts_for_each_fit():
    out = io.StringIO()
    import xmodal.progress as p

    hook, close = epoch_reporter("fit m")
    original = p.Progress.__init__

    def to_buffer(self, *a, **k):
        original(self, *a, **{**k, "stream": out, "min_interval": 0})

    p.Progress.__init__ = to_buffer
    try:
        for _ in range(2):  # two folds of the same method
            for e in (1, 2):
                hook(e, 2)
        close()
    finally:
        p.Progress.__init__ = original
    assert out.getvalue().splitlines() == ["fit m: 1/2 epoch", "fit m: 2/2 epoch"] * 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from xmodal.bench.testing import make_tiny_imagefolder

    return make_tiny_imagefolder(tmp_path_factory.mktemp("progress") / "imgs", classes=3, train=6, test=3, size=16)


def _run(args):
    from xmodal.cli import app

    return CliRunner().invoke(app, args)


def test_fewshot_reports_extraction_each_method_and_epochs_on_stderr(folder, tmp_path):
    res = _run(["fewshot", "--backbone", "tiny:clip", "--data", f"imagefolder:{folder}", "--shots", "2",
                "--methods", "zeroshot,tip-adapter-f", "--augment-views", "1", "--device", "cpu",
                "--cache-dir", str(tmp_path / "c"), "--json"])
    assert res.exit_code == 0, res.output
    json.loads(res.stdout)  # stdout: exactly one JSON document
    err = res.stderr
    assert re.search(r"^view 1/1: \d+/\d+ img$", err, re.M), err
    assert re.search(r"^2-shot seed 1: 2/2 method · tip-adapter-f", err, re.M), err
    epochs = re.findall(r"^fit tip-adapter-f: (\d+)/(\d+) epoch$", err, re.M)
    assert epochs and epochs[-1][0] == epochs[-1][1], err  # the last epoch always shows


def test_fit_reports_its_epochs_on_stderr(folder, tmp_path):
    res = _run(["fit", "--backbone", "tiny:clip", "--data", f"imagefolder:{folder}", "--shots", "2", "--method",
                "clip-adapter", "--param", "epochs=3", "--augment-views", "0", "--device", "cpu", "--cache-dir",
                str(tmp_path / "c"), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert re.search(r"^fit clip-adapter: 3/3 epoch$", res.stderr, re.M), res.stderr
    assert " epoch\n" not in res.stdout  # the report on stdout, progress on stderr only
