"""Everything that depends on how many processes run: rank queries, rank-0 I/O, gathers and batch slicing.

Every helper works without an initialised process group (one process, world size 1), so trainers and losses read
the same in a single process and under torchrun.
"""
from typing import Any, Dict

import torch
import torch.distributed as dist

from utils import HalosError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def rank0_print(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs)


def slice_batch_for_rank(batch: Dict[str, Any], rank_idx: int, n_ranks: int, device: torch.device) -> Dict[str, Any]:
    """This rank's contiguous share of a global batch; tensors are moved to `device`.

    The global batch must divide evenly (the original silently dropped the remainder).
    """
    size = len(next(iter(batch.values())))
    if size % n_ranks:
        raise HalosError(f"a batch of {size} examples cannot be split evenly over {n_ranks} processes; "
                         f"choose model.batch_size and model.eval_batch_size divisible by {n_ranks}")
    chunk = size // n_ranks
    start, end = chunk * rank_idx, chunk * (rank_idx + 1)
    return {k: (v[start:end].to(device) if isinstance(v, torch.Tensor) else v[start:end]) for k, v in batch.items()}


def all_gather_if_needed(values: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's `values` along dim 0 (0-dim tensors are stacked); identity in one process.

    Ranks may hold different numbers of rows (e.g. the chosen rows of an unpaired batch), so sizes are exchanged
    first and rows padded to the largest before the gather.
    """
    if world_size() == 1:
        return values
    values = values.detach().reshape(1) if values.dim() == 0 else values.detach()
    sizes = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([values.size(0)], device=values.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *values.shape[1:]), dtype=values.dtype, device=values.device)
    padded[: values.size(0)] = values
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a detached copy); identity in one process."""
    if world_size() == 1:
        return value.detach()
    reduced = value.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / world_size()


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Clips gradients to a total norm of `max_norm` and returns the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm).item()


def full_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's complete weights on CPU, as plain tensors with their usual names."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
