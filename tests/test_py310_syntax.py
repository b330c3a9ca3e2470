"""Every module stays valid for Python 3.10, the oldest version pyproject.toml declares.

Only Python 3.11 runs here, so 3.10 is held by reading the code: each file must parse with the 3.10
grammar (no ``except*``, no 3.11+ syntax), and must not use standard-library names added after 3.10
unless the import sits in a ``try`` whose ``except ImportError`` provides a fallback.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("xmodal", "tests", "benchmarks", "scripts")

# module -> names added after 3.10 (None: the whole module is new)
NEWER_STDLIB: dict[str, set[str] | None] = {
    "tomllib": None,
    "wsgiref.types": None,
    "typing": {"Self", "LiteralString", "Never", "assert_never", "assert_type", "reveal_type", "Required",
               "NotRequired", "TypeVarTuple", "Unpack", "dataclass_transform", "override", "get_overloads",
               "clear_overloads", "TypeAliasType", "ReadOnly", "TypeIs", "NoDefault"},
    "enum": {"StrEnum", "ReprEnum", "verify", "EnumCheck", "FlagBoundary", "member", "nonmember", "global_enum",
             "property", "show_flag_values", "CONTINUOUS", "NAMED_FLAGS", "UNIQUE", "EnumType"},
    "datetime": {"UTC"},
    "asyncio": {"TaskGroup", "timeout", "timeout_at", "Timeout", "Runner", "Barrier", "BrokenBarrierError"},
    "hashlib": {"file_digest"},
    "contextlib": {"chdir"},
    "itertools": {"batched"},
    "math": {"exp2", "cbrt"},
    "operator": {"call"},
    "logging": {"getLevelNamesMapping"},
}
NEWER_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}


def _sources() -> list[Path]:
    files = []
    for folder in FOLDERS:
        files += sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def _guarded_lines(tree: ast.AST) -> set[int]:
    """Lines inside a ``try`` body that has an ``except ImportError`` / ``ModuleNotFoundError`` fallback."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = []
        for handler in node.handlers:
            types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            caught += [t.id for t in types if isinstance(t, ast.Name)]
        if {"ImportError", "ModuleNotFoundError"} & set(caught):
            for stmt in node.body:
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def newer_than_310(src: str, filename: str = "<src>") -> list[str]:
    """``line: what`` for every 3.11+ construct in ``src`` (grammar errors first, then standard-library names)."""
    try:
        tree = ast.parse(src, filename=filename, feature_version=(3, 10))
    except SyntaxError as exc:
        return [f"{exc.lineno}: not valid Python 3.10 syntax: {exc.msg}"]
    guarded = _guarded_lines(tree)
    modules: dict[str, str] = {}  # local name -> module it refers to
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
                if alias.name in NEWER_STDLIB and NEWER_STDLIB[alias.name] is None and line not in guarded:
                    found.append(f"{line}: module {alias.name} is Python 3.11+")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            new = NEWER_STDLIB.get(node.module, set())
            if line in guarded:
                continue
            if new is None:
                found.append(f"{line}: module {node.module} is Python 3.11+")
                continue
            for alias in node.names:
                if alias.name in new:
                    found.append(f"{line}: {node.module}.{alias.name} is Python 3.11+")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = modules.get(node.value.id)
            new = NEWER_STDLIB.get(module or "", set())
            if new and node.attr in new and line not in guarded:
                found.append(f"{line}: {module}.{node.attr} is Python 3.11+")
        elif isinstance(node, ast.Name) and node.id in NEWER_BUILTINS and line not in guarded:
            found.append(f"{line}: builtin {node.id} is Python 3.11+")
    return sorted(set(found), key=lambda s: int(s.split(":")[0]))


def test_every_module_is_python_310_code():
    files = _sources()
    assert len(files) > 50, "the source folders were not found"
    problems = []
    for path in files:
        rel = path.relative_to(ROOT)
        problems += [f"{rel}:{item}" for item in newer_than_310(path.read_text(encoding="utf-8"), str(rel))]
    assert not problems, "3.11+ constructs (the package supports Python 3.10):\n" + "\n".join(problems)


@pytest.mark.parametrize("src, expected", [
    ("try:\n    pass\nexcept* ValueError:\n    pass\n", "4: not valid Python 3.10 syntax"),
    ("import tomllib\n", "1: module tomllib"),
    ("x = 1\nfrom typing import Self\n", "2: typing.Self"),
    ("import datetime\nnow = datetime.datetime.now(datetime.UTC)\n", "2: datetime.UTC"),
    ("import enum as e\nclass C(e.StrEnum):\n    pass\n", "2: enum.StrEnum"),
    ("from enum import verify, UNIQUE\n", "1: enum.verify"),
    ("raise ExceptionGroup('x', [ValueError()])\n", "1: builtin ExceptionGroup"),
    ("import asyncio\nasync def f():\n    async with asyncio.TaskGroup():\n        pass\n", "3: asyncio.TaskGroup"),
])
def test_the_checker_finds_each_kind_of_311_construct(src, expected):
    found = newer_than_310(src)
    assert any(f.startswith(expected) for f in found), found


def test_the_checker_allows_guarded_imports_and_310_code():
    src = ("try:\n    import tomllib\nexcept ModuleNotFoundError:\n    import tomli as tomllib\n"
           "match 1:\n    case 1:\n        pass\n"
           "def f(x: int | None = None) -> list[int]:\n    return [*zip([1], [2], strict=True)][0]\n")
    assert newer_than_310(src) == []
