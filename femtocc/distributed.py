"""Several training processes: ``torchrun --nproc-per-node N femtocc prune ... --train DIR``.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env`
joins the process group (gloo on CPU, NCCL on CUDA, each process on GPU ``LOCAL_RANK``). One
process, or torch without ``torch.distributed``, is rank 0 of 1 and every helper here does
nothing, so the trainer reads the same either way: gradients are averaged by
DistributedDataParallel, rank 0 prunes, validates and writes, and :func:`broadcast_module` gives
every rank rank 0's weights (and so its masks, which are the weights' zeros).
"""

from __future__ import annotations

import os

from femtocc.errors import FemtoccError


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str = "cpu") -> tuple[int, int, str]:
    """Join the process group torchrun describes; returns (rank, world size, this process's device)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda" and not torch.cuda.is_available():
        raise FemtoccError("--device cuda: torch sees no CUDA device on this machine")
    if world <= 1:
        return 0, 1, device
    if not dist.is_available():
        raise FemtoccError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def barrier() -> None:
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()


def broadcast_module(model) -> None:
    """Every parameter and buffer of ``model`` set to rank 0's."""
    import torch.distributed as dist

    if rank_world()[1] > 1:
        for tensor in model.state_dict().values():
            t = _on_backend(tensor)
            dist.broadcast(t, 0)
            if t is not tensor:
                tensor.copy_(t)


def gather(obj) -> list:
    """``obj`` from every rank, in rank order (on every rank)."""
    import torch.distributed as dist

    if rank_world()[1] == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean(value: float) -> float:
    """The mean of ``value`` over the ranks."""
    import torch
    import torch.distributed as dist

    world = rank_world()[1]
    if world == 1:
        return value
    t = _on_backend(torch.tensor([value], dtype=torch.float64))
    dist.all_reduce(t)
    return float(t[0]) / world


def _on_backend(tensor):
    """``tensor`` where the process group's backend can reach it (NCCL reaches only GPU memory)."""
    import torch.distributed as dist

    return tensor.cuda() if dist.get_backend() == "nccl" and not tensor.is_cuda else tensor

