"""CLI layer: ``fednode start``, run a node until Ctrl-C (or SIGTERM).

It prints the node's peer ID and full multiaddrs (``/ip4/…/tcp/…/p2p/12D3…``, dialable as they
are by any libp2p implementation), then logs membership changes on stderr. Every role joins,
heartbeats, serves status and serves the blobs it holds; ``client``, ``combiner`` and ``reducer``
then run their part of training sessions (``fednode.node.client``, ``combiner``, ``reducer``,
``auto``):

- a reducer runs one session (``--session FILE`` and the session flags) and exits 0 once it
  completed, or with the exit code of a ``ProtocolError`` (7) if it failed;
- clients and combiners follow whatever session their federation runs, until stopped, or, with
  ``--exit-after-session``, until a session ends (exit 0);
- an ``auto`` node (the default role) is a client with data that serves as combiner when the
  reducer's election picks it, and a standby reducer (``fednode.node.auto``); given
  ``--session FILE`` it may start that session itself when no explicit reducer is around.

With ``--events`` the node prints one JSON object per line on stdout after its identity block
(``fednode.node.events``). ``FEDNODE_LOG_MODULES=1`` makes it log, at exit, the top-level modules
it loaded (a test checks that reducers and combiners never load torch).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from fednode.cli.command import Subparsers
    from fednode.node.config import NodeConfig
    from fednode.node.context import RoleContext
    from fednode.task.runner import TaskRunner
    from fednode.wire import SessionConfig

ROLES = ("client", "combiner", "reducer", "bootstrap", "auto")


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "start",
        help="run a node",
        description="Run a fednode node until Ctrl-C. "
        "Flags override the config file's [node] table.",
    )
    parser.add_argument("--role", choices=ROLES, help="the node's role (default: auto)")
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="a TOML file with a [node] table"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="key, peerstore and blobs (default: ./fednode-data)",
    )
    parser.add_argument(
        "--listen",
        action="append",
        metavar="MULTIADDR",
        help="listen address, repeatable (default: /ip4/0.0.0.0/tcp/0; none for a client)",
    )
    parser.add_argument(
        "--bootstrap",
        action="append",
        metavar="ADDR",
        help="a bootstrap peer's full multiaddr, repeatable",
    )
    parser.add_argument("--federation", metavar="ID", help="federation id (default: default)")
    parser.add_argument("--region", help="a region label advertised in heartbeats")
    parser.add_argument("--capacity", type=int, help="clients this node can take as a combiner")
    parser.add_argument(
        "--heartbeat-interval", type=float, metavar="SECONDS", help="heartbeat period (default: 1)"
    )
    parser.add_argument(
        "--mdns",
        action="store_true",
        default=None,
        help="also find peers on the LAN with mDNS: announce the listen addresses (not loopback) "
        "by multicast on their interfaces and dial the peers heard (default: off)",
    )
    parser.add_argument("--quiet", action="store_true", help="do not log membership changes")
    parser.add_argument(
        "--events",
        action="store_true",
        help="print one JSON object per line on stdout for each session event",
    )
    parser.add_argument(
        "--exit-after-session",
        action="store_true",
        help="a client or combiner: exit (0) when the session it follows ends",
    )
    _add_client_flags(parser)
    _add_reducer_flags(parser)
    return parser


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("client and reducer")
    group.add_argument(
        "--task",
        metavar="TASK",
        help="a client: the task it trains; a reducer: the session's task "
        "(a module such as fednode.task.digits, or a .py file; default: fednode.task.digits)",
    )
    group = parser.add_argument_group("client")
    group.add_argument(
        "--partition-index", type=int, metavar="I", help="this client's share of the data (0-based)"
    )
    group.add_argument(
        "--partition-count", type=int, metavar="N", help="how many shares the data is cut into"
    )


def _add_reducer_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "reducer", "Session settings; flags override the --session file's [session] table."
    )
    group.add_argument(
        "--session",
        type=Path,
        metavar="FILE",
        help="a TOML file: [session] (for an auto node: a session it may start itself when "
        "no explicit reducer is around)",
    )
    group.add_argument(
        "--standby",
        action="store_true",
        help="a reducer that starts no session: it follows the federation's session and takes "
        "over when its reducer dies (the session settings come from the reducer's checkpoints)",
    )
    group.add_argument(
        "--lease",
        type=float,
        metavar="SECONDS",
        help="the reducer's lease: a standby takes over this long after the reducer's last "
        "checkpoint, once the reducer is dead (default: five heartbeat periods)",
    )
    group.add_argument("--session-id", metavar="ID", help="the session's name (default: fresh)")
    group.add_argument("--rounds", type=int, metavar="R", help="training rounds (default 5)")
    group.add_argument(
        "--min-clients", type=int, metavar="N", help="fewest updates that close a round (2)"
    )
    group.add_argument(
        "--max-retries", type=int, metavar="N", help="re-plans of a short round before failing (2)"
    )
    group.add_argument(
        "--round-deadline", type=float, metavar="SECONDS", help="how long a round stays open (60)"
    )
    group.add_argument("--epochs", type=int, help="local epochs per round (5)")
    group.add_argument("--batch-size", type=int, help="local minibatch size (32)")
    group.add_argument("--lr", type=float, help="clients' learning rate (0.5)")
    group.add_argument(
        "--server-optimizer",
        choices=("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"),
        help="applied by the reducer to each round's average (fedavg)",
    )
    group.add_argument(
        "--server-lr", type=float, help="the server optimiser's rate (its own default)"
    )
    group.add_argument(
        "--eval-every", type=int, metavar="K", help="evaluate every K rounds and the last; 0: never"
    )
    group.add_argument("--seed", type=int, help="seeds the initial model, partition, shuffles (0)")
    group.add_argument("--partition", choices=("iid", "dirichlet"), help="data split (iid)")
    group.add_argument("--alpha", type=float, help="Dirichlet concentration (0.5)")
    group.add_argument("--proximal-mu", type=float, help="FedProx coefficient (0: FedAvg)")
    group.add_argument(
        "--wait-for",
        type=int,
        metavar="N",
        help="start the session once N clients are alive (default: --min-clients)",
    )
    group.add_argument(
        "--wait-for-combiners",
        type=int,
        metavar="K",
        default=1,
        help="...and K combiners (default 1)",
    )


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    from fednode.node.config import load_config

    return load_config(
        args.config,
        role=args.role,
        data_dir=args.data_dir,
        listen=args.listen,
        bootstrap=args.bootstrap,
        federation=args.federation,
        region=args.region,
        capacity=args.capacity,
        heartbeat_interval=args.heartbeat_interval,
        mdns=args.mdns,
        task=args.task if args.role != "reducer" else None,
        partition_index=args.partition_index,
        partition_count=args.partition_count,
    )


def session_from_args(args: argparse.Namespace) -> tuple[str, SessionConfig]:
    from fednode.node.session import load_session

    return load_session(
        args.session,
        id=args.session_id,
        rounds=args.rounds,
        min_clients=args.min_clients,
        max_retries=args.max_retries,
        round_deadline=args.round_deadline,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        server_optimizer=args.server_optimizer,
        server_lr=args.server_lr,
        eval_every=args.eval_every,
        seed=args.seed,
        task=args.task,
        partition=args.partition,
        alpha=args.alpha,
        proximal_mu=args.proximal_mu,
    )


def run(args: argparse.Namespace) -> int:
    import logging
    import os
    import sys

    import trio

    from fednode.task.runner import preloaded

    config = config_from_args(args)
    standby = bool(getattr(args, "standby", False))
    starts = (config.role == "reducer" and not standby) or (
        config.role == "auto" and args.session is not None
    )
    session = session_from_args(args) if starts else None
    if args.wait_for is not None and args.wait_for < 1:
        from fednode.errors import ConfigError

        raise ConfigError("--wait-for must be at least 1")
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("fednode.net").setLevel(logging.WARNING)
    runner = _runner(config, session)
    if standby and runner is None:  # a standby evaluates as soon as it takes over
        from fednode.task import DEFAULT_TASK
        from fednode.task.runner import TaskRunner

        runner = TaskRunner(args.task or DEFAULT_TASK, mode="process")
    try:
        if runner is not None and preloaded(runner.spec):
            _fork_worker(runner)
        code: int = trio.run(_serve, config, args, session, runner)
    finally:
        if runner is not None:
            runner.close()
        if os.environ.get("FEDNODE_LOG_MODULES"):
            loaded = sorted({name.split(".")[0] for name in sys.modules})
            print(f"fednode: modules loaded: {' '.join(loaded)}", file=sys.stderr, flush=True)
    return code


def _runner(config: NodeConfig, session: tuple[str, SessionConfig] | None) -> TaskRunner | None:
    """The task runner a role needs: a client's, to train; a reducer's, to evaluate. Both run
    the task in a worker process, so neither the loop nor the reducer's process loads torch."""
    from fednode.task import DEFAULT_TASK
    from fednode.task.runner import TaskRunner

    if config.role in ("client", "auto"):
        return TaskRunner(config.task or DEFAULT_TASK, mode="process")
    if session is not None and session[1].eval_every > 0:
        return TaskRunner(session[1].task, mode="process")
    return None


def _fork_worker(runner: TaskRunner) -> None:
    """Start the worker of a task this process already loaded (a node forked by the demo's
    zygote) while the process has one thread, so that it is forked with the task in memory; a
    failure is left for the warm-up to report."""
    try:
        runner.start()
    except Exception:
        pass


async def _serve(
    config: NodeConfig,
    args: argparse.Namespace,
    session: tuple[str, SessionConfig] | None,
    runner: TaskRunner | None,
) -> int:
    import signal
    import sys

    import trio

    from fednode.cli.console import field_lines, show, stdout_console
    from fednode.crypto import load_or_create_key
    from fednode.net.blobstore import BlobStore
    from fednode.net.libp2p_host import open_libp2p_host
    from fednode.node.context import Activity, RoleContext
    from fednode.node.events import EventLog
    from fednode.node.runtime import open_node, system_load

    key, created = load_or_create_key(config.key_path)
    console = stdout_console()
    events = EventLog(sys.stdout if args.events else None)
    ctx: RoleContext | None = None
    code = 0
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with open_libp2p_host(key, config.listen_addrs(), mdns=config.mdns) as host:
                addrs = host.listen_addrs()
                rows = [
                    ("peer ID", key.peer_id),
                    ("role", config.role),
                    ("federation", config.federation),
                ]
                rows += [("key", f"{config.key_path}{' (new)' if created else ''}")]
                rows += [("listening", addr) for addr in addrs] or [
                    ("listening", "no inbound port (dials out only)")
                ]
                show(console, field_lines(rows, indent=0))
                console.file.flush()
                store = BlobStore(config.data_dir)
                activity = Activity()
                # A client joins (heartbeats) once it can train: the reducer counts it then,
                # and the first round does not wait for torch to load.
                trains = config.role in ("client", "auto")
                if runner is None or not trains or await _warm_up(runner, signals):
                    load = activity.load(system_load)
                    async with open_node(config, key, host, load=load) as node:
                        ctx = RoleContext(node, store, events=events, activity=activity)
                        code = await _run_role(ctx, args, session, runner, signals)
                print("fednode: stopping", file=console.file, flush=True)
    finally:
        if runner is not None:
            await trio.to_thread.run_sync(runner.close)
    events.emit("stopped", bytes_sent=ctx.bytes_sent() if ctx is not None else 0)
    return code


async def _warm_up(runner: TaskRunner, signals: AsyncIterator[int]) -> bool:
    """Load the task in its worker; False if a signal came first."""
    import logging

    import trio

    log = logging.getLogger("fednode.node.client")
    started = trio.current_time()
    warm = False
    async with trio.open_nursery() as nursery:

        async def load() -> None:
            nonlocal warm
            try:
                # (trio-typing, which libp2p installs, shadows trio's stubs: an older signature.)
                await trio.to_thread.run_sync(  # type: ignore[call-arg]
                    runner.start, abandon_on_cancel=True
                )
            except Exception as exc:  # the task's own failure: each round will report it
                log.error("the task %s did not load: %s", runner.spec, exc)
            warm = True
            nursery.cancel_scope.cancel()

        async def until_signal() -> None:
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()

        nursery.start_soon(load)
        nursery.start_soon(until_signal)
    if warm:
        elapsed = trio.current_time() - started
        log.info(
            "task %s loaded in %.1f s (worker %sed)", runner.spec, elapsed, runner.start_method
        )
    return warm


async def _run_role(
    ctx: RoleContext,
    args: argparse.Namespace,
    session: tuple[str, SessionConfig] | None,
    runner: TaskRunner | None,
    signals: AsyncIterator[int],
) -> int:
    """Run the node's role until it is done or a signal comes; returns the exit code."""
    import trio

    from fednode.errors import ProtocolError, exit_code_for

    role = ctx.node.config.role
    code = 0

    async def work(cancel: trio.CancelScope) -> None:
        nonlocal code
        if role == "reducer":
            from fednode.node.leader import ReducerSeat

            seat = ReducerSeat(
                ctx,
                session=session,
                runner=runner,
                wait_for=args.wait_for,
                wait_for_combiners=args.wait_for_combiners,
                lease=args.lease,
            )
            ended = await seat.run()
            if ended is not None and ended.outcome != "completed":
                code = exit_code_for(ProtocolError(ended.reason))
        elif role == "combiner":
            from fednode.node.combiner import CombinerDriver

            await CombinerDriver(ctx, exit_after_session=args.exit_after_session).run()
        elif role == "auto":
            from fednode.node.auto import AutoDriver

            assert runner is not None
            node_config = ctx.node.config
            led = await AutoDriver(
                ctx,
                runner,
                partition_index=node_config.partition_index,
                partition_count=node_config.partition_count,
                session=session,
                wait_for=args.wait_for,
                wait_for_combiners=args.wait_for_combiners,
                lease=args.lease,
                exit_after_session=args.exit_after_session,
            ).run()
            if led is not None and led.outcome != "completed":
                code = exit_code_for(ProtocolError(led.reason))
        elif role == "client":
            from fednode.node.client import ClientDriver

            assert runner is not None
            node_config = ctx.node.config
            await ClientDriver(
                ctx,
                runner,
                partition_index=node_config.partition_index,
                partition_count=node_config.partition_count,
                exit_after_session=args.exit_after_session,
            ).run()
        else:
            await trio.sleep_forever()
        cancel.cancel()

    async def until_signal(cancel: trio.CancelScope) -> None:
        async for _ in signals:
            break
        cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(work, nursery.cancel_scope)
        nursery.start_soon(until_signal, nursery.cancel_scope)
    return code
