"""CLI layer: a guided tour of node identities and signed messages, run as the README's main job
until the demo federation exists: ``python -m fednode.cli.walkthrough [DIR]``.

Every step runs the real ``fednode`` command in a subprocess and shows it as a user would type it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.rule import Rule

from fednode.crypto import digest, load_key, seal_bytes
from fednode.scenario.processes import NodeProcess
from fednode.wire import FederationId, Model, ModelBlob, ModelUpdate, Nonce, SessionId, encode

console = Console()


def _run(*args: str, expect: int = 0) -> None:
    console.print(f"[bold]$ fednode {shlex.join(args)}[/bold]", soft_wrap=True)
    result = subprocess.run(
        [sys.executable, "-m", "fednode", *args], capture_output=True, text=True
    )
    for stream in (result.stdout, result.stderr):
        if stream.strip():
            console.print(stream.rstrip(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"[dim](exit code {result.returncode})[/dim]\n")
    if result.returncode != expect:
        raise SystemExit(
            f"walkthrough: `fednode {shlex.join(args)}` exited {result.returncode},"
            f" expected {expect}"
        )


def _network(workdir: Path) -> None:
    """A bootstrap node and three nodes as separate processes over libp2p on loopback: they find
    each other, one is killed, the others declare it dead."""
    interval = "0.5"
    nodes: list[NodeProcess] = []
    try:
        console.print("$ fednode start --role bootstrap --listen /ip4/127.0.0.1/tcp/0 &")
        boot = NodeProcess(
            workdir / "boot",
            "--role",
            "bootstrap",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--heartbeat-interval",
            interval,
        )
        nodes.append(boot)
        console.print(f"  peer ID {boot.peer_id}\n  listening {boot.addr}\n", soft_wrap=True)
        for name, role in (("alpha", "combiner"), ("beta", "combiner"), ("gamma", "client")):
            listen = () if role == "client" else ("--listen", "/ip4/127.0.0.1/tcp/0")
            console.print(
                f"$ fednode start --role {role} --bootstrap <bootstrap> {' '.join(listen)} &",
                soft_wrap=True,
            )
            node = NodeProcess(
                workdir / name,
                "--role",
                role,
                "--bootstrap",
                boot.addr,
                *listen,
                "--heartbeat-interval",
                interval,
            )
            nodes.append(node)
            console.print(f"  {name}: {node.peer_id} ({node.addr})", soft_wrap=True)
        started = time.monotonic()
        for node in nodes[1:]:
            boot.wait_for("PeerJoined", node.peer_id)
        console.print(
            f"\nThe bootstrap saw all three join within {time.monotonic() - started:.1f} s.\n"
        )
        _run("peers", boot.addr)
        victim = nodes[1]
        console.print(f"kill -9 {victim.proc.pid}  (alpha, a combiner)")
        killed_at = victim.kill()
        died_at = boot.wait_for("PeerDied", victim.peer_id, since=killed_at)
        console.print(f"The bootstrap declared alpha dead {died_at - killed_at:.2f} s later.\n")
        _run("peers", boot.addr)
    finally:
        for node in nodes:
            node.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    workdir = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="fednode-walkthrough-"))
    workdir.mkdir(parents=True, exist_ok=True)
    key_path = workdir / "node.key"

    console.print(Rule("1. A node identity"))
    console.print("One Ed25519 key is both the node's libp2p identity and its signing key.\n")
    _run("keygen", str(key_path), "--force")
    _run("id", str(key_path))
    console.print(f"The key file is private: mode {oct(os.stat(key_path).st_mode & 0o777)}.")
    _run("keygen", str(key_path), expect=5)

    console.print(Rule("2. A model and a signed update"))
    rng = np.random.default_rng(0)
    model = {
        "fc1.weight": rng.standard_normal((32, 64), dtype=np.float32),
        "fc1.bias": np.zeros(32, np.float32),
        "fc2.weight": rng.standard_normal((10, 32), dtype=np.float32),
        "fc2.bias": np.zeros(10, np.float32),
    }
    blob = encode(ModelBlob(tensors=Model(model)))
    (workdir / "model.cbor").write_bytes(blob)
    key = load_key(key_path)
    update = ModelUpdate(
        federation=FederationId("walkthrough"),
        session=SessionId("s1"),
        round=1,
        parent=digest(b"initial model"),
        update=digest(blob),
        size=len(blob),
        num_examples=180,
        metrics={"loss": 0.42, "accuracy": 0.91},
        signer=key.public_key,
        created_ms=int(time.time() * 1000),
        nonce=Nonce(os.urandom(16)),
    )
    signed = seal_bytes(key, update)
    (workdir / "update.cbor").write_bytes(signed)
    console.print(
        f"A {len(blob)}-byte model blob (content address = BLAKE3-256 of its bytes) and a"
    )
    console.print(f"{len(signed)}-byte signed update that commits to it.\n")
    _run("inspect", str(workdir / "model.cbor"))
    _run("inspect", str(workdir / "update.cbor"))

    console.print(Rule("3. Tampering is caught"))
    tampered = bytearray(signed)
    tampered[signed.index(b"accuracy") + 10] ^= 0x01  # flip one bit inside the signed payload
    (workdir / "tampered.cbor").write_bytes(bytes(tampered))
    _run("inspect", str(workdir / "tampered.cbor"), expect=4)
    (workdir / "truncated.cbor").write_bytes(signed[:-7])
    _run("inspect", str(workdir / "truncated.cbor"), expect=3)

    console.print(Rule("4. A small network"))
    _network(workdir)

    console.print(Rule("done"))
    console.print(f"Files are in {workdir}. Next: `fednode --help`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
