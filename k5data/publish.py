"""Publish a local pipeline folder to the object store under an immutable, content-derived prefix.

Layout: ``<root>/<family>/<digest>/<relative path>`` for every file, plus ``<root>/<family>/<digest>/manifest.json``
listing each file's sha256 and size. ``digest`` is the first 16 hex digits of the sha256 of the canonical file list,
so the same bytes always land under the same prefix and a prefix never changes content. Files go up first and the
manifest last: a reader that finds the manifest finds a complete folder, and a re-publish that finds it uploads
nothing. Symlinks are followed (stage exports link the frozen components of their base pipeline), so the published
folder is self-contained.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k5data.object_store import LocalStore, S3Store

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "k5-release-manifest/1"
DIGEST_CHARS = 16
RELEASES_ROOT = "releases"


class ManifestMismatch(ValueError):
    """A folder does not match its manifest; ``path`` names the first file that differs."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


@dataclass(frozen=True)
class FileEntry:
    path: str  # POSIX path relative to the folder
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileEntry, ...]  # sorted by path

    @property
    def sha256(self) -> str:
        """sha256 of the canonical file list: the identity of the folder's content."""
        canonical = json.dumps([[f.path, f.sha256, f.size] for f in self.files], separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def digest(self) -> str:
        return self.sha256[:DIGEST_CHARS]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        return json.dumps({"format": MANIFEST_FORMAT, "sha256": self.sha256, "total_bytes": self.total_bytes,
                           "files": [vars(f) for f in self.files]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a release manifest (format {data.get('format')!r}, expected {MANIFEST_FORMAT!r})")
        manifest = cls(tuple(FileEntry(**f) for f in data["files"]))
        if data.get("sha256") not in (None, manifest.sha256):
            raise ValueError("release manifest is inconsistent: its sha256 does not match its file list")
        return manifest


@dataclass(frozen=True)
class PublishedFolder:
    uri: str  # the folder's URI in the store (file:// or s3://): an MLflow model version source
    manifest_uri: str
    manifest: Manifest
    uploaded: int  # files uploaded by this call (0 when the release already existed)


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _walk(folder: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, file) for every file under ``folder``, following symlinks; a link cycle is an error."""
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            raise ValueError(f"{dirpath} links back to {real}: a symlink cycle cannot be published")
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if rel == MANIFEST:  # a downloaded release carries its manifest; it is not part of the content
                continue
            if not path.is_file():
                raise FileNotFoundError(f"{path} is a broken link or not a regular file")
            out.append((rel, path))
    return sorted(out)


def build_manifest(folder: Path) -> Manifest:
    """Hash every file of ``folder`` (links followed)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder to publish")
    files = tuple(FileEntry(rel, sha256_file(p), p.stat().st_size) for rel, p in _walk(folder))
    if not files:
        raise ValueError(f"{folder} holds no files to publish")
    return Manifest(files)


def release_prefix(family: str, manifest: Manifest, root: str = RELEASES_ROOT) -> str:
    return f"{root.strip('/')}/{family}/{manifest.digest}"


def _put_text(store: LocalStore | S3Store, key: str, text: str) -> str:
    # the store API uploads files; a temp file keeps this module on that API alone
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data"
        path.write_text(text, encoding="utf-8")
        return store.put_file(path, key)


def publish_folder(folder: Path, store: LocalStore | S3Store, family: str,
                   root: str = RELEASES_ROOT) -> PublishedFolder:
    """Upload ``folder`` under ``<root>/<family>/<digest>/`` with its manifest; idempotent.

    A prefix whose manifest exists is complete and is reused without uploading. A prefix left half-uploaded by a
    crash keeps its finished objects (written atomically by the store) and gets the missing ones."""
    manifest = build_manifest(Path(folder))
    prefix = release_prefix(family, manifest, root)
    manifest_key = f"{prefix}/{MANIFEST}"
    uploaded = 0
    if not store.exists(manifest_key):
        present = set(store.list(prefix + "/"))
        for entry in manifest.files:
            key = f"{prefix}/{entry.path}"
            if key not in present:
                store.put_file(Path(folder) / entry.path, key)
                uploaded += 1
        _put_text(store, manifest_key, manifest.to_json())  # last: its presence means "complete"
    return PublishedFolder(uri=store.uri(prefix), manifest_uri=store.uri(manifest_key), manifest=manifest,
                           uploaded=uploaded)


def read_manifest(source: Path | str) -> Manifest:
    """The manifest in a folder (or a manifest.json path)."""
    path = Path(source)
    return Manifest.from_json((path / MANIFEST if path.is_dir() else path).read_text(encoding="utf-8"))


def verify_folder(local_dir: Path, manifest: Manifest | None = None) -> Manifest:
    """Check a (downloaded) folder against ``manifest`` (default: its own ``manifest.json``): every listed file
    present with its size and sha256, and no other file. Raises ``ManifestMismatch`` naming the first bad file."""
    local_dir = Path(local_dir)
    manifest = manifest or read_manifest(local_dir)
    found = {rel: path for rel, path in _walk(local_dir)}
    for entry in manifest.files:
        path = found.pop(entry.path, None)
        if path is None:
            raise ManifestMismatch(entry.path, f"missing from {local_dir}")
        size = path.stat().st_size
        if size != entry.size:
            raise ManifestMismatch(entry.path, f"size {size} bytes, manifest says {entry.size}")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise ManifestMismatch(entry.path, f"sha256 {digest[:12]}..., manifest says {entry.sha256[:12]}...")
    if found:
        raise ManifestMismatch(sorted(found)[0], f"not listed in the manifest of {local_dir}")
    return manifest


def manifest_summary(published: PublishedFolder) -> dict[str, Any]:
    """Flat fields for asset metadata and MLflow tags."""
    m = published.manifest
    return {"source_uri": published.uri, "manifest_uri": published.manifest_uri, "manifest_sha256": m.sha256,
            "files": len(m.files), "total_bytes": m.total_bytes, "uploaded_files": published.uploaded}
