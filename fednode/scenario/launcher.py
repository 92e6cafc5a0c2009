"""Scenario layer: starting node processes, by ``exec`` (a fresh interpreter each) or by fork
from a zygote that imported the heavy modules once (:mod:`fednode.scenario.zygote`).

A fresh ``fednode start`` interpreter spends about a second importing libp2p, and a client's
training worker about three more importing torch and loading its data: fourteen nodes on two
cores take half a minute to be ready. Forked from a zygote, each node starts with all of that in
memory (copy-on-write), and a client forks its worker from itself the same way.

:class:`Zygote` is the parent's end: :meth:`Zygote.fork` returns a :class:`ForkedProcess`, which
answers as much of :class:`subprocess.Popen`'s interface as :mod:`fednode.scenario.processes`
uses (:class:`ChildProcess`): the pid, stdout and stderr pipes, ``poll``, ``wait``,
``send_signal``, ``kill``. Signals go through a pidfd, so a recycled pid is never signalled; the
exit status comes from the zygote, which reaps its children.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import IO, Protocol

from fednode.errors import FednodeError

#: Native thread pools the zygote must not start: a fork copies no thread.
SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_ZYGOTE = "fednode.scenario.zygote"
_MAX_MESSAGE = 1 << 20


class LauncherError(FednodeError):
    """The zygote could not start a node, or died."""


class ChildProcess(Protocol):
    """What :class:`fednode.scenario.processes.NodeProcess` needs of a child process."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def stdout(self) -> IO[str] | None: ...

    @property
    def stderr(self) -> IO[str] | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


def fork_supported() -> bool:
    """The zygote needs Linux (``prctl``, pidfds)."""
    return sys.platform == "linux" and hasattr(os, "pidfd_open")


def forkable(command: Sequence[str]) -> bool:
    """Whether the zygote can run ``command``: this interpreter with ``-m module``, ``-c code`` or
    a script, and no interpreter options."""
    if len(command) < 2 or command[0] != sys.executable:
        return False
    if command[1] in ("-m", "-c"):
        return len(command) >= 3
    return not command[1].startswith("-")


class ForkedProcess:
    """A process the zygote forked (see the module docstring)."""

    def __init__(self, args: Sequence[str]) -> None:
        self.args = list(args)
        self.pid = 0
        self.returncode: int | None = None
        self.stdout: IO[str] | None = None
        self.stderr: IO[str] | None = None
        self._pidfd = -1
        self._lock = threading.Lock()
        self._forked = threading.Event()
        self._exited = threading.Event()
        self._error = ""

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        with self._lock:
            if self.returncode is None and self._pidfd >= 0:
                try:
                    signal.pidfd_send_signal(self._pidfd, sig)
                except ProcessLookupError:
                    pass  # it exited; the zygote has reaped it or is about to

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def close_pipes(self) -> None:
        for pipe in (self.stdout, self.stderr):
            if pipe is not None:
                pipe.close()

    def _started(self, pid: int, pidfd: int) -> None:
        with self._lock:
            self.pid, self._pidfd = pid, pidfd
        self._forked.set()

    def _ended(self, code: int, error: str = "") -> None:
        with self._lock:
            if self.returncode is not None:
                return
            self.returncode = code
            self._error = error
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
        self._forked.set()
        self._exited.set()


class Zygote:
    """The parent's end of a zygote process (see the module docstring). Start it, :meth:`fork`
    nodes from it, :meth:`close` it (which kills whatever it forked that still runs)."""

    def __init__(self, *, env: Mapping[str, str] | None = None) -> None:
        if not fork_supported():
            raise LauncherError("forking nodes from a zygote needs Linux")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", _ZYGOTE, str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env={**(env if env is not None else os.environ), **SINGLE_THREADED},
                process_group=0,
            )
        self._sock = ours
        self._send_lock = threading.Lock()
        self._children: dict[int, ForkedProcess] = {}
        self._next_id = 0
        self._closed = False
        self._gone = False
        self.log: collections.deque[str] = collections.deque(maxlen=20)
        threading.Thread(target=self._read_replies, daemon=True).start()
        threading.Thread(target=self._read_log, daemon=True).start()

    def fork(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        preload: Sequence[str] = (),
        task: str | None = None,
        timeout: float,
    ) -> ForkedProcess:
        """Fork a node that runs ``command`` (see :func:`forkable`) with ``env``, after importing
        ``preload`` and preloading ``task`` in the zygote (once for all nodes); returns once it
        runs.

        Raises:
            LauncherError: the zygote did not fork it within ``timeout``, could not, or died.
        """
        if not forkable(command):
            raise LauncherError(f"the zygote cannot run {list(command)}")
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        child = ForkedProcess(command)
        child.stdout = open(out_read, encoding="utf-8", errors="replace")
        child.stderr = open(err_read, encoding="utf-8", errors="replace")
        request: dict[str, object] = {
            "argv": list(command[1:]),
            "env": dict(env),
            "preload": list(preload),
            "task": task,
        }
        try:
            with self._send_lock:
                if self._gone:
                    raise LauncherError(f"the node launcher exited{self._last_words()}")
                ident = self._next_id = self._next_id + 1
                self._children[ident] = child
                request["id"] = ident
                socket.send_fds(self._sock, [json.dumps(request).encode()], [out_write, err_write])
        except OSError as exc:
            raise LauncherError(f"the node launcher is gone: {exc}") from exc
        finally:
            os.close(out_write)
            os.close(err_write)
        if child._forked.wait(timeout) and child.pid:
            return child
        child.close_pipes()
        if not child._forked.is_set():
            raise LauncherError(f"the node launcher did not start a node within {timeout:g} s")
        raise LauncherError(child._error or "the node launcher did not start a node")

    def close(self, timeout: float = 5.0) -> None:
        """Close the socket: the zygote kills what it forked that still runs, and exits.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._sock.shutdown(socket.SHUT_RDWR)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._sock.close()

    def _read_replies(self) -> None:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._sock, _MAX_MESSAGE, 1)
            except OSError:
                message, fds = b"", []
            if not message:
                break
            reply = json.loads(message)
            child = self._children.get(int(reply["id"]))
            if child is None:
                for fd in fds:
                    os.close(fd)
                continue
            if "pid" in reply and fds:
                child._started(int(reply["pid"]), fds[0])
            elif "exit" in reply:
                child._ended(int(reply["exit"]))
                del self._children[int(reply["id"])]
            else:
                child._ended(1, str(reply.get("error", "")))
        # The zygote is gone, and with it (the kernel saw to it) every node it forked.
        with self._send_lock:
            self._gone = True
        self.proc.wait()
        for child in list(self._children.values()):
            child._ended(-signal.SIGKILL, f"the node launcher exited{self._last_words()}")
        self._children.clear()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))

    def _last_words(self) -> str:
        return f": {self.log[-1]}" if self.log else ""
