"""The shipped reference models of the embedded default: a mini-wiki RAG model and its closed-book baseline.

Both are stored as what differs from the installed all-MiniLM-L6-v2, in float16 safetensors, under
``rag/reference_weights/``::

    MANIFEST.json            how they were made (commands, commit, hardware, times), every file's SHA-256
    rag/generator/           delta of the RAG model's BERT-initialised BART (rag.generation.generator.save_delta)
    rag/query_encoder/       delta of its question encoder q(x)
    closed_book/generator/   delta of the closed-book BART, trained the same way without passages
    logs/                    the training runs' metrics.csv and metrics.json

``scripts/train_reference.py`` makes them (and rewrites the folder); ``rag-reference`` evaluates them; the
Hydra groups ``generator=reference`` / ``query_encoder=reference`` load them into any run (the default
``rag-train experiment=miniwiki_rag_token`` fine-tunes from them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rag.atomic import sha256_file, write_json_atomic
from rag.errors import RagError
from rag.weights import (
    DELTA_WEIGHTS,
    apply_delta,
    check_delta_base,
    read_delta,
    state_delta,
    state_fingerprint,
    write_delta,
)

__all__ = [
    "REFERENCE_DIR",
    "ReferenceModelError",
    "check_reference",
    "load_encoder_delta",
    "load_reference_generator",
    "load_reference_query_encoder",
    "save_encoder_delta",
]

REFERENCE_DIR = Path(__file__).resolve().parent / "reference_weights"
MANIFEST = "MANIFEST.json"
KINDS = ("rag", "closed_book")
RETRAIN = "python scripts/train_reference.py (see README, 'The reference model')"


class ReferenceModelError(RagError, RuntimeError):
    """The reference weights are missing, corrupt or do not fit the installed base model."""


def reference_dir(path: str | os.PathLike | None = None) -> Path:
    return REFERENCE_DIR if path is None else Path(path).expanduser()


def check_reference(path: str | os.PathLike | None = None) -> dict:
    """The reference folder's manifest, after checking that every file it lists has its recorded SHA-256."""
    root = reference_dir(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ReferenceModelError(
            f"no reference model in {root} ({MANIFEST} is missing): restore it with `git checkout -- {root}` or "
            f"train one with {RETRAIN}"
        )
    manifest = json.loads(manifest_path.read_text())
    for rel, digest in manifest.get("files", {}).items():
        f = root / rel
        if not f.is_file():
            raise ReferenceModelError(
                f"reference file {f} is missing: restore it with `git checkout -- {root}`"
            )
        if sha256_file(f) != digest:
            raise ReferenceModelError(
                f"reference file {f} is corrupt (its SHA-256 differs from {manifest_path}): restore it with "
                f"`git checkout -- {root}` or retrain with {RETRAIN}"
            )
    return manifest


# ------------------------------------------------------------------------------------------- encoder deltas


def save_encoder_delta(encoder, base, path: str | os.PathLike) -> dict:
    """Store the tensors of ``encoder.model`` that differ from ``base.model`` (its starting point), in float16,
    with a manifest naming the base and the encoder's pooling; atomic (written beside, then renamed)."""
    state = encoder.model.state_dict()
    base_state = base.model.state_dict()
    if state.keys() != base_state.keys():
        raise ReferenceModelError(
            "the encoder and its base have different parameters: not the same architecture"
        )
    manifest = {
        "base": base.name,
        "base_sha256": state_fingerprint(base_state),
        "pooling": encoder.pooling,
        "normalize": encoder.normalize,
        "max_length": encoder.max_length,
    }
    return write_delta(path, state_delta(state, base_state, error=ReferenceModelError), manifest)


def load_encoder_delta(path: str | os.PathLike, base_name_or_path: str | None = None):
    """A :class:`~rag.retrieval.encoders.QueryEncoder`: the base (default: the shipped MiniLM) plus the delta
    saved by :func:`save_encoder_delta`, after checking the file's SHA-256 and the base's fingerprint."""
    from rag.retrieval.encoders import MINILM_HUB_NAME, load_query_encoder

    path = Path(path).expanduser()
    manifest, delta = read_delta(path, writer="save_encoder_delta", error=ReferenceModelError)
    encoder = load_query_encoder(
        base_name_or_path or MINILM_HUB_NAME,
        pooling=manifest["pooling"],
        normalize=manifest["normalize"],
        max_length=manifest["max_length"],
    )
    params = encoder.model.state_dict()
    check_delta_base(path, manifest, params, fix="install the same base model", error=ReferenceModelError)
    apply_delta(params, delta, what=str(path / DELTA_WEIGHTS), error=ReferenceModelError)
    return encoder


# ------------------------------------------------------------------------------------------- Hydra targets


def load_reference_generator(kind: str = "rag", path: str | os.PathLike | None = None):
    """The reference ``rag`` or ``closed_book`` generator (Hydra: ``generator=reference``)."""
    from rag.generation.generator import load_delta

    if kind not in KINDS:
        raise ReferenceModelError(f"kind must be one of {KINDS}, got {kind!r}")
    root = reference_dir(path)
    check_reference(root)
    return load_delta(root / kind / "generator")


def load_reference_query_encoder(path: str | os.PathLike | None = None):
    """The reference RAG model's question encoder (Hydra: ``query_encoder=reference``)."""
    root = reference_dir(path)
    check_reference(root)
    return load_encoder_delta(root / "rag" / "query_encoder")


def write_manifest(root: Path, record: dict) -> dict:
    """Write ``MANIFEST.json`` with the SHA-256 of every file under ``root`` (but itself)."""
    files = {
        str(f.relative_to(root)): sha256_file(f)
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }
    record = {**record, "files": files, "total_bytes": sum((root / f).stat().st_size for f in files)}
    write_json_atomic(root / MANIFEST, record)
    return record
