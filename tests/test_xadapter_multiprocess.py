"""Two processes under `accelerate launch` on the CPU (gloo) give the adapter that one process gives at
the same global batch and seed (tiny PLM, tiny VLM, a few steps, dropout off).

accelerate 1.15 starts a single process for `accelerate launch --cpu --num_processes 2` (its multi-CPU
mode needs an MPI hostfile); `--multi_gpu --num_processes 2` starts two through torchrun, and
`--device cpu` (or auto on a machine without a GPU) puts them in one gloo group.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xmodal.backbones import load_backbone
from xmodal.xadapter.retrieval.bank import RetrievalBank
from xmodal.xadapter.tiny import build_tiny_plm

TEXTS = [f"a {c} {o} near the {p}" for c in ("red", "blue", "green", "white")
         for o in ("bus", "car", "dog", "cat") for p in ("house", "tree")]
ACCELERATE = Path(sys.executable).with_name("accelerate")


@pytest.mark.skipif(not ACCELERATE.is_file(), reason="accelerate's launcher is not installed")
def test_two_processes_match_one(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    plm = build_tiny_plm(tmp_path / "plm", "bert", TEXTS, head="none", seed=0)
    # the frozen PLM's own dropout draws per process; switch it off like the experts' (--dropout 0)
    cfg = json.loads((plm / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (plm / "config.json").write_text(json.dumps(cfg))
    clip = load_backbone("tiny:clip")
    px = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    RetrievalBank.from_embeddings(clip.encode_images(px).clone(), tmp_path / "bank",
                                  meta={"backbone": clip.spec, "fingerprint": clip.fingerprint()})
    common = ["xadapter", "train", "--plm", str(plm), "--backbone", "tiny:clip", "--bank", str(tmp_path / "bank"),
              "--corpus", str(corpus), "--steps", "3", "--lr", "1e-2", "--dropout", "0", "--device", "cpu",
              "--seed", "0", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_CONFIG_FILE": str(tmp_path / "no-accelerate-config.yaml")}
    one = subprocess.run([sys.executable, "-m", "xmodal", *common, "--out", str(tmp_path / "one"), "--batch-size", "8"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "xmodal", *common,
                          "--out", str(tmp_path / "two"), "--batch-size", "4"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 8
    a = load_file(str(tmp_path / "one" / "xadapter" / "xadapter.safetensors"))
    b = load_file(str(tmp_path / "two" / "xadapter" / "xadapter.safetensors"))
    assert a.keys() == b.keys()
    moved = [k for k in a if k.startswith("adapter.") and float(a[k].abs().max()) > 0]
    assert moved, "training did not change the adapter"
    # float tolerance: summation order differs between one and two processes, and Adam (lr 1e-2) turns
    # rounding-level gradient differences into at most ~1e-5 weight differences over 3 steps
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=1e-3), (key, float((a[key] - b[key]).abs().max()))
    la = [json.loads(l)["loss"] for l in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 3 and all(abs(x - y) < 1e-4 for x, y in zip(la, lb))
    shutil.rmtree(tmp_path / "two", ignore_errors=True)
