"""Scenario layer: a ``fednode start`` node as a child OS process.

The parent reads the child's stdout (its identity block) and stderr (its log) on threads into
queues, so that callers wait on what the node says (``wait_for("PeerJoined", peer)``) rather
than on the clock. Every child is stopped by :meth:`NodeProcess.stop` (SIGINT, then SIGKILL).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

from fednode.errors import FednodeError

DEFAULT_WAIT = 60.0


class NodeProcessError(FednodeError):
    """A child node exited, or did not say what was expected in time."""


class NodeProcess:
    """One ``python -m fednode start`` child process.

    Attributes:
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
    ) -> None:
        """``command_prefix`` runs the node under another command, such as
        ``("ip", "netns", "exec", "ns1")`` (which execs it: signals still reach the node)."""
        self.wait = wait
        command = [
            *command_prefix,
            sys.executable,
            *("-m", "fednode", "start", "--data-dir", str(data_dir), *args),
        ]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})},
        )
        self._out: queue.Queue[str | None] = queue.Queue()
        self._err: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self.log: list[tuple[float, str]] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pumps = [
            threading.Thread(target=self._pump_out, args=(self.proc.stdout,), daemon=True),
            threading.Thread(target=self._pump_err, args=(self.proc.stderr,), daemon=True),
        ]
        for pump in self._pumps:
            pump.start()
        fields: dict[str, str] = {}
        try:
            while "listening" not in fields:
                line = self._out.get(timeout=wait)
                if line is None:
                    raise NodeProcessError(
                        f"node exited with code {self.proc.wait()}: {self._tail()}"
                    )
                key, _, value = line.partition("  ")
                fields.setdefault(key.strip(), value.strip())
        except queue.Empty:
            self.stop()
            raise NodeProcessError(
                f"node did not start within {wait:g} s: {self._tail()}"
            ) from None
        self.identity = fields
        self.peer_id = fields["peer ID"]
        self.addr = fields["listening"]

    def _pump_out(self, stream: IO[str]) -> None:
        for line in stream:
            self._out.put(line.rstrip("\n"))
        self._out.put(None)

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
        """SIGKILL, as a crash would; returns when it was sent."""
        at = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return at

    def stop(self, timeout: float = 10.0) -> int:
        """SIGINT (a clean shutdown), then SIGKILL if it has not exited within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def stderr_after_exit(self) -> str:
        """Everything the (exited) process wrote on stderr."""
        for pump in self._pumps:
            pump.join(timeout=self.wait)
        self._drain()
        return "\n".join(line for _, line in self.log)


def stop_all(nodes: Iterable[NodeProcess]) -> None:
    for node in nodes:
        node.stop()
