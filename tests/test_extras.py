"""Optional extras: a missing optional dependency is one clear error naming the pip extra to install."""
from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xmodal.cli import app
from xmodal.cli_errors import classify, report
from xmodal.errors import EXIT_ENVIRONMENT, EXIT_INPUT
from xmodal.extras import EXTRA_MODULES, MissingExtraError, extra_of, require_extra

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomllib is 3.11+, tomli is its backport
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import <module>`` fail as if the distribution were not installed."""
    for name in list(sys.modules):
        if name.split(".")[0] in modules:
            monkeypatch.delitem(sys.modules, name)
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("hidden", [("fastapi",), ("uvicorn",), ("starlette",), ("pydantic",),
                                    ("python_multipart", "multipart")])
def test_serve_without_the_serve_extra_names_it(monkeypatch, tmp_path, hidden):
    _hide(monkeypatch, *hidden)
    result = runner.invoke(app, ["serve", str(tmp_path / "model")])
    assert result.exit_code == EXIT_ENVIRONMENT, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert f"needs the optional dependency '{hidden[0]}'" in result.stderr
    assert "install xmodal[serve]: pip install 'xmodal[serve]'" in result.stderr


def test_the_missing_extra_is_one_json_document_with_json(capsys):
    code = report(ModuleNotFoundError("No module named 'accelerate'", name="accelerate"), as_json=True,
                  debug=False)
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert code == EXIT_ENVIRONMENT and out.err == ""
    assert doc["type"] == "MissingExtraError" and doc["exit_code"] == EXIT_ENVIRONMENT
    assert "'accelerate'" in doc["error"] and "xmodal[xadapter]" in doc["hint"]


def test_serve_with_the_extra_gets_past_the_check(tmp_path):
    """Control: with every serve module present the same command fails later, on the missing model folder."""
    result = runner.invoke(app, ["serve", str(tmp_path / "model")])
    assert result.exit_code == EXIT_INPUT, result.stderr
    assert "no saved classifier folder" in result.stderr


def test_library_access_to_the_app_names_the_extra(monkeypatch):
    _hide(monkeypatch, "fastapi")
    monkeypatch.delitem(sys.modules, "xmodal.serve.app", raising=False)
    import xmodal.serve as serve

    with pytest.raises(MissingExtraError, match="fastapi") as info:
        serve.create_app  # noqa: B018 - the attribute access is what imports the app
    assert info.value.extra == "serve" and "xmodal[serve]" in info.value.hint


def test_xadapter_bank_without_faiss_names_the_extra(monkeypatch, tmp_path):
    """The bank command is always listed; run without faiss it says which extra brings it."""
    _hide(monkeypatch, "faiss")
    monkeypatch.delitem(sys.modules, "xmodal.xadapter.retrieval.bank", raising=False)
    result = runner.invoke(app, ["xadapter", "bank", "--backbone", "tiny:clip", "--data", f"imagefolder:{tmp_path}",
                                 "--out", str(tmp_path / "bank")])
    assert result.exit_code == EXIT_ENVIRONMENT, (result.stdout, result.stderr)
    assert "'faiss'" in result.stderr and "pip install 'xmodal[xadapter]'" in result.stderr


@pytest.mark.parametrize("module, extra", [("faiss", "xadapter"), ("accelerate", "xadapter"), ("accelerate.utils", "xadapter"),
                                           ("uvicorn", "serve"), ("multipart", "serve")])
def test_any_command_hitting_a_missing_optional_module_names_its_extra(module, extra):
    rep = classify(ModuleNotFoundError(f"No module named {module!r}", name=module))
    assert rep.exit_code == EXIT_ENVIRONMENT and rep.type == "MissingExtraError"
    assert f"pip install 'xmodal[{extra}]'" in rep.hint and module.split(".")[0] in rep.message


def test_a_missing_core_module_is_not_blamed_on_an_extra():
    rep = classify(ModuleNotFoundError("No module named 'xmodal_nonexistent'", name="xmodal_nonexistent"))
    assert rep.type != "MissingExtraError" and "xmodal[" not in rep.hint
    assert extra_of("torch") is None


def test_require_extra_accepts_either_name_of_python_multipart(monkeypatch):
    _hide(monkeypatch, "multipart")
    require_extra("serve", "x", modules=[("python_multipart", "multipart")])  # the new name is enough
    _hide(monkeypatch, "python_multipart")
    with pytest.raises(MissingExtraError, match="python_multipart"):
        require_extra("serve", "x", modules=[("python_multipart", "multipart")])


def _declared_extras() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    norm = lambda s: re.split(r"[\s<>=!~;\[]", s, maxsplit=1)[0].lower().replace("_", "-")  # noqa: E731
    return {extra: {norm(req) for req in reqs} for extra, reqs in project["optional-dependencies"].items()}


def test_every_mapped_module_comes_from_a_distribution_of_its_extra():
    """``EXTRA_MODULES`` and pyproject's extras cannot drift apart: each module is shipped by a listed distribution."""
    declared = _declared_extras()
    shipped_by = metadata.packages_distributions()
    for extra, modules in EXTRA_MODULES.items():
        assert extra in declared, f"extra {extra!r} is not declared in pyproject.toml"
        for entry in modules:
            names = entry if isinstance(entry, tuple) else (entry,)
            dists = {d.lower().replace("_", "-") for n in names for d in shipped_by.get(n, [])}
            assert dists & declared[extra], f"module {names} (from {dists or 'nothing installed'}) is not in [{extra}]"
