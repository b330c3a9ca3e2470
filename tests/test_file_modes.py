"""Files xmodal writes get the user's umask mode, like any file the user creates (not owner-only).

A saved classifier, its feature-cache entries and every other atomic write are checked under umask 022
(shareable: 0644 files, 0755 folders) and 077 (private: 0600 / 0700).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from xmodal.cache import atomic_path, atomic_write_text
from xmodal.classifier.artefact import write_artefact
from xmodal.filemode import current_umask


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _check_tree(root: Path, mask: int) -> list[Path]:
    seen = []
    for p in [root, *root.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert _mode(p) == want, f"{p}: {oct(_mode(p))}, expected {oct(want)} under umask {oct(mask)}"
        seen.append(p)
    return seen


def test_current_umask_reads_the_process_umask(umask):
    assert current_umask() == umask


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    atomic_write_text(tmp_path / "a.json", "{}")
    from safetensors.torch import save_file  # safetensors itself creates 0600 files

    with atomic_path(tmp_path / "t.safetensors") as tmp:
        save_file({"x": torch.zeros(3)}, str(tmp))
    assert len(_check_tree(tmp_path / "a.json", umask) + _check_tree(tmp_path / "t.safetensors", umask)) == 2


def test_saved_classifier_folder_follows_the_umask(tmp_path, umask):
    out = write_artefact(tmp_path / "models" / "m", {"w": torch.ones(2, 2)}, {"format": "x"})
    files = _check_tree(out, umask)
    assert {p.name for p in files} >= {"m", "adapter.safetensors", "xmodal_classifier.json"}


def test_fitted_classifier_and_feature_cache_follow_the_umask(tmp_path, umask):
    from xmodal.serve.testing import fit_tiny_classifier

    _, model_dir, _ = fit_tiny_classifier(tmp_path, shots=2, classes=2)
    _check_tree(model_dir, umask)
    cache_files = _check_tree(tmp_path / "cache", umask)
    assert any(p.suffix == ".safetensors" for p in cache_files)  # feature-cache entries were written
