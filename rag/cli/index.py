"""``rag-index``: embed a corpus with the frozen document encoder and build a dense index over it.

    rag-index                                   # the mini-wiki, MiniLM, exact (flat) index
    rag-index index=hnsw                        # the paper's HNSW index
    rag-index corpus=file corpus.name=mywiki corpus.passages.path=psgs_w100.tsv doc_encoder=dpr_nq index=hnsw
    rag-index embed.shard=3 embed.num_shards=8  # machine 3 of 8 embeds its slice (same embeddings_dir)
    rag-index index=sharded embed.dtype=float16 # embed only, for index=sharded training; prints the memory
                                                # each rank will hold at 8 and 64 ranks

Embeddings go to ``<cache_dir>/embeddings/<corpus>-<encoder>-<dtype>`` (resumable: rerun after an
interrupt and finished files are kept), the index to ``<cache_dir>/indexes/<corpus>-<encoder>-<kind>``,
where ``cache_dir`` is ``$RAG_HOME`` or ``~/.cache/rag``. An index that already fits the corpus, the encoder
and the index parameters is reused unless ``rebuild=true``. With ``index=sharded`` the embeddings are the
index (each DDP rank of a training run reads its shard of them): they are embedded, no index file is
built, and the per-rank memory plan is printed instead of the replicated one.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rag.build import (
    check_required,
    default_embeddings_dir,
    default_index_dir,
    ensure_index,
    instantiate,
    set_threads,
)
from rag.cli.app import hydra_entry
from rag.retrieval.indexer import IndexResult
from rag.retrieval.sharded import ShardedIndex, ensure_embeddings, sharded_memory_table

log = logging.getLogger("rag.cli.index")

CONFIG_NAME = "rag_index"


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
    log.info(
        f"corpus {cfg.corpus.name}: {len(passages):,} passages; encoder {doc_encoder.name} "
        f"({doc_encoder.dim}-d, {doc_encoder.pooling} pooling); index {index.kind}"
    )
    if isinstance(index, ShardedIndex):
        return _sharded(passages, doc_encoder, index, embed, embeddings_dir)
    index_dir = cfg.index_dir or default_index_dir(cfg.cache_dir, cfg.corpus.name, doc_encoder, index.kind)
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


def _sharded(passages, doc_encoder, index: ShardedIndex, embed: dict, embeddings_dir) -> IndexResult:
    """``index=sharded``: the per-rank memory plan, then the embeddings (the index the ranks shard)."""
    stored = index.dtype or embed["dtype"]
    dtypes = [stored, *(d for d in ("float32", "float16") if d != stored)]
    for line in sharded_memory_table(len(passages), doc_encoder.dim, dtypes=dtypes).splitlines():
        log.info(line)
    embeds = ensure_embeddings(passages, doc_encoder, embeddings_dir, embed=embed)
    if embeds is None:
        log.info(f"shard {embed['shard']} of {embed['num_shards']} is embedded in {embeddings_dir}")
    else:
        index.build(embeds)
        log.info(
            f"the embeddings in {embeddings_dir} are ready for index=sharded ({index.ntotal:,} x {index.dim}); "
            "no index file is built"
        )
    return IndexResult(
        index if embeds is not None else None, Path(embeddings_dir), Path(embeddings_dir), built=False
    )


def main() -> None:
    hydra_entry(run, CONFIG_NAME, "rag-index")


if __name__ == "__main__":
    main()
