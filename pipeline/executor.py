"""Where shard tasks run: on a Dask cluster (one task per shard and step), or one after the
other in this process (tests, debugging). The stages never know which.

Both answer `map(step, fn, arg_tuples)`: fn(*args) for each tuple, results in order; a
task that fails fails the call with its step and index named. `DaskExecutor` also lets
`curate run` submit tasks one by one (a stage's task takes the upstream task's future as
an argument, so Dask orders them) and collect them as they finish.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Iterable, Iterator

from curate.pipeline.errors import UserError


def _failed(step: str, index: int, exc: Exception) -> Exception:
    """The error a failed task becomes: a user's problem (a full disk: UserError, OSError)
    passes as it is; anything else names the task."""
    if isinstance(exc, (UserError, OSError)):
        return exc
    return RuntimeError(f"{step} of shard {index:05d} failed: {type(exc).__name__}: {exc}")


def run_serially(step: str, fn: Callable, arg_tuples: Iterable[tuple]) -> list:
    """`map` in this process, one task after the other."""
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


class DaskExecutor:
    def __init__(self, client):
        self.client = client
        self.token = uuid.uuid4().hex[:8]  # task keys unique per run, so runs can share a cluster
        self.submitted: list = []

    def submit(self, step: str, index: int, fn: Callable, *args, **options):
        """One task (Dask `options` such as resources={"GPU": 1}); its key names step and index.
        It stays in `submitted` (what `cancel()` cancels) until it is collected by `map`."""
        future = self.client.submit(fn, *args, key=f"{step}-{self.token}-{index}", **options)
        self.submitted.append(future)
        return future

    def finished(self, futures: list) -> Iterator[tuple[str, int, Any]]:
        """(step, index, result) of each future as it finishes; a failed task raises, named."""
        from distributed import as_completed

        for future in as_completed(futures):
            step, _, index = future.key.partition(f"-{self.token}-")
            try:
                result = future.result()
            except Exception as exc:
                failure = _failed(step, int(index), exc)
                if failure is exc:
                    raise
                raise failure from exc
            yield step, int(index), result

    def map(self, step: str, fn: Callable, arg_tuples: Iterable[tuple]) -> list:
        futures = [self.submit(step, i, fn, *args) for i, args in enumerate(arg_tuples)]
        try:
            results = {index: result for _, index, result in self.finished(futures)}
            return [results[i] for i in range(len(futures))]
        finally:
            self.cancel(futures)
            done = {f.key for f in futures}
            self.submitted = [f for f in self.submitted if f.key not in done]

    def cancel(self, futures: list | None = None) -> None:
        self.client.cancel(self.submitted if futures is None else futures)
