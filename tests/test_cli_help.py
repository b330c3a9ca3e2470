"""``xmodal --help`` and every ``xmodal <command> --help`` print without importing torch (help must be instant).

Each check runs in a fresh interpreter: import the CLI app, print every command's help through CliRunner, and
report the first help after which ``torch`` (or torchvision) is in ``sys.modules``. Timing is not asserted (a
shared machine's load would make it flaky); the import of torch is what takes seconds.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "transformers", "open_clip", "faiss", "onnxruntime", "matplotlib")

_PROBE = r"""
import json, sys, types
if {stub_xadapter}:  # the X-adapter commands stand aside (their package is checked separately)
    stub = types.ModuleType("xmodal.xadapter.cli")
    stub.register = lambda app: None
    sys.modules["xmodal.xadapter.cli"] = stub
heavy = {heavy!r}
loaded = lambda: [m for m in heavy if m in sys.modules]
from typer.main import get_command
from typer.testing import CliRunner
from xmodal.cli import app
report = {{"after_import": loaded(), "commands": [], "first_heavy": None}}

def paths(cmd, prefix):
    yield prefix
    for name, sub in sorted(getattr(cmd, "commands", {{}}).items()):
        yield from paths(sub, prefix + [name])

for path in paths(get_command(app), []):
    res = CliRunner().invoke(app, path + ["--help"])
    report["commands"].append([" ".join(path), res.exit_code])
    if loaded() and report["first_heavy"] is None:
        report["first_heavy"] = [" ".join(path) or "(top level)", loaded()]
print(json.dumps(report))
"""


def _probe(stub_xadapter: bool) -> dict:
    code = _PROBE.format(stub_xadapter=stub_xadapter, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_light(report: dict, expect: set[str]) -> None:
    assert report["after_import"] == [], f"importing xmodal.cli loads {report['after_import']}"
    names = {name for name, _ in report["commands"]}
    assert expect <= names, sorted(names)
    assert all(code == 0 for _, code in report["commands"]), report["commands"]
    assert report["first_heavy"] is None, f"`xmodal {report['first_heavy'][0]} --help` loads {report['first_heavy'][1]}"


def test_help_of_every_command_imports_no_torch():
    _assert_light(_probe(stub_xadapter=True), {"", "features", "zeroshot", "fewshot", "bench", "fit", "predict",
                                               "serve", "backbones", "datasets"})


def test_help_including_xadapter_commands_imports_no_torch():
    _assert_light(_probe(stub_xadapter=False), {"", "xadapter", "xadapter train", "probe", "glue", "fill-mask"})


def test_every_command_a_help_text_names_exists_and_methods_lists_the_method_names():
    """A help text that sends the user to `xmodal X` must name a command that exists (and answers the question)."""
    import re

    from typer.main import get_command
    from typer.testing import CliRunner

    from xmodal.cli import app
    from xmodal.fewshot import available_methods

    root = get_command(app)

    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    named = set()
    for path, cmd in walk(root, []):
        texts = [cmd.help or ""] + [getattr(p, "help", "") or "" for p in cmd.params]
        for text in texts:
            named.update(re.findall(r"`xmodal ([a-z][\w-]*)", text))
    assert "methods" in named  # fit --method and fewshot/bench --methods point there
    missing = sorted(n for n in named if n not in root.commands)
    assert not missing, f"help texts name commands that do not exist: {missing}"
    listing = CliRunner().invoke(app, ["methods"])
    assert listing.exit_code == 0
    assert {line.split()[0] for line in listing.stdout.splitlines() if line.strip()} == set(available_methods())
