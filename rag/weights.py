"""Weights as data: the content fingerprint of a state dict, and float16 delta checkpoints against a base.

:func:`state_fingerprint` identifies weights whatever file holds them (the document encoder in index and
embeddings manifests, the base model of a delta). A *delta checkpoint* is a folder holding only the tensors
of a model that differ from its base (``delta.safetensors``, float16) and ``delta.json`` (the base's name and
fingerprint, the weights file's SHA-256, and what the caller adds); the generator's
(:func:`rag.generation.generator.save_delta`) and the query encoder's (:func:`rag.reference.save_encoder_delta`)
deltas are both written and read here. Each caller passes its own error class, so that its users catch what
they always caught.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from rag.atomic import atomic_dir, sha256_file
from rag.errors import RagError

__all__ = [
    "DELTA_MANIFEST",
    "DELTA_WEIGHTS",
    "DeltaError",
    "apply_delta",
    "check_delta_base",
    "read_delta",
    "state_delta",
    "state_fingerprint",
    "write_delta",
]

DELTA_WEIGHTS = "delta.safetensors"
DELTA_MANIFEST = "delta.json"


class DeltaError(RagError, ValueError):
    """A delta checkpoint that cannot be written or read (the default error class of this module)."""


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order: identifies weights whatever file format
    holds them (the document encoder in every index manifest and embeddings record, the base of a delta)."""
    return _fingerprint(state, "{name}|{dtype}|{shape}|")


def _fingerprint(state: Mapping[str, torch.Tensor], framing: str) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(framing.format(name=name, dtype=t.dtype, shape=tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


#: the framing deltas written before one fingerprint served everything recorded as ``base_sha256`` (the
#: shipped reference deltas among them); read, never written
_DELTA_FRAMING_BEFORE = "{name}:{dtype}:{shape};"


def state_delta(
    state: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    *,
    error: type[Exception] = DeltaError,
) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` that differ from (or are missing in) ``base``, as contiguous float16 on the CPU.

    Tied tensors (one storage under several names) are stored once, under a name ``base`` has when one does.
    A tensor that overflows float16 raises ``error``.
    """
    canonical: dict[int, str] = {}
    for name, tensor in state.items():
        ptr = tensor.data_ptr()
        if ptr not in canonical or (name in base and canonical[ptr] not in base):
            canonical[ptr] = name
    delta: dict[str, torch.Tensor] = {}
    for name in sorted(set(canonical.values())):
        tensor = state[name].detach().cpu()
        if name in base and torch.equal(tensor.float(), base[name].detach().cpu().float()):
            continue
        half = tensor.to(torch.float16).contiguous()
        if not torch.isfinite(half).all():
            raise error(f"{name} overflows float16 (max |x| = {tensor.abs().max():.3g})")
        delta[name] = half
    return delta


def write_delta(
    path: str | os.PathLike,
    delta: Mapping[str, torch.Tensor],
    manifest: Mapping,
    *,
    metadata: dict[str, str] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> dict:
    """Write the folder ``path`` atomically: ``delta.safetensors`` (with the safetensors ``metadata``) and
    ``delta.json`` (``manifest`` plus dtype, n_tensors, n_params and the weights file's SHA-256); ``extra``
    writes more files into the folder (a tokenizer) before it is renamed into place. Returns the manifest
    as stored."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(dict(delta), str(tmp / DELTA_WEIGHTS), metadata=metadata)
        record = {
            **manifest,
            "dtype": "float16",
            "n_tensors": len(delta),
            "n_params": sum(t.numel() for t in delta.values()),
            "sha256": sha256_file(tmp / DELTA_WEIGHTS),
        }
        (tmp / DELTA_MANIFEST).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if extra is not None:
            extra(tmp)
    return json.loads((path / DELTA_MANIFEST).read_text())


def read_delta(
    path: str | os.PathLike,
    *,
    writer: str,
    format: int | None = None,
    error: type[Exception] = DeltaError,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest and tensors of a folder written by :func:`write_delta` (through ``writer``, named in the
    error of a folder without a manifest), after checking the manifest's ``format`` (when given) and the
    weights file's SHA-256."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest_path = path / DELTA_MANIFEST
    if not manifest_path.is_file():
        raise error(f"{path} holds no {DELTA_MANIFEST}: not a folder written by {writer}")
    manifest = json.loads(manifest_path.read_text())
    if format is not None and manifest.get("format") != format:
        raise error(f"{manifest_path}: format {manifest.get('format')!r}, expected {format}")
    weights = path / DELTA_WEIGHTS
    if not weights.is_file() or sha256_file(weights) != manifest["sha256"]:
        raise error(
            f"{weights} is missing or its SHA-256 differs from {manifest_path}: the file is corrupt or was "
            "changed after saving; restore it (e.g. `git checkout` / re-download)"
        )
    return manifest, load_file(str(weights))


def check_delta_base(
    path: str | os.PathLike,
    manifest: Mapping,
    base: Mapping[str, torch.Tensor],
    *,
    fix: str,
    error: type[Exception] = DeltaError,
) -> None:
    """Raise ``error`` (ending in ``fix``) unless ``base`` is the model the delta in ``path`` was made against."""
    fingerprint = state_fingerprint(base)
    if manifest["base_sha256"] not in (fingerprint, _fingerprint(base, _DELTA_FRAMING_BEFORE)):
        raise error(
            f"the delta in {path} was made against base {manifest['base']!r} (fingerprint "
            f"{manifest['base_sha256'][:12]}), but the base loaded has fingerprint {fingerprint[:12]}: {fix}"
        )


def apply_delta(
    params: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    *,
    what: str,
    error: type[Exception] = DeltaError,
) -> None:
    """Copy each delta tensor into the same-named tensor of ``params`` (a model's ``state_dict()``), in its
    dtype; a tensor ``what`` (the model, in the error) has not, or of another shape, raises ``error``."""
    with torch.no_grad():
        for name, tensor in delta.items():
            if name not in params or params[name].shape != tensor.shape:
                raise error(f"{what}: tensor {name} {tuple(tensor.shape)} does not fit the model")
            params[name].copy_(tensor.to(params[name].dtype))
