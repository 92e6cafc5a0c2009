"""Scenario layer: a whole local federation as separate OS processes over libp2p on loopback.

A :class:`Federation` starts a bootstrap node, then a reducer, combiners and clients side by
side, every one a ``fednode start --events`` process in a process group of its own, and follows
the JSON events they print (:mod:`fednode.scenario.events`) until the reducer completes the
session. It then stops the other nodes (SIGINT) while the reducer exits by itself, and reads
their ``stopped`` events, which carry the bytes each sent. :meth:`Federation.close` (also on
leaving the ``with`` block, however it is left) stops every process it started and SIGKILLs
whatever is left, with SIGINT and SIGTERM ignored meanwhile so that a second Ctrl-C cannot cut
the cleanup short.

With ``launcher="fork"`` (the default on Linux) the nodes are forked from a zygote
(:mod:`fednode.scenario.launcher`) that imported the node's modules once, and the task, torch and
its data once for the clients and the reducer; with ``"exec"`` each is a fresh interpreter. Either
way each node is a separate OS process with its own pid, process group, pipes and exit status.

Auto mode (``DemoConfig.auto``, ``fednode demo --auto``). The data nodes are ``--role auto``
nodes named ``auto-0``, ``auto-1``, ..., and no ``combiner-*`` process starts: the reducer's
election picks which auto nodes serve as combiners each round (an elected one is placed under
itself and aggregates its own update with its clients'), and the auto nodes are the reducer's
standbys (no ``reducer-<i>`` process is needed for ``--kill reducer``). ``combiners`` then says
how many combiners the election should pick: each auto node advertises ``--capacity
ceil(clients / combiners)`` (itself included), so that it takes that many to hold every node
(:meth:`DemoConfig.elected_combiners`); the reducer waits for one of them. That count holds
while the nodes have room; the election is load-aware, so on a saturated machine (every node
reports the machine's CPU) or after a death it may pick more, and who combines may change from
round to round (the ``--json`` rounds name them). Every auto node listens (an elected one takes
pushes), so the auto nodes dial one another: a denser mesh, and more gossip, than clients that
only dial out. Once the session is over, an auto node in office (one took over from a killed
reducer) is stopped like the others: an auto node runs until stopped. Kills in auto mode:
:mod:`fednode.scenario.kills`.

The run fails with :class:`DemoFailed` when the reducer reports ``session-failed``, any node
exits before the session completes, or the deadline passes. Waits are on the nodes' events, never
on the clock; the clock only bounds them.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import NoReturn

from fednode.crypto import load_or_create_key
from fednode.errors import FednodeError
from fednode.scenario.demo_config import (
    DEFAULT_TASK,
    LOOPBACK,
    DemoConfig,
    DemoResult,
    Launcher,
)
from fednode.scenario.events import EventError, SessionCompleted, SessionFailed, Stopped, decode
from fednode.scenario.kills import Chaos
from fednode.scenario.launcher import ChildProcess, Zygote
from fednode.scenario.processes import (
    EXIT_FLUSH,
    FEDNODE_START,
    Launch,
    NodeExited,
    NodeLine,
    NodeOutput,
    NodeProcess,
    NodeProcessError,
    stop_all,
)
from fednode.scenario.progress import FederationSnapshot, Progress, Role

#: What a ``fednode start`` node imports, loaded once in the zygote for every node.
NODE_MODULES = (
    "fednode.cli.main",
    "fednode.cli.start",
    "fednode.net.libp2p_host",
    "fednode.node.runtime",
    "fednode.node.client",
    "fednode.node.combiner",
    "fednode.node.reducer",
    "fednode.node.leader",
    "fednode.node.auto",
)


class DemoFailed(FednodeError):
    """The federation failed: the session failed, a node died, or the deadline passed."""


class Terminated(Exception):
    """SIGTERM arrived (raised by :func:`sigterm_raises`)."""


ProgressCallback = Callable[[FederationSnapshot], None]


class Federation:
    """Runs one local federation (see the module docstring). A context manager, so that leaving
    the block stops every process: ``with Federation(config, dir) as f: result = f.run()``.
    ``on_progress`` sees a snapshot after every change and every ``tick`` seconds."""

    def __init__(
        self,
        config: DemoConfig,
        data_dir: Path,
        *,
        on_progress: ProgressCallback | None = None,
        tick: float = 0.25,
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.on_progress = on_progress
        self.tick = tick
        self.nodes: dict[str, NodeProcess] = {}
        self.started = time.monotonic()
        self.progress = Progress(
            clients=config.clients,
            combiners=config.combiners,
            rounds=config.rounds,
            started=self.started,
            auto=config.auto,
        )
        self.deadline = self.started + config.timeout
        self._events: queue.Queue[NodeOutput] = queue.Queue()
        self._exited: set[str] = set()
        self._interrupted: set[str] = set()
        self._warnings: list[str] = []
        self._closed = False
        self._zygote: Zygote | None = None
        self.chaos = Chaos(
            config.kills,
            self.started,
            "reducer",
            auto=config.auto,
            combiners=config.combiners,
        )
        self._killed: set[str] = set()
        self._model: str | None = None

    def __enter__(self) -> Federation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- running ---

    def run(self) -> DemoResult:
        """Start the federation, follow it to the end of its session, stop it.

        Raises:
            DemoFailed: see the module docstring.
        """
        self.started = self.progress.started = self.chaos.started = time.monotonic()
        self.deadline = self.started + self.config.timeout
        try:
            self._start_nodes()
            self._follow_session()
            warnings = self._stop_nodes()
        except (NodeProcessError, EventError) as exc:
            self._fail(str(exc))
        self.progress.finish()
        self._report()
        progress = self.progress
        assert progress.session_started_at is not None
        assert progress.session_completed_at is not None
        return DemoResult(
            rounds=tuple(progress.completed),
            final_accuracy=progress.final_accuracy,
            total_seconds=progress.session_completed_at - self.started,
            startup_seconds=progress.session_started_at - self.started,
            first_round_seconds=(
                None if progress.first_round_at is None else progress.first_round_at - self.started
            ),
            processes_up_seconds=progress.processes_up_seconds,
            bytes_sent=progress.bytes_sent,
            warnings=tuple(warnings),
            model=self._model,
            events=tuple(self.chaos.timeline),
            heal_seconds=tuple(self.chaos.heal_seconds),
        )

    def snapshot(self) -> FederationSnapshot:
        return self.progress.snapshot(time.monotonic())

    def _start_nodes(self) -> None:
        """Every node at once: the bootstrap's address is known before it starts (its key is
        made here, its port picked here), so no node waits for another to come up; a node that
        dials the bootstrap before it listens retries (``fednode.protocol.dialing``). The nodes
        that do not train start first: forked, they need not wait for the zygote to load the
        task."""
        config = self.config
        boot_addr = _bootstrap_address(self.data_dir / "bootstrap")
        listen = boot_addr.rsplit("/p2p/", 1)[0]
        joined = ("--bootstrap", boot_addr)
        combiners = [] if config.auto else [f"combiner-{i}" for i in range(config.combiners)]
        clients = config.data_nodes
        standbys = [f"reducer-{i + 1}" for i in range(config.standby_count)]
        roles: list[tuple[str, Role]] = [("bootstrap", "bootstrap"), ("reducer", "reducer")]
        roles += [(name, "reducer") for name in standbys]
        roles += [(name, "combiner") for name in combiners]
        roles += [(name, config.data_role) for name in clients]
        for name, role in roles:
            self.progress.add_node(name, role)  # listed in this order, whatever the start order
        if config.forks:
            self._zygote = Zygote()
        self._spawn("bootstrap", "bootstrap", "--listen", listen)
        for name in combiners:
            self._spawn(name, "combiner", *joined, "--listen", LOOPBACK)
        self._spawn("reducer", "reducer", *joined, "--listen", LOOPBACK, *config.reducer_args())
        for name in standbys:
            self._spawn(name, "reducer", *joined, "--listen", LOOPBACK, "--standby")
        for i, name in enumerate(clients):
            self._spawn(name, config.data_role, *joined, *config.client_args(i))
        for node in self.nodes.values():
            self._ready(node)
        self.progress.all_up(time.monotonic())
        self._report()

    def _spawn(self, name: str, role: Role, *args: str) -> NodeProcess:
        node = NodeProcess(
            self.data_dir / name,
            *self.config.common_args(role),
            *args,
            program=self.config.program,
            name=name,
            events=self._events,
            ready=False,
            wait=self.config.timeout,
            die_with_parent=True,
            launch=self._launch(role),
        )
        self.nodes[name] = node
        return node

    def _launch(self, role: Role) -> Launch | None:
        """How a node of ``role`` starts: forked by the zygote, which first imports what a
        ``fednode start`` node does and, for the roles that run the task, loads it; or None,
        for a fresh process."""
        zygote, config = self._zygote, self.config
        if zygote is None:
            return None
        node_program = config.program == FEDNODE_START
        trains = role in ("client", "auto") or (role == "reducer" and config.eval_every > 0)

        def launch(command: list[str], env: dict[str, str]) -> ChildProcess:
            return zygote.fork(
                command,
                env=env,
                preload=NODE_MODULES if node_program else (),
                task=config.task if node_program and trains else None,
                timeout=max(0.01, self.deadline - time.monotonic()),
            )

        return launch

    def _ready(self, node: NodeProcess) -> None:
        node.wait_ready(max(0.01, self.deadline - time.monotonic()))
        self.progress.node_ready(node.name, node.peer_id)
        self._report()

    def _follow_session(self) -> None:
        """Take events until the reducer has completed the session, then until it has exited
        (within ``exit_grace``; :meth:`_stop_nodes` sees to it if not)."""
        wind_down: float | None = None  # when the reducer should have exited by
        while True:
            if wind_down is None:
                item = self._next(f"the session did not complete within {self.config.timeout:g} s")
            elif time.monotonic() < wind_down:
                item = self._next("", until=wind_down)
            else:
                self._warnings.append(
                    f"the reducer did not exit within {self.config.exit_grace:g} s of completing "
                    "the session"
                )
                return
            if item is None:
                continue
            if isinstance(item, NodeLine):
                event = self._take(item)
                self._chaos(item)
                if isinstance(event, SessionCompleted):
                    self._model = event.model
                if isinstance(event, SessionFailed):
                    self._fail(f"the session failed: {event.reason}")
                if isinstance(event, SessionCompleted) and wind_down is None:
                    wind_down = time.monotonic() + self.config.exit_grace
                    # The session is over: the others stop while the reducer winds down (an
                    # auto node in office runs until stopped, like any auto node).
                    for name in self.nodes:
                        leads = name == item.node and self.progress.nodes[name].role == "reducer"
                        if not leads and name not in self._exited:
                            self._interrupt(name)
                continue
            if wind_down is not None:
                if item.node == self.chaos.office:
                    return
                continue  # the session is over; _stop_nodes reports how each node ended
            if item.node in self._killed:
                continue  # we killed it
            what = "exited" if item.code >= 0 else "was killed"
            code = item.code if item.code >= 0 else f"signal {-item.code}"
            self._fail(f"{item.node} {what} unexpectedly (code {code}){self._last_words(item)}")

    def _chaos(self, line: NodeLine) -> None:
        """Fire the kill this event opens, if any (``--kill``)."""
        spec = self.chaos.on_event(line.node, line.data, line.at)
        if spec is None:
            return
        alive = [n for n in self.nodes if n not in self._exited and n not in self._killed]
        victim = self.chaos.victim(spec, alive)
        if victim is None and self.chaos.postpone(spec, alive):
            return  # until the demo hears who combines (auto mode)
        if victim is None:
            self._warnings.append(f"--kill {spec}: no live {spec.role} to kill")
            return
        self._killed.add(victim)
        at = self.nodes[victim].kill()
        self.chaos.killed(spec, victim, at)
        self._report()

    def _interrupt(self, name: str) -> None:
        """SIGINT, once: a node may take a second one as "stop now" and skip its cleanup."""
        if name not in self._interrupted:
            self._interrupted.add(name)
            self.nodes[name].interrupt()

    def _stop_nodes(self) -> list[str]:
        """SIGINT every node still running (each once), read their ``stopped`` events until
        all have exited (or ``stop_grace`` passes). Returns a warning for each node that did not
        stop cleanly."""
        for name in self.nodes:
            if name not in self._exited:
                self._interrupt(name)
        grace = time.monotonic() + self.config.stop_grace
        while len(self._exited) < len(self.nodes) and time.monotonic() < grace:
            item = self._next("", until=grace)
            if isinstance(item, NodeLine):
                self._take(item)
        warnings = self._warnings
        for name, node in self.nodes.items():
            if name in self._killed:
                continue
            if name not in self._exited:
                warnings.append(f"{name} did not stop within {self.config.stop_grace:g} s")
            elif node.proc.returncode != 0:
                warnings.append(f"{name} exited with code {node.proc.returncode} when stopped")
            elif self.progress.nodes[name].bytes_sent is None:
                warnings.append(f"{name} exited without a stopped event")
        return warnings

    def _next(self, timeout_message: str, until: float | None = None) -> NodeOutput | None:
        """The next output of any node, or None after a tick without one (the view refreshes).
        Raises DemoFailed with ``timeout_message`` once the deadline has passed."""
        limit = self.deadline if until is None else until
        remaining = limit - time.monotonic()
        if remaining <= 0:
            if until is None:
                self._fail(timeout_message)
            return None
        try:
            item = self._events.get(timeout=min(self.tick, remaining))
        except queue.Empty:
            self._report()
            return None
        if isinstance(item, NodeExited):
            self._exited.add(item.node)
            self.progress.exited(item.node, item.code)
        self._report()
        return item

    def _take(self, line: NodeLine) -> object:
        event = decode(line.data)
        if event is not None:
            self.progress.apply(line.node, event, line.at)
            if isinstance(event, Stopped | SessionCompleted | SessionFailed):
                self._report()
        return event

    def _last_words(self, item: NodeExited) -> str:
        node = self.nodes[item.node]
        node.kill_group()  # workers it left behind would hold its stderr open
        log = node.stderr_after_exit(timeout=EXIT_FLUSH).strip().splitlines()
        if not log:
            return ""
        last = log[-1].strip()
        return ": " + (last if len(last) <= 300 else last[:297] + "...")

    def _fail(self, message: str) -> NoReturn:
        self.progress.fail(message)
        self._report()
        raise DemoFailed(message)

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.snapshot())

    # --- cleanup ---

    def close(self) -> None:
        """Stop every process this federation started (SIGINT, then SIGKILL after
        ``stop_grace``), and kill their process groups. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        with _signals_ignored():
            stop_all(self.nodes.values(), timeout=self.config.stop_grace)
            if self._zygote is not None:
                self._zygote.close()
            self._write_logs()

    def _write_logs(self) -> None:
        """Each node's stderr to ``<data_dir>/<name>.log`` (kept with ``--keep``)."""
        for name, node in self.nodes.items():
            with contextlib.suppress(OSError):
                log = node.stderr_after_exit(timeout=EXIT_FLUSH)
                (self.data_dir / f"{name}.log").write_text(log + "\n")

    def pids(self) -> list[int]:
        return [node.pid for node in self.nodes.values()]


def _bootstrap_address(data_dir: Path) -> str:
    """A full loopback multiaddr for a bootstrap node yet to start: its key is created in
    ``data_dir`` (where ``fednode start`` finds it) and a free port is picked. Another program
    could take the port before the node binds it; the node would then fail to start, and say so.
    """
    key, _ = load_or_create_key(data_dir / "node.key")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{key.peer_id}"


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored for the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread, so ``finally``
    clauses and ``with`` blocks run as they do for Ctrl-C (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    saved = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)


__all__ = [
    "DEFAULT_TASK",
    "NODE_MODULES",
    "DemoConfig",
    "DemoFailed",
    "DemoResult",
    "Federation",
    "Launcher",
    "ProgressCallback",
    "Terminated",
    "sigterm_raises",
]
