"""Task layer: run a task's training away from the event loop, in a thread or a warm process.

:class:`TaskRunner` has blocking methods; the node driver calls them from a worker thread
(``trio.to_thread.run_sync``), so training never stalls the trio loop (py-libp2p resets a stream
whose reader stalls for 5 s). Calls are serialised: one training or evaluation at a time.

``mode="process"`` (the default) keeps one warm worker process, started with ``spawn`` (but see
below) so the node's process never imports torch and the worker inherits none of its threads or
sockets;
params and results cross as pickled numpy arrays. ``mode="thread"`` runs the task in the calling
thread, in the node's process.

Why a process by default, measured on this 2-core machine with the built-in task (one client's
round, 144 examples x 5 epochs, trained back to back while a trio loop does CPU work standing in
for noise/yamux/CBOR): the trio loop's worst lag is tens of milliseconds in both modes, far from
py-libp2p's 5 s, but in a thread the small model's per-op Python dispatch contends for the GIL,
so the loop gets through 35-60 % less work and training slows ~2x; and the node's resident
memory is ~390 MB with torch against ~46 MB without. The process costs its start-up (~2 s,
nearly all of it importing torch, which a thread pays too), ~40 MB for a second
interpreter, and a pickle of the model each way (microseconds for this model). Use ``"thread"``
for in-process tools and tests. As with any ``spawn`` worker, a script that starts a process
runner needs the ``if __name__ == "__main__":`` guard.

A process that loaded the task itself with :func:`preload` (the demo's zygote, whose nodes are
forked from it with torch and the data already in memory) has its worker *forked* instead, which
costs milliseconds instead of seconds: the worker inherits the task loaded and prepared. Only
while the process has a single thread (no event loop, no thread pool yet), since a fork copies
no other thread and so may copy a lock some other thread holds; ``fednode start`` therefore
starts its runner before ``trio.run``. A replacement for a worker that died is always spawned.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Literal

from fednode.errors import ConfigError
from fednode.task.api import (
    EvalConfig,
    Metrics,
    ModuleTask,
    TrainConfig,
    TrainResult,
    is_path_spec,
    load_task,
)
from fednode.wire.schema import Model

RunMode = Literal["thread", "process"]
MODES: tuple[RunMode, ...] = ("thread", "process")
DEFAULT_MODE: RunMode = "process"
#: How a ``"process"`` runner started its worker (see the module docstring).
StartMethod = Literal["fork", "spawn"]


class TaskRunner:
    """Runs one task's ``train``, ``evaluate`` and ``initial_params``, one call at a time.

    Use as a context manager, or call :meth:`start` and :meth:`close`. :meth:`start` loads the
    task (in the worker, for ``"process"``) and runs its ``prepare`` hook, so a bad task spec
    fails there with a :class:`~fednode.errors.ConfigError` and the first round does not pay for
    imports. Exceptions raised by the task's own code reach the caller unchanged.
    """

    def __init__(self, spec: str, *, mode: RunMode = DEFAULT_MODE) -> None:
        if mode not in MODES:
            raise ConfigError(f"task runner mode must be thread or process, got {mode!r}")
        self.spec = spec
        self.mode = mode
        self._worker_spec = _resolved(spec)
        self._lock = threading.Lock()
        self._task: ModuleTask | None = None
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._closed = False
        #: How the current (or last) worker was started; None before the first.
        self.start_method: StartMethod | None = None

    def __enter__(self) -> TaskRunner:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Load the task and warm it up (idempotent: ``prepare`` runs once per worker). For a
        ``"process"`` runner of a task this process :func:`preload`-ed, call it before starting
        any thread, so that the worker is forked."""
        self._call("prepare")

    def train(self, params: Model, config: TrainConfig) -> TrainResult:
        result: TrainResult = self._call("train", params, config)
        return result

    def evaluate(self, params: Model, config: EvalConfig) -> Metrics:
        metrics: Metrics = self._call("evaluate", params, config)
        return metrics

    def initial_params(self, seed: int) -> Model:
        params: Model = self._call("initial_params", seed)
        return params

    def close(self) -> None:
        """Stop the worker process, if any, after the call in progress (idempotent)."""
        with self._lock:
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        """A pool of one worker: forked for the first worker of a preloaded task while nothing
        else runs here that could hold a lock; spawned otherwise."""
        preloaded = self.start_method is None and self._worker_spec in _PREPARED
        start: StartMethod = "fork" if preloaded and _single_threaded() else "spawn"
        self.start_method = start
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context(start), initializer=_ignore_sigint
        )

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            if self._closed:
                raise RuntimeError("TaskRunner is closed")
            if self.mode == "thread":
                if self._task is None:
                    self._task = load_task(self.spec)
                return getattr(self._task, method)(*args)
            if self._pool is None:
                self._pool = self._new_pool()
            try:
                return self._pool.submit(_run_in_worker, self._worker_spec, method, args).result()
            except BrokenProcessPool as exc:
                # The worker died (killed, out of memory, crashed in native code). The next
                # call starts a new one.
                self._pool.shutdown(wait=False)
                self._pool = None
                raise ConfigError(
                    f"task {self.spec}: the worker process died during {method}"
                ) from exc


#: Tasks loaded in this process (by a worker, or by :func:`preload`), and those whose ``prepare``
#: hook ran: both inherited by a forked worker.
_TASKS: dict[str, ModuleTask] = {}
_PREPARED: set[str] = set()


def preload(spec: str) -> ModuleTask:
    """Load ``spec`` in this process and run its ``prepare`` hook, so that a ``"process"``
    runner of it started here forks its worker (see the module docstring).

    Raises:
        ConfigError: as :func:`~fednode.task.api.load_task`; the task's own exceptions from
            ``prepare`` pass unchanged, and the task is then not preloaded.
    """
    key = _resolved(spec)
    _prepare(key)
    return _TASKS[key]


def preloaded(spec: str) -> bool:
    """Whether this process :func:`preload`-ed ``spec``."""
    return _resolved(spec) in _PREPARED


def _resolved(spec: str) -> str:
    """A task spec independent of the working directory (a worker resolves a file path itself)."""
    return str(Path(spec.strip()).expanduser().resolve()) if is_path_spec(spec) else spec


def _single_threaded() -> bool:
    """Whether this process has one thread, counting threads of native libraries (Linux only:
    elsewhere we do not fork)."""
    if sys.platform != "linux":
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the node decides when its worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_in_worker(spec: str, method: str, args: tuple[Any, ...]) -> Any:
    if method == "prepare":
        _prepare(spec)
        return None
    return getattr(_task(spec), method)(*args)


def _task(spec: str) -> ModuleTask:
    task = _TASKS.get(spec)
    if task is None:
        task = _TASKS[spec] = load_task(spec)
    return task


def _prepare(spec: str) -> None:
    """Run the task's ``prepare`` hook once per process (a forked worker inherits its effect)."""
    if spec not in _PREPARED:
        _task(spec).prepare()
        _PREPARED.add(spec)
