"""Everything that depends on how many processes run: launching, FSDP sharding, rank queries, rank-0 I/O, gathers,
gradient clipping, full (unsharded) weights and optimizer state, and batch slicing.

Every helper works without an initialised process group (one process, world size 1), so trainers and losses read
the same in a single process and under torchrun. See docs/distributed.md.
"""
import logging
import os
import signal
import socket
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from console import say
from errors import HalosError

LOCALHOST = "127.0.0.1"


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def rank0_print(message: str) -> None:
    """One line on the main process's stdout, above any progress bar (console.say)."""
    if is_main_process():
        say(message)


# --- launching -------------------------------------------------------------------------------------------------


def launch(fn: Callable, *args: Any, use_fsdp: bool, port: Optional[int]) -> None:
    """Runs `fn(*args)` in every training process of this machine.

    * Under torchrun (WORLD_SIZE > 1 in the environment) this process is one of them: join the process group.
    * Plain `python train.py` with several visible GPUs and use_fsdp: start one process per GPU here, rendezvousing
      on localhost:`port` (a free port when None), so no launcher is needed (as in the original).
    * Otherwise one process, with no process group at all.
    """
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if launched_processes > 1 and not use_fsdp:
        raise HalosError(f"use_fsdp=false cannot train on {launched_processes} processes (DDP is not implemented); "
                         "set use_fsdp=true or start a single process")
    if launched_processes > 1:
        run_in_process_group(fn, *args)
    elif use_fsdp and torch.cuda.device_count() > 1:
        spawn(fn, args, torch.cuda.device_count(), port)
    else:
        fn(*args)


# What a process stopped by SIGINT/SIGTERM exits with after writing its resumable checkpoint (trainers.py).
STOPPED_BY_SIGNAL_EXIT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)


def spawn(fn: Callable, args: Sequence[Any], n_processes: int, port: Optional[int] = None) -> None:
    """Starts `n_processes` local processes that each run `fn(*args)` inside one process group, and waits for them.

    When one process exits with an error the others are ended, and this raises HalosError naming it (the process
    has printed its own message).
    """
    port = port or free_port()
    try:
        mp.spawn(_spawned_process, args=(n_processes, port, fn, tuple(args)), nprocs=n_processes, join=True)
    except mp.ProcessExitedException as e:
        if e.exit_code in STOPPED_BY_SIGNAL_EXIT_CODES:  # preempted after a resumable checkpoint: not an error
            raise SystemExit(e.exit_code) from None
        raise HalosError(f"training process {e.error_index} of {n_processes} exited with status {e.exit_code}"
                         ) from None


def _spawned_process(local_rank: int, n_processes: int, port: int, fn: Callable, args: tuple) -> None:
    # The same environment torchrun provides, so both launch paths initialise the group the same way.
    os.environ.update(MASTER_ADDR=LOCALHOST, MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(n_processes), LOCAL_WORLD_SIZE=str(n_processes))
    run_in_process_group(fn, *args)


# --- CPU threads -----------------------------------------------------------------------------------------------


def cpu_thread_count(cores: int, load: float, local_processes: int) -> int:
    """Intra-op threads for each of `local_processes` processes: the cores not busy with other work, shared out.

    An intra-op thread that has to wait for a core stalls every other thread of the same operator at its barrier,
    so on a loaded machine fewer threads run faster (docs/performance.md): one thread per idle core, at least one.

    Args:
        cores: cores this process may run on.
        load: the 1-minute load average (runnable threads, including other users' work).
        local_processes: training processes on this machine.
    """
    idle = max(1, int(cores - load))
    return max(1, min(cores, idle) // local_processes)


def choose_cpu_threads() -> str:
    """Sets torch's intra-op thread count for this process by cpu_thread_count, unless OMP_NUM_THREADS is set (torch
    has read it already); returns a one-line account of the choice."""
    if os.environ.get("OMP_NUM_THREADS"):
        threads = torch.get_num_threads()
        return f"CPU: {threads} intra-op thread{'s' * (threads > 1)} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = cpu_thread_count(cores, load, local_processes)
    torch.set_num_threads(threads)
    return (f"CPU: {threads} intra-op thread{'s' * (threads > 1)} ({cores} cores, load {load:.1f}, "
            f"{local_processes} process{'es' * (local_processes > 1)}; set OMP_NUM_THREADS to choose)")


def free_port() -> int:
    """A TCP port on localhost that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def run_in_process_group(fn: Callable, *args: Any) -> None:
    """Joins the process group described by the torchrun environment, runs `fn(*args)`, and leaves the group.

    NCCL for GPUs (with gloo beside it for any CPU tensor), gloo on CPU-only machines. Each process uses the GPU of
    its LOCAL_RANK; CUDA_VISIBLE_DEVICES is left alone (the original overwrote it, F-23).
    """
    if torch.cuda.is_available():
        local_device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(local_device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=local_device)
    else:
        dist.init_process_group("gloo")
    if dist.get_rank() != 0:
        # Every process loads the same data, so the data warnings would otherwise repeat once per process.
        logging.getLogger("halos").setLevel(logging.ERROR)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def device() -> torch.device:
    """This process's compute device: its GPU (set from LOCAL_RANK when distributed), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# --- sharding --------------------------------------------------------------------------------------------------


def shard_model(model: torch.nn.Module, block_name: Optional[str], mixed_precision: Optional[str]) -> torch.nn.Module:
    """Shards `model` in place over all processes with FSDP2 and returns it.

    Every module whose class is named `block_name` becomes one unit whose parameters are gathered just for its
    forward and backward; the root holds the rest (embeddings, final norm, head). Parameters move to this process's
    device block by block, so a model built on the CPU never sits whole on one GPU.

    Args:
        model: a model on the CPU or on this process's device.
        block_name: class name of the transformer block (model.block_name), e.g. LlamaDecoderLayer.
        mixed_precision: dtype name (model.fsdp_policy_mp) for parameters in forward/backward and for gradient
            reduction; None keeps the model's own dtype.
    """
    blocks = [module for module in model.modules() if type(module).__name__ == block_name]
    if not blocks:
        shown = "null" if block_name is None else block_name
        raise HalosError(f"model.block_name={shown} names no module of {type(model).__name__}, so FSDP has nothing "
                         f"to shard by; its repeated blocks are: {', '.join(repeated_block_names(model))}")
    dtype = getattr(torch, mixed_precision) if mixed_precision else None
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
    mesh = init_device_mesh(device().type, (world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def repeated_block_names(model: torch.nn.Module) -> List[str]:
    """Class names of the modules held in the model's ModuleLists: the candidates for model.block_name."""
    return sorted({type(child).__name__ for module in model.modules() if isinstance(module, torch.nn.ModuleList)
                   for child in module})


# --- collectives -----------------------------------------------------------------------------------------------


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
    return all_reduce_sum(value) / world_size()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (a detached copy); identity in one process."""
    if world_size() == 1:
        return value.detach()
    reduced = value.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Scales gradients so their total L2 norm is at most `max_norm`; returns the norm before clipping.

    With sharded (DTensor) parameters the norm is the whole model's, the same on every rank, and every shard is
    scaled by the same factor (the original clipped each rank's shard by its own norm, F-05).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = global_grad_norm(grads)
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for grad in grads:
            grad.mul_(scale)
    return norm


def global_grad_norm(grads: Sequence[torch.Tensor]) -> float:
    """L2 norm of all gradients together: shards of DTensor gradients are summed over ranks, plain tensors are
    the same on every rank and count once.

    Squares are accumulated in float64: torch's float32 CPU norm was off by 6e-5 (relative) on the tiny model's
    lm_head gradient, enough for the norm to depend on how the gradient is sharded.
    """
    def squares(tensors) -> torch.Tensor:
        return sum((t.double().pow(2).sum() for t in tensors), torch.zeros((), dtype=torch.float64, device=device()))

    sharded = squares(g.to_local() for g in grads if isinstance(g, DTensor))
    if world_size() > 1:
        dist.all_reduce(sharded, op=dist.ReduceOp.SUM)
    return (sharded + squares(g for g in grads if not isinstance(g, DTensor))).sqrt().item()


def full_state_dict(model: torch.nn.Module, trainable_only: bool = False) -> Dict[str, torch.Tensor]:
    """The model's complete weights on CPU with their usual (Hugging Face) names; {} on ranks other than 0.
    `trainable_only` leaves out the parameters that need no gradient (a LoRA policy's frozen base model).

    Under FSDP every rank must call this: the shards are gathered to rank 0 one tensor at a time.
    """
    if world_size() == 1:
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad} if trainable_only else set()
        return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=trainable_only))


def full_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """The optimizer's complete state on CPU, keyed by parameter names (so it loads under any number of processes);
    {} on ranks other than 0. Under FSDP every rank must call this."""
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: torch.nn.Module, state: Dict[str, torch.Tensor],
                         trainable_only: bool = False) -> None:
    """Loads complete weights (as full_state_dict returns them) into a model that may be sharded, strictly unless
    `trainable_only` (then `state` holds the trainable parameters, which the caller has checked are all there, and
    the frozen ones keep their values; torch adds their entries to `state`). Under FSDP only rank 0 needs them
    (other ranks pass {}): every rank receives its shards from rank 0."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=not trainable_only,
                                                                broadcast_from_rank0=world_size() > 1))


def load_full_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                   state: Dict[str, Any]) -> None:
    """Loads what full_optimizer_state_dict returned into the optimizer of a model that may be sharded; under FSDP
    only rank 0 needs it (other ranks pass {})."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True,
                                                                               broadcast_from_rank0=world_size() > 1))


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
