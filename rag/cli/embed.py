"""``rag-embed``: embed a corpus with the frozen document encoder on every device of a Lightning run.

    rag-embed                                           # the mini-wiki, on this machine's devices
    rag-embed trainer.devices=8 corpus=file corpus.name=mywiki corpus.passages.path=psgs_w100.tsv doc_encoder=dpr_nq
    torchrun --nproc-per-node 4 -m rag.cli.embed trainer.strategy=ddp

Takes ``conf/rag_index.yaml``'s corpus, doc_encoder, embed and cache_dir settings plus the Trainer's device
settings; the embeddings land where ``rag-index`` and ``rag-train`` look for them
(:func:`rag.retrieval.distributed_embed.embed_corpus_distributed` does the work).
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from rag.build import check_required, default_embeddings_dir, instantiate, set_threads
from rag.cli.app import hydra_entry
from rag.retrieval.distributed_embed import DistributedEmbedReport, embed_corpus_distributed

#: ``conf/rag_index.yaml`` (corpus, doc_encoder, embed, cache_dir) plus the Trainer's device settings
CONFIG = {
    "defaults": ["rag_index", "_self_"],
    "trainer": {
        "accelerator": "auto",
        "devices": "auto",
        "num_nodes": 1,
        "strategy": "auto",
        "precision": "32-true",
    },
    "consolidate": True,
}


def run(cfg) -> DistributedEmbedReport:
    """Embed the configured corpus with the configured document encoder on every device of the run."""
    check_required(cfg)
    set_threads(cfg.threads)
    passages = instantiate(cfg.corpus.passages)
    encoder = instantiate(cfg.doc_encoder)
    embed = OmegaConf.to_container(cfg.embed, resolve=True)
    out = cfg.embeddings_dir or default_embeddings_dir(
        cfg.cache_dir, cfg.corpus.name, encoder, embed["dtype"]
    )
    return embed_corpus_distributed(
        encoder,
        passages,
        out,
        batch_size=embed["batch_size"],
        dtype=embed["dtype"],
        rows_per_file=embed["rows_per_file"],
        shard=embed["shard"],
        num_shards=embed["num_shards"],
        overwrite=embed["overwrite"],
        consolidate=cfg.consolidate,
        trainer=OmegaConf.to_container(cfg.trainer, resolve=True),
        show_progress=embed.get("show_progress", True),
    )


def main() -> None:
    ConfigStore.instance().store(name="distributed_embed", node=CONFIG)
    hydra_entry(run, "distributed_embed", "rag-embed")


if __name__ == "__main__":
    main()
