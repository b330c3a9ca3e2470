import json
import os

import pytest

from xmodal.bench.store import ResultStore, row_key


def _row(method="zeroshot", shots=1, seed=1, top1=50.0, **extra):
    return {"method": method, "backbone": "tiny:clip", "dataset": "d", "shots": shots, "seed": seed,
            "top1": top1, **extra}


def test_append_and_reopen(tmp_path):
    path = tmp_path / "out" / "results.jsonl"
    store = ResultStore(path)
    assert len(store) == 0 and not path.exists()
    assert store.append(_row(seed=1))
    assert store.append(_row(seed=2))
    assert not store.append(_row(seed=1, top1=99.0))  # same key: ignored, first row kept
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x) for x in lines)
    again = ResultStore(path)
    assert [r["seed"] for r in again.rows] == [1, 2]
    assert again.get(("zeroshot", "tiny:clip", "d", 1, 1, "", ""))["top1"] == 50.0
    assert again.has(row_key(_row(seed=2))) and not again.has(row_key(_row(seed=3)))
    assert again.repaired is None


def test_each_append_is_fsynced(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    store = ResultStore(tmp_path / "r.jsonl")
    store.append(_row(seed=1))
    store.append(_row(seed=2))
    assert len(calls) == 2


def test_non_json_values_are_stored(tmp_path):
    import torch

    store = ResultStore(tmp_path / "r.jsonl")
    store.append(_row(hparams={"alpha": torch.tensor(0.5), "grid": (1, 2)}))
    assert ResultStore(tmp_path / "r.jsonl").rows[0]["hparams"] == {"alpha": 0.5, "grid": [1, 2]}
    assert store.rows[0]["hparams"] == {"alpha": 0.5, "grid": [1, 2]}  # memory == disk


def test_torn_last_line_is_cut_off(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.append(_row(seed=1))
    store.append(_row(seed=2))
    good = path.read_bytes()
    with open(path, "ab") as fh:  # a writer killed mid-line
        fh.write(b'{"method": "zeroshot", "backbone": "tiny:clip", "data')
    with pytest.warns(UserWarning, match="torn"):
        repaired = ResultStore(path)
    assert repaired.repaired and len(repaired) == 2
    assert path.read_bytes() == good  # the file is valid JSONL again
    repaired.append(_row(seed=3))
    assert [json.loads(x)["seed"] for x in path.read_text().splitlines()] == [1, 2, 3]


def test_complete_last_row_without_newline_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_row(seed=1)) + "\n" + json.dumps(_row(seed=2)))
    store = ResultStore(path)
    assert len(store) == 2 and "newline" in store.repaired
    store.append(_row(seed=3))
    assert len(ResultStore(path)) == 3


def test_garbage_line_in_the_middle_is_skipped(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_row(seed=1)) + "\nnot json\n" + json.dumps(_row(seed=2)) + "\n")
    with pytest.warns(UserWarning, match="unreadable"):
        store = ResultStore(path)
    assert [r["seed"] for r in store.rows] == [1, 2] and store.skipped_lines == [2]


def test_duplicate_keys_on_disk_keep_the_first(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_row(top1=1.0)) + "\n" + json.dumps(_row(top1=2.0)) + "\n")
    assert [r["top1"] for r in ResultStore(path).rows] == [1.0]


def test_row_without_key_fields_is_refused(tmp_path):
    with pytest.raises(KeyError, match="seed"):
        ResultStore(tmp_path / "r.jsonl").append({"method": "m", "backbone": "b", "dataset": "d", "shots": 1})


def test_two_writers_never_duplicate_a_row(tmp_path):
    path = tmp_path / "r.jsonl"
    a, b = ResultStore(path), ResultStore(path)  # e.g. two sweeps sharing one --out folder
    assert a.append(_row(seed=1))
    assert not b.append(_row(seed=1))  # b catches up under the lock and sees a's row
    assert b.append(_row(seed=2)) and a.append(_row(seed=3))
    assert b.has(row_key(_row(seed=1))) and a.has(row_key(_row(seed=2)))
    assert [json.loads(x)["seed"] for x in path.read_text().splitlines()] == [1, 2, 3]


def test_append_after_another_writer_was_killed_mid_line(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.append(_row(seed=1))
    with open(path, "ab") as fh:  # another process died while writing
        fh.write(b'{"method": "x", "bac')
    with pytest.warns(UserWarning, match="torn"):
        store.append(_row(seed=2))
    assert [json.loads(x)["seed"] for x in path.read_text().splitlines()] == [1, 2]


def test_read_only_file_with_torn_tail(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_row(seed=1)) + "\n" + '{"method": "zero')
    before = path.read_bytes()

    def no_write(self, mode):
        raise PermissionError(f"read-only: {mode}")

    monkeypatch.setattr(ResultStore, "_locked", no_write)
    store = ResultStore(path)
    assert len(store) == 1 and store.repaired is None and path.read_bytes() == before


def test_identity_is_part_of_the_key(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    assert store.append(_row(identity="aaa", top1=1.0))
    assert store.append(_row(identity="bbb", top1=2.0))  # same cell, other data/options: a separate row
    assert not store.append(_row(identity="aaa", top1=3.0))
    again = ResultStore(tmp_path / "r.jsonl")
    assert again.get(("zeroshot", "tiny:clip", "d", 1, 1, "aaa", ""))["top1"] == 1.0
    assert again.get(("zeroshot", "tiny:clip", "d", 1, 1, "bbb", ""))["top1"] == 2.0
    assert again.get(("zeroshot", "tiny:clip", "d", 1, 1, "", "")) is None  # a row without identity matches nothing else
    # the method-settings digest is part of the key too: other settings, another row
    assert store.append(_row(identity="aaa", method_config="m2", top1=4.0))
    assert ResultStore(tmp_path / "r.jsonl").get(("zeroshot", "tiny:clip", "d", 1, 1, "aaa", "m2"))["top1"] == 4.0


def test_failed_write_leaves_no_partial_line(tmp_path, monkeypatch):
    """Disk full mid-line: the half-written row is cut off at once, the earlier rows are intact."""
    import errno

    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.append(_row(seed=1))
    good = path.read_bytes()

    class HalfThenFull:
        def __init__(self, fh):
            self.fh, self.calls = fh, 0

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def write(self, data):
            self.calls += 1
            if self.calls == 1:
                return self.fh.write(bytes(data[:10]))
            raise OSError(errno.ENOSPC, "No space left on device")

    real = ResultStore._locked

    class Wrapped:
        def __init__(self, inner):
            self.inner = inner

        def __enter__(self):
            return HalfThenFull(self.inner.__enter__())

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(ResultStore, "_locked", lambda self, mode: Wrapped(real(self, mode)))
    with pytest.raises(OSError, match="No space"):
        store.append(_row(seed=2))
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert [r["seed"] for r in ResultStore(path).rows] == [1]


def test_write_returning_zero_bytes_does_not_spin(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    real = ResultStore._locked

    class Zero:
        def __init__(self, inner):
            self.inner = inner

        def __enter__(self):
            fh = self.inner.__enter__()

            class F:
                def __getattr__(self, name):
                    return getattr(fh, name)

                def write(self, data):
                    return 0
            return F()

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(ResultStore, "_locked", lambda self, mode: Zero(real(self, mode)))
    with pytest.raises(OSError, match="disk full"):
        store.append(_row(seed=1))
