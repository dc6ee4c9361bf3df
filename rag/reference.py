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

import torch

from rag.atomic import sha256_file as _sha256
from rag.atomic import write_json_atomic

__all__ = [
    "REFERENCE_DIR",
    "ReferenceError",
    "check_reference",
    "load_encoder_delta",
    "load_reference_generator",
    "load_reference_query_encoder",
    "save_encoder_delta",
]

REFERENCE_DIR = Path(__file__).resolve().parent / "reference_weights"
MANIFEST = "MANIFEST.json"
ENCODER_DELTA = "delta.safetensors"
ENCODER_MANIFEST = "delta.json"
KINDS = ("rag", "closed_book")
RETRAIN = "python scripts/train_reference.py (see README, 'The reference model')"


class ReferenceError(RuntimeError):
    """The reference weights are missing, corrupt or do not fit the installed base model."""


def reference_dir(path: str | os.PathLike | None = None) -> Path:
    return REFERENCE_DIR if path is None else Path(path).expanduser()


def check_reference(path: str | os.PathLike | None = None) -> dict:
    """The reference folder's manifest, after checking that every file it lists has its recorded SHA-256."""
    root = reference_dir(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ReferenceError(
            f"no reference model in {root} ({MANIFEST} is missing): restore it with `git checkout -- {root}` or "
            f"train one with {RETRAIN}"
        )
    manifest = json.loads(manifest_path.read_text())
    for rel, digest in manifest.get("files", {}).items():
        f = root / rel
        if not f.is_file():
            raise ReferenceError(f"reference file {f} is missing: restore it with `git checkout -- {root}`")
        if _sha256(f) != digest:
            raise ReferenceError(
                f"reference file {f} is corrupt (its SHA-256 differs from {manifest_path}): restore it with "
                f"`git checkout -- {root}` or retrain with {RETRAIN}"
            )
    return manifest


# ------------------------------------------------------------------------------------------- encoder deltas


def save_encoder_delta(encoder, base, path: str | os.PathLike) -> dict:
    """Store the tensors of ``encoder.model`` that differ from ``base.model`` (its starting point), in float16,
    with a manifest naming the base and the encoder's pooling; atomic (written beside, then renamed)."""
    from safetensors.torch import save_file

    from rag.generation.generator import _atomic_write_dir, _state_fingerprint

    state = encoder.model.state_dict()
    base_state = base.model.state_dict()
    if state.keys() != base_state.keys():
        raise ReferenceError("the encoder and its base have different parameters: not the same architecture")
    delta = {
        k: v.detach().cpu().to(torch.float16).contiguous()
        for k, v in state.items()
        if not torch.equal(v.detach().cpu().float(), base_state[k].detach().cpu().float())
    }

    def write(tmp: Path) -> None:
        save_file(delta, str(tmp / ENCODER_DELTA))
        manifest = {
            "base": base.name,
            "base_sha256": _state_fingerprint(base_state),
            "pooling": encoder.pooling,
            "normalize": encoder.normalize,
            "max_length": encoder.max_length,
            "dtype": "float16",
            "n_tensors": len(delta),
            "n_params": sum(t.numel() for t in delta.values()),
            "sha256": _sha256(tmp / ENCODER_DELTA),
        }
        (tmp / ENCODER_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    out = _atomic_write_dir(Path(path), write)
    return json.loads((out / ENCODER_MANIFEST).read_text())


def load_encoder_delta(path: str | os.PathLike, base_name_or_path: str | None = None):
    """A :class:`~rag.retrieval.encoders.QueryEncoder`: the base (default: the shipped MiniLM) plus the delta
    saved by :func:`save_encoder_delta`, after checking the file's SHA-256 and the base's fingerprint."""
    from safetensors.torch import load_file

    from rag.generation.generator import _state_fingerprint
    from rag.retrieval.encoders import MINILM_HUB_NAME, load_query_encoder

    path = Path(path).expanduser()
    manifest_path = path / ENCODER_MANIFEST
    if not manifest_path.is_file():
        raise ReferenceError(
            f"{path} holds no {ENCODER_MANIFEST}: not a folder written by save_encoder_delta"
        )
    manifest = json.loads(manifest_path.read_text())
    weights = path / ENCODER_DELTA
    if not weights.is_file() or _sha256(weights) != manifest["sha256"]:
        raise ReferenceError(
            f"{weights} is missing or its SHA-256 differs from {manifest_path}: restore it (`git checkout`)"
        )
    encoder = load_query_encoder(
        base_name_or_path or MINILM_HUB_NAME,
        pooling=manifest["pooling"],
        normalize=manifest["normalize"],
        max_length=manifest["max_length"],
    )
    fingerprint = _state_fingerprint(encoder.model.state_dict())
    if fingerprint != manifest["base_sha256"]:
        raise ReferenceError(
            f"the delta in {path} was made against {manifest['base']!r} (fingerprint {manifest['base_sha256'][:12]}) "
            f"but the base loaded has fingerprint {fingerprint[:12]}: install the same base model"
        )
    params = encoder.model.state_dict()
    with torch.no_grad():
        for name, tensor in load_file(str(weights)).items():
            if name not in params or params[name].shape != tensor.shape:
                raise ReferenceError(
                    f"{weights}: tensor {name} {tuple(tensor.shape)} does not fit the encoder"
                )
            params[name].copy_(tensor.to(params[name].dtype))
    return encoder


# ------------------------------------------------------------------------------------------- Hydra targets


def load_reference_generator(kind: str = "rag", path: str | os.PathLike | None = None):
    """The reference ``rag`` or ``closed_book`` generator (Hydra: ``generator=reference``)."""
    from rag.generation.generator import load_delta

    if kind not in KINDS:
        raise ReferenceError(f"kind must be one of {KINDS}, got {kind!r}")
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
        str(f.relative_to(root)): _sha256(f)
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }
    record = {**record, "files": files, "total_bytes": sum((root / f).stat().st_size for f in files)}
    write_json_atomic(root / MANIFEST, record)
    return record
