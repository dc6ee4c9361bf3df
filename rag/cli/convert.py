"""``rag-convert``: between transformers' RAG format and this project's checkpoints (:mod:`rag.interop_convert`).

    rag-convert import experiment=nq_rag_token_released corpus.passages.path=/data/psgs_w100.tsv \\
        data.train.nq.path=... data.val.nq.path=... data.test.nq.path=/data/nq-test.qa.csv out=rag-token-nq.ckpt
    rag-evaluate ckpt_path=rag-token-nq.ckpt

    rag-convert export ckpt_path=outputs/<run>/checkpoints/last.ckpt out=exported/my-rag

``import`` takes every key of rag-train's config (``conf/convert_import.yaml`` includes ``conf/train.yaml``) and
writes a checkpoint holding that config and no weights, marked so that :class:`~rag.lit_module.RagLitModule`
takes every weight from the config's own loaders: ``generator=rag_checkpoint query_encoder=rag_checkpoint``,
which read the transformers RAG checkpoint named by ``rag_checkpoint`` (a hub name or a folder). The released
models' files stay where the hub cache keeps them; ``rag-evaluate`` and ``rag.build.load_checkpoint`` then
treat the file as any rag-train checkpoint. To fine-tune a released model, train the experiment itself
(``rag-train experiment=nq_rag_token_released ...``).

``export`` writes a rag-train checkpoint (or an imported one) as a transformers RAG folder
(``conf/convert_export.yaml``): the generator and query encoder are rebuilt from the checkpoint's config and
its weights, never its index.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from rag.build import check_required, set_threads
from rag.cli.app import hydra_entry
from rag.interop_convert import export_checkpoint, import_checkpoint

USAGE = (
    "usage: rag-convert import <rag-train config overrides> out=FILE.ckpt\n"
    "       rag-convert export ckpt_path=FILE.ckpt out=FOLDER [head=...] [question_encoder=...]"
)


def run_import(cfg: DictConfig) -> dict:
    """Write ``cfg.out``: a checkpoint of the transformers RAG model the config loads (config only, no weights)."""
    check_required(cfg)
    return import_checkpoint(cfg, cfg.out)  # the checkpoint stores the config without its `out`


def run_export(cfg: DictConfig) -> dict:
    """Write ``cfg.out``: the checkpoint ``cfg.ckpt_path`` as a transformers RAG folder."""
    check_required(cfg)
    set_threads(cfg.threads)
    return export_checkpoint(
        cfg.ckpt_path,
        cfg.out,
        head=cfg.head,
        n_docs=cfg.n_docs,
        question_encoder=cfg.question_encoder,
        allow_pooling_mismatch=cfg.allow_pooling_mismatch,
    )


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("import", "export"):
        print(f"error: say what to convert\n{USAGE}", file=sys.stderr, flush=True)
        sys.exit(2)
    direction = sys.argv.pop(1)
    if direction == "import":
        return hydra_entry(run_import, "convert_import", "rag-convert import")
    hydra_entry(run_export, "convert_export", "rag-convert export")


if __name__ == "__main__":
    main()
