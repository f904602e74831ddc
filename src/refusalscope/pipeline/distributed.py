"""Where a step's per-item work runs: in this process, or sharded over the workers of a Ray cluster.

A step hands over its items (prompts, activation chunks) and a ``Worker``: a picklable recipe that, started once
per process, loads what the work needs (model, SAEs, judge) and returns a function doing one item, which writes
that item's result file into the run store atomically. The driver only hands out items and counts; afterwards it
reads those files, exactly as after a single-process loop. So a worker killed mid-item loses only that item (Ray
restarts the worker and runs the item again), and a driver that died is rerun like any interrupted run: finished
files are kept, the rest is handed out again.

Ray is an optional extra (``pip install 'refusalscope[ray]'``); the run directory and the model/SAE caches must lie
on a filesystem every worker sees under the same path.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tqdm.auto import tqdm

from refusalscope.errors import RefusalScopeError

log = logging.getLogger("refusalscope")

# our choice: a worker killed while doing an item is restarted and the item run again, at most this many times
# (a kill, a preempted node); an item that keeps killing its worker (out of memory) then stops the run
MAX_ITEM_RETRIES = 3


class Worker(Protocol):
    """Loads what one process needs and returns the function that does (and writes) one item."""

    def start(self, device: str | None = None) -> Callable[[Any], None]: ...


def require_ray():
    """The ``ray`` module, or one clear error naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise RefusalScopeError("--ray needs Ray: pip install 'refusalscope[ray]'") from None
    return ray


def connect(address: str) -> None:
    """Join (or start) the Ray cluster ``address`` names, unless this process is connected already.

    "auto" is Ray's own default (the cluster in RAY_ADDRESS or started with ``ray start`` on this node, else a new
    local one); "local" always starts a new local cluster; anything else is a cluster address (``ray://head:10001``).
    """
    ray = require_ray()
    if ray.is_initialized():
        return
    # the workers' own output (model-loading bars) stays in Ray's logs; Ray Client (ray://) takes no such option
    quiet = {} if address.startswith("ray://") else {"log_to_driver": False}
    try:
        ray.init(address=None if address == "auto" else address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise RefusalScopeError(f"cannot reach the Ray cluster {address!r}: {e}") from None


class RayWorker:
    """One Ray worker process, kept for every step of a run: it starts each step's ``Worker`` once (on the GPU Ray
    gave it, if any) the first time it gets one of that step's items, then does items. A worker Ray restarted
    (after a kill) starts the step's ``Worker`` again."""

    def __init__(self, cwd: str, device: str):
        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative paths in the settings resolve as on the driver
        self.device = device
        self.step: tuple[str, Callable[[Any], None]] | None = None

    def run(self, step: str, worker: list, item, units: int = 1) -> int:
        """Do ``item`` of ``step``; ``worker`` is [object ref of its Worker], fetched only when the step starts.
        Returns ``units`` (what the item counts for on the driver's progress bar)."""
        import ray

        if self.step is None or self.step[0] != step:
            self.step = None  # the previous step's model and SAEs go before this step's are loaded
            device = self.device if self.device == "cpu" else ("cuda" if ray.get_gpu_ids() else "cpu")
            self.step = (step, ray.get(worker[0]).start(device))
        self.step[1](item)
        return units


def run_items(
    items: Sequence,
    worker: Worker,
    *,
    local: Callable[[Any], None] | None = None,
    ray: str | None = None,
    workers: int | None = None,
    device: str = "auto",
    desc: str = "",
    unit: str = "prompt",
    done: int = 0,
    progress: bool = True,
    count: Callable[[Any], int] = lambda item: 1,
) -> None:
    """Do every item: in this process with ``local`` (or a started ``worker``) when ``ray`` is None, else on the
    Ray cluster ``ray`` names, with ``workers`` workers (default: one per GPU of the cluster, or one per CPU when it
    has none; ``device="cpu"`` keeps them on CPUs). ``done`` units were finished before (the progress bar's start);
    ``count(item)``: the units an item holds (a group of prompts holds several).
    """
    total = done + sum(count(item) for item in items)
    with tqdm(total=total, initial=done, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True) as bar:
        if not items:
            return
        if ray is None:
            do = local or worker.start(device)
            for item in items:
                do(item)
                bar.update(count(item))
            return
        _run_on_ray(items, worker, ray, workers, device, bar, count)


_pool: dict = {}  # this driver's Ray workers, kept for the later steps of the run: {(job, options): [actors]}


def _actors(workers: int | None, device: str) -> list:
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
    slots = gpus or max(1, int(resources.get("CPU", 1)))
    n = min(workers or slots, slots)  # a worker the cluster has no room for would hold its items forever
    if workers and workers > slots:
        log.warning("Ray: %d workers asked for, the cluster has room for %d", workers, slots)
    key = (ray.get_runtime_context().get_job_id(), n, device, bool(gpus))
    if key not in _pool:
        release_workers()  # another cluster or other options
        # our choice: one GPU per worker where the cluster has GPUs (the model and SAEs fit one), else one CPU each
        per_worker = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        remote = ray.remote(max_restarts=-1, max_task_retries=MAX_ITEM_RETRIES, **per_worker)(RayWorker)
        _pool[key] = [remote.remote(os.getcwd(), device) for _ in range(n)]
        log.info("Ray: %d workers, %s each", n, "1 GPU" if gpus else "1 CPU")
    return _pool[key]


def release_workers() -> None:
    """End this driver's Ray workers (at the end of a run), freeing their GPUs and memory for other jobs."""
    if _pool:
        import ray

        for actors in _pool.values():
            for actor in actors:
                ray.kill(actor)
        _pool.clear()


def _run_on_ray(items: Sequence, worker: Worker, address: str, workers: int | None, device: str, bar,
                count: Callable[[Any], int]) -> None:
    connect(address)
    import ray
    from ray.exceptions import RayActorError, RayTaskError
    from ray.util import ActorPool

    actors = _actors(workers, device)
    step, ref = uuid.uuid4().hex, ray.put(worker)
    try:
        pool = ActorPool(actors)
        for n in pool.map_unordered(lambda actor, item: actor.run.remote(step, [ref], item, count(item)), list(items)):
            bar.update(n)
    except RayTaskError as e:  # the work itself failed: bad input is reported as a single process reports it
        if isinstance(e.cause, RefusalScopeError):
            raise RefusalScopeError(str(e.cause)) from None
        raise
    except RayActorError as e:
        release_workers()
        raise RefusalScopeError(f"a Ray worker died {MAX_ITEM_RETRIES + 1} times on one item or could not be "
                                f"restarted ({str(e).splitlines()[0]}); finished items are kept: rerun the same "
                                "command to resume") from None
