"""The ``fednode`` command end to end (subprocesses in tmp_path), plus its views rendered to a
fixed-width string console."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fednode import __version__
from fednode.cli.describe import Inspection, summarize_tensor
from fednode.cli.view import render_inspection, tensor_table
from fednode.crypto import NodeKey, digest, load_key, open_envelope, seal_bytes
from fednode.errors import BadSignatureError, KeyFileError, WireError, exit_code_for
from fednode.wire import (
    BLOB_LIMITS,
    Digest,
    Envelope,
    FederationId,
    Model,
    ModelBlob,
    ModelUpdate,
    Nonce,
    SessionId,
    decode,
    encode,
)

WIRE_EXIT = exit_code_for(WireError("x"))
SIGNATURE_EXIT = exit_code_for(BadSignatureError("x"))
KEY_FILE_EXIT = exit_code_for(KeyFileError("x"))
# Colour would break the text comparisons; the CLI must not colour a pipe on its own.
ENV = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS")}


Output = subprocess.CompletedProcess[str]


def fednode(*args: str, stdin: bytes = b"") -> Output:
    result = subprocess.run(
        [sys.executable, "-m", "fednode", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        env=ENV,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def assert_one_line_error(result: Output, code: int) -> None:
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("fednode: error: ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


@pytest.fixture
def key() -> NodeKey:
    return NodeKey.generate()


@pytest.fixture
def model_blob() -> bytes:
    tensors = {
        "layer1.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "layer1.bias": np.array([0.5, -1.5], dtype=np.float32),
        "step": np.array([7], dtype=np.int64),
    }
    return encode(ModelBlob(tensors=Model(tensors)))


def make_update(key: NodeKey, blob: bytes, round: int = 3) -> ModelUpdate:
    return ModelUpdate(
        federation=FederationId("fed-demo"),
        session=SessionId("session-1"),
        round=round,
        parent=Digest(bytes(32)),
        update=digest(blob),
        size=len(blob),
        num_examples=500,
        metrics={"loss": 0.25},
        signer=key.public_key,
        created_ms=1_700_000_000_000,
        nonce=Nonce(bytes(range(16))),
    )


@pytest.fixture
def sealed_update(tmp_path: Path, key: NodeKey, model_blob: bytes) -> Path:
    path = tmp_path / "update.cbor"
    path.write_bytes(seal_bytes(key, make_update(key, model_blob)))
    return path


# --- keygen and id ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Output]:
    """A key file made by ``fednode keygen`` and that run's output. Tests that change it copy it."""
    path = tmp_path_factory.mktemp("keys") / "node.key"
    return path, fednode("keygen", str(path))


def copy_key(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    dst.chmod(0o600)
    return dst


def test_version() -> None:
    # Execute
    result = fednode("--version")
    # Assert
    assert (result.returncode, result.stdout) == (0, f"fednode {__version__}\n")


def test_keygen_creates_a_private_key_file_and_prints_its_peer_id(
    generated: tuple[Path, Output],
) -> None:
    # Execute
    path, result = generated
    # Assert
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(path).peer_id in result.stdout
    assert str(path) in result.stdout
    assert "\x1b[" not in result.stdout


def test_keygen_refuses_to_overwrite_without_force(
    generated: tuple[Path, Output], tmp_path: Path
) -> None:
    # Prepare
    path = copy_key(generated[0], tmp_path / "node.key")
    before = path.read_bytes()
    # Execute
    result = fednode("keygen", str(path))
    # Assert
    assert_one_line_error(result, KEY_FILE_EXIT)
    assert "--force" in result.stderr
    assert path.read_bytes() == before


def test_keygen_force_replaces_the_key(generated: tuple[Path, Output], tmp_path: Path) -> None:
    # Prepare
    path = copy_key(generated[0], tmp_path / "node.key")
    old = load_key(path).peer_id
    # Execute
    result = fednode("keygen", "--force", str(path))
    # Assert
    assert result.returncode == 0, result.stderr
    new = load_key(path).peer_id
    assert new != old
    assert new in result.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_id_shows_the_peer_id_keygen_printed(generated: tuple[Path, Output]) -> None:
    # Prepare
    path, created = generated
    key = load_key(path)
    # Execute
    text = fednode("id", str(path))
    as_json = fednode("id", "--json", str(path))
    # Assert
    assert key.peer_id in created.stdout
    assert text.returncode == 0
    assert key.peer_id in text.stdout
    assert key.public_key.hex() in text.stdout
    assert json.loads(as_json.stdout) == {
        "peer_id": key.peer_id,
        "public_key": key.public_key.hex(),
        "path": str(path),
    }


def test_id_refuses_a_key_file_others_can_read(
    generated: tuple[Path, Output], tmp_path: Path
) -> None:
    # Prepare
    path = copy_key(generated[0], tmp_path / "node.key")
    path.chmod(0o644)
    # Execute
    result = fednode("id", str(path))
    # Assert
    assert_one_line_error(result, KEY_FILE_EXIT)
    assert "0644" in result.stderr


# --- inspect ---------------------------------------------------------------------------------


def test_inspect_sealed_update_verifies_and_shows_fields(sealed_update: Path, key: NodeKey) -> None:
    # Execute
    result = fednode("inspect", str(sealed_update))
    # Assert
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "signature: valid" in out
    assert "fednode/model-update/v1" in out
    assert "model-update v1" in out
    assert key.peer_id in out
    assert "fed-demo" in out
    assert "round         3" in out
    assert "metrics.loss  0.25" in out
    assert bytes(range(16)).hex() in out
    assert "2023-11-14T22:13:20.000Z" in out
    assert "\x1b[" not in out


def test_inspect_json_has_envelope_and_payload_fields(sealed_update: Path, key: NodeKey) -> None:
    # Execute
    result = fednode("inspect", "--json", str(sealed_update))
    # Assert
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    data = sealed_update.read_bytes()
    assert report["digest"] == digest(data).hex()
    assert report["size"] == len(data)
    assert report["envelope"]["signer_peer_id"] == key.peer_id
    assert report["envelope"]["domain"] == "fednode/model-update/v1"
    assert report["envelope"]["signature_valid"] is True
    message = report["message"]
    assert (message["type"], message["v"], message["round"]) == ("model-update", 1, 3)
    assert message["signer"] == key.public_key.hex()
    assert message["signer_peer_id"] == key.peer_id
    assert message["metrics"] == {"loss": 0.25}
    assert message["nonce"] == bytes(range(16)).hex()


def test_inspect_tampered_envelope_fails_with_bad_signature(
    tmp_path: Path, sealed_update: Path, key: NodeKey, model_blob: bytes
) -> None:
    # Prepare: a well-formed envelope whose payload is no longer what was signed
    envelope = decode(sealed_update.read_bytes(), Envelope)
    forged = Envelope(
        signer=envelope.signer,
        domain=envelope.domain,
        payload=encode(make_update(key, model_blob, round=4)),
        signature=envelope.signature,
    )
    path = tmp_path / "forged.cbor"
    path.write_bytes(encode(forged))
    # Execute
    result = fednode("inspect", str(path))
    # Assert
    assert_one_line_error(result, SIGNATURE_EXIT)
    assert str(path) in result.stderr


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[:-10], id="truncated"),
        pytest.param(lambda data: b"\xff\x00 not cbor at all", id="garbage"),
        pytest.param(lambda data: data + b"\x00", id="trailing-byte"),
    ],
)
def test_inspect_malformed_input_fails_with_wire_error(
    tmp_path: Path, sealed_update: Path, damage: Callable[[bytes], bytes]
) -> None:
    # Prepare
    path = tmp_path / "bad.cbor"
    path.write_bytes(damage(sealed_update.read_bytes()))
    # Execute
    result = fednode("inspect", str(path))
    # Assert
    assert_one_line_error(result, WIRE_EXIT)


def test_inspect_model_blob_shows_a_tensor_table(tmp_path: Path, model_blob: bytes) -> None:
    # Prepare
    path = tmp_path / "model.cbor"
    path.write_bytes(model_blob)
    # Execute
    result = fednode("inspect", str(path))
    # Assert
    assert result.returncode == 0, result.stderr
    rows = {
        line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.strip()
    }
    assert rows["layer1.weight"] == ["float32", "[2,", "3]", "24", "B", "0", "5", "2.5"]
    assert rows["layer1.bias"] == ["float32", "[2]", "8", "B", "-1.5", "0.5", "-0.5"]
    assert rows["step"] == ["int64", "[1]", "8", "B", "7", "7", "7"]
    assert digest(model_blob).hex() in result.stdout


def test_inspect_model_blob_json_summarises_tensors(tmp_path: Path, model_blob: bytes) -> None:
    # Prepare
    path = tmp_path / "model.cbor"
    path.write_bytes(model_blob)
    # Execute
    result = fednode("inspect", "--json", str(path))
    # Assert
    tensors = json.loads(result.stdout)["message"]["tensors"]
    assert [(t["name"], t["dtype"], t["shape"], t["nbytes"]) for t in tensors] == [
        ("layer1.weight", "float32", [2, 3], 24),
        ("layer1.bias", "float32", [2], 8),
        ("step", "int64", [1], 8),
    ]
    assert (tensors[0]["min"], tensors[0]["max"], tensors[0]["mean"]) == (0.0, 5.0, 2.5)


def test_inspect_reads_stdin(sealed_update: Path) -> None:
    # Execute
    result = fednode("inspect", "--json", "-", stdin=sealed_update.read_bytes())
    # Assert
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["source"] == "<stdin>"
    assert report["message"]["type"] == "model-update"


def test_inspect_refuses_input_over_max_size(sealed_update: Path) -> None:
    # Execute
    result = fednode("inspect", "--max-size", "100", str(sealed_update))
    # Assert
    assert_one_line_error(result, WIRE_EXIT)
    assert "--max-size" in result.stderr


def test_inspect_never_shows_a_key_files_seed(generated: tuple[Path, Output]) -> None:
    # Prepare
    path = generated[0]
    seed = load_key(path).seed.hex()
    # Execute
    text = fednode("inspect", str(path))
    as_json = fednode("inspect", "--json", str(path))
    # Assert
    assert text.returncode == 0 and "secret" in text.stdout
    assert json.loads(as_json.stdout)["message"]["seed"] is None
    assert seed not in text.stdout + as_json.stdout


def test_inspect_missing_file_fails_in_one_line(tmp_path: Path) -> None:
    # Execute
    result = fednode("inspect", str(tmp_path / "absent.cbor"))
    # Assert
    assert_one_line_error(result, 1)
    assert "absent.cbor" in result.stderr


# --- usage and entry points ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("frobnicate",), (), ("inspect", "--max-size", "lots", "x")],
    ids=["unknown", "none", "bad-size"],
)
def test_usage_errors_exit_2_without_traceback(args: tuple[str, ...]) -> None:
    # Execute
    result = fednode(*args)
    # Assert
    assert result.returncode == 2
    assert result.stderr.startswith("usage: fednode")
    assert "error:" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_help_lists_the_exit_codes() -> None:
    # Execute
    result = fednode("--help")
    # Assert
    assert result.returncode == 0
    for name in ("keygen", "id", "inspect"):
        assert f"    {name}" in result.stdout
    assert f"  {WIRE_EXIT}    WireError" in result.stdout
    assert f"  {KEY_FILE_EXIT}    KeyFileError" in result.stdout


def test_entry_points_agree(tmp_path: Path) -> None:
    # Prepare
    script = Path(sys.executable).parent / "fednode"
    commands = [[sys.executable, "-m", "fednode.cli.main"]]
    if script.exists():
        commands.append([str(script)])
    # Execute
    outputs = [
        subprocess.run([*c, "--version"], capture_output=True, text=True, timeout=30)
        for c in commands
    ]
    # Assert
    assert [o.stdout for o in outputs] == [f"fednode {__version__}\n"] * len(commands)


def test_cli_imports_no_torch_no_libp2p_and_starts_lean(
    sealed_update: Path, tmp_path: Path
) -> None:
    # Prepare: run commands in one interpreter, then list what got imported
    code = (
        "import sys\n"
        "import fednode.cli.main as cli\n"
        "lean = sorted(m for m in ('numpy', 'rich', 'nacl', 'cbor2') if m in sys.modules)\n"
        f"assert cli.main(['keygen', {str(tmp_path / 'k')!r}]) == 0\n"
        f"assert cli.main(['inspect', {str(sealed_update)!r}]) == 0\n"
        "heavy = sorted(m for m in ('torch', 'libp2p', 'trio') if m in sys.modules)\n"
        "print('RESULT', lean, heavy)\n"
    )
    # Execute
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "RESULT [] []"


# --- views, rendered in-process --------------------------------------------------------------


def render(renderable: object, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    console.print(renderable, soft_wrap=True)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def test_tensor_table_renders_summaries() -> None:
    # Prepare
    tensors = [
        summarize_tensor("w", np.array([[1.0, np.nan], [3.0, 5.0]], dtype=np.float32)),
        summarize_tensor("n", np.zeros(0, dtype=np.float16)),
    ]
    # Execute
    text = render(tensor_table(tensors, title="tensors"))
    # Assert
    assert text.splitlines() == [
        "tensors",
        " name   dtype     shape    nbytes   min   max   mean   non-finite ",
        "──────────────────────────────────────────────────────────────────",
        " w      float32   [2, 2]     16 B     1     5      3            1 ",
        " n      float16   [0]         0 B     -     -      -            0 ",
    ]


def test_view_escapes_control_characters_from_the_wire(key: NodeKey, model_blob: bytes) -> None:
    # Prepare: a signed update whose federation name tries to drive the terminal
    update = make_update(key, model_blob)
    hostile = dataclasses.replace(update, federation=FederationId("a\x1b[2Jb\nc"))
    data = seal_bytes(key, hostile)
    message, envelope = open_envelope(data, ModelUpdate, BLOB_LIMITS)
    inspection = Inspection(
        source="x", size=len(data), digest=digest(data), envelope=envelope, message=message
    )
    # Execute
    text = render(render_inspection(inspection), width=60)
    # Assert
    assert "\x1b" not in text
    assert "federation    a\\x1b[2Jb\\nc" in text
