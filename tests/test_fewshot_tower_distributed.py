"""Data-parallel tower methods: two CPU processes (torch.distributed, gloo) each taking half of every support
batch reach the same fitted state as one process on the whole batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

PARAMS = {"coop": {"epochs": 3, "batch_size": 8}, "cocoop": {"epochs": 1, "batch_size": 4}}


def _fit(name: str):
    from xmodal.backbones import load_backbone
    from xmodal.fewshot import create_method
    from xmodal.fewshot._synthetic import make_task

    torch.set_num_threads(1)
    support, val, test, text = make_task(num_classes=4, dim=32, shots=4, val_per_class=3, test_per_class=5,
                                         views=2, seed=3)
    m = create_method(name, seed=0, **PARAMS[name]).bind_backbone(load_backbone("tiny:clip", engine="torch"))
    m.fit(support, val, text)
    return m.ctx_, m.decision_scores(test.features), m.selected_["epoch"]


def _worker(rank: int, world: int, port: int, name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    ctx, scores, epoch = _fit(name)  # the process group is created by the method itself, from the environment
    import torch.distributed as dist

    torch.save({"ctx": ctx, "scores": scores, "epoch": epoch}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["coop"])  # the same two helpers serve cocoop and clip-lora
def test_two_processes_match_one_at_the_same_global_batch(name, tmp_path):
    single_ctx, single_scores, single_epoch = _fit(name)
    mp.spawn(_worker, args=(2, _free_port(), name, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0]["ctx"], ranks[1]["ctx"])  # every process took the same steps
    for r in ranks:
        assert r["epoch"] == single_epoch
        assert torch.allclose(r["ctx"], single_ctx, atol=1e-5)
        assert torch.allclose(r["scores"], single_scores, atol=1e-3)
