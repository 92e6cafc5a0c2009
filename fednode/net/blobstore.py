"""Net layer: the local content-addressed blob store.

Blobs live as files named by the hex BLAKE3-256 digest of their bytes under ``<data-dir>/blobs/``.
A blob is written to a temporary file, hashed as it is written, and renamed into place only once
its digest verifies, so a file under a digest's name always holds exactly those bytes. A fetch
in progress keeps its verified prefix as ``<digest>.part`` (surviving a restart) so it can resume
from that offset; other transfers write ``<digest>.<token>.tmp``, removed when the store opens.

The store keeps at most ``max_bytes`` of complete blobs: after each write it evicts the least
recently used (by access time, kept in the files' mtime so the order survives a restart) among
the unpinned ones. :meth:`BlobStore.pin` protects a blob (the current global model, updates still
to be aggregated) until as many :meth:`BlobStore.unpin` calls; pins live in memory only.

The methods are plain blocking file I/O and thread-safe: protocol code calls them through
``trio.to_thread.run_sync`` for anything big, so the event loop never blocks.
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fednode.crypto import DIGEST_SIZE, Hasher, digest
from fednode.errors import TransferError
from fednode.wire import Digest

_CHUNK_CACHE = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobStoreStatistics:
    """A snapshot of a :class:`BlobStore`.

    Attributes:
        blobs: complete blobs held.
        total_bytes: their total size.
        max_bytes: the eviction budget (``None``: unbounded).
        pinned: blobs with at least one pin.
        pinned_bytes: their total size.
        partials: ``.part`` files (resumable fetches) on disk.
        evicted: blobs evicted since the store opened.
        evicted_bytes: their total size.
    """

    blobs: int
    total_bytes: int
    max_bytes: int | None
    pinned: int
    pinned_bytes: int
    partials: int
    evicted: int
    evicted_bytes: int


@dataclass(slots=True)
class _Entry:
    size: int
    accessed: float


class BlobStore:
    """Content-addressed blobs on disk with LRU eviction and pins.

    Args:
        data_dir: the node's data directory; blobs go in its ``blobs/`` subdirectory.
        max_bytes: keep at most this many bytes of unpinned-plus-pinned blobs where unpinned ones
            can be evicted to get there (pinned blobs are never evicted, even over budget).
        clock: wall-clock seconds, for access times (injectable for tests).
        durable: fsync each blob and the directory before it counts as stored.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
        durable: bool = True,
    ) -> None:
        self.root = Path(data_dir) / "blobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._clock = clock
        self.durable = durable
        self._lock = threading.Lock()
        self._entries: dict[Digest, _Entry] = {}
        self._pins: collections.Counter[Digest] = collections.Counter()
        self._partials: set[Digest] = set()
        self._writing: set[Digest] = set()
        self._chunk_cache: collections.OrderedDict[tuple[Digest, int], tuple[Digest, ...]] = (
            collections.OrderedDict()
        )
        self._evicted = 0
        self._evicted_bytes = 0
        self._scan()

    def _scan(self) -> None:
        for path in self.root.iterdir():
            name = path.name
            if name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                continue
            key = _parse_hex(name.removesuffix(".part"))
            if key is None:
                continue
            if name.endswith(".part"):
                self._partials.add(key)
            else:
                st = path.stat()
                self._entries[key] = _Entry(size=st.st_size, accessed=st.st_mtime)

    # -- paths --------------------------------------------------------------------------------

    def _path(self, key: Digest) -> Path:
        return self.root / key.hex()

    def _part_path(self, key: Digest) -> Path:
        return self.root / f"{key.hex()}.part"

    # -- reading ------------------------------------------------------------------------------

    def has(self, key: Digest) -> bool:
        """Whether the complete blob is held (does not count as an access)."""
        with self._lock:
            return key in self._entries

    def size(self, key: Digest) -> int:
        """The blob's size in bytes. Raises :class:`KeyError` if it is not held."""
        with self._lock:
            return self._entries[key].size

    def open_reader(self, key: Digest, offset: int = 0) -> BinaryIO:
        """An open binary file positioned at ``offset``; the caller closes it.

        The blob stays readable through this file even if it is evicted meanwhile.
        Raises :class:`KeyError` if the blob is not held.
        """
        with self._lock:
            if key not in self._entries:
                raise KeyError(key.hex())
            self._touch(key)
            f = self._path(key).open("rb")
        f.seek(offset)
        return f

    def get(self, key: Digest) -> bytes:
        """The whole blob. Raises :class:`KeyError` if it is not held."""
        with self.open_reader(key) as f:
            return f.read()

    def chunk_digests(self, key: Digest, chunk_size: int) -> tuple[Digest, ...]:
        """BLAKE3-256 of each ``chunk_size`` chunk of the blob (cached; reads the file once)."""
        cache_key = (key, chunk_size)
        with self._lock:
            cached = self._chunk_cache.get(cache_key)
            if cached is not None:
                self._chunk_cache.move_to_end(cache_key)
                return cached
        with self.open_reader(key) as f:
            chunks = tuple(digest(block) for block in _blocks(f, chunk_size))
        with self._lock:
            self._chunk_cache[cache_key] = chunks
            while len(self._chunk_cache) > _CHUNK_CACHE:
                self._chunk_cache.popitem(last=False)
        return chunks

    # -- writing ------------------------------------------------------------------------------

    def put(self, data: bytes | bytearray | memoryview) -> Digest:
        """Store ``data``; returns its digest."""
        key = digest(data)
        self.put_verified(key, [data])
        return key

    def put_verified(self, key: Digest, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        """Store the concatenation of ``chunks`` as ``key``, if it hashes to ``key``.

        Raises:
            TransferError: the bytes do not hash to ``key``; nothing is stored.
        """
        with self.open_partial(key) as partial:
            for chunk in chunks:
                partial.append(chunk)
            partial.commit()

    def partial_size(self, key: Digest) -> int:
        """Bytes held in ``key``'s resumable ``.part`` file (0 if there is none)."""
        try:
            return self._part_path(key).stat().st_size
        except FileNotFoundError:
            return 0

    def open_partial(self, key: Digest, *, resume_chunk_size: int | None = None) -> PartialBlob:
        """A writer for blob ``key`` that stores it only once its digest verifies.

        With ``resume_chunk_size``, the writer is the resumable ``<digest>.part``: what it already
        holds is cut back to a whole number of chunks and re-hashed (its chunk digests are in
        :attr:`PartialBlob.chunks`), and at most one such writer per digest may be open.
        Without, it writes a private temporary file.

        Raises:
            TransferError: a resumable writer for ``key`` is already open.
        """
        if resume_chunk_size is None:
            path = self.root / f"{key.hex()}.{secrets.token_hex(8)}.tmp"
            return PartialBlob(self, key, path, resumable=False)
        with self._lock:
            if key in self._writing:
                raise TransferError(f"a fetch of blob {key.hex()[:16]} is already running")
            self._writing.add(key)
            self._partials.add(key)
        try:
            return PartialBlob(
                self, key, self._part_path(key), resumable=True, chunk_size=resume_chunk_size
            )
        except BaseException:
            with self._lock:
                self._writing.discard(key)
            raise

    def _commit(self, key: Digest, path: Path, size: int, *, pin: bool) -> None:
        with self._lock:
            if key in self._entries:
                path.unlink(missing_ok=True)
            else:
                os.replace(path, self._path(key))
                self._entries[key] = _Entry(size=size, accessed=0.0)
            if self.durable:
                _fsync_dir(self.root)
            self._touch(key)
            if pin:
                self._pins[key] += 1
            self._evict(keep=key)

    def _release(self, key: Digest, *, resumable: bool, kept: bool) -> None:
        with self._lock:
            if resumable:
                self._writing.discard(key)
                if not kept:
                    self._partials.discard(key)

    # -- eviction and pins --------------------------------------------------------------------

    def pin(self, key: Digest) -> None:
        """Protect ``key`` from eviction until a matching :meth:`unpin` (pins are counted)."""
        with self._lock:
            self._pins[key] += 1

    def unpin(self, key: Digest) -> None:
        """Drop one pin of ``key``; it becomes evictable when none is left."""
        with self._lock:
            if self._pins[key] <= 1:
                del self._pins[key]
            else:
                self._pins[key] -= 1
            self._evict(keep=None)

    def pinned(self, key: Digest) -> bool:
        with self._lock:
            return self._pins[key] > 0

    def remove(self, key: Digest) -> None:
        """Delete a blob now, pinned or not (its pins are dropped)."""
        with self._lock:
            self._pins.pop(key, None)
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._forget(key)
                self._path(key).unlink(missing_ok=True)

    def _touch(self, key: Digest) -> None:
        now = self._clock()
        entry = self._entries[key]
        entry.accessed = now
        with contextlib.suppress(OSError):
            os.utime(self._path(key), (now, now))

    def _evict(self, keep: Digest | None) -> None:
        if self.max_bytes is None:
            return
        total = sum(e.size for e in self._entries.values())
        if total <= self.max_bytes:
            return
        victims = sorted(
            (e.accessed, key)
            for key, e in self._entries.items()
            if key != keep and self._pins[key] <= 0
        )
        for _, key in victims:
            if total <= self.max_bytes:
                break
            entry = self._entries.pop(key)
            self._forget(key)
            self._path(key).unlink(missing_ok=True)
            total -= entry.size
            self._evicted += 1
            self._evicted_bytes += entry.size

    def _forget(self, key: Digest) -> None:
        for cache_key in [k for k in self._chunk_cache if k[0] == key]:
            del self._chunk_cache[cache_key]

    def statistics(self) -> BlobStoreStatistics:
        with self._lock:
            pinned = [key for key, n in self._pins.items() if n > 0 and key in self._entries]
            return BlobStoreStatistics(
                blobs=len(self._entries),
                total_bytes=sum(e.size for e in self._entries.values()),
                max_bytes=self.max_bytes,
                pinned=len(pinned),
                pinned_bytes=sum(self._entries[key].size for key in pinned),
                partials=len(self._partials),
                evicted=self._evicted,
                evicted_bytes=self._evicted_bytes,
            )

    def digests(self) -> list[Digest]:
        """Every complete blob held, least recently used first."""
        with self._lock:
            return [key for key, _ in sorted(self._entries.items(), key=lambda kv: kv[1].accessed)]


class PartialBlob:
    """A blob being written: bytes are appended and hashed, and :meth:`commit` moves the file into
    place only if they hash to the blob's digest. Use as a context manager: leaving it without a
    commit keeps a resumable ``.part`` (its verified prefix) and deletes a temporary file."""

    def __init__(
        self, store: BlobStore, key: Digest, path: Path, *, resumable: bool, chunk_size: int = 0
    ) -> None:
        self._store = store
        self.digest = key
        self.path = path
        self.resumable = resumable
        self._hasher = Hasher()
        #: Digests of the whole chunks held, in order (kept by resumable writers: the ones read
        #: back when it opened, then one per :meth:`append` given a ``chunk_digest``).
        self.chunks: list[Digest] = []
        self._size = 0
        self._done = False
        self._file: BinaryIO
        if resumable and path.exists():
            self._file = path.open("r+b")
            self._rehash(path.stat().st_size // chunk_size, chunk_size)
        else:
            self._file = path.open("w+b" if resumable else "wb")

    def _rehash(self, count: int, chunk_size: int) -> None:
        keep = count * chunk_size
        self._file.flush()
        self._file.truncate(keep)
        self._file.seek(0)
        self._hasher = Hasher()
        self.chunks = []
        for block in _blocks(self._file, chunk_size):
            self._hasher.update(block)
            self.chunks.append(digest(block))
        self._size = keep

    def truncate_chunks(self, count: int, chunk_size: int) -> None:
        """Keep only the first ``count`` chunks (re-hashing them)."""
        self._rehash(count, chunk_size)

    @property
    def size(self) -> int:
        """Bytes held so far."""
        return self._size

    def append(
        self, data: bytes | bytearray | memoryview, chunk_digest: Digest | None = None
    ) -> None:
        """Write ``data`` at the end; ``chunk_digest`` (its digest, if the caller checked it) is
        recorded in :attr:`chunks`."""
        self._file.write(data)
        self._hasher.update(data)
        self._size += len(data)
        if chunk_digest is not None:
            self.chunks.append(chunk_digest)

    def flush(self) -> None:
        """Make what was appended survive a crash (a resumable writer's checkpoint)."""
        self._file.flush()
        if self._store.durable:
            os.fsync(self._file.fileno())

    def commit(self, pin: bool = False) -> None:
        """Store the blob if its bytes hash to its digest (pinned once if ``pin``).

        Raises:
            TransferError: they do not; the partial file is deleted.
        """
        self._file.flush()
        if self._hasher.digest() != self.digest:
            self.discard()
            raise TransferError(
                f"blob does not match its digest {self.digest.hex()[:16]}… ({self._size} bytes)"
            )
        if self._store.durable:
            os.fsync(self._file.fileno())
        self._file.close()
        self._done = True
        try:
            self._store._commit(self.digest, self.path, self._size, pin=pin)
        finally:
            self._store._release(self.digest, resumable=self.resumable, kept=False)

    def discard(self) -> None:
        """Delete what was written."""
        if self._done:
            return
        self._done = True
        self._file.close()
        self.path.unlink(missing_ok=True)
        self._store._release(self.digest, resumable=self.resumable, kept=False)

    def close(self) -> None:
        """Stop writing: a resumable writer keeps its ``.part``, a temporary one is deleted."""
        if self._done:
            return
        if not self.resumable:
            self.discard()
            return
        self._done = True
        self._file.close()
        self._store._release(self.digest, resumable=True, kept=True)

    def __enter__(self) -> PartialBlob:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _blocks(f: BinaryIO, size: int) -> Iterator[bytes]:
    while block := f.read(size):
        yield block


def _parse_hex(name: str) -> Digest | None:
    if len(name) != 2 * DIGEST_SIZE:
        return None
    try:
        return Digest(bytes.fromhex(name))
    except ValueError:
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
