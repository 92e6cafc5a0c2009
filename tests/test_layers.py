"""Imports point down the layers (STYLE.md); the low layers stay free of trio, libp2p, torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fednode

PACKAGE = Path(fednode.__file__).parent
LAYERS = [
    "wire",
    "crypto",
    "protocol",
    "aggregation",
    "task",
    "net",
    "node",
    "cli",
    "ui",
    "scenario",
]
# cli, ui and scenario are one top tier: they may use each other.
RANK = {name: min(i, LAYERS.index("cli")) for i, name in enumerate(LAYERS)}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fednode" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in RANK else None


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def test_imports_point_down() -> None:
    # Prepare
    violations = []
    # Execute
    for path in PACKAGE.rglob("*.py"):
        module = "fednode." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        own = _layer(module)
        if own is None:
            continue
        for imported in _imports(path):
            target = _layer(imported)
            if target is not None and RANK[target] > RANK[own]:
                violations.append(f"{module} imports {imported}")
    # Assert
    assert violations == []


def _loaded_after(import_line: str) -> set[str]:
    roots = "sorted({m.split('.')[0] for m in sys.modules})"
    code = f"import sys; {import_line}; print(' '.join({roots}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_low_layers_import_no_trio_libp2p_or_torch() -> None:
    # Execute
    loaded = _loaded_after(
        "import fednode.wire, fednode.crypto, fednode.errors,"
        " fednode.protocol.membership, fednode.protocol.dialing"
    )
    # Assert
    assert not loaded & {"trio", "libp2p", "torch"}


def test_cli_does_not_import_torch() -> None:
    # Execute
    loaded = _loaded_after("import fednode.cli.main")
    # Assert
    assert "torch" not in loaded
