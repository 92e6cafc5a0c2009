"""Node layer: what the round roles' drivers (``reducer``, ``combiner``, ``client``) share.

A :class:`RoleContext` holds a running :class:`~fednode.node.runtime.Node`, its blob store and
blob server (every node serves the blobs it holds, so any holder can serve a global model), the
event log, the activity its heartbeats report, and the count of data-plane bytes it sent. Here
too: opening the sealed round messages that arrive on the control topic, model blobs in and out
of the store (never blocking the event loop on a big one), and dialling a peer known only from
its heartbeats.

Model blobs are canonical ``model`` messages (:class:`~fednode.wire.ModelBlob`). A partial
aggregate's blob also carries its contributions' weighted training metrics, as 0-d float64
entries named ``#metric:<name>`` after the model's tensors: ``partial-aggregate`` v1 has no field
for them (``protocols/rounds.md``), and in the blob they are covered by the combiner's signature.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import trio

from fednode.crypto import domain_of, open_envelope
from fednode.errors import CryptoError, TransportError, WireError
from fednode.net.blob import BlobServer, fetch_blob, serve_blobs
from fednode.net.blobstore import BlobStore
from fednode.net.chunkio import INLINE_IO, sync_cost
from fednode.net.interface import Host
from fednode.node.events import EventLog
from fednode.node.runtime import LoadSample, Node
from fednode.wire import (
    BLOB_LIMITS,
    Digest,
    Envelope,
    Model,
    ModelBlob,
    PeerId,
    RoundPlan,
    RoundResult,
    SessionEnded,
    decode,
    encode,
)

log = logging.getLogger(__name__)

Params = Mapping[str, np.ndarray[Any, Any]]
Layout = tuple[tuple[str, tuple[int, ...], str], ...]
METRIC_PREFIX = "#metric:"
#: Blob transfers a node serves at once before it answers "busy".
BLOB_CONCURRENCY = 64
_DOMAINS: dict[str, type[Any]] = {
    domain_of(cls): cls for cls in (RoundPlan, RoundResult, SessionEnded)
}
RoundMessage = RoundPlan | RoundResult | SessionEnded


@dataclass(slots=True)
class Activity:
    """What the node's heartbeats report about its part in a session."""

    session: str = ""
    round: int = -1
    attached: int = 0

    def load(self, base: Callable[[], LoadSample] = LoadSample) -> Callable[[], LoadSample]:
        """A heartbeat load sampler: ``base()`` with this activity."""

        def sample() -> LoadSample:
            return replace(base(), session=self.session, round=self.round, attached=self.attached)

        return sample


class RoleContext:
    """One node's shared equipment for a round role (see the module docstring)."""

    def __init__(
        self,
        node: Node,
        store: BlobStore,
        *,
        events: EventLog | None = None,
        activity: Activity | None = None,
    ) -> None:
        self.node = node
        self.store = store
        self.events = events if events is not None else EventLog()
        self.activity = activity if activity is not None else Activity()
        # Serving global models is every node's job, the reducer's above all: a round's plan
        # sends every client and combiner to fetch at once.
        self.blobs: BlobServer = serve_blobs(node.host, store, max_concurrent=BLOB_CONCURRENCY)
        self.pushed_bytes = 0  #: bytes of the updates and partials this node pushed
        #: Blobs this node's roles are fetching (see :meth:`fetch`), each with an event set when
        #: that fetch ends.
        self.fetches: dict[Digest, trio.Event] = {}
        self.wall_offset_ms = time.time() * 1000 - trio.current_time() * 1000

    async def fetch(
        self, holders: Sequence[PeerId], key: Digest, *, max_size: int, expected_size: int
    ) -> None:
        """Have blob ``key`` in our store, pinned once for the caller: fetched from ``holders``
        in turn (:func:`fednode.net.blob.fetch_blob`), unless held. The roles of one node share
        its store (an ``auto`` node's client, combiner and reducer seat all want each round's
        model): a fetch of a blob another role is fetching waits for that one, then has the
        blob or fetches it itself, instead of failing "already running".

        Raises:
            TransportError: no holder delivered it.
        """
        while (running := self.fetches.get(key)) is not None:
            await running.wait()
        if self.store.has(key):
            self.store.pin(key)
            return
        done = self.fetches[key] = trio.Event()
        try:
            await fetch_blob(
                self.host,
                holders,
                key,
                self.store,
                max_size=max_size,
                expected_size=expected_size,
                pin=True,
            )
        finally:
            del self.fetches[key]
            done.set()

    @property
    def host(self) -> Host:
        return self.node.host

    @property
    def peer(self) -> PeerId:
        return self.node.peer_id

    def bytes_sent(self) -> int:
        """Data-plane bytes sent so far: blobs served and blobs pushed."""
        return self.blobs.statistics().bytes_sent + self.pushed_bytes

    def open_round_message(self, envelope: Envelope, source: PeerId) -> RoundMessage | None:
        """The verified plan, result or session end ``envelope`` seals; None for anything else
        (an unknown domain, a bad signature: logged and counted as invalid)."""
        cls = _DOMAINS.get(envelope.domain)
        if cls is None:
            log.debug("ignored a %s control message from %s", envelope.domain, source)
            return None
        try:
            msg, _ = open_envelope(envelope, cls)
        except (WireError, CryptoError) as exc:
            self.node.invalid_messages += 1
            log.info("dropped an invalid %s from %s: %s", envelope.domain, source, exc)
            return None
        assert isinstance(msg, RoundPlan | RoundResult | SessionEnded)
        return msg

    async def publish(self, sealed: bytes) -> None:
        """Gossip a sealed control message on the federation's topic (best effort)."""
        try:
            await self.node.host.publish(self.node.topic, sealed)
        except TransportError as exc:
            log.warning("could not publish a control message: %s", exc)

    async def reach(self, peer: PeerId) -> None:
        """Connect to ``peer`` if we are not, at an address from its heartbeats (best effort:
        ``open_stream`` still tries whatever route the host knows)."""
        host = self.node.host
        if peer == self.peer or peer in host.connected_peers():
            return
        member = self.node.view.member(peer)
        addrs = [_full(a, peer) for a in (member.heartbeat.addrs if member else ())]
        addrs += [_full(a, peer) for a in host.peer_addrs(peer)]
        for addr in dict.fromkeys(addrs):
            try:
                await host.connect(addr)
                return
            except TransportError as exc:
                log.debug("dialling %s at %s failed: %s", peer, addr, exc)


def _full(addr: str, peer: PeerId) -> str:
    return addr if "/p2p/" in addr else f"{addr}/p2p/{peer}"


# --- model blobs ----------------------------------------------------------------------------


def encode_model(params: Params, metrics: Mapping[str, float] | None = None) -> bytes:
    """A model blob: ``params`` in order, then ``metrics`` as ``#metric:<name>`` scalars."""
    tensors: dict[str, np.ndarray[Any, Any]] = dict(params)
    for name, value in sorted((metrics or {}).items()):
        tensors[METRIC_PREFIX + name] = np.asarray(float(value), dtype=np.float64)
    return encode(ModelBlob(tensors=Model(tensors)))


def decode_model(data: bytes) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, float]]:
    """(params, metrics) of a model blob (the arrays are read-only).

    Raises:
        WireError: not a model blob, or a metric entry that is not a finite scalar.
    """
    blob = decode(data, ModelBlob, BLOB_LIMITS)
    params: dict[str, np.ndarray[Any, Any]] = {}
    metrics: dict[str, float] = {}
    for name, array in blob.tensors.items():
        if not name.startswith(METRIC_PREFIX):
            params[name] = array
            continue
        if array.shape != () or array.dtype.kind != "f" or not np.isfinite(array):
            raise WireError("a metric must be a finite float scalar", name)
        metrics[name.removeprefix(METRIC_PREFIX)] = float(array)
    if not params:
        raise WireError("a model blob holds at least one tensor", "tensors")
    return params, metrics


def layout(params: Params) -> Layout:
    """Names, shapes and dtypes of ``params``, in order."""
    return tuple((name, tuple(a.shape), a.dtype.str) for name, a in params.items())


def check_params(params: Params, expected: Layout | None) -> str | None:
    """Why ``params`` cannot be averaged into a model of ``expected`` layout (None: it can):
    another layout, or a NaN or infinite value."""
    if expected is not None and layout(params) != expected:
        return "malformed: its tensors differ from the global model's"
    for name, array in params.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            return f"malformed: {name} holds NaN or infinite values"
    return None


async def run_blocking(cost: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` inline when it touches at most ``INLINE_IO`` bytes, else in a worker thread
    (py-libp2p resets streams whose reader stalls for 5 s: the loop must keep running)."""
    if cost <= INLINE_IO:
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)


async def put_model(
    store: BlobStore, params: Params, metrics: Mapping[str, float] | None = None, *, pin: bool
) -> tuple[Digest, int]:
    """Encode and store a model blob; returns (digest, size). ``pin`` pins it once. A durable
    store's fsyncs run in a worker thread, whatever the size: the event loop never waits on one."""
    size = sum(a.nbytes for a in params.values()) + sync_cost(store)

    def put() -> tuple[Digest, int]:
        data = encode_model(params, metrics)
        key = store.put(data)
        if pin:
            store.pin(key)
        return key, len(data)

    result: tuple[Digest, int] = await run_blocking(size, put)
    return result


async def load_model(
    store: BlobStore, key: Digest
) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, float]]:
    """(params, metrics) of a stored model blob.

    Raises:
        KeyError: the blob is not held. WireError: it is not a model blob.
    """
    size = store.size(key)

    def load() -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, float]]:
        return decode_model(store.get(key))

    result: tuple[dict[str, np.ndarray[Any, Any]], dict[str, float]] = await run_blocking(
        size, load
    )
    return result


class Unpinner:
    """Pins to drop later, by round: ``keep(round, digest)`` records a pin the store holds,
    ``release_before(round)`` drops those of earlier rounds."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        self._held: dict[int, list[Digest]] = {}

    def keep(self, round: int, key: Digest) -> None:
        self._held.setdefault(round, []).append(key)

    def release_before(self, round: int) -> None:
        for old in [r for r in self._held if r < round]:
            for key in self._held.pop(old):
                self._store.unpin(key)

    def release_all(self) -> None:
        self.release_before(1 << 62)


__all__ = [
    "METRIC_PREFIX",
    "Activity",
    "Layout",
    "Params",
    "RoleContext",
    "RoundMessage",
    "Unpinner",
    "check_params",
    "decode_model",
    "encode_model",
    "layout",
    "load_model",
    "put_model",
    "run_blocking",
]
