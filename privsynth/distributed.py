"""The torchrun process group: which process this is, and the few collectives privsynth uses.

privsynth scales out on PyTorch's own engine. `torchrun` starts the processes and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `session()` joins that group with
`torch.distributed.init_process_group("env://")`: gloo for CPU tensors and, where CUDA is
present, NCCL for CUDA tensors (one group, "cpu:gloo,cuda:nccl"). Outside torchrun there is one
process and every helper here is a no-op, so one code path serves both.

The rules every caller follows:
- Rank 0 alone writes (ledger, run folder, datasets, reports) and draws privacy noise; the other
  ranks read the same inputs and compute their share.
- Every rank calls the same collectives in the same order. A check that can fail on rank 0 runs
  through `on_main`, so the other ranks raise the same error at once instead of waiting for it.
- A collective waits at most PRIVSYNTH_DIST_TIMEOUT seconds (default 1800); torchrun stops every
  process as soon as one of them fails, so an error on any rank ends the whole run.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import pickle
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from privsynth.errors import UsageError

TIMEOUT_ENV = "PRIVSYNTH_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # long enough for one rank to decode a large folder while others wait
T = TypeVar("T")
_solo = False  # inside `solo()`: this process acts alone although the group has several


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Join torchrun's process group for the block (nothing to join outside torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        yield
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", init_method="env://",
                            timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def world() -> int:
    """How many processes take part (1 outside torchrun)."""
    if _solo:
        return 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun, but nobody joined the group
        raise UsageError("running under torchrun (WORLD_SIZE > 1) outside "
                         "privsynth.distributed.session(): wrap the call in that block")
    return 1


def rank() -> int:
    """This process's rank, 0..world()-1 (0 outside torchrun)."""
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    """Whether this is rank 0: the process that writes outputs and draws privacy noise."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its own machine (torchrun's LOCAL_RANK): its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def device(name: str) -> str:
    """The device this process uses for the recipe's `run.device`: 'cuda' -> its own GPU."""
    if world() == 1 or not name.startswith("cuda"):
        return name
    if name != "cuda":
        raise UsageError(f"run.device={name!r} under torchrun: use run.device=cuda, and each "
                         "process takes the GPU of its LOCAL_RANK")
    return f"cuda:{local_rank()}"


@contextlib.contextmanager
def solo() -> Iterator[None]:
    """Run the block as if this process were alone (the other ranks do not take part in it)."""
    global _solo
    before, _solo = _solo, True
    try:
        yield
    finally:
        _solo = before


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's share of `items`: every world()-th item from position rank()."""
    return items[rank()::world()] if world() > 1 else items


def share(n: int, what: str) -> int:
    """How many of `n` rows this rank takes (the first n % world ranks take one more)."""
    if n < world():
        raise UsageError(f"{what} is {n}: it must be at least the number of processes ({world()})")
    return n // world() + (rank() < n % world())


def generator(seed: int) -> torch.Generator:
    """A public random stream for this rank: `seed` itself on rank 0 (as in one process), and
    streams independent of it on the other ranks."""
    return torch.Generator().manual_seed(seed) if rank() == 0 else stream(seed, rank())


def stream(seed: int, key: int) -> torch.Generator:
    """A torch generator seeded from (seed, key) alone (numpy SeedSequence mixing): unrelated
    streams for different keys, the same stream in any process."""
    import numpy as np

    mixed = np.random.SeedSequence([seed % 2 ** 63, key]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 32 | int(mixed[1]))


def broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite `tensor` with rank 0's, in place, on every rank; return it."""
    if world() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def all_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its sum over the ranks, in place (the same result on every rank).

    The tensors (one dtype and device) travel as one flat buffer: one all-reduce per call, not
    one per tensor (a UNet has hundreds of parameter tensors; each all-reduce has a latency)."""
    if world() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def on_main(fn: Callable[..., T], *args: Any, send: Callable[[T], Any] | None = None) -> T:
    """`fn(*args)` run on rank 0 only; every rank returns its result (`send(result)` on the
    other ranks, to send less), or raises the exception it raised there."""
    if world() == 1:
        return fn(*args)
    box: list[Any] = [None]
    if is_main():
        try:
            result = fn(*args)
            box[0] = ("ok", send(result) if send else result)
        except BaseException as exc:  # noqa: BLE001 - sent to the other ranks, then re-raised
            box[0] = ("error", _portable(exc))
            dist.broadcast_object_list(box, src=0)
            raise
        dist.broadcast_object_list(box, src=0)
        return result
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        value.echo_of_rank = 0  # the CLI lets rank 0 report it, once
        raise value
    return value


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError carrying its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any unpicklable exception
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def gather(obj: T) -> list[T] | None:
    """Rank 0 gets every rank's `obj`, in rank order; the other ranks get None."""
    if world() == 1:
        return [obj]
    out: list[Any] | None = [None] * world() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def first_error(error: BaseException | None) -> BaseException | None:
    """The first (by rank) of the ranks' `error`s, or None when no rank has one: every rank gets
    the same answer, so they all stop together (one small collective)."""
    if world() == 1:
        return error
    errors: list[Any] = [None] * world()
    dist.all_gather_object(errors, None if error is None else _portable(error))
    return next((e for e in errors if e is not None), None)


def check_same(value: str, error: Exception) -> None:
    """Raise `error` on every rank unless all ranks hold the same `value` (a short digest)."""
    if world() == 1:
        return
    values: list[Any] = [None] * world()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        raise error


def digest(tensors: Sequence[torch.Tensor]) -> str:
    """sha256 of the tensors' bytes, in order (to compare weights across ranks)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """`model` wrapped in torch DistributedDataParallel (gradients averaged over the ranks in
    backward), or `model` itself in one process."""
    if world() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    on_gpu = next(model.parameters()).device.type == "cuda"
    return DistributedDataParallel(model, device_ids=[local_rank()] if on_gpu else None)
