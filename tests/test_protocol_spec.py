"""protocols/ stays in step with the code.

``protocols/messages.cddl`` must hold one rule per registered message and per record nested in one,
named after the class, with the class's fields in order and, for each, the CDDL type its Python
annotation maps to. A CDDL type may be narrower than the annotation (``uint`` for ``int``,
``bstr .size 32`` for ``bytes``...) only where the constructor enforces exactly that: each such
narrowing is probed on an example instance. ``protocols/wire.md`` must name every message type
and signing domain, table every field, and carry the worked examples the code still produces.

Run ``python tests/test_protocol_spec.py`` to print those examples after a change.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
import re
import types
import typing
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fednode.wire import scan, schema
from fednode.wire.arrays import BFLOAT16, DTYPE_TAGS, SUPPORTED_DTYPES

PROTOCOLS = Path(__file__).resolve().parent.parent / "protocols"
# Every layer that may define wire messages; none of them imports trio or libp2p, so this is cheap.
MESSAGE_LAYERS = ("fednode.wire", "fednode.crypto", "fednode.protocol")
ROOT_RULE = "FednodeMessage"
SCALARS = {int: "int", float: "float", str: "tstr", bytes: "bstr", bool: "bool"}
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")


# ------------------------------------------------------------------------------------- the code


def _import_message_layers() -> None:
    for package_name in MESSAGE_LAYERS:
        if importlib.util.find_spec(package_name) is None:
            continue
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            importlib.import_module(info.name)


@cache
def registry() -> dict[str, type[Any]]:
    _import_message_layers()
    # Only fednode's own messages: a test may register a throwaway one.
    return {t: cls for t, cls in schema.REGISTRY.items() if cls.__module__.startswith("fednode.")}


def _hints(cls: type[Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _nested(tp: Any) -> Iterator[Any]:
    """``tp`` and every type inside it (union members, tuple items, map values)."""
    yield tp
    for arg in typing.get_args(tp):
        if arg is not Ellipsis and not isinstance(arg, str):
            yield from _nested(arg)


def _is_newtype(tp: Any) -> bool:
    return hasattr(tp, "__supertype__")


def _is_record(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@cache
def records() -> dict[str, type[Any]]:
    """Every record reachable from a registered message, by class name."""
    found: dict[str, type[Any]] = {}
    todo = list(registry().values())
    while todo:
        for tp in _hints(todo.pop()).values():
            for inner in _nested(tp):
                if _is_record(inner) and inner.__name__ not in found:
                    found[inner.__name__] = inner
                    todo.append(inner)
    return found


def newtypes_used() -> dict[str, Any]:
    """Every identifier NewType a message or record field uses, plus those schema defines."""
    found = {name: tp for name, tp in vars(schema).items() if _is_newtype(tp)}
    for cls in (*registry().values(), *records().values()):
        for tp in _hints(cls).values():
            found.update((inner.__name__, inner) for inner in _nested(tp) if _is_newtype(inner))
    return found


def _group(cddl: str) -> str:
    return f"({cddl})" if " / " in cddl else cddl


def expected_cddl(tp: Any) -> str:
    """The CDDL type a Python annotation maps to (identifiers and records by name)."""
    if _is_newtype(tp) or _is_record(tp):
        return str(tp.__name__)
    if tp is np.ndarray:
        return "Array"
    if tp in SCALARS:
        return SCALARS[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " / ".join(f'"{arg}"' for arg in args)
    if origin in (types.UnionType, typing.Union) and type(None) in args and len(args) == 2:
        (inner,) = (arg for arg in args if arg is not type(None))
        return f"{expected_cddl(inner)} / nil"
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"[* {_group(expected_cddl(args[0]))}]"
    if origin is dict and args[0] is str:
        return f"{{* tstr => {_group(expected_cddl(args[1]))}}}"
    raise AssertionError(f"no CDDL mapping for {tp!r}: extend expected_cddl() and messages.cddl")


def expected_newtype_rule(tp: Any) -> str:
    if tp in schema.FIXED_BYTES:
        return f"bstr .size {schema.FIXED_BYTES[tp]}"
    if tp is schema.Model:
        return "[* [tstr, Array]]"
    return expected_cddl(tp.__supertype__)


# ------------------------------------------------------------------------------------- the CDDL


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    body: str  # whitespace collapsed, comments removed
    entries: tuple[tuple[str, str], ...] | None  # (key, type) for a map rule, else None


def _strip_comment(line: str) -> str:
    in_string = False
    for i, char in enumerate(line):
        if char == '"':
            in_string = not in_string
        elif char == ";" and not in_string:
            return line[:i]
    return line


def _split_top(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside brackets, braces, parentheses and strings."""
    parts, depth, in_string, start = [], 0, False, 0
    i = 0
    while i < len(text):
        char = text[i]
        if char == '"':
            in_string = not in_string
        elif not in_string and char in "[{(":
            depth += 1
        elif not in_string and char in "]})":
            depth -= 1
        elif not in_string and depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


_RULE_START = re.compile(r"^([A-Za-z][\w-]*)\s*=(?!=)\s*(.*)$")
_BAREWORD = re.compile(r"^[A-Za-z_][\w]*$")


def parse_cddl(text: str) -> dict[str, Rule]:
    """The subset of RFC 8610 messages.cddl uses: ``Name = type`` rules (a rule runs until the
    next line that starts one), and map rules ``Name = { key: type, ... }`` with bareword keys and
    a comma after each entry."""
    chunks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = _strip_comment(raw).rstrip()
        if not line.strip():
            continue
        match = _RULE_START.match(line)
        if match:
            name = match.group(1)
            assert name not in chunks, f"CDDL rule {name} defined twice"
            current = chunks[name] = [match.group(2)]
        else:
            assert current is not None, f"CDDL line outside a rule: {raw!r}"
            current.append(line)
    rules = {}
    for name, lines in chunks.items():
        body = " ".join(" ".join(lines).split())
        entries = None
        if body.startswith("{") and body.endswith("}"):
            entries = []
            for entry in _split_top(body[1:-1], ","):
                key, colon, value = entry.partition(":")
                assert colon and _BAREWORD.match(key.strip()), (
                    f"{name}: entry {entry!r} is not `key: type`"
                )
                entries.append((key.strip(), value.strip()))
            entries = tuple(entries)
        rules[name] = Rule(name, body, entries)
    return rules


@cache
def cddl() -> dict[str, Rule]:
    return parse_cddl((PROTOCOLS / "messages.cddl").read_text())


def _literal_aliases(rules: dict[str, Rule]) -> dict[str, str]:
    """Rules that are a choice of text literals (``DType = "uint8" / ...``), by name."""
    literal = re.compile(r'^"[^"]*"( / "[^"]*")*$')
    return {name: rule.body for name, rule in rules.items() if literal.match(rule.body)}


def resolve_aliases(cddl_type: str, aliases: dict[str, str]) -> str:
    """``cddl_type`` with references to literal-choice rules written out, as the mapping does."""
    choices = []
    for choice in _split_top(cddl_type, " / "):
        if choice in aliases:
            choices.append(aliases[choice])
        else:
            choices.append(
                re.sub(r"\b[A-Za-z][\w-]*\b", lambda m: _group(aliases.get(m[0], m[0])), choice)
            )
    return " / ".join(choices)


# ------------------------------------------------------------------------ examples and probing


def key() -> Any:
    from fednode.crypto.keys import NodeKey

    return NodeKey(RFC8032_SEED)


def example_model() -> dict[str, np.ndarray[Any, Any]]:
    return {"w": np.array([[1.0, 2.0]], dtype=np.float32), "b": np.array([0.5], dtype=BFLOAT16)}


def _digests() -> tuple[schema.Digest, schema.Digest]:
    """(the example blob's address, BLAKE3-256 of b"update")."""
    from fednode.crypto import digest
    from fednode.wire import ModelBlob

    blob = schema.encode(ModelBlob(tensors=schema.Model(example_model())))
    return digest(blob), digest(b"update")


def _core_examples() -> dict[str, Callable[[], Any]]:
    from fednode.crypto import KeyFile, seal
    from fednode.wire import messages as m

    signer = key().public_key
    parent, update = _digests()
    demo, s1 = schema.FederationId("demo"), schema.SessionId("s1")

    def model_update() -> m.ModelUpdate:
        return m.ModelUpdate(
            federation=demo,
            session=s1,
            round=3,
            parent=parent,
            update=update,
            size=1234,
            num_examples=100,
            metrics={"loss": 0.25},
            signer=signer,
            created_ms=1_700_000_000_000,
            nonce=schema.Nonce(bytes(16)),
        )

    def contribution() -> m.Contribution:
        return m.Contribution(signer=signer, update=update, weight=100)

    def partial_ref() -> m.PartialRef:
        return m.PartialRef(combiner=signer, partial=update, total_weight=100, contributions=parent)

    def tensor_info() -> m.TensorInfo:
        return m.TensorInfo(name="w", dtype="float32", shape=(1, 2))

    return {
        "TensorInfo": tensor_info,
        "Contribution": contribution,
        "PartialRef": partial_ref,
        "ModelUpdate": model_update,
        "ModelBlob": lambda: m.ModelBlob(tensors=schema.Model(example_model())),
        "BlobHeader": lambda: m.BlobHeader(
            digest=parent, size=79, kind="model", tensors=(tensor_info(),)
        ),
        "PartialAggregate": lambda: m.PartialAggregate(
            federation=demo,
            session=s1,
            round=3,
            parent=parent,
            partial=update,
            size=1234,
            contributions=(contribution(),),
            total_weight=100,
            combiner=signer,
            created_ms=1_700_000_000_001,
            nonce=schema.Nonce(bytes(16)),
        ),
        "GlobalModel": lambda: m.GlobalModel(
            federation=demo,
            session=s1,
            round=4,
            model=update,
            size=1234,
            parent=parent,
            partials=(partial_ref(),),
            num_examples=100,
            reducer=signer,
            created_ms=1_700_000_000_002,
        ),
        "KeyFile": lambda: KeyFile(seed=RFC8032_SEED, created_ms=1_700_000_000_000),
        "Envelope": lambda: seal(key(), model_update()),
    }


def _plane_examples() -> dict[str, Callable[[], Any]]:
    from fednode.wire import control, transfer

    parent, _ = _digests()
    return {
        "Heartbeat": lambda: control.Heartbeat(
            federation=schema.FederationId("demo"),
            peer=key().peer_id,
            incarnation=1_700_000_000_000,
            seq=0,
            sent_ms=1_700_000_000_000,
            interval_ms=1000,
            role="client",
            capacity=0,
            attached=0,
            cpu=0.5,
            memory=0.25,
            bandwidth=1e6,
            region="",
            addrs=("/ip4/127.0.0.1/tcp/4001",),
            session=schema.SessionId(""),
            round=-1,
        ),
        "BlobRequest": lambda: transfer.BlobRequest(
            digest=parent, offset=0, max_size=1 << 20, chunk_size=1 << 20
        ),
        "BlobResponse": lambda: transfer.BlobResponse(
            status="not-found", size=0, offset=0, chunk_size=0, chunks=()
        ),
    }


def _round_examples() -> dict[str, Callable[[], Any]]:
    from fednode.wire import messages as m
    from fednode.wire import rounds

    parent, update = _digests()
    signer = key().public_key
    demo, s1 = schema.FederationId("demo"), schema.SessionId("s1")

    def session_config() -> rounds.SessionConfig:
        return rounds.SessionConfig(
            rounds=10, min_clients=2, max_retries=2, round_deadline_ms=60_000, epochs=1,
            batch_size=32, lr=0.05, aggregator="fedavg", server_optimizer="fedadam",
            server_lr=0.01, server_momentum=0.9, beta1=0.9, beta2=0.99, tau=1e-3, eval_every=1,
            seed=0, task="fednode.task.digits", partition="dirichlet", alpha=0.5, proximal_mu=0.0,
        )  # fmt: skip

    def assignment() -> rounds.Assignment:
        return rounds.Assignment(combiner=key().peer_id, clients=(key().peer_id,))

    contribution = m.Contribution(signer=signer, update=update, weight=100)
    return {
        "SessionConfig": session_config,
        "Assignment": assignment,
        "RoundPlan": lambda: rounds.RoundPlan(
            federation=demo,
            session=s1,
            term=0,
            round=1,
            amendment=0,
            parent=parent,
            parent_size=79,
            holders=(key().peer_id,),
            assignments=(assignment(),),
            min_clients=1,
            deadline_ms=1_700_000_060_000,
            config=session_config(),
            reducer=signer,
            created_ms=1_700_000_000_000,
        ),
        "RoundResult": lambda: rounds.RoundResult(
            federation=demo,
            session=s1,
            term=0,
            round=1,
            amendment=0,
            parent=parent,
            model=update,
            size=79,
            partials=(
                m.PartialRef(
                    combiner=signer, partial=update, total_weight=100, contributions=parent
                ),
            ),
            included=(contribution,),
            num_examples=100,
            metrics={"loss": 0.25},
            reducer=signer,
            created_ms=1_700_000_000_000,
        ),
        "SessionEnded": lambda: rounds.SessionEnded(
            federation=demo,
            session=s1,
            term=0,
            outcome="completed",
            rounds=10,
            model=update,
            reason="",
            reducer=signer,
            created_ms=1_700_000_000_000,
        ),
        "BlobRef": lambda: rounds.BlobRef(digest=update, size=1234),
        # Plain FedAvg, so no optimiser state: every round from 0 is valid, as the probes need.
        "SessionCheckpoint": lambda: rounds.SessionCheckpoint(
            federation=demo,
            session=s1,
            term=2,
            round=3,
            model=update,
            size=79,
            holders=(key().peer_id,),
            config=dataclasses.replace(session_config(), server_optimizer="fedavg"),
            optimizer=None,
            members=(key().peer_id,),
            lease_ms=15_000,
            reducer=signer,
            created_ms=1_700_000_000_000,
        ),
    }


@cache
def example(class_name: str) -> Any:
    """A valid instance of a message or record (for narrowing probes and wire.md's examples),
    built on demand so that a class that changed breaks only what uses it. None if there is none.
    """
    factory = {**_core_examples(), **_plane_examples(), **_round_examples()}.get(class_name)
    return None if factory is None else factory()


def _rejects(instance: Any, field: str, value: Any) -> bool:
    try:
        dataclasses.replace(instance, **{field: value})
    except (ValueError, TypeError):
        return True
    return False


_NUMBER = r"-?\d+(?:\.\d+)?"
_BOUNDS = {  # base type -> forms of a bounded narrowing -> (lower, upper) groups
    "int": [
        (re.compile(r"uint"), None),
        (re.compile(rf"u?int \.ge ({_NUMBER})"), int),
        (re.compile(r"(-?\d+)\.\.(-?\d+)"), int),
    ],
    "float": [
        (re.compile(rf"float \.ge ({_NUMBER})"), float),
        (re.compile(rf"\(float \.ge ({_NUMBER})\) \.and \(float \.le ({_NUMBER})\)"), float),
    ],
}


def _probes(expected: str, written: str) -> tuple[list[Any], list[Any]] | None:
    """Values a narrowing of ``expected`` to ``written`` rejects and accepts, at its edges."""
    for form, number in _BOUNDS.get(expected, []):
        match = form.fullmatch(written)
        if match:
            lo, hi = (0, None) if number is None else (*map(number, match.groups()), None)[:2]
            bad, good = [lo - 1], [lo]
            if hi is not None:
                bad, good = [*bad, hi + 1], [*good, hi]
            return bad, good
    if expected == "[* int]" and written == "[* uint]":
        return [(-1,), (0, -1)], [(0,)]
    size = re.fullmatch(r"bstr \.size (\d+)", written)
    if expected == "bstr" and size:
        n = int(size.group(1))
        return [bytes(n - 1), bytes(n + 1)], [bytes(n)]
    if expected.startswith("[* ") and written == "[+ " + expected[3:]:
        return [()], []
    return None


def check_narrowing(cls: type[Any], field: str, expected: str, written: str) -> str | None:
    """Why ``written`` is not ``expected`` or a narrowing of it the constructor enforces."""
    if written == expected:
        return None
    probes = _probes(expected, written)
    if probes is None:
        return f"{written!r} is neither {expected!r} nor a narrowing of it this test can probe"
    instance = example(cls.__name__)
    if instance is None:
        return f"{written!r} narrows {expected!r}: add a {cls.__name__} to example() to probe it"
    bad, good = probes
    for value in bad:
        if not _rejects(instance, field, value):
            return f"{written!r}, but the constructor accepts {value!r}"
    for value in good:
        if _rejects(instance, field, value):
            return f"{written!r}, but the constructor rejects {value!r}: narrow the CDDL further"
    return None


# ------------------------------------------------------------------------------- CDDL tests


def message_classes() -> list[type[Any]]:
    return sorted(registry().values(), key=lambda cls: cls.__name__)


def test_core_messages_and_key_file_are_registered() -> None:
    assert {"envelope", "blob-header", "model", "model-update", "partial-aggregate",
            "global-model", "ed25519-key"} <= set(registry())  # fmt: skip


def test_root_rule_lists_every_message_and_nothing_else() -> None:
    # Prepare
    rules = cddl()
    message_rules = {
        name for name, rule in rules.items() if rule.entries and rule.entries[0][0] == "type"
    }
    # Execute
    root = set(_split_top(rules[ROOT_RULE].body, " / "))
    # Assert
    registered = {cls.__name__ for cls in registry().values()}
    assert message_rules == registered, (
        "CDDL message rules differ from fednode.wire.schema.REGISTRY"
    )
    assert root == registered


def test_no_map_rule_for_anything_unregistered() -> None:
    known = {*(cls.__name__ for cls in registry().values()), *records(), "Bfloat16Array"}
    maps = {name for name, rule in cddl().items() if rule.entries is not None}
    assert maps - known == set(), "CDDL map rules for no registered message or record"


@pytest.mark.parametrize("cls", message_classes(), ids=lambda cls: cls.TYPE)
def test_message_rule_matches_dataclass(cls: type[Any]) -> None:
    # Prepare
    rule = cddl().get(cls.__name__)
    assert rule is not None and rule.entries is not None, f"no CDDL map rule {cls.__name__}"
    # Execute
    keys = [key for key, _ in rule.entries]
    # Assert
    assert rule.entries[:2] == (("type", f'"{cls.TYPE}"'), ("v", str(cls.VERSION)))
    assert keys[2:] == [f.name for f in dataclasses.fields(cls)], f"{cls.__name__} fields"
    _assert_field_types(cls, rule.entries[2:])


@pytest.mark.parametrize("name", sorted(records()))
def test_record_rule_matches_dataclass(name: str) -> None:
    # Prepare
    cls = records()[name]
    rule = cddl().get(name)
    assert rule is not None and rule.entries is not None, f"no CDDL map rule {name}"
    # Execute
    keys = [key for key, _ in rule.entries]
    # Assert
    assert keys == [f.name for f in dataclasses.fields(cls)], f"{name} fields"
    _assert_field_types(cls, rule.entries)


def _assert_field_types(cls: type[Any], entries: tuple[tuple[str, str], ...]) -> None:
    aliases = _literal_aliases(cddl())
    hints = _hints(cls)
    problems = []
    for field, written in entries:
        expected = expected_cddl(hints[field])
        why = check_narrowing(cls, field, expected, resolve_aliases(written, aliases))
        if why:
            problems.append(f"{cls.__name__}.{field}: {why}")
    assert problems == []


@pytest.mark.parametrize("name", sorted(newtypes_used()))
def test_identifier_rule_matches_newtype(name: str) -> None:
    tp = newtypes_used()[name]
    rule = cddl().get(name)
    assert rule is not None, f"no CDDL rule for identifier type {name}"
    assert rule.body == expected_newtype_rule(tp)


def test_array_rules_match_the_codec() -> None:
    # Prepare
    rules = cddl()
    aliases = _literal_aliases(rules)

    def tags(rule: str) -> list[int]:
        return [int(tag) for tag in re.findall(r"#6\.(\d+)\(bstr\)", rules[rule].body)]

    # Execute
    dtypes = re.findall(r'"([^"]+)"', aliases["DType"])
    # Assert
    assert dtypes == list(SUPPORTED_DTYPES)
    assert tags("LeTypedArray") == list(DTYPE_TAGS.values())
    assert {40, *tags("LeTypedArray"), *tags("BeTypedArray")} == scan.ALLOWED_TAGS
    assert rules["Array"].body == "NdArray / Bfloat16Array"
    assert rules["NdArray"].body == "#6.40([Shape, TypedArray])"
    assert rules["Bfloat16Array"].entries == (
        ("dtype", '"bfloat16"'),
        ("shape", "Shape"),
        ("data", "bstr"),
    )


def test_a_field_the_cddl_lacks_is_caught() -> None:
    # Prepare: ModelUpdate as if someone added a field without touching messages.cddl
    from fednode.wire.messages import ModelUpdate

    grown = dataclasses.make_dataclass(
        "ModelUpdate",
        [(f.name, _hints(ModelUpdate)[f.name]) for f in dataclasses.fields(ModelUpdate)]
        + [("added_without_cddl", str)],
        frozen=True,
        slots=True,
        kw_only=True,
    )
    grown.TYPE, grown.VERSION = ModelUpdate.TYPE, ModelUpdate.VERSION  # type: ignore[attr-defined]
    # Execute / Assert
    with pytest.raises(AssertionError, match="fields"):
        test_message_rule_matches_dataclass(grown)


def test_a_narrowing_the_code_does_not_enforce_is_caught() -> None:
    from fednode.wire.messages import GlobalModel

    assert check_narrowing(GlobalModel, "created_ms", "int", "uint .ge 5") is not None
    assert check_narrowing(GlobalModel, "round", "int", "uint .ge 1") is not None
    assert check_narrowing(GlobalModel, "round", "int", "0..10") is not None
    assert check_narrowing(GlobalModel, "round", "int", "uint") is None


# ------------------------------------------------------------------------------- wire.md tests


@cache
def wire_md() -> str:
    return (PROTOCOLS / "wire.md").read_text()


def _section(text: str, class_name: str) -> str:
    """The ``###`` section whose heading names ``class_name`` in backticks."""
    match = re.search(
        rf"^###[^\n]*`{re.escape(class_name)}`[^\n]*\n(.*?)(?=^##|\Z)", text, re.M | re.S
    )
    assert match, f"wire.md has no ### section naming `{class_name}`"
    return match.group(1)


@pytest.mark.parametrize("cls", message_classes(), ids=lambda cls: cls.TYPE)
def test_wire_md_names_type_and_domain(cls: type[Any]) -> None:
    from fednode.crypto.envelope import domain_of

    text = wire_md()
    assert f"`{cls.TYPE}`" in text, f"wire.md does not name the type `{cls.TYPE}`"
    assert f"`{domain_of(cls)}`" in text, f"wire.md does not name the domain `{domain_of(cls)}`"


@pytest.mark.parametrize("name", sorted({*(c.__name__ for c in registry().values()), *records()}))
def test_wire_md_tables_every_field(name: str) -> None:
    cls = {**{c.__name__: c for c in registry().values()}, **records()}[name]
    rows = re.findall(r"^\| `(\w+)` \|", _section(wire_md(), name), re.M)
    assert rows == [f.name for f in dataclasses.fields(cls)]


def test_wire_md_names_every_author_rule() -> None:
    from fednode.crypto.envelope import AUTHOR_FIELDS

    for type_name, field in AUTHOR_FIELDS.items():
        row = f"| `{type_name}` | `{field}` |"
        assert row in wire_md(), f"wire.md's author table lacks {row}"


def worked_examples() -> dict[str, str]:
    """Values wire.md quotes, recomputed from the code."""
    from fednode.crypto import digest, signing_input
    from fednode.crypto.envelope import domain_of
    from fednode.wire import ModelUpdate, encode

    node = key()
    envelope = example("Envelope")
    payload = encode(example("ModelUpdate"))
    return {
        "public key": node.public_key.hex(),
        "peer id": node.peer_id,
        "peer id bytes": (b"\x00\x24\x08\x01\x12\x20" + node.public_key).hex(),
        "empty digest": digest(b"").hex(),
        "model blob": encode(example("ModelBlob")).hex(),
        "model blob digest": digest(encode(example("ModelBlob"))).hex(),
        "update payload": payload.hex(),
        "signing input head": signing_input(domain_of(ModelUpdate), b"").hex(),
        "signature": envelope.signature.hex(),
        "envelope": encode(envelope).hex(),
        "key file": encode(example("KeyFile")).hex(),
    }


WORKED_EXAMPLES = (
    "public key", "peer id", "peer id bytes", "empty digest", "model blob", "model blob digest",
    "update payload", "signing input head", "signature", "envelope", "key file",
)  # fmt: skip


def test_worked_examples_are_all_checked() -> None:
    assert set(worked_examples()) == set(WORKED_EXAMPLES)


@pytest.mark.parametrize("name", WORKED_EXAMPLES)
def test_wire_md_examples_are_what_the_code_produces(name: str) -> None:
    value = worked_examples()[name]
    assert value in "".join(wire_md().split()), f"wire.md lacks the current {name}: {value}"


if __name__ == "__main__":
    for example_name, example_value in worked_examples().items():
        print(f"{example_name}:")
        for start in range(0, len(example_value), 96):
            print("   ", example_value[start : start + 96])
