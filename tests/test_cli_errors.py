"""The single CLI error path: exit codes, one line / one JSON document, traceback only with --debug."""
from __future__ import annotations

import errno
import json
import re

import pytest
from typer.testing import CliRunner

from xmodal.cli import app
from xmodal.cli_errors import classify
from xmodal.errors import (EXIT_ENVIRONMENT, EXIT_INPUT, EXIT_INTERNAL, EXIT_USAGE, BackboneUnavailableError,
                           CorruptImageError, DatasetError, ResourceError, UsageError)

runner = CliRunner()


def _command_options(path: list[str]) -> set[str]:
    """Every --option (and its secondary names) the command at ``path`` accepts."""
    import typer.main

    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


def assert_clean_error(result, command: list[str], code: int, as_json: bool) -> dict | str:
    """The contract every failing command keeps: exit code, no traceback, suggested options exist."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    if as_json:
        doc = json.loads(result.stdout)  # exactly one JSON document: json.loads fails on trailing data
        assert set(doc) >= {"error", "type", "hint"} and doc["error"]
        text = doc["hint"]
    else:
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, result.stderr
        assert result.stdout == ""
        text = lines[0].rpartition(" — ")[2]  # the hint: what the message suggests doing
    suggested = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    missing = suggested - _command_options(command) - {"--help", "--debug"}
    assert not missing, f"{' '.join(command)} suggests options it does not have: {missing}"
    return doc if as_json else lines[0]


@pytest.mark.parametrize("exc, code", [
    (DatasetError("x"), EXIT_INPUT),
    (CorruptImageError("x"), EXIT_INPUT),
    (UsageError("x"), EXIT_USAGE),
    (ResourceError("x"), EXIT_ENVIRONMENT),
    (BackboneUnavailableError("x"), EXIT_ENVIRONMENT),
    (OSError(errno.ENOSPC, "No space left on device", "/out/results.jsonl"), EXIT_ENVIRONMENT),
    (OSError(errno.EROFS, "Read-only file system", "/ro"), EXIT_ENVIRONMENT),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), EXIT_ENVIRONMENT),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/nope"), EXIT_INPUT),
    (OSError(errno.ELOOP, "Too many levels of symbolic links", "/loop"), EXIT_INPUT),
    (RuntimeError("Found no NVIDIA driver on your system"), EXIT_ENVIRONMENT),
    (AssertionError("Torch not compiled with CUDA enabled"), EXIT_ENVIRONMENT),
    (RuntimeError("CUDA out of memory"), EXIT_ENVIRONMENT),
    (MemoryError(), EXIT_ENVIRONMENT),
    (ValueError("bad value"), EXIT_INPUT),
    (KeyError("label"), EXIT_INPUT),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), EXIT_INPUT),
    (ZeroDivisionError("oops"), EXIT_INTERNAL),
])
def test_classify_maps_each_kind_to_its_exit_code(exc, code):
    rep = classify(exc)
    assert rep.exit_code == code
    assert rep.message and "\n" not in rep.as_line()
    if code != EXIT_INTERNAL:
        assert rep.hint, f"{type(exc).__name__} needs a hint"


def test_disk_full_names_the_file_and_says_the_rerun_resumes():
    rep = classify(OSError(errno.ENOSPC, "No space left on device", "/out/results.jsonl"))
    assert "/out/results.jsonl" in rep.message and "resumes" in rep.hint


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize("command, extra, code", [
    (["fewshot"], ["--data", "bogus:spec"], EXIT_INPUT),
    (["bench"], ["--data", "bogus:spec", "--out", "OUT"], EXIT_INPUT),
    (["features"], ["--data", "imagefolder:/nonexistent/folder"], EXIT_INPUT),
    (["zeroshot"], ["--data", "digits", "--backbone", "nope:x"], EXIT_INPUT),
    (["features"], ["--data", "digits", "--device", "cuda:7"], EXIT_ENVIRONMENT),
    (["fewshot"], ["--data", "digits", "--device", "tpu"], EXIT_USAGE),
    (["fewshot"], ["--data", "digits", "--methods", "nosuchmethod"], EXIT_USAGE),
    (["bench"], ["--data", "digits", "--out", "OUT", "--shots", "a,b"], EXIT_USAGE),
    (["fewshot"], ["--data", "digits", "--no-such-option"], EXIT_USAGE),
    (["xadapter", "bank"], ["--data", "bogus", "--out", "OUT"], EXIT_INPUT),
])
def test_commands_fail_cleanly(command, extra, code, as_json, tmp_path):
    args = command + ["--backbone", "tiny:clip"] * ("--backbone" not in extra) + extra
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args] + ["--cache-dir", str(tmp_path / "c")]
    result = runner.invoke(app, args + (["--json"] if as_json else []))
    assert_clean_error(result, command, code, as_json)


def test_missing_required_option_is_a_usage_error_with_json():
    result = runner.invoke(app, ["fewshot", "--json"])
    doc = assert_clean_error(result, ["fewshot"], EXIT_USAGE, True)
    assert "--data" in doc["error"]


def test_unknown_command_is_a_usage_error():
    result = runner.invoke(app, ["no-such-command"])
    assert result.exit_code == EXIT_USAGE and "No such command" in result.stderr and "Traceback" not in result.stderr


def test_output_folder_under_a_file_is_an_input_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["bench", "--backbone", "tiny:clip", "--data", "digits", "--out", str(blocker / "run"),
                                 "--shots", "1", "--seeds", "1", "--methods", "zeroshot", "--json",
                                 "--cache-dir", str(tmp_path / "c")])
    doc = assert_clean_error(result, ["bench"], EXIT_INPUT, True)
    assert doc["type"] == "NotADirectoryError" and "a_file" in doc["error"]


def test_debug_flag_and_env_print_the_traceback(monkeypatch):
    args = ["fewshot", "--data", "bogus:spec", "--backbone", "tiny:clip"]
    quiet = runner.invoke(app, args)
    assert "Traceback" not in quiet.stderr
    loud = runner.invoke(app, args + ["--debug"])
    assert loud.exit_code == EXIT_INPUT and "Traceback" in loud.stderr and "error:" in loud.stderr
    monkeypatch.setenv("XMODAL_DEBUG", "1")
    env = runner.invoke(app, args)
    assert env.exit_code == EXIT_INPUT and "Traceback" in env.stderr


def test_internal_errors_exit_1_and_ask_for_a_report(monkeypatch):
    import xmodal.data as data

    def broken(spec):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(data, "load_dataset", broken)
    result = runner.invoke(app, ["zeroshot", "--data", "digits", "--backbone", "tiny:clip", "--json"])
    doc = assert_clean_error(result, ["zeroshot"], EXIT_INTERNAL, True)
    assert doc["error"].startswith("internal error") and "--debug" in doc["hint"]


def test_success_still_exits_zero_and_prints_one_document():
    result = runner.invoke(app, ["backbones", "--json"])
    assert result.exit_code == 0 and "tiny:clip" in json.loads(result.stdout)


def test_cache_dir_env_is_honoured_by_the_cli(monkeypatch, tmp_path):
    cache = tmp_path / "env-cache"
    monkeypatch.setenv("XMODAL_CACHE", str(cache))
    result = runner.invoke(app, ["features", "--backbone", "tiny:clip", "--data", "digits", "--split", "test",
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.stdout
    assert json.loads(result.stdout)["cache_dir"] == str(cache) and any(cache.rglob("*"))


def test_hints_only_suggest_options_the_failing_command_has():
    exc = CorruptImageError("cannot decode image /x.jpg")
    assert "--skip-corrupt" in classify(exc).hint
    assert "--skip-corrupt" not in classify(exc, options={"--data", "--out"}).hint
    assert "--skip-corrupt" in classify(exc, options={"--data", "--skip-corrupt"}).hint
    other = UsageError("no saved classifier", hint="create one with `xmodal fit ... --out DIR` and pass that DIR")
    assert classify(other, options={"--port"}).hint == other.hint  # another command's options, quoted, stay
    ro = OSError(errno.EROFS, "Read-only file system", "/ro/cache")
    hint = classify(ro, options={"--cache-dir"}).hint
    assert "--cache-dir" in hint and "--out" not in hint


def test_foreign_write_errors_on_a_full_disk_and_damaged_safetensors_are_classified():
    class SafetensorError(Exception):  # the library's own class name, as safetensors raises it
        pass

    full = classify(SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                    "message: \"No space left on device\" })"))
    assert full.exit_code == EXIT_ENVIRONMENT and "resumes" in full.hint
    damaged = classify(SafetensorError("Error while deserializing header: header too small"))
    assert damaged.exit_code == EXIT_INPUT and "re-create" in damaged.hint
    in_the_way = classify(FileExistsError(errno.EEXIST, "File exists", "/out/model"))
    assert in_the_way.exit_code == EXIT_INPUT and "/out/model" in in_the_way.message


def test_warnings_print_as_one_line(tmp_path):
    import warnings as w

    import xmodal.data as data

    real = data.load_dataset

    def warn_then_load(spec):
        w.warn("first line\nsecond line", UserWarning)
        return real(spec)

    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load_dataset", warn_then_load)
        result = runner.invoke(app, ["features", "--backbone", "tiny:clip", "--data", "digits", "--device", "cpu",
                                     "--cache-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0
    assert "warning: first line second line" in result.stderr.splitlines()
