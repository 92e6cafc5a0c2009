"""The blob store: content addressing, verified writes, resumable partials, eviction, restart."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fednode.crypto import digest
from fednode.errors import TransferError
from fednode.net.blobstore import BlobStore, BlobStoreStatistics

CHUNK = 16 << 10


class FakeClock:
    """Wall-clock seconds that advance one per read, so access order is explicit."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def open_store(path: Path, **options: object) -> BlobStore:
    return BlobStore(path, durable=False, **options)  # type: ignore[arg-type]


def test_put_get_is_content_addressed(tmp_path: Path) -> None:
    # Prepare
    store = open_store(tmp_path)
    data = blob(50_000)
    # Execute
    key = store.put(data)
    # Assert
    assert key == digest(data)
    assert store.has(key) and store.size(key) == len(data)
    assert store.get(key) == data
    assert (tmp_path / "blobs" / key.hex()).read_bytes() == data
    with store.open_reader(key, 40_000) as reader:
        assert reader.read() == data[40_000:]


def test_missing_blob_raises_key_error(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    missing = digest(b"nope")
    assert not store.has(missing)
    with pytest.raises(KeyError):
        store.get(missing)
    with pytest.raises(KeyError):
        store.size(missing)


def test_put_verified_refuses_bytes_that_do_not_hash_to_the_digest(tmp_path: Path) -> None:
    # Prepare
    store = open_store(tmp_path)
    data = blob(10_000)
    # Execute
    with pytest.raises(TransferError, match="does not match"):
        store.put_verified(digest(data), [data[:5000], b"X" + data[5001:]])
    store.put_verified(digest(data), [data[:5000], data[5000:]])
    # Assert: the failed write left nothing behind, the good one is stored
    names = sorted(p.name for p in (tmp_path / "blobs").iterdir())
    assert names == [digest(data).hex()]


def test_partial_is_resumable_from_whole_chunks_only(tmp_path: Path) -> None:
    # Prepare: 2.5 chunks written to the .part, then the writer closed (a fetch cut short)
    store = open_store(tmp_path)
    data = blob(4 * CHUNK + 100)
    key = digest(data)
    with store.open_partial(key, resume_chunk_size=CHUNK) as partial:
        partial.append(data[:CHUNK], digest(data[:CHUNK]))
        partial.append(data[CHUNK : 2 * CHUNK + CHUNK // 2])
    assert store.statistics().partials == 1
    # Execute: a new writer for the same blob
    with store.open_partial(key, resume_chunk_size=CHUNK) as partial:
        resumed_at = partial.size
        held = list(partial.chunks)
        partial.append(data[resumed_at:])
        partial.commit()
    # Assert
    assert resumed_at == 2 * CHUNK
    assert held == [digest(data[:CHUNK]), digest(data[CHUNK : 2 * CHUNK])]
    assert store.get(key) == data
    assert store.statistics().partials == 0
    assert not (tmp_path / "blobs" / f"{key.hex()}.part").exists()


def test_one_resumable_writer_per_blob(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    key = digest(b"x")
    with store.open_partial(key, resume_chunk_size=CHUNK):
        with pytest.raises(TransferError, match="already running"):
            store.open_partial(key, resume_chunk_size=CHUNK)
    with store.open_partial(key, resume_chunk_size=CHUNK) as partial:
        partial.append(b"x")
        partial.commit()
    assert store.get(key) == b"x"


def test_temporary_writer_leaves_nothing_when_abandoned(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    data = blob(1000)
    with store.open_partial(digest(data)) as partial:
        partial.append(data[:500])
    assert list((tmp_path / "blobs").iterdir()) == []


def test_truncate_chunks_rehashes_the_kept_prefix(tmp_path: Path) -> None:
    # Prepare
    store = open_store(tmp_path)
    data = blob(3 * CHUNK)
    key = digest(data)
    with store.open_partial(key, resume_chunk_size=CHUNK) as partial:
        partial.append(data[:CHUNK], digest(data[:CHUNK]))
        partial.append(b"\0" * CHUNK, digest(b"\0" * CHUNK))
        # Execute
        partial.truncate_chunks(1, CHUNK)
        partial.append(data[CHUNK:])
        partial.commit()
    # Assert
    assert store.get(key) == data


def test_eviction_is_lru_by_access_and_skips_pins(tmp_path: Path) -> None:
    # Prepare: budget for three 1000-byte blobs
    store = open_store(tmp_path, max_bytes=3000, clock=FakeClock())
    a, b, c = (store.put(blob(1000, seed)) for seed in (1, 2, 3))
    store.pin(a)  # oldest, but pinned
    store.get(b)  # b is now more recent than c
    # Execute
    d = store.put(blob(1000, 4))
    # Assert: c, the least recently used unpinned blob, went
    assert [store.has(k) for k in (a, b, c, d)] == [True, True, False, True]
    assert store.statistics() == BlobStoreStatistics(
        blobs=3, total_bytes=3000, max_bytes=3000, pinned=1, pinned_bytes=1000,
        partials=0, evicted=1, evicted_bytes=1000,
    )  # fmt: skip


def test_pins_are_counted_and_the_budget_applies_once_they_go(tmp_path: Path) -> None:
    # Prepare: a budget of 1.5 blobs
    store = open_store(tmp_path, max_bytes=1500, clock=FakeClock())
    a = store.put(blob(1000, 1))
    store.pin(a)
    store.pin(a)
    # Execute / Assert
    b = store.put(blob(1000, 2))
    assert store.has(a) and store.has(b), "a is pinned, b just arrived: over budget for now"
    store.unpin(a)
    assert store.has(a) and not store.has(b), "one pin left on a; b was the only candidate"
    store.unpin(a)
    assert store.has(a) and not store.pinned(a), "under budget: nothing to evict"
    c = store.put(blob(1000, 3))
    assert not store.has(a) and store.has(c)
    assert store.statistics().evicted == 2


def test_store_survives_restart_with_blobs_partials_and_access_order(tmp_path: Path) -> None:
    # Prepare
    clock = FakeClock()
    store = open_store(tmp_path, clock=clock)
    old, new = store.put(blob(1000, 1)), store.put(blob(1000, 2))
    store.get(old)  # old is now the most recently used
    data = blob(2 * CHUNK, 3)
    with store.open_partial(digest(data), resume_chunk_size=CHUNK) as partial:
        partial.append(data[:CHUNK])
    (tmp_path / "blobs" / f"{'ab' * 32}.1234.tmp").write_bytes(b"junk of a crashed transfer")
    # Execute
    reopened = open_store(tmp_path, max_bytes=1000, clock=clock)
    reopened.put(b"")  # any write applies the (now smaller) budget
    # Assert
    assert reopened.has(old) and not reopened.has(new)  # LRU order came back from the files
    assert reopened.get(old) == blob(1000, 1)
    assert reopened.statistics().partials == 1
    with reopened.open_partial(digest(data), resume_chunk_size=CHUNK) as partial:
        assert partial.size == CHUNK
    assert not list((tmp_path / "blobs").glob("*.tmp"))


def test_chunk_digests_list_every_chunk(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    data = blob(2 * CHUNK + 1)
    key = store.put(data)
    expected = (digest(data[:CHUNK]), digest(data[CHUNK : 2 * CHUNK]), digest(data[2 * CHUNK :]))
    assert store.chunk_digests(key, CHUNK) == expected
    assert store.chunk_digests(store.put(b""), CHUNK) == ()


def test_remove_drops_a_blob_and_its_pins(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    key = store.put(b"abc")
    store.pin(key)
    store.remove(key)
    assert not store.has(key) and not store.pinned(key)
    assert store.statistics().blobs == 0
