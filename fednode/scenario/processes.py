"""Scenario layer: a ``fednode start`` node as a child OS process.

The parent reads the child's stdout (its identity block) and stderr (its log) on threads into
queues, so that callers wait on what the node says (``wait_for("PeerJoined", peer)``) rather
than on the clock. Every child is stopped by :meth:`NodeProcess.stop` (SIGINT, then SIGKILL).

A child is a ``subprocess.Popen`` of its command, or whatever a ``launch`` callable returns for
it (a node forked by :class:`fednode.scenario.launcher.Zygote`).

Each child leads a process group of its own: a Ctrl-C at the terminal reaches the parent only,
which stops its children in order, and whatever a child started (a training worker) is killed
with it. A node started with ``--events`` prints one JSON object per line after its identity
block; given an ``events`` queue, the parent puts each as a :class:`NodeLine`, and a
:class:`NodeExited` when the child exits, so one loop can follow many nodes.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fednode.errors import FednodeError
from fednode.scenario.launcher import ChildProcess, LauncherError

DEFAULT_WAIT = 60.0
#: After a node exits, how long its last stdout lines may take to arrive before NodeExited is
#: reported anyway (a worker it started may hold the pipe open, so EOF can come much later).
EXIT_FLUSH = 1.0


class NodeProcessError(FednodeError):
    """A child node exited, or did not say what was expected in time."""


#: The node program: ``fednode start`` in this interpreter.
FEDNODE_START: tuple[str, ...] = (sys.executable, "-m", "fednode", "start")

# Run before the node's own program (which it then execs): on Linux, have the kernel SIGKILL
# the node when its parent dies, even by SIGKILL, when no cleanup code of the parent can run.
# argv: the parent's pid, then the command. A parent that died before the prctl is caught by
# comparing the parent pid.
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


@dataclass(frozen=True, slots=True)
class NodeLine:
    """A JSON object a node printed on stdout, read ``at`` (``time.monotonic()``)."""

    node: str
    data: dict[str, object]
    at: float


@dataclass(frozen=True, slots=True)
class NodeExited:
    """A node exited with ``code`` (negative: killed by signal ``-code``), seen ``at``
    (``time.monotonic()``); after the lines it printed (within :data:`EXIT_FLUSH`)."""

    node: str
    code: int
    at: float


NodeOutput = NodeLine | NodeExited
#: Starts a node: its command and its whole environment in, the running child out.
Launch = Callable[[list[str], dict[str, str]], ChildProcess]


class NodeProcess:
    """One ``python -m fednode start`` child process.

    Attributes:
        name: what the caller calls the node (``client-3``); tags its :class:`NodeOutput`.
        peer_id: the node's peer ID, from its identity block.
        addr: its first full multiaddr, or the "no inbound port" note of a client.
    """

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        wait: float = DEFAULT_WAIT,
        extra_env: dict[str, str] | None = None,
        command_prefix: Sequence[str] = (),
        program: Sequence[str] = FEDNODE_START,
        name: str = "",
        events: queue.Queue[NodeOutput] | None = None,
        ready: bool = True,
        die_with_parent: bool = False,
        launch: Launch | None = None,
    ) -> None:
        """``command_prefix`` runs the node under another command, such as
        ``("ip", "netns", "exec", "ns1")`` (which execs it: signals still reach the node).
        ``program`` replaces ``fednode start`` (a stand-in node in tests). With ``ready=False``
        the constructor returns at once and :meth:`wait_ready` reads the identity block, so many
        nodes can start side by side. ``die_with_parent`` (Linux) has the kernel kill the node
        if this process dies without stopping it (``kill -9``). ``launch`` starts the command
        in place of ``subprocess.Popen`` (``die_with_parent`` is then its business).

        Raises:
            NodeProcessError: ``launch`` could not start it.
        """
        self.wait = wait
        self.name = name or str(data_dir.name)
        self._events = events
        command = [*command_prefix, *program, "--data-dir", str(data_dir), *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.proc: ChildProcess
        if launch is not None:
            try:
                self.proc = launch(command, env)
            except LauncherError as exc:
                raise NodeProcessError(f"{self.name} did not start: {exc}") from exc
        else:
            if die_with_parent and sys.platform == "linux":
                command = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]
            self.proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                env=env,
                process_group=0,
            )
        self._out: queue.Queue[str | None] = queue.Queue()
        self._err: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self.log: list[tuple[float, str]] = []
        self.identity: dict[str, str] = {}
        self.peer_id = ""
        self.addr = ""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pumps = [
            threading.Thread(target=self._pump_out, args=(self.proc.stdout,), daemon=True),
            threading.Thread(target=self._pump_err, args=(self.proc.stderr,), daemon=True),
        ]
        for pump in self._pumps:
            pump.start()
        if events is not None:
            threading.Thread(target=self._report_exit, args=(events,), daemon=True).start()
        if ready:
            self.wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, wait: float | None = None) -> None:
        """Block until the node has printed its identity block (``peer ID`` to ``listening``).

        Raises:
            NodeProcessError: it exited first, or said nothing for ``wait`` seconds (it is then
                stopped).
        """
        if self.identity:
            return
        wait = self.wait if wait is None else wait
        fields: dict[str, str] = {}
        try:
            while "listening" not in fields:
                line = self._out.get(timeout=wait)
                if line is None:
                    raise NodeProcessError(
                        f"{self.name} exited with code {self.proc.wait()}: {self._tail()}"
                    )
                key, _, value = line.partition("  ")
                fields.setdefault(key.strip(), value.strip())
        except queue.Empty:
            self.stop()
            raise NodeProcessError(
                f"{self.name} did not start within {wait:g} s: {self._tail()}"
            ) from None
        self.identity = fields
        self.peer_id = fields["peer ID"]
        self.addr = fields["listening"]

    def _pump_out(self, stream: IO[str]) -> None:
        for raw in stream:
            line = raw.rstrip("\n")
            if self._events is not None and line.startswith("{"):
                data = _json_object(line)
                if data is not None:
                    self._events.put(NodeLine(self.name, data, time.monotonic()))
                    continue
            self._out.put(line)
        self._out.put(None)

    def _report_exit(self, events: queue.Queue[NodeOutput]) -> None:
        code = self.proc.wait()
        self._pumps[0].join(timeout=EXIT_FLUSH)  # what it printed before exiting comes first
        events.put(NodeExited(self.name, code, time.monotonic()))

    def _pump_err(self, stream: IO[str]) -> None:
        for line in stream:
            self._err.put((time.monotonic(), line.rstrip("\n")))
        self._err.put(None)

    def _tail(self) -> str:
        self._drain()
        return " | ".join(line for _, line in self.log[-5:])

    def _drain(self) -> None:
        while True:
            try:
                item = self._err.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self.log.append(item)

    def wait_for(self, *needles: str, since: float = 0.0) -> float:
        """Block until a log line read at or after ``since`` (``time.monotonic()``) contains
        every needle; return when it was read. Lines read while waiting for something else are
        kept and searched too."""
        for at, line in self.log:
            if at >= since and all(n in line for n in needles):
                return at
        deadline = time.monotonic() + self.wait
        while True:
            try:
                item = self._err.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise NodeProcessError(
                    f"no log line with {needles} within {self.wait:g} s"
                ) from None
            if item is None:
                raise NodeProcessError(
                    f"node exited (code {self.proc.wait()}) before logging {needles}"
                )
            self.log.append(item)
            at, line = item
            if at >= since and all(n in line for n in needles):
                return at

    def kill(self) -> float:
        """SIGKILL to the node and its process group, as a crash would; returns when it was
        sent."""
        at = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kill_group()
        return at

    def interrupt(self) -> None:
        """SIGINT to the node (not its group: the node shuts its own workers down)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def kill_group(self) -> None:
        """SIGKILL whatever is left in the node's process group (the node, workers it started)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is empty: everything in it has exited

    def stop(self, timeout: float = 10.0) -> int:
        """SIGINT (a clean shutdown), then SIGKILL if it has not exited within ``timeout``;
        then SIGKILL to anything left in its process group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.kill_group()
        return self.proc.wait()

    def stderr_after_exit(self, timeout: float | None = None) -> str:
        """Everything the (exited) process wrote on stderr, waiting up to ``timeout`` (default:
        ``wait``) for the pipe to close (a worker it started may hold it open)."""
        for pump in self._pumps:
            pump.join(timeout=self.wait if timeout is None else timeout)
        self._drain()
        return "\n".join(line for _, line in self.log)


def stop_all(nodes: Iterable[NodeProcess], timeout: float = 10.0) -> dict[str, int]:
    """Stop ``nodes`` side by side: SIGINT to each, wait up to ``timeout`` for all of them, then
    SIGKILL the stragglers and every node's process group. Returns each node's exit code."""
    nodes = list(nodes)
    for node in nodes:
        node.interrupt()
    deadline = time.monotonic() + timeout
    for node in nodes:
        try:
            node.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()
    for node in nodes:
        node.kill_group()
    return {node.name: node.proc.wait() for node in nodes}


def _json_object(line: str) -> dict[str, object] | None:
    try:
        data = json.loads(line)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
