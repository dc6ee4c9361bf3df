"""Embed a corpus and build (or reuse) its dense index: the one path ``rag-index``, ``rag-train``, the studies
and the Python API take from passages to a searchable index.

    result = ensure_index(passages, doc_encoder, DenseIndex.create("hnsw"), index_dir, embeddings_dir)
    result.index.search(query_embeds, n_docs)

Embeddings are written resumably (finished files are kept after an interrupt), the index atomically with its
manifest (encoder, corpus checksum, count); an index that already fits the corpus, the encoder and the index
parameters is loaded instead of rebuilt. Processes asking for the same index at once take turns (a lock
beside the folder), so the first builds it and the others load it.
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rag.data import miniwiki
from rag.retrieval.base import IndexEmbeddingsError
from rag.retrieval.embed import (
    EmbeddingsError,
    ShardedEmbeddings,
    consolidate_embeddings,
    corpus_checksum,
    embed_corpus,
    open_embeddings,
)
from rag.retrieval.encoders import BertEncoder
from rag.retrieval.index import MANIFEST_NAME, DenseIndex, IndexManifest, read_manifest
from rag.retrieval.memory import log_plan, plan_for_index
from rag.retrieval.retriever import write_index_source
from rag.types import Passage

log = logging.getLogger(__name__)


@dataclass
class IndexResult:
    index: DenseIndex | None  # None when this call embedded only a shard and the corpus is not complete
    index_dir: Path
    embeddings_dir: Path
    built: bool  # False: an existing index was loaded


#: the environment variable naming where indexes and embeddings are cached, and its default
CACHE_VARIABLE = "RAG_HOME"
DEFAULT_CACHE_DIR = "~/.cache/rag"


def default_cache_dir() -> str:
    """Where indexes and embeddings are cached when nothing says otherwise: ``$RAG_HOME``, else
    ``~/.cache/rag`` (not expanded: :func:`cache_dir` does that)."""
    return os.environ.get(CACHE_VARIABLE) or DEFAULT_CACHE_DIR


def cache_dir(path: str) -> Path:
    return Path(path).expanduser()


def default_embeddings_dir(cache: str, corpus_name: str, encoder: BertEncoder, dtype: str) -> Path:
    return cache_dir(cache) / "embeddings" / f"{corpus_name}-{encoder.name}-{dtype}"


def default_index_dir(cache: str, corpus_name: str, encoder: BertEncoder, kind: str) -> Path:
    return cache_dir(cache) / "indexes" / f"{corpus_name}-{encoder.name}-{kind}"


def _comparable(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "verbose"}


def _one_process_at_a_time(build):
    """Run ``build`` under an exclusive lock beside its ``index_dir``: processes that ask for the same index
    at once (the ranks of a DDP job) take turns, so the first builds it and the others load it."""

    @functools.wraps(build)
    def locked(*args, **kwargs):
        index_dir = Path(inspect.signature(build).bind(*args, **kwargs).arguments["index_dir"]).expanduser()
        index_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(index_dir.with_name(f".{index_dir.name}.lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                return build(*args, **kwargs)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    return locked


@_one_process_at_a_time
def ensure_index(
    passages: Sequence[Passage],
    doc_encoder: BertEncoder,
    index: DenseIndex,
    index_dir: str | Path,
    embeddings_dir: str | Path,
    *,
    embed: dict | None = None,
    rebuild: bool = False,
    rebuild_command: str = "",
    corpus_name: str = "",
    mmap: bool = False,
    prebuilt: Sequence[str | Path] | None = None,
) -> IndexResult:
    """Load the index in ``index_dir`` if it fits; otherwise embed what is missing and build ``index``.

    ``prebuilt``: embeddings directories whose files are taken instead of embedding the same rows with the
    same encoder (:func:`rag.retrieval.embed.embed_corpus`); None: the mini-wiki's shipped ones.

    ``index`` is an empty index of the wanted kind and parameters; ``embed`` holds :func:`embed_corpus`
    options (batch_size, dtype, rows_per_file, shard, num_shards, overwrite). ``mmap`` loads an existing
    index memory-mapped (read-only, its vectors shared by the processes of a machine). Before embedding,
    the memory each index kind needs is logged, and an index this machine cannot hold is refused
    (:mod:`rag.retrieval.memory`).

    A kind that re-scores from the embeddings (``ivfpq_refine``) is built from the memory-mapped file in
    ``embeddings_dir`` and saved with a reference to it; an existing one is loaded with its embeddings
    looked for in ``embeddings_dir`` first, and rebuilt (re-embedding what is missing) when they are gone
    or are not the ones it was built from.
    """
    embed = dict(embed or {})
    index_dir, embeddings_dir = Path(index_dir).expanduser(), Path(embeddings_dir).expanduser()
    checksum = corpus_checksum(passages)
    encoder_checksum = doc_encoder.weights_checksum()
    expected = IndexManifest(
        encoder_name=doc_encoder.name,
        encoder_checksum=encoder_checksum,
        corpus_checksum=checksum,
        n_passages=len(passages),
        dim=doc_encoder.dim,
        rebuild_command=rebuild_command,
    )
    if not rebuild and (index_dir / MANIFEST_NAME).is_file():
        saved = read_manifest(index_dir)
        same_params = saved.index_kind == index.kind and _comparable(saved.index_params) == _comparable(
            index.params()
        )
        why = ""
        if not saved.differences(expected) and same_params:
            try:
                loaded = DenseIndex.load(
                    index_dir, expected=expected, verbose=index.verbose, mmap=mmap, embeddings=embeddings_dir
                )
            except IndexEmbeddingsError as err:  # the embeddings it re-scores from are gone or changed
                why = str(err)
            else:
                log.info(f"reusing the {index.kind} index in {index_dir}")
                return IndexResult(loaded, index_dir, embeddings_dir, built=False)
        diffs = saved.differences(expected)
        if not why:
            why = f"it was built for another {', '.join(diffs)}" if diffs else "its kind or parameters differ"
        log.info(f"rebuilding the index in {index_dir}: {why}")

    # refuse an index this machine cannot hold before hours of embedding, not after
    plan = plan_for_index(index, len(passages), doc_encoder.dim, embed.get("dtype", "float32"))
    log_plan(plan)
    if embed.get("num_shards", 1) == 1:
        plan.check()
    start = time.perf_counter()
    if prebuilt is None:
        prebuilt = [miniwiki.embeddings_dir()]
    report = embed_corpus(doc_encoder, passages, embeddings_dir, prebuilt=prebuilt, **embed)
    if report.seeded:
        n = sum(hi - lo for lo, hi in report.seeded)
        log.info(
            f"took the embeddings of {n:,} passages from {', '.join(map(str, prebuilt))} (same encoder weights and "
            f"passages) into {embeddings_dir}"
        )
    if report.computed:
        n = sum(hi - lo for lo, hi in report.computed)
        seconds = time.perf_counter() - start
        log.info(
            f"embedded {n:,} passages in {seconds:.1f} s ({n / seconds:.0f} passages/s) into {embeddings_dir}"
        )
    try:
        embeds = open_embeddings(embeddings_dir, expected_rows=len(passages))
    except EmbeddingsError as err:
        if embed.get("num_shards", 1) > 1:
            log.info(
                f"shard {embed.get('shard', 0)} of {embed['num_shards']} is embedded; the index is "
                f"built once all shards are in {embeddings_dir} ({err})"
            )
            return IndexResult(None, index_dir, embeddings_dir, built=False)
        raise
    if isinstance(embeds, ShardedEmbeddings):
        embeds = consolidate_embeddings(
            embeddings_dir, passages, show_progress=embed.get("show_progress", True)
        )
    plan.check()
    start = time.perf_counter()
    index.build(embeds)
    log.info(
        f"built the {index.kind} index over {index.ntotal:,} x {index.dim} in "
        f"{time.perf_counter() - start:.1f} s"
    )
    if index.is_exact:
        log.info("exact search: recall vs exact is 1.0 by construction")
    expected.embed_dtype = str(embeds.dtype)
    index.save(index_dir, expected)
    write_index_source(
        index_dir,
        embeddings_dir=str(embeddings_dir),
        corpus=corpus_name,
        encoder=doc_encoder.settings(),
        recall_vs_exact=index.build_recall,
    )
    log.info(f"saved the index to {index_dir}")
    return IndexResult(index, index_dir, embeddings_dir, built=True)
