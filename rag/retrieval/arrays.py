"""Embedding matrices going into an index: the shape / dtype / finiteness checks every index applies, and the
chunked float32 reading that keeps one block of a (possibly memory-mapped, float16) corpus in memory."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from rag.retrieval.errors import RetrievalInputError

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "as_tensor",
    "check_matrix",
    "check_n_docs",
    "dtype_name",
    "iter_chunks",
    "rows_of",
    "to_float32",
]

DEFAULT_CHUNK_ROWS = 65536


def dtype_name(embeds) -> str:
    return str(embeds.dtype).removeprefix("torch.")


def check_matrix(embeds, what: str, dim: int | None = None) -> tuple[int, int]:
    """Shape and dtype checks shared by build/add/search; returns (rows, dim)."""
    if isinstance(embeds, torch.Tensor):
        floating = embeds.is_floating_point()
    elif isinstance(embeds, np.ndarray):
        floating = np.issubdtype(embeds.dtype, np.floating)
    else:
        raise RetrievalInputError(
            f"{what} must be a numpy array or torch tensor of shape (N, D), got {type(embeds).__name__}"
        )
    if embeds.ndim != 2:
        raise RetrievalInputError(
            f"{what} must have shape (N, D), got shape {tuple(embeds.shape)}"
            + ("; add a batch dimension with x[None]" if embeds.ndim == 1 else "")
        )
    if not floating:
        raise RetrievalInputError(f"{what} must be float32 or float16, got {dtype_name(embeds)}")
    rows, d = embeds.shape
    if dim is not None and d != dim:
        raise RetrievalInputError(
            f"{what} has dimension {d} but the index holds {dim}-d vectors: the encoder that made them "
            "is not the one the index was built with (check the manifest's encoder_name)"
        )
    return rows, d


def to_float32(block, what: str, first_row: int = 0) -> np.ndarray:
    """One block of rows as a C-contiguous float32 numpy array, refusing NaN/inf."""
    if isinstance(block, torch.Tensor):
        block = block.detach().to("cpu", torch.float32).numpy()
    out = np.ascontiguousarray(block, dtype=np.float32)
    if not np.isfinite(out).all():
        bad = int(np.argwhere(~np.isfinite(out))[0, 0]) + first_row
        raise RetrievalInputError(
            f"{what} has a NaN or infinite value in row {bad}: the encoder overflowed (float16 "
            "embeddings of an unnormalised encoder?); re-embed in float32"
        )
    return out


def iter_chunks(embeds, chunk_rows: int, what: str) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 block) over ``embeds`` (which may be a read-only memmap): one block in memory
    at a time."""
    n = embeds.shape[0]
    for start in range(0, n, chunk_rows):
        yield start, to_float32(embeds[start : start + chunk_rows], what, start)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, or a copy of it when it is read-only (a memmap)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def check_n_docs(n_docs: int, ntotal: int, where: str = "the index") -> int:
    """``n_docs`` as an int if it is 1..``ntotal``; else :class:`RetrievalInputError` naming ``where`` the
    ``ntotal`` passages are (``the index``, ``the corpus``)."""
    if isinstance(n_docs, bool) or not isinstance(n_docs, (int, np.integer)) or n_docs < 1:
        raise RetrievalInputError(f"n_docs must be a positive integer, got n_docs={n_docs!r}")
    if n_docs > ntotal:
        raise RetrievalInputError(
            f"n_docs={n_docs} but {where} has {ntotal} passages: ask for at most {ntotal}"
        )
    return int(n_docs)


def rows_of(embeds, rows: np.ndarray) -> np.ndarray:
    """The given (sorted) rows of ``embeds``, numpy or torch, as float32 (a memmap reads forward)."""
    picked = embeds[torch.from_numpy(rows)] if isinstance(embeds, torch.Tensor) else embeds[rows]
    return to_float32(picked, "embeds")
