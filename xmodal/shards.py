"""Sharded extraction under ``accelerate launch`` / ``torchrun``: which rank embeds which batches.

Ranks split the batch list (not the sample list) into contiguous blocks, so every batch holds exactly
the images it holds in a single process and the merged fp32 features are bit-identical to one process's.
The launchers' environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) says whether we are sharded;
barriers use the default process group, initialised with gloo when nobody did it before.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batch_range(self, n: int, batch_size: int) -> tuple[int, int]:
        """Sample range [lo, hi) of this rank: a contiguous block of whole batches."""
        batches = -(-n // batch_size)
        first, last = self.rank * batches // self.world, (self.rank + 1) * batches // self.world
        return min(n, first * batch_size), min(n, last * batch_size)

    def barrier(self) -> None:
        """Wait for every rank; a rank that died turns into one clear error here (gloo sees the closed peer)."""
        import torch.distributed as dist

        from .errors import ResourceError

        try:
            dist.barrier()
        except RuntimeError as exc:
            raise ResourceError(f"rank {self.rank}: another rank of this {self.world}-process extraction failed "
                                f"({str(exc).splitlines()[0][:160]})",
                                hint="fix that rank's error and rerun the same command: finished shards are reused") from exc


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        return default


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) outside a launcher."""
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)


def current_shard(enabled: bool | None = None) -> Shard | None:
    """The shard of this process, or ``None`` for a plain single-process run.

    ``enabled=None`` shards whenever a launcher started several processes; ``False`` never shards.
    """
    rank, world, local = launched_world()
    if enabled is False or world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        # gloo: barriers only (data travels through the cache folder), works for CPU and GPU ranks
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=60))
    return Shard(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


def is_main_process() -> bool:
    """True outside a launcher and on rank 0 inside one (write shared outputs only there)."""
    return launched_world()[0] == 0
