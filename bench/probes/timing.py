"""The probes' timer (run them from the repository root: `python bench/probes/NAME.py`)."""

import time

import torch


def images_per_second(fn, images_per_call: int, seconds: float, warmup: int = 2, stop=None) -> float:
    """`fn()` called over and over for `seconds` (or until the event `stop` is set), after
    `warmup` untimed calls, in inference mode, timed between GPU synchronizations."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds and not (stop is not None and stop.is_set()):
            fn()
            calls += 1
        torch.cuda.synchronize()
        return calls * images_per_call / (time.perf_counter() - started)
