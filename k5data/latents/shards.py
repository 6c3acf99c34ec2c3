"""Latent shards: tar archives per modality/resolution class plus a Parquet index listing only uploaded shards."""
from __future__ import annotations

import io
import json
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from k5data.object_store import ObjectStore as Store  # the name the loader and the encoder import

# report: samples per archive so archives are of similar size
SAMPLES_PER_SHARD: dict[tuple[str, str], int] = {
    ("image", "low"): 1024, ("image", "medium"): 256, ("image", "high"): 64,
    ("video", "low"): 16, ("video", "medium"): 4, ("video", "high"): 1,
}
INDEX_KEY = "index.parquet"


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


def write_tar(samples: list[LatentSample], path: Path) -> None:
    """Members per sample: ``<id>.npy``, ``<id>.src_npy`` (editing source, optional), then ``<id>.json`` last."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            if "." in s.id or "/" in s.id:
                raise ValueError(f"sample id {s.id!r} must not contain '.' or '/' (tar member names)")
            _add(tar, f"{s.id}.npy", _npy(s.latent))
            if s.source_latent is not None:
                _add(tar, f"{s.id}.src_npy", _npy(s.source_latent))
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
                yield LatentSample(sid, np.load(io.BytesIO(d["npy"]), allow_pickle=False), meta["caption"],
                                   meta["fps"], meta["res_class"], meta["scores"], src, meta.get("meta", {}))


INDEX_SCHEMA = pa.schema([("shard", pa.string()), ("modality", pa.string()), ("res_class", pa.string()),
                          ("sample_id", pa.string()), ("t", pa.int32()), ("h", pa.int32()), ("w", pa.int32())])


def read_index(store: Store, prefix: str) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(store.get_bytes(f"{prefix}/{INDEX_KEY}")))
    except FileNotFoundError:
        return INDEX_SCHEMA.empty_table()


def _write_index(store: Store, prefix: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.put_bytes(f"{prefix}/{INDEX_KEY}", buf.getvalue())  # why: store puts are atomic, readers see old or new


def write_shards(samples: Iterable[LatentSample], store: Store, prefix: str,
                 per_shard: dict[tuple[str, str], int] | None = None, fail_after: int | None = None) -> int:
    """Pack samples into shards; idempotent: samples already listed in the index are skipped, so a re-run
    after a crash resumes without duplicates. Shards are numbered after the highest listed one, so an
    orphaned (uploaded but unlisted) archive is simply overwritten. Returns number of shards written.
    `fail_after` raises after that many shards (crash simulation in tests)."""
    per_shard = per_shard or SAMPLES_PER_SHARD
    index = read_index(store, prefix)
    done = set(index.column("sample_id").to_pylist())
    next_no: dict[tuple[str, str], int] = {}
    for shard, mod, rc in zip(*(index.column(c).to_pylist() for c in ("shard", "modality", "res_class"))):
        n = int(shard.rsplit("-", 1)[1].split(".")[0])
        next_no[(mod, rc)] = max(next_no.get((mod, rc), 0), n + 1)
    buckets: dict[tuple[str, str], list[LatentSample]] = {}
    written = 0
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)

        def flush(key: tuple[str, str]) -> None:
            nonlocal index, written
            batch = buckets.pop(key)
            no = next_no.get(key, 0)
            next_no[key] = no + 1
            name = f"shards/{key[0]}/{key[1]}/shard-{no:06d}.tar"
            write_tar(batch, tmp / "s.tar")
            store.put_file(tmp / "s.tar", f"{prefix}/{name}")
            rows = pa.table({"shard": [name] * len(batch), "modality": [key[0]] * len(batch),
                             "res_class": [key[1]] * len(batch), "sample_id": [s.id for s in batch],
                             "t": [s.latent.shape[0] for s in batch], "h": [s.latent.shape[1] for s in batch],
                             "w": [s.latent.shape[2] for s in batch]}, schema=INDEX_SCHEMA)
            index = pa.concat_tables([index, rows])
            _write_index(store, prefix, index)  # listed only after the archive upload completed
            written += 1
            if fail_after is not None and written >= fail_after:
                raise RuntimeError("simulated crash")

        for s in samples:
            if s.id in done:
                continue
            key = (s.modality, s.res_class)
            buckets.setdefault(key, []).append(s)
            if len(buckets[key]) >= per_shard[key]:
                flush(key)
        for key in sorted(buckets):
            flush(key)
    return written


