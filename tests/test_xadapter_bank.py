"""Retrieval bank for the X-adapter: exact/IVF search, storage, atomic writes, fingerprint checks, CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from PIL import Image
from typer.testing import CliRunner

from xmodal.backbones import load_backbone
from xmodal.errors import CacheMismatchError, ShapeError
from xmodal.xadapter import bank as bank_mod
from xmodal.xadapter.bank import (BankNotFoundError, RetrievalBank, RetrievalBankError, default_nlist, exact_topk,
                                  recall_at_k)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/<split>/<class>/*.png with random 32 px images: 3 classes x 8 train, x 2 test."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 8), ("test", 2)):
        for cls in ("cat", "dog", "ship"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny:clip")


# ----- index level ----------------------------------------------------------------------------
def test_recall_at_k_counts_overlap():
    exact = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    approx = torch.tensor([[3, 2, 9, 0], [4, 5, 6, 7]])
    assert recall_at_k(approx, exact) == pytest.approx((3 / 4 + 1) / 2)
    assert recall_at_k(exact, exact) == 1.0
    with pytest.raises(ShapeError):
        recall_at_k(approx[:1], exact)


def test_exact_index_matches_bruteforce_topk(tmp_path):
    pool, queries = unit(300, 32, 0), torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    bank = RetrievalBank.from_embeddings(pool, tmp_path / "b", index="exact")
    scores, idx = bank.search(queries, 5)  # queries are not normalised: the bank normalises them
    ref_scores, ref_idx = (F.normalize(queries, dim=-1) @ pool.T).topk(5, dim=1)
    assert idx.dtype == torch.long and idx.shape == (40, 5)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(scores, ref_scores, atol=1e-5)
    assert torch.allclose(bank.embeddings(idx), pool[idx], atol=1e-6)
    assert bank.meta["index"] == "exact" and bank.meta["nlist"] is None and len(bank) == 300
    with pytest.raises(ValueError, match="k must be"):
        bank.search(queries, 301)
    with pytest.raises(ShapeError):
        bank.search(queries[:, :16], 5)


def test_ivf_recall_vs_exact(tmp_path):
    # Uniform random unit vectors have no cluster structure: the hardest case for IVF.
    # Measured: nlist 12 (default for 500), nprobe 8 -> recall@4 = 0.938 on 200 random queries.
    pool, queries = unit(500, 32, 2), unit(200, 32, 3)
    bank = RetrievalBank.from_embeddings(pool, tmp_path / "b", index="ivf", nprobe=8)
    assert bank.meta["nlist"] == default_nlist(500) == 12
    _, exact = exact_topk(pool, queries, 4)
    _, approx = bank.search(queries, 4)
    assert recall_at_k(approx, exact) >= 0.85
    bank.nprobe = 1
    low = recall_at_k(bank.search(queries, 4)[1], exact)
    assert low < recall_at_k(approx, exact)
    bank.nprobe = bank.meta["nlist"]  # probing every list is exact search
    assert torch.equal(bank.search(queries, 4)[1], exact)
    assert RetrievalBank.load(tmp_path / "b").nprobe == 8  # stored nprobe comes back


def test_ivf_short_lists_fall_back_to_exact(tmp_path):
    pool = unit(100, 16, 4)
    with pytest.warns(UserWarning, match="39 training points"):
        bank = RetrievalBank.from_embeddings(pool, tmp_path / "b", index="ivf", nlist=50, nprobe=1)
    scores, idx = bank.search(unit(20, 16, 5), 10)
    assert (idx >= 0).all() and (idx < 100).all()
    assert (scores[:, :-1] >= scores[:, 1:] - 1e-6).all()
    with pytest.raises(ValueError, match="nlist"):
        RetrievalBank.from_embeddings(pool, tmp_path / "c", index="ivf", nlist=101)


def test_save_load_round_trip_with_tokens(tmp_path):
    pool = unit(60, 8, 6)
    tokens = torch.randn(60, 5, 12, generator=torch.Generator().manual_seed(7))
    ids = [f"img{i}" for i in range(60)]
    built = RetrievalBank.from_embeddings(pool, tmp_path / "b", ids=ids, tokens=tokens, index="ivf", nlist=1,
                                          meta={"backbone": "x", "fingerprint": "fp", "dataset": "d", "split": "train"})
    loaded = RetrievalBank.load(tmp_path / "b")
    assert loaded.ids == ids and loaded.meta == built.meta
    assert {"backbone", "fingerprint", "dim", "token_dim", "size", "dataset", "split", "index", "created"} <= set(loaded.meta)
    assert (loaded.dim, loaded.token_dim, loaded.num_tokens, len(loaded)) == (8, 12, 5, 60)
    q = unit(7, 8, 8)
    s1, i1 = built.search(q, 3)
    s2, i2 = loaded.search(q, 3)
    assert torch.equal(i1, i2) and torch.allclose(s1, s2)
    tok = loaded.tokens(i2)
    assert tok.shape == (7, 3, 5, 12) and tok.dtype == torch.float32
    assert torch.equal(tok, tokens[i2].half().float())
    assert loaded.embeddings(i2).shape == (7, 3, 8)
    with pytest.raises(IndexError):
        loaded.embeddings(torch.tensor([[60]]))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["bank.json", "embeddings.safetensors", "index.faiss"]


def test_bank_without_tokens_says_how_to_fix(tmp_path):
    bank = RetrievalBank.from_embeddings(unit(10, 4, 9), tmp_path / "b")
    with pytest.raises(RetrievalBankError, match="--no-tokens"):
        bank.tokens(torch.tensor([[0, 1]]))


def test_missing_bank_errors_say_how_to_build(tmp_path):
    with pytest.raises(BankNotFoundError, match="xmodal xadapter bank"):
        RetrievalBank.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankNotFoundError, match="bank.json is missing"):
        RetrievalBank.load(tmp_path / "empty")
    RetrievalBank.from_embeddings(unit(10, 4, 9), tmp_path / "b")
    (tmp_path / "b" / "index.faiss").unlink()
    with pytest.raises(BankNotFoundError, match="index.faiss is missing"):
        RetrievalBank.load(tmp_path / "b")


# ----- atomic writes --------------------------------------------------------------------------
def test_crash_during_index_write_keeps_old_bank(tmp_path, monkeypatch):
    out = tmp_path / "b"
    old = RetrievalBank.from_embeddings(unit(50, 8, 10), out)

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(bank_mod.faiss, "serialize_index", boom)
    with pytest.raises(RuntimeError, match="killed"):
        RetrievalBank.from_embeddings(unit(80, 8, 11), out)
    with pytest.raises(RuntimeError, match="killed"):
        RetrievalBank.from_embeddings(unit(80, 8, 11), tmp_path / "fresh")
    monkeypatch.undo()
    again = RetrievalBank.load(out)
    assert len(again) == 50 and again.meta["build_id"] == old.meta["build_id"]
    assert sorted(p.name for p in out.iterdir()) == ["bank.json", "embeddings.safetensors", "index.faiss"]
    assert not (tmp_path / "fresh" / "bank.json").exists()
    assert list((tmp_path / "fresh").iterdir()) == []  # no temp files left behind
    with pytest.raises(BankNotFoundError):
        RetrievalBank.load(tmp_path / "fresh")


def test_crash_between_renames_never_loads_half_bank(tmp_path, monkeypatch):
    out = tmp_path / "b"
    RetrievalBank.from_embeddings(unit(50, 8, 12), out)
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # new embeddings are in place, new index and bank.json are not
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(bank_mod.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        RetrievalBank.from_embeddings(unit(80, 8, 13), out)
    monkeypatch.undo()
    with pytest.raises(RetrievalBankError, match="inconsistent"):
        RetrievalBank.load(out)
    RetrievalBank.from_embeddings(unit(80, 8, 13), out)  # a rebuild repairs it
    assert len(RetrievalBank.load(out)) == 80


# ----- from a dataset, with a backbone ----------------------------------------------------------
@pytest.fixture(scope="module")
def built_bank(tmp_path_factory, image_folder, tiny):
    from xmodal.data import load_dataset

    out = tmp_path_factory.mktemp("bank")
    cache = tmp_path_factory.mktemp("cache")
    ds = load_dataset(f"imagefolder:{image_folder}")
    bank = RetrievalBank.build(tiny, ds, out, split="train", cache_dir=cache, batch_size=16, progress=False)
    return bank, ds, cache


def test_build_from_dataset(built_bank, tiny):
    from xmodal.features import extract_features

    bank, ds, cache = built_bank
    fs = extract_features(tiny, ds, "train", cache_dir=cache, progress=False)
    assert len(bank) == 24 and bank.ids == fs.ids
    assert bank.meta["fingerprint"] == tiny.fingerprint() and bank.meta["backbone"] == "tiny:clip"
    assert bank.meta["split"] == "train" and bank.meta["dataset"].startswith("imagefolder:")
    assert torch.allclose(bank.all_embeddings(), fs.features, atol=1e-6)
    # an image retrieves itself first
    scores, idx = bank.search(fs.features[:5], 3)
    assert torch.equal(idx[:, 0], torch.arange(5)) and torch.allclose(scores[:, 0], torch.ones(5), atol=1e-5)
    assert bank.tokens(idx).shape == (5, 3, 16, tiny.token_dim)
    s, i = bank.search_texts(tiny, ["a photo of a cat.", "a dog"], 4)
    ref_s, ref_i = exact_topk(fs.features, tiny.encode_texts(["a photo of a cat.", "a dog"]), 4)
    assert torch.equal(i, ref_i) and torch.allclose(s, ref_s, atol=1e-5)


def test_fingerprint_mismatch_names_both(built_bank, tiny):
    bank, _, _ = built_bank
    other = load_backbone("tiny:clip:1")
    assert RetrievalBank.load(bank.directory, tiny).ids == bank.ids
    with pytest.raises(CacheMismatchError) as err:
        RetrievalBank.load(bank.directory, other)
    assert tiny.fingerprint() in str(err.value) and other.fingerprint() in str(err.value)
    with pytest.raises(CacheMismatchError):
        bank.search_texts(other, ["a cat"], 2)


# ----- CLI ------------------------------------------------------------------------------------
def _app() -> typer.Typer:
    from xmodal.cli import app  # the real command, with its one error path

    return app


@pytest.mark.filterwarnings("ignore:nlist=2 gives fewer")
def test_cli_builds_ivf_bank_and_prints_one_json(tmp_path, image_folder):
    out = tmp_path / "bank"
    args = ["xadapter", "bank", "--backbone", "tiny:clip", "--data", f"imagefolder:{image_folder}",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    result = CliRunner().invoke(_app(), args + ["--index", "ivf", "--nlist", "2", "--nprobe", "1", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["size"] == 24 and summary["dim"] == 32 and summary["index"] == "ivf"
    assert summary["nlist"] == 2 and summary["tokens"] == [16, 32]
    for kind in ("text", "image"):
        assert 0.0 <= summary["recall"][kind]["recall"] <= 1.0 and summary["recall"][kind]["k"] == 4
    assert summary["recall"]["image"]["source"] == "held-out test images" and summary["recall"]["image"]["queries"] == 6
    assert RetrievalBank.load(out).index_kind == "ivf"

    human = CliRunner().invoke(_app(), args + ["--no-tokens", "--split", "test"])
    assert human.exit_code == 0, human.output
    assert "6 images" in human.stdout and "tokens    none" in human.stdout
    assert not RetrievalBank.load(out).has_tokens

    bad = CliRunner().invoke(_app(), args + ["--index", "hnsw", "--json"])
    assert bad.exit_code in (2, 3) and "hnsw" in json.loads(bad.stdout)["error"]
