"""The few collectives the stages need outside a training step, on plain ``torch.distributed``
(one process: each is the identity). Every rank must call them in the same order."""

from __future__ import annotations

from typing import Any

import torch


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if initialized() else (0, 1)


def barrier() -> None:
    if initialized():
        torch.distributed.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not initialized():
        return [obj]
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts


def all_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (each rank may have seen only its shard of something)."""
    if not initialized():
        return flag
    value = torch.tensor(int(flag))
    if torch.distributed.get_backend() == "nccl":
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())
