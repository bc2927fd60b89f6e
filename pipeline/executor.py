"""Where a plan's tasks run: on a Dask cluster, or one after the other in this process
(tests, debugging: `dask.in_process: true`). The stages never know which.

Both executors offer two calls:

- `run_chains(phase, chains)`: for each shard a chain of tasks (download → score → write,
  or a part of it), each task ordered after the one before it. At most `bound` shards are
  in flight at once; more are started as shards finish (on Dask, several in one call), so
  the driver holds a bounded number of tasks whatever the number of shards. A shard whose
  chain fails (after Dask's retries) comes back as a failure naming its step and error; the
  run goes on. A full disk (OSError) or a UserError still stops the run: no other shard would
  fare better.
  The chains may be a generator that is not always ready: it yields `Wait(handles)` when no
  shard can start until one of those tasks (started with `submit`) finishes, e.g. the cut of
  the next input file; the executor then waits for that, or for a shard, and asks again.
- `map(step, fn, arg_tuples)`: fn(*args) for each tuple, results in order, for the
  dataset-wide passes (their tasks are few and small); any failure fails the call.
- `submit(step, fn, args, index)`: one task, started now on a Dask cluster (in-process: run
  when its handle is first asked `done()` or `result()`); `cancel(handles)` drops unfinished ones.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

from curate.pipeline.errors import UserError


class Upstream:
    """Stands, in a task's arguments, for the result of the task before it in its chain."""


UPSTREAM = Upstream()


@dataclass
class Task:
    step: str                      # "download", "score", "write": names the task and its progress
    fn: Callable
    args: tuple                    # UPSTREAM where the previous task's result goes
    options: dict = field(default_factory=dict)  # Dask submit options, e.g. resources={"GPU": 1}


@dataclass
class Wait:
    """A chain source's answer when no chain is ready: wait until one of `handles` (from
    `submit`) has finished, then ask again."""

    handles: list


class Deferred:
    """An in-process task's handle: fn(*args) runs when it is first asked for."""

    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args = fn, args
        self._ran, self._value, self._error = False, None, None

    def done(self) -> bool:
        if not self._ran:
            self._ran = True
            try:
                self._value = self.fn(*self.args)
            except Exception as exc:
                self._error = exc
        return True

    def result(self):
        self.done()
        if self._error is not None:
            raise self._error
        return self._value


@dataclass
class ShardOutcome:
    shard: int
    results: dict[str, Any]        # step → result, for the steps that finished
    failed_step: Optional[str] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.failed_step is None


def _fatal(exc: BaseException) -> bool:
    """Errors that stop the whole run: the user's to fix (a full disk, a bad config)."""
    return isinstance(exc, (UserError, OSError))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _failed(step: str, index: int, exc: Exception) -> Exception:
    if _fatal(exc):
        return exc
    return RuntimeError(f"{step} {index} failed: {_describe(exc)}")


class InProcessExecutor:
    """Every task in this process, in order: no cluster, plain tracebacks in a debugger."""

    bound = 1

    def run_chains(self, phase: str, chains: Iterable[tuple[int, list[Task]]]) -> Iterator[ShardOutcome]:
        for item in chains:
            if isinstance(item, Wait):  # its handles run when the source asks them
                continue
            shard, tasks = item
            outcome, previous = ShardOutcome(shard, {}), None
            for task in tasks:
                try:
                    previous = task.fn(*[previous if a is UPSTREAM else a for a in task.args])
                except Exception as exc:
                    if _fatal(exc):
                        raise
                    outcome.failed_step, outcome.error = task.step, _describe(exc)
                    break
                outcome.results[task.step] = previous
            yield outcome

    def submit(self, step: str, fn: Callable, args: tuple, index: int) -> Deferred:
        return Deferred(fn, args)

    def cancel(self, handles: list) -> None:
        pass

    def map(self, step: str, fn: Callable, arg_tuples: Iterable[tuple]) -> list:
        results = []
        for index, args in enumerate(arg_tuples):
            try:
                results.append(fn(*args))
            except Exception as exc:
                failure = _failed(step, index, exc)
                if failure is exc:
                    raise
                raise failure from exc
        return results


def run_serially(step: str, fn: Callable, arg_tuples: Iterable[tuple]) -> list:
    """`map` in this process (what a dataset-wide pass runs on without a cluster)."""
    return InProcessExecutor().map(step, fn, arg_tuples)


# Shards in flight per task slot of the cluster: enough that a slot never waits for the driver
# to submit the next shard, few enough that the driver and the scheduler hold a bounded graph.
# New shards are sent once half of this bound is free, all in one call (`fill` in run_chains):
# the scheduler keeps metadata per call for as long as the client is connected, and a three-task
# chain grew it by 0.69 KB sent alone against 0.51 KB with four chains a call
# (bench/probes/scheduler_growth.py --per-call). In flight stays between two and four shards a slot.
SHARDS_PER_SLOT = 4

# Seconds between two asks of the scheduler for the cluster's task slots. Each ask returns every
# worker's description (about a kilobyte each); asked at every finished shard, a run of 50,000
# shards on a 1,000-worker cluster would move ~50 GB through the scheduler.
BOUND_REFRESH_S = 5.0


class DaskExecutor:
    def __init__(self, client, retries: int = 2, shards_per_slot: int = SHARDS_PER_SLOT,
                 bound_refresh_s: float = BOUND_REFRESH_S):
        self.client = client
        self.retries = retries
        self.shards_per_slot = shards_per_slot
        self.bound_refresh_s = bound_refresh_s
        self._bound: Optional[tuple[float, int]] = None  # (when asked, the bound then)
        self.token = uuid.uuid4().hex[:8]  # task keys unique per run, so runs can share a cluster
        self.calls = 0  # calls that sent chains to the scheduler (a test counts them)
        self.peak_in_flight = 0  # the most shards in flight at once, over the run (reported in stats)

    @property
    def bound(self) -> int:
        """Shards in flight at most: a small multiple of the cluster's task slots, asked anew
        every `bound_refresh_s` seconds, so it follows workers joining or leaving."""
        now = time.monotonic()
        if self._bound is None or now - self._bound[0] >= self.bound_refresh_s:
            workers = self.client.scheduler_info(n_workers=-1).get("workers", {}).values()
            slots = sum(w.get("nthreads", 1) for w in workers)
            self._bound = (now, max(2, self.shards_per_slot * max(1, slots)))
        return self._bound[1]

    def run_chains(self, phase: str, chains: Iterable[tuple[int, list[Task]]]) -> Iterator[ShardOutcome]:
        from distributed import as_completed

        source = iter(chains)
        in_flight: dict[str, tuple[int, list]] = {}  # key of the chain's last task → (shard, futures)
        waiting: dict[str, object] = {}  # tasks the source waits for (Wait), by key
        exhausted = False
        done = as_completed()
        try:
            def fill() -> None:
                nonlocal exhausted
                bound = self.bound
                if in_flight and bound - len(in_flight) < max(1, bound // 2):
                    return  # too few free places yet for a call worth making (see SHARDS_PER_SLOT)
                batch = []
                while not exhausted and len(in_flight) + len(batch) < bound:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                        break
                    if isinstance(item, Wait):
                        for handle in item.handles:
                            if handle.key not in waiting:
                                waiting[handle.key] = handle
                                done.add(handle)
                        break
                    batch.append(item)
                if not batch:
                    return
                for shard, futures in self._submit_chains(batch):
                    last = futures[-1][1]
                    in_flight[last.key] = (shard, futures)
                    done.add(last)
                self.peak_in_flight = max(self.peak_in_flight, len(in_flight))

            fill()
            while in_flight or waiting:
                finished = next(done)
                if finished.key in in_flight:
                    shard, futures = in_flight.pop(finished.key)
                    yield self._outcome(shard, futures)
                else:  # a task the source waited for: it may have something ready now
                    waiting.pop(finished.key, None)
                fill()
        finally:
            self.client.cancel([f for _, futures in in_flight.values() for _, f in futures])
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _submit_chains(self, chains: list[tuple[int, list[Task]]]) -> list[tuple[int, list[tuple[str, Any]]]]:
        """Shards' chains as one graph in one call: [(shard, [(step, future)])]. The scheduler keeps
        an entry of metadata per call for as long as the client is connected (0.71 KB for a call
        of one three-task chain against 1.46 for three calls of one task: bench/probes/
        scheduler_growth.py), so the calls are few. Each task is its own layer, so that it keeps
        its own options (a score task's GPU, a write's CPU slot)."""
        from dask._task_spec import Task as GraphTask, TaskRef
        from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

        layers, dependencies, keys = {}, {}, []
        for shard, tasks in chains:
            chain_keys, previous = [], None
            for task in tasks:
                key = f"{task.step}-{self.token}-{shard}"
                args = [TaskRef(previous) if a is UPSTREAM else a for a in task.args]
                layers[key] = MaterializedLayer({key: GraphTask(key, task.fn, *args)},
                                                annotations={"retries": self.retries, **task.options})
                dependencies[key] = {previous} if previous else set()
                chain_keys.append(key)
                previous = key
            keys.append(chain_keys)
        futures = self.client.get(HighLevelGraph(layers, dependencies), keys, sync=False)
        self.calls += 1
        return [(shard, [(task.step, future) for task, future in zip(tasks, chain_futures)])
                for (shard, tasks), chain_futures in zip(chains, futures)]

    def submit(self, step: str, fn: Callable, args: tuple, index: int):
        return self.client.submit(fn, *args, key=f"{step}-{self.token}-{index}", retries=self.retries)

    def cancel(self, handles: list) -> None:
        self.client.cancel(handles)

    def _outcome(self, shard: int, futures: list) -> ShardOutcome:
        outcome = ShardOutcome(shard, {})
        for step, future in futures:
            if future.status == "error":
                exc = future.exception()
                if _fatal(exc):
                    raise exc
                outcome.failed_step, outcome.error = step, _describe(exc)
                return outcome
            outcome.results[step] = future.result()
        return outcome

    def map(self, step: str, fn: Callable, arg_tuples: Iterable[tuple]) -> list:
        from distributed import as_completed

        futures = [self.client.submit(fn, *args, key=f"{step}-{self.token}-{i}", retries=self.retries)
                   for i, args in enumerate(arg_tuples)]
        index = {f.key: i for i, f in enumerate(futures)}
        try:
            for future in as_completed(futures):
                try:
                    future.result()
                except Exception as exc:
                    failure = _failed(step, index[future.key], exc)
                    if failure is exc:
                        raise
                    raise failure from exc
            return [f.result() for f in futures]
        finally:
            self.client.cancel(futures)

