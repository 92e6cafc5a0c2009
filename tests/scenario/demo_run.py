"""Run ``fednode demo`` as a subprocess for the real-process scenario tests, and read what it
left: the ``--json`` summary and the final global model from a node's blob store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fednode.net.blobstore import BlobStore
from fednode.node.context import decode_model
from fednode.wire import Digest


def run_demo(tmp_path: Path, *args: str, timeout: float) -> dict[str, Any]:
    """``fednode demo --no-live ARGS`` with a data directory and ``--json`` under ``tmp_path``
    and ``--timeout timeout``; asserts it exited 0 (showing the output and each node's last
    log lines if not); returns the summary, with ``"data_dir"`` and ``"stdout"`` added."""
    out = tmp_path / "result.json"
    data = tmp_path / "data"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "fednode", "demo", "--no-live", *args),
            *("--data-dir", str(data), "--json", str(out), "--timeout", f"{timeout:g}"),
        ],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
    )
    logs = "\n".join(
        f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-12:])
        for log in sorted(data.glob("*.log"))
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{logs}"
    summary: dict[str, Any] = json.loads(out.read_text())
    summary["data_dir"] = data
    summary["stdout"] = result.stdout
    return summary


def final_model(summary: dict[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    """The final global model, from the store of whichever node holds it (the node that led
    last, at least)."""
    digest = Digest(bytes.fromhex(summary["model"]))
    for node in sorted(Path(summary["data_dir"]).iterdir()):
        if node.is_dir() and BlobStore(node).has(digest):
            params, _ = decode_model(BlobStore(node).get(digest))
            return params
    raise AssertionError(f"no node holds the final model {summary['model'][:16]}")
