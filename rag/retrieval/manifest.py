"""The manifest of a saved index: what it was built from, and the checks that refuse a wrong or damaged one.

A saved index is a folder holding ``manifest.json`` (this module's :class:`IndexManifest`) and one data file
that the manifest names, with its size and SHA-256. A kind that re-scores from the embeddings it was built
from (``ivfpq_refine``) also records those files (:func:`embeddings_part_record`): where they are, relative
to the folder and absolute, their shape, dtype, size and a fingerprint of their rows (:func:`array_fingerprint`). The format is versioned (``FORMAT_VERSION``): a reader
loads manifests of its own or an older version and ignores keys a newer writer added.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np
import torch

import rag
from rag.atomic import sha256_file
from rag.retrieval.errors import IndexCorruptError, IndexMismatchError, IndexNotFoundError

__all__ = [
    "FINGERPRINT_ROWS",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "METRIC",
    "IndexManifest",
    "array_fingerprint",
    "check_data_file",
    "check_expected",
    "embeddings_part_record",
    "file_record",
    "library_versions",
    "read_manifest",
    "rebuild_hint",
]

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
METRIC = "inner_product"
#: rows an embeddings fingerprint reads, spread evenly over the file (first and last included)
FINGERPRINT_ROWS = 1024


@dataclass
class IndexManifest:
    """What a saved index was built from; ``save`` writes it as ``manifest.json`` beside the index file.

    The caller fills the provenance (encoder, corpus); ``save`` fills what the index knows (dimension,
    count, kind, parameters, versions, files). ``load(directory, expected)`` compares the identity
    fields that ``expected`` sets (non-empty) and refuses an index built for another setup.
    """

    encoder_name: str = ""
    encoder_checksum: str = ""  # checksum of the document encoder's weights
    corpus_checksum: str = ""  # checksum of the passages the rows stand for, in row order
    n_passages: int | None = None
    dim: int | None = None
    metric: str = METRIC
    embed_dtype: str = ""  # dtype of the embeddings the index was built from (float32 / float16)
    index_kind: str = ""
    index_params: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    rebuild_command: str = ""  # the command that rebuilds this index; quoted in mismatch errors
    # role -> {name, bytes, sha256}; "embeddings" -> {rows, dim, parts: [embeddings_part_record]}
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # what loading needs beyond the parameters
    format_version: int = FORMAT_VERSION

    # Fields that make an index unusable for a caller when they differ.
    IDENTITY_FIELDS: ClassVar[tuple[str, ...]] = (
        "encoder_name",
        "encoder_checksum",
        "dim",
        "corpus_checksum",
        "n_passages",
        "metric",
    )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IndexManifest:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("manifest is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        # Unknown keys come from a newer writer; keep loading what this version understands.
        return cls(**{k: v for k, v in raw.items() if k in known})

    def differences(self, expected: IndexManifest) -> dict[str, tuple[Any, Any]]:
        """Identity fields where ``expected`` sets a value that differs from this manifest's:
        field -> (saved, expected)."""
        diffs = {}
        for name in self.IDENTITY_FIELDS:
            want = getattr(expected, name)
            if want is None or want == "":
                continue
            have = getattr(self, name)
            if have != want:
                diffs[name] = (have, want)
        return diffs


def library_versions() -> dict[str, str]:
    """The versions a manifest records (rag, faiss, torch, numpy, python)."""
    return {
        "rag": rag.__version__,
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def file_record(path: Path) -> dict[str, Any]:
    """The manifest's entry for a data file: its name, size and SHA-256."""
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def array_fingerprint(array: np.ndarray, max_rows: int = FINGERPRINT_ROWS) -> str:
    """SHA-256 of a (N, D) array's shape, dtype and the bytes of up to ``max_rows`` rows spread evenly over
    it, first and last included: tells embeddings files apart (another encoder, corpus or dtype changes
    every row) by reading a few thousand rows, where a full checksum of DPR's 21M x 768 would read 32 GB."""
    n = int(array.shape[0])
    rows = np.unique(np.linspace(0, n - 1, min(n, max_rows)).round().astype(np.int64)) if n else []
    digest = hashlib.sha256(f"{array.dtype.str}{tuple(array.shape)}".encode())
    digest.update(np.ascontiguousarray(array[rows]).view(np.uint8).reshape(-1))
    return digest.hexdigest()


def embeddings_part_record(path: Path, start: int, array: np.ndarray, directory: Path) -> dict[str, Any]:
    """The manifest's entry for an embeddings ``.npy`` file an index re-scores from: rows ``start`` ..
    ``start + len(array) - 1`` of the corpus, found at ``path`` (recorded relative to the index folder
    ``directory`` and absolute, so that moving both together keeps it found), with its shape, dtype,
    size and :func:`array_fingerprint`."""
    path = Path(os.path.abspath(path))
    return {
        "name": path.name,
        "path": os.path.relpath(path, os.path.abspath(directory)),
        "absolute": str(path),
        "start": int(start),
        "rows": int(array.shape[0]),
        "dim": int(array.shape[1]),
        "dtype": str(array.dtype),
        "bytes": path.stat().st_size,
        "fingerprint": array_fingerprint(array),
    }


def read_manifest(directory: str | os.PathLike) -> IndexManifest:
    """The manifest of a saved index, with clear errors when there is none or it is unreadable."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise IndexNotFoundError(
            f"no saved index in {directory} (no {MANIFEST_NAME}): build one with `rag-index`, or point to "
            "the directory that `rag-index` wrote"
        )
    try:
        manifest = IndexManifest.from_json(path.read_text())
    except (ValueError, TypeError) as exc:
        raise IndexCorruptError(f"{path} is not a valid index manifest ({exc}); rebuild the index") from exc
    if manifest.format_version > FORMAT_VERSION:
        raise IndexCorruptError(
            f"{path} was written by a newer rag (format {manifest.format_version} > {FORMAT_VERSION}): "
            "upgrade rag or rebuild the index"
        )
    return manifest


def rebuild_hint(manifest: IndexManifest, directory: Path, expected: IndexManifest | None = None) -> str:
    """`` with: <the command that rebuilds this index>``, for the end of an error message."""
    command = (expected.rebuild_command if expected is not None else "") or manifest.rebuild_command
    if not command:
        command = f"rag-index index={manifest.index_kind or 'hnsw'} index_dir={directory} rebuild=true"
    return f" with: {command}"


def check_expected(directory: Path, saved: IndexManifest, expected: IndexManifest | None) -> None:
    """Raise `IndexMismatchError` when ``saved`` was built for another encoder, corpus or dimension than
    the identity fields ``expected`` sets."""
    if expected is None:
        return
    diffs = saved.differences(expected)
    if not diffs:
        return
    lines = [f"the index in {directory} was built for another setup than the one in use:"]
    for name, (have, want) in diffs.items():
        lines.append(f"  {name}: index has {have!r}, expected {want!r}")
    lines.append(
        "Rebuild the index with the encoder and corpus you use now"
        + rebuild_hint(saved, directory, expected)
        + " (or load with the encoder/corpus it was built from)"
    )
    raise IndexMismatchError("\n".join(lines), diffs)


def check_data_file(directory: Path, manifest: IndexManifest, verify_checksum: bool = True) -> Path:
    """The data file ``manifest`` names, checked against the size (and the SHA-256 unless
    ``verify_checksum=False``) the manifest records; `IndexCorruptError` when it is missing or differs."""
    info = manifest.files.get("index") or {}
    path = directory / str(info.get("name", ""))
    if not info.get("name") or not path.is_file():
        raise IndexCorruptError(
            f"{directory} has a manifest but its index file {info.get('name')!r} is missing: the "
            f"directory was copied in part; rebuild it{rebuild_hint(manifest, directory)}"
        )
    size = path.stat().st_size
    if size != info.get("bytes"):
        raise IndexCorruptError(
            f"{path} is {size:,} bytes but the manifest says {info.get('bytes'):,}: the file is "
            f"truncated or was overwritten; rebuild it{rebuild_hint(manifest, directory)}"
        )
    if verify_checksum and sha256_file(path) != info.get("sha256"):
        raise IndexCorruptError(
            f"{path} does not match the SHA-256 in its manifest: the file is damaged; rebuild "
            f"it{rebuild_hint(manifest, directory)}"
        )
    return path
