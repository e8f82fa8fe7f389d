"""What a job shows while it runs: one progress bar with ETA per stage on the `vlsae` command's
console, or a log line every few seconds everywhere else.

Jobs open their stage with `stage(name, total, unit)` and call `advance()` as work completes (a
shard committed, a shard's partial result merged, a training step). When the CLI has made itself
quiet (`quiet`: this process's stdout and stderr, so Ray's logs, its workers' output and every
library's warnings, go to a log file), the stage draws a tqdm bar on the console and `echo` writes
results there. Without a console (a job under `ray job submit`, a notebook, a test), progress goes
to the `vlsae_ray.progress` logger: done/total and the ETA, which is what an operator reading the
job's logs needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

log = logging.getLogger(__name__)
LOG_EVERY_S = 10.0

_console: TextIO | None = None  # the user's terminal, once `quiet` has moved stdout/stderr to a file
_errors: TextIO | None = None
_current: Stage | None = None


def quiet(path: str) -> None:
    """Send file descriptors 1 and 2 of this process (and of every process it starts) to `path`;
    `echo` and the stage bars keep writing to the terminal they were on."""
    global _console, _errors
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    _console = os.fdopen(os.dup(1), "w", buffering=1)
    _errors = os.fdopen(os.dup(2), "w", buffering=1)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 1)
    os.dup2(target, 2)
    os.close(target)


def echo(text: str = "", error: bool = False) -> None:
    """A line for the user: on the console when quiet, else on stdout (stderr for errors)."""
    stream = (_errors if error else _console) or (sys.stderr if error else sys.stdout)
    print(text, file=stream, flush=True)


def is_quiet() -> bool:
    return _console is not None


class Stage:
    """Progress of one stage: a bar on the console, or a log line every LOG_EVERY_S seconds."""

    def __init__(self, name: str, total: int, unit: str):
        self.name, self.total, self.unit = name, max(total, 1), unit
        self.done, self.started, self.logged = 0, time.monotonic(), 0.0
        self.bar = None
        if _console is not None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                desc=f"{name:<9}",
                unit=f" {unit}",
                file=_console,
                dynamic_ncols=True,
                bar_format="{desc}{percentage:3.0f}%|{bar:30}| {n_fmt}/{total_fmt}{unit} "
                "[{elapsed}<{remaining}]",
            )

    def advance(self, n: int = 1) -> None:
        if n <= 0:
            return
        self.done = min(self.done + n, self.total)
        if self.bar is not None:
            self.bar.n = self.done
            self.bar.refresh()
            return
        now = time.monotonic()
        if now - self.logged >= LOG_EVERY_S or self.done == self.total:
            self.logged = now
            elapsed = now - self.started
            eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            log.info("%s: %d/%d %s, %.0f s elapsed, ETA %.0f s", self.name, self.done, self.total, self.unit,
                     elapsed, eta)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def stage(name: str, total: int, unit: str) -> Iterator[Stage]:
    """The running job's stage; `advance()` anywhere below moves it. A stage inside another one (a
    job calling a job) leaves the outer one in charge."""
    global _current
    if _current is not None:
        yield _current
        return
    _current = Stage(name, total, unit)
    try:
        yield _current
    finally:
        _current.close()
        _current = None


def advance(n: int = 1) -> None:
    if _current is not None:
        _current.advance(n)


@contextlib.contextmanager
def remote_counter(poll_s: float = 0.5) -> Iterator[object | None]:
    """A Ray actor that workers set to their step count, followed by the current stage while open;
    None without a console (the workers log their own progress then)."""
    if _current is None or _current.bar is None:
        yield None
        return
    import ray

    counter = ray.remote(num_cpus=0)(_Counter).remote()
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(poll_s):
            with contextlib.suppress(Exception):  # the actor goes with the job; a late poll is harmless
                advance(ray.get(counter.done.remote(), timeout=5) - _current.done)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield counter
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            advance(ray.get(counter.done.remote(), timeout=5) - _current.done)
        ray.kill(counter)


class _Counter:
    def __init__(self):
        self.steps = 0

    def set(self, steps: int) -> None:
        self.steps = steps

    def done(self) -> int:
        return self.steps
