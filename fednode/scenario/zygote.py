"""Scenario layer: the zygote, a process that imports the heavy modules once and forks nodes.

Started by :class:`fednode.scenario.launcher.Zygote` as ``python -m fednode.scenario.zygote FD
PARENT``, with FD one end of a ``SOCK_SEQPACKET`` socket pair. Each request on it (one JSON object
with two file descriptors, the node's stdout and stderr) names a program (``-m module args``,
``-c code args`` or ``script args``), its environment, the modules to import first and the task
to :func:`~fednode.task.runner.preload`. The zygote imports those (once: later nodes find them
loaded), forks, replies ``{"id", "pid"}`` with a pidfd of the child, and later ``{"id",
"exit"}`` with its exit status (``-signal`` if killed), as ``subprocess`` reports them.

The child is a real OS process: its own PID and process group, stdin ``/dev/null``, its output on
the descriptors it was given, the environment it was given, killable on its own. It runs the
program as ``python`` would (``runpy``), and leaves the way a ``python`` process does (exceptions,
``sys.exit``, atexit handlers, a KeyboardInterrupt exiting by SIGINT), since the program runs
at the bottom of the zygote's own stack, which returns into the interpreter's exit; only the
interpreter's final teardown is skipped (:func:`_leave`).

Fork safety: the zygote keeps one thread (it serves with ``selectors``, reaps with pidfds, has
no signal handlers), and its parent starts it with one thread for numpy's BLAS and torch's
OpenMP, so no native thread pool exists at a fork; the task sets its own thread count in the
child. ``gc.freeze()`` before each fork keeps the collector from touching (and so copying) the
pages of what was imported.

Lifetime (Linux only): the zygote dies with its parent (``PR_SET_PDEATHSIG``) and every child
with the zygote; the zygote exits, killing whatever it started, when its parent closes the
socket.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import importlib
import io
import json
import os
import runpy
import selectors
import signal
import socket
import sys
from dataclasses import dataclass
from typing import TextIO

#: The largest request or reply (an environment fits many times over).
MAX_MESSAGE = 1 << 20
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class Fork:
    """A request, as the child received it."""

    id: int
    zygote: int
    argv: list[str]
    env: dict[str, str]
    stdout: int
    stderr: int


def main(argv: list[str]) -> int:
    """Serve requests on the socket ``argv[0]`` for the process ``argv[1]``; in a child, run its
    program and return (or raise) what it does."""
    fd, parent = int(argv[0]), int(argv[1])
    atexit.register(_leave)  # before anything else registers: so it runs after all of them
    _die_with(parent)
    # Held until a child has its handler: a node sent SIGINT as it starts takes it as Ctrl-C.
    # (The parent stops the zygote by closing the socket.)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    sock = socket.socket(fileno=fd)
    child = serve(sock)
    if child is None:
        return 0
    return run_child(child)


def serve(sock: socket.socket) -> Fork | None:
    """Fork on every request until the socket closes (then kill every child still running and
    return None). In a child, return its request."""
    children: dict[int, tuple[int, int]] = {}  # pidfd -> (request id, pid)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj is not sock:
                    pidfd = key.fd
                    ident, pid = children.pop(pidfd)
                    selector.unregister(pidfd)
                    os.close(pidfd)
                    _, status = os.waitpid(pid, 0)
                    _send(sock, {"id": ident, "exit": os.waitstatus_to_exitcode(status)})
                    continue
                message, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 2)
                if not message:
                    for _, pid in children.values():
                        _kill_group(pid)
                    return None
                request = json.loads(message)
                ident = int(request["id"])
                if len(fds) != 2:
                    for fd in fds:
                        os.close(fd)
                    _send(sock, {"id": ident, "error": "the request carried no stdout/stderr"})
                    continue
                _preload(request.get("preload", []), request.get("task"))
                gc.freeze()
                zygote = os.getpid()
                try:
                    pid = os.fork()
                except OSError as exc:
                    _send(sock, {"id": ident, "error": f"fork failed: {exc}"})
                    pid = -1
                if pid == 0:
                    sock.close()
                    for pidfd in children:
                        os.close(pidfd)
                    env = {str(k): str(v) for k, v in request["env"].items()}
                    return Fork(ident, zygote, list(request["argv"]), env, *fds)
                for fd in fds:
                    os.close(fd)
                if pid < 0:
                    continue
                _set_group(pid)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (ident, pid)
                selector.register(pidfd, selectors.EVENT_READ)
                socket.send_fds(sock, [json.dumps({"id": ident, "pid": pid}).encode()], [pidfd])
    finally:
        selector.close()


def run_child(request: Fork) -> int:
    """Become the node: own process group, die with the zygote, the given stdio and environment;
    then run its program."""
    os.setpgid(0, 0)
    _die_with(request.zygote)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    devnull = os.open(os.devnull, os.O_RDONLY)
    for source, target in ((devnull, 0), (request.stdout, 1), (request.stderr, 2)):
        os.dup2(source, target)
        os.close(source)
    os.environ.clear()
    os.environ.update(request.env)
    # Buffered as python would buffer them in this environment (PYTHONUNBUFFERED included).
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdout = _stdio(sys.stdout, 1, unbuffered, line=os.isatty(1))
    sys.stderr = _stdio(sys.stderr, 2, unbuffered, line=True)
    _outcome["status"] = 1  # what python exits with after an uncaught exception
    try:
        _run(request.argv)
    except SystemExit as exc:
        code = exc.code
        _outcome["status"] = 0 if code is None else code if isinstance(code, int) else 1
        raise
    except KeyboardInterrupt:
        _outcome["status"] = -signal.SIGINT
        raise
    _outcome["status"] = 0
    return 0


def _stdio(old: TextIO, fd: int, unbuffered: bool, *, line: bool) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(
        raw if unbuffered else io.BufferedWriter(raw),
        encoding=old.encoding,
        errors=old.errors,
        line_buffering=line and not unbuffered,
        write_through=unbuffered,
    )


def _run(argv: list[str]) -> None:
    kind, *rest = argv
    if kind == "-m":
        module, *args = rest
        sys.argv = ["-m", *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    elif kind == "-c":
        code, *args = rest
        sys.argv = ["-c", *args]
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = [kind, *rest]
        sys.path[0] = os.path.dirname(os.path.abspath(kind))
        runpy.run_path(kind, run_name="__main__")


#: How the child's program ended (empty in the zygote itself).
_outcome: dict[str, int] = {}


def _leave() -> None:
    """A child's exit, once its threads are joined and every other atexit handler ran: without
    the interpreter's teardown, which would free every object inherited from the zygote and so
    copy nearly every page of it (half a second and the zygote's size in memory, per node)."""
    if not _outcome:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    status = _outcome["status"]
    if status == -signal.SIGINT:  # as python leaves after an unhandled Ctrl-C
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status & 0xFF)


def _preload(modules: list[str], task: str | None) -> None:
    """Import what the node will: a failure here is the node's to report, when it imports the
    same thing itself."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            print(f"zygote: cannot preload {name}: {exc}", file=sys.stderr, flush=True)
    if task:
        from fednode.task.runner import preload

        try:
            preload(task)
        except Exception as exc:
            print(f"zygote: cannot preload task {task}: {exc}", file=sys.stderr, flush=True)


def _die_with(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies, even by SIGKILL; exit at once
    if it already has."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _set_group(pid: int) -> None:
    """The child's own process group, set from both sides, so that it exists before anyone may
    signal it (the child sets it too)."""
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # the child has set it, or already exited


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _send(sock: socket.socket, reply: dict[str, object]) -> None:
    sock.send(json.dumps(reply).encode())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
