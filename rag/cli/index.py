"""``rag-index``: embed a corpus with the frozen document encoder and build a dense index over it.

    rag-index                                   # the mini-wiki, MiniLM, exact (flat) index
    rag-index index=hnsw                        # the paper's HNSW index
    rag-index corpus=file corpus.name=mywiki corpus.passages.path=psgs_w100.tsv doc_encoder=dpr_nq index=hnsw
    rag-index embed.shard=3 embed.num_shards=8  # machine 3 of 8 embeds its slice (same embeddings_dir)

Embeddings go to ``<cache_dir>/embeddings/<corpus>-<encoder>-<dtype>`` (resumable: rerun after an
interrupt and finished files are kept), the index to ``<cache_dir>/indexes/<corpus>-<encoder>-<kind>``,
where ``cache_dir`` is ``$RAG_HOME`` or ``~/.cache/rag``. An index that already fits the corpus, the encoder
and the index parameters is reused unless ``rebuild=true``.
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from rag.cli import CONF_DIR
from rag.errors import ConfigError
from rag.retrieval.embed import (
    EmbeddingsError,
    ShardedEmbeddings,
    consolidate_embeddings,
    corpus_checksum,
    embed_corpus,
    open_embeddings,
)
from rag.retrieval.encoders import BertEncoder
from rag.retrieval.errors import RetrievalError
from rag.retrieval.index import MANIFEST_NAME, DenseIndex, IndexManifest, read_manifest
from rag.retrieval.retriever import write_index_source
from rag.types import Passage

log = logging.getLogger("rag.index")


@dataclass
class IndexResult:
    index: DenseIndex | None  # None when this call embedded only a shard and the corpus is not complete
    index_dir: Path
    embeddings_dir: Path
    built: bool  # False: an existing index was loaded


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
) -> IndexResult:
    """Load the index in ``index_dir`` if it fits; otherwise embed what is missing and build ``index``.

    ``index`` is an empty index of the wanted kind and parameters; ``embed`` holds :func:`embed_corpus`
    options (batch_size, dtype, rows_per_file, shard, num_shards, overwrite). ``mmap`` loads an existing
    index memory-mapped (read-only, its vectors shared by the processes of a machine). Before embedding,
    the memory each index kind needs is printed, and an index this machine cannot hold is refused
    (:mod:`rag.retrieval.memory`).
    """
    from rag.retrieval.memory import plan_for_index, print_plan

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
        if not saved.differences(expected) and same_params:
            print(f"[rag-index] reusing the {index.kind} index in {index_dir}", file=sys.stderr, flush=True)
            loaded = DenseIndex.load(index_dir, expected=expected, verbose=index.verbose, mmap=mmap)
            return IndexResult(loaded, index_dir, embeddings_dir, built=False)
        diffs = saved.differences(expected)
        why = f"it was built for another {', '.join(diffs)}" if diffs else "its kind or parameters differ"
        print(f"[rag-index] rebuilding the index in {index_dir}: {why}", file=sys.stderr, flush=True)

    # refuse an index this machine cannot hold before hours of embedding, not after
    plan = plan_for_index(index, len(passages), doc_encoder.dim, embed.get("dtype", "float32"))
    print_plan(plan)
    if embed.get("num_shards", 1) == 1:
        plan.check()
    start = time.perf_counter()
    report = embed_corpus(doc_encoder, passages, embeddings_dir, **embed)
    if report.computed:
        n = sum(hi - lo for lo, hi in report.computed)
        seconds = time.perf_counter() - start
        print(
            f"[rag-index] embedded {n:,} passages in {seconds:.1f} s ({n / seconds:.0f} passages/s) into "
            f"{embeddings_dir}",
            file=sys.stderr,
            flush=True,
        )
    try:
        embeds = open_embeddings(embeddings_dir, expected_rows=len(passages))
    except EmbeddingsError as err:
        if embed.get("num_shards", 1) > 1:
            print(
                f"[rag-index] shard {embed.get('shard', 0)} of {embed['num_shards']} is embedded; the index is "
                f"built once all shards are in {embeddings_dir} ({err})",
                file=sys.stderr,
                flush=True,
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
    print(
        f"[rag-index] built the {index.kind} index over {index.ntotal:,} x {index.dim} in "
        f"{time.perf_counter() - start:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    if index.is_exact:
        print("[rag-index] exact search: recall vs exact is 1.0 by construction", file=sys.stderr, flush=True)
    expected.embed_dtype = str(embeds.dtype)
    index.save(index_dir, expected)
    write_index_source(
        index_dir,
        embeddings_dir=str(embeddings_dir),
        corpus=corpus_name,
        encoder=doc_encoder.settings(),
        recall_vs_exact=index.build_recall,
    )
    print(f"[rag-index] saved the index to {index_dir}", file=sys.stderr, flush=True)
    return IndexResult(index, index_dir, embeddings_dir, built=True)


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in torch and faiss (None: their defaults)."""
    if threads:
        import faiss

        torch.set_num_threads(int(threads))
        faiss.omp_set_num_threads(int(threads))


def fail(err: Exception) -> None:
    """Print a known error as one message and exit with status 1 (no stack trace)."""
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(1)


def known_errors() -> tuple[type[Exception], ...]:
    from rag.data.errors import DataError

    return (RetrievalError, DataError, ConfigError)


def check_required(cfg: DictConfig) -> None:
    """Name every required (``???``) config value left unset, in one message."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        example = " ".join(f"{key}=..." for key in missing)
        raise ConfigError(
            f"required config values are not set: {', '.join(missing)}. Set them, e.g. {example}"
        )


def instantiate(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate`` that surfaces our own errors instead of Hydra's wrapper around them."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, known_errors()):
            raise cause from None
        raise


def run(cfg: DictConfig) -> IndexResult:
    check_required(cfg)
    set_threads(cfg.threads)
    passages = instantiate(cfg.corpus.passages)
    doc_encoder = instantiate(cfg.doc_encoder).to(cfg.device)
    index = instantiate(cfg.index)
    embed = OmegaConf.to_container(cfg.embed, resolve=True)
    embeddings_dir = cfg.embeddings_dir or default_embeddings_dir(
        cfg.cache_dir, cfg.corpus.name, doc_encoder, embed["dtype"]
    )
    index_dir = cfg.index_dir or default_index_dir(cfg.cache_dir, cfg.corpus.name, doc_encoder, index.kind)
    print(
        f"[rag-index] corpus {cfg.corpus.name}: {len(passages):,} passages; encoder {doc_encoder.name} "
        f"({doc_encoder.dim}-d, {doc_encoder.pooling} pooling); index {index.kind}",
        file=sys.stderr,
        flush=True,
    )
    return ensure_index(
        passages,
        doc_encoder,
        index,
        index_dir,
        embeddings_dir,
        embed=embed,
        rebuild=cfg.rebuild,
        rebuild_command="rag-index " + " ".join(sys.argv[1:]) + " rebuild=true",
        corpus_name=cfg.corpus.name,
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="rag_index")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except known_errors() as err:
        fail(err)


if __name__ == "__main__":
    main()
