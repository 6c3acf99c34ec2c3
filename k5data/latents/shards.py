"""Latent shards: tar archives per modality/resolution class plus a versioned Parquet index listing only uploaded
archives, written by one writer at a time.

Layout under a prefix::

    shards/<modality>/<class>/shard-<n>-<writer>.tar   archives (the writer tag: two writers never share a name)
    indexes/index-<generation>-<writer>.parquet         index versions (each run's last; its latest few while running)
    index.json                                          pointer to the current version (+ its SHA-256 and counts)
    pending/<modality>/<class>/spill-<writer>-<n>.tar   encoded samples not yet in an archive (bounded kill loss)
    _lease.json                                         the writer's lease (``k5data.leases``)

A publish writes a new index version, then switches ``index.json`` with a compare-and-swap on the version it started
from, so readers see the old index or the new one, never none, and a second writer's publish is refused instead of
dropping rows. Stores written before the pointer (a bare ``index.parquet``) are read as they are and migrated by the
next publish."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from k5data.leases import Lease, acquire_lease, put_if_absent, put_if_version, read_versioned
from k5data.object_store import ObjectStore as Store  # the name the loader and the encoder import

log = logging.getLogger(__name__)

# report: samples per archive so archives are of similar size
SAMPLES_PER_SHARD: dict[tuple[str, str], int] = {
    ("image", "low"): 1024, ("image", "medium"): 256, ("image", "high"): 64,
    ("video", "low"): 16, ("video", "medium"): 4, ("video", "high"): 1,
}
LEGACY_INDEX_KEY = "index.parquet"  # before index.json: read, migrated on the next publish
INDEX_POINTER = "index.json"
KEEP_INDEX_VERSIONS = 4  # a run's older versions are deleted: a reader between pointer and version retries
SPILL_EVERY = 32  # encoded samples per class kept only in memory at most (then spilled to pending/)
SPILL_SECONDS = 60.0  # ... or for at most this long


@dataclass
class LatentSample:
    id: str
    latent: np.ndarray  # (T, H, W, C)
    caption: str
    fps: float
    res_class: str
    scores: dict[str, float] = field(default_factory=dict)
    # instruct editing: the source image's latent (same shape); trained with it in the condition channels, mask ones
    source_latent: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # provenance (source uri, scene times, bucket, vae, ...)
    # instruct editing: the source image as Qwen2.5-VL sees it in the edit prompt (uint8, half the bucket size)
    source_image: np.ndarray | None = None

    @property
    def modality(self) -> str:
        return "image" if self.latent.shape[0] == 1 else "video"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _unpng(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def write_tar(samples: list[LatentSample], path: Path) -> None:
    """Members per sample: ``<id>.npy``, ``<id>.src_npy`` and ``<id>.src_png`` (editing source latent and image,
    optional), then ``<id>.json`` last."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            if "." in s.id or "/" in s.id:
                raise ValueError(f"sample id {s.id!r} must not contain '.' or '/' (tar member names)")
            _add(tar, f"{s.id}.npy", _npy(s.latent))
            if s.source_latent is not None:
                _add(tar, f"{s.id}.src_npy", _npy(s.source_latent))
            if s.source_image is not None:
                _add(tar, f"{s.id}.src_png", _png(s.source_image))
            meta = {"id": s.id, "caption": s.caption, "fps": s.fps, "res_class": s.res_class,
                    "scores": s.scores, "shape": list(s.latent.shape), "source": s.source_latent is not None,
                    "meta": s.meta}
            _add(tar, f"{s.id}.json", json.dumps(meta).encode())


def read_tar(f: IO[bytes]) -> Iterator[LatentSample]:
    """Stream samples from an archive (pipe mode: one sequential pass, no seeking)."""
    pending: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            fh = tar.extractfile(m)
            assert fh is not None
            sid, ext = m.name.rsplit(".", 1)
            pending.setdefault(sid, {})[ext] = fh.read()
            if ext == "json":  # written last: the sample is complete (older shards have no src_npy/meta)
                d = pending.pop(sid)
                meta = json.loads(d["json"])
                src = np.load(io.BytesIO(d["src_npy"]), allow_pickle=False) if "src_npy" in d else None
                image = _unpng(d["src_png"]) if "src_png" in d else None
                yield LatentSample(sid, np.load(io.BytesIO(d["npy"]), allow_pickle=False), meta["caption"],
                                   meta["fps"], meta["res_class"], meta["scores"], src, meta.get("meta", {}), image)




INDEX_SCHEMA = pa.schema([("shard", pa.string()), ("modality", pa.string()), ("res_class", pa.string()),
                          ("sample_id", pa.string()), ("t", pa.int32()), ("h", pa.int32()), ("w", pa.int32())])


class IndexConflict(RuntimeError):
    """The index changed between this writer's read and its publish: another writer is active."""


@dataclass(frozen=True)
class IndexHead:
    """The index version a reader got: ``key`` of the Parquet object, its ``generation``, and the pointer's store
    version (what a publish compares against; None for a legacy bare ``index.parquet``)."""

    key: str
    generation: int
    pointer_version: str | None


def read_index_head(store: Store, prefix: str) -> tuple[pa.Table, IndexHead | None]:
    """The current index and its head (None when there is none yet)."""
    for attempt in range(5):
        pointer = read_versioned(store, f"{prefix}/{INDEX_POINTER}")
        if pointer is None:
            try:
                data = store.get_bytes(f"{prefix}/{LEGACY_INDEX_KEY}")
            except FileNotFoundError:
                return INDEX_SCHEMA.empty_table(), None
            return pq.read_table(io.BytesIO(data)), IndexHead(LEGACY_INDEX_KEY, 0, None)
        head = json.loads(pointer.data)
        try:
            data = store.get_bytes(f"{prefix}/{head['index']}")
        except FileNotFoundError:  # pruned by a later publish between our two reads: read the pointer again
            time.sleep(0.05 * (attempt + 1))
            continue
        if hashlib.sha256(data).hexdigest() != head["sha256"]:
            where, pointer_uri = store.uri(f"{prefix}/{head['index']}"), store.uri(f"{prefix}/{INDEX_POINTER}")
            raise ValueError(f"shard index {where} does not match the SHA-256 in {pointer_uri} (damaged in the "
                             "store); re-run the writer")
        return pq.read_table(io.BytesIO(data)), IndexHead(head["index"], int(head["generation"]), pointer.version)
    raise FileNotFoundError(f"the shard index under {store.uri(prefix)} kept moving while being read; retry")


def read_index(store: Store, prefix: str) -> pa.Table:
    """The current shard index of ``prefix`` (empty when nothing was published)."""
    return read_index_head(store, prefix)[0]


def index_uri(store: Store, prefix: str) -> str:
    """URI of the current (immutable) index version, what lineage records."""
    head = read_index_head(store, prefix)[1]
    return store.uri(f"{prefix}/{head.key if head else INDEX_POINTER}")


def publish_index(store: Store, prefix: str, table: pa.Table, expected: IndexHead | None, writer: str) -> IndexHead:
    """Write ``table`` as a new index version and switch the pointer to it if the pointer is still at ``expected``
    (``IndexConflict`` otherwise); older versions beyond ``KEEP_INDEX_VERSIONS`` are pruned."""
    generation = (expected.generation if expected else 0) + 1
    key = f"indexes/index-{generation:08d}-{writer}.parquet"
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    try:
        store.put_bytes(f"{prefix}/{key}", data)  # a failure here leaves the pointer at the previous version
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: a half-written version is never pointed at anyway
            store.delete_prefix(f"{prefix}/{key}")
        raise
    digest = hashlib.sha256(data).hexdigest()
    pointer = json.dumps({"format": 1, "index": key, "generation": generation, "sha256": digest,
                          "samples": table.num_rows, "shards": len(set(table.column("shard").to_pylist())),
                          "writer": writer, "published_at": datetime.now(UTC).isoformat(timespec="seconds")}).encode()
    pkey = f"{prefix}/{INDEX_POINTER}"
    if expected is None or expected.pointer_version is None:
        version = put_if_absent(store, pkey, pointer)
    else:
        version = put_if_version(store, pkey, pointer, expected.pointer_version)
    if version is None:
        with contextlib.suppress(FileNotFoundError):
            store.delete_prefix(f"{prefix}/{key}")
        raise IndexConflict(f"the shard index {store.uri(pkey)} changed while this writer ({writer}) was writing: "
                            "another writer is active on this prefix; stop it (or wait) and re-run, which resumes")
    if expected is not None and expected.pointer_version is None:
        store.delete_prefix(f"{prefix}/{LEGACY_INDEX_KEY}")  # migrated: the pointer is the one truth now
    # prune this writer's intermediate versions only: the last version of every run stays (lineage names it)
    own = sorted(k for k in store.list(f"{prefix}/indexes/") if k.endswith(f"-{writer}.parquet"))
    for stale in own[:-KEEP_INDEX_VERSIONS]:
        store.delete_prefix(stale)
    return IndexHead(key, generation, version)


def archive_number(name: str) -> int:
    """n of ``.../shard-<n>.tar`` or ``.../shard-<n>-<writer>.tar``."""
    return int(name.rsplit("/", 1)[-1].removesuffix(".tar").split("-")[1])


def _index_rows(name: str, batch: list[LatentSample]) -> pa.Table:
    return pa.table({"shard": [name] * len(batch), "modality": [s.modality for s in batch],
                     "res_class": [s.res_class for s in batch], "sample_id": [s.id for s in batch],
                     "t": [s.latent.shape[0] for s in batch], "h": [s.latent.shape[1] for s in batch],
                     "w": [s.latent.shape[2] for s in batch]}, schema=INDEX_SCHEMA)


class ShardWriter:
    """Packs samples into archives of ``per_shard`` samples per (modality, class) under the caller's lease.

    Opening it (under the lease) deletes archives no index lists (left by a killed writer) and takes back the
    encoded samples spilled to ``pending/`` by a killed run. Samples wait in memory for their archive; every
    ``spill_every`` samples or ``spill_s`` seconds a class's new ones are spilled to ``pending/``, so a kill loses at
    most that much encoding work. Each archive is uploaded, then listed by a new index version, then its spills
    are deleted. ``done`` holds the ids that need no encoding (indexed or recovered)."""

    def __init__(self, store: Store, prefix: str, lease: Lease, per_shard: dict[tuple[str, str], int] | None = None,
                 *, spill_every: int = SPILL_EVERY, spill_s: float = SPILL_SECONDS, fail_after: int | None = None):
        self.store, self.prefix, self.lease = store, prefix, lease
        self.per_shard = per_shard or SAMPLES_PER_SHARD
        self.spill_every, self.spill_s, self.fail_after = spill_every, spill_s, fail_after
        self.tag = lease.record.token[:8]
        self.index, self.head = read_index_head(store, prefix)
        self.indexed = set(self.index.column("sample_id").to_pylist())
        self.next_no: dict[tuple[str, str], int] = {}
        for shard, mod, rc in zip(*(self.index.column(c).to_pylist() for c in ("shard", "modality", "res_class"))):
            self.next_no[(mod, rc)] = max(self.next_no.get((mod, rc), 0), archive_number(shard) + 1)
        self.buckets: dict[tuple[str, str], list[LatentSample]] = {}
        self.unspilled: dict[tuple[str, str], list[LatentSample]] = {}
        self.waiting: set[str] = set()  # ids in the buckets (in memory or spilled), not yet in an archive
        self.spills: dict[str, set[str]] = {}  # spill key -> its ids not yet listed in the index
        self.spill_seq, self.last_spill = 0, time.monotonic()
        self.shards_written = self.recovered = self.orphans_deleted = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="k5-shards-")
        self._delete_orphans()
        self._recover()

    @property
    def done(self) -> set[str]:
        return self.indexed | self.waiting

    def _known(self, sid: str) -> bool:
        return sid in self.indexed or sid in self.waiting

    def _delete_orphans(self) -> None:
        listed = set(self.index.column("shard").to_pylist())
        for key in self.store.list(f"{self.prefix}/shards/"):
            if key.endswith(".tar") and key[len(self.prefix) + 1:] not in listed:
                self.orphans_deleted += self.store.delete_prefix(key)
        if self.orphans_deleted:
            log.info(f"deleted {self.orphans_deleted} unlisted archives under {self.store.uri(self.prefix)}")

    def _recover(self) -> None:
        for key in sorted(self.store.list(f"{self.prefix}/pending/")):
            if not key.endswith(".tar"):
                continue
            with self.store.open_read(key) as f:
                samples = [s for s in read_tar(f) if not self._known(s.id)]
            if samples:
                self.spills[key] = {s.id for s in samples}
                for s in samples:
                    self.buckets.setdefault((s.modality, s.res_class), []).append(s)
                    self.waiting.add(s.id)
                self.recovered += len(samples)
            else:
                self.store.delete_prefix(key)
        for k in sorted(self.buckets):
            while len(self.buckets.get(k, [])) >= self.per_shard[k]:
                self._flush(k)

    def add(self, s: LatentSample) -> None:
        if self._known(s.id):
            return
        key = (s.modality, s.res_class)
        self.buckets.setdefault(key, []).append(s)
        self.waiting.add(s.id)
        self.unspilled.setdefault(key, []).append(s)
        if len(self.buckets[key]) >= self.per_shard[key]:
            self._flush(key)
        elif len(self.unspilled[key]) >= self.spill_every or time.monotonic() - self.last_spill >= self.spill_s:
            for k in sorted(k for k, v in self.unspilled.items() if v):
                self._spill(k)

    def _spill(self, key: tuple[str, str]) -> None:
        batch = self.unspilled.pop(key)
        name = f"{self.prefix}/pending/{key[0]}/{key[1]}/spill-{self.tag}-{self.spill_seq:06d}.tar"
        self.spill_seq += 1
        write_tar(batch, Path(self._tmp.name) / "p.tar")
        self.store.put_file(Path(self._tmp.name) / "p.tar", name)
        self.spills[name] = {s.id for s in batch}
        self.last_spill = time.monotonic()

    def _flush(self, key: tuple[str, str]) -> None:
        batch, self.buckets[key] = self.buckets[key][:self.per_shard[key]], self.buckets[key][self.per_shard[key]:]
        flushed = {s.id for s in batch}
        self.unspilled[key] = [s for s in self.unspilled.get(key, []) if s.id not in flushed]
        no = self.next_no.get(key, 0)
        self.next_no[key] = no + 1
        name = f"shards/{key[0]}/{key[1]}/shard-{no:06d}-{self.tag}.tar"
        write_tar(batch, Path(self._tmp.name) / "s.tar")
        self.store.put_file(Path(self._tmp.name) / "s.tar", f"{self.prefix}/{name}")
        self.lease.check()  # a writer whose lease was taken over must not publish
        index = pa.concat_tables([self.index, _index_rows(name, batch)])
        self.head = publish_index(self.store, self.prefix, index, self.head, self.tag)  # listed after the upload
        self.index, self.indexed, self.waiting = index, self.indexed | flushed, self.waiting - flushed
        for spill, ids in list(self.spills.items()):
            ids -= flushed
            if not ids:
                self.store.delete_prefix(spill)
                del self.spills[spill]
        self.shards_written += 1
        if self.fail_after is not None and self.shards_written >= self.fail_after:
            raise RuntimeError("simulated crash")

    def close(self) -> None:
        """Flush every partly filled archive (the run's end)."""
        for key in sorted(self.buckets):
            while self.buckets[key]:
                self._flush(key)
        self._tmp.cleanup()


def write_shards(samples: Iterable[LatentSample], store: Store, prefix: str,
                 per_shard: dict[tuple[str, str], int] | None = None, fail_after: int | None = None, *,
                 lease: Lease | None = None, holder: str = "write_shards", spill_every: int = SPILL_EVERY) -> int:
    """Pack samples into shards under ``prefix`` (``ShardWriter``) holding its lease (``lease``, or one taken here
    for ``holder``); idempotent: samples already listed are skipped, so a re-run after a crash resumes without
    duplicates. Returns the number of archives written. ``fail_after`` raises after that many (tests)."""
    with contextlib.ExitStack() as stack:
        if lease is None:
            lease = stack.enter_context(acquire_lease(store, prefix, holder=holder))
        writer = ShardWriter(store, prefix, lease, per_shard, spill_every=spill_every, fail_after=fail_after)
        for s in samples:
            writer.add(s)
        writer.close()
        return writer.shards_written

