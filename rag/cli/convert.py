"""``rag-convert``: between transformers' RAG format and this project's checkpoints (:mod:`rag.interop`).

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
its weights, never its index (:func:`rag.interop.write_import_checkpoint` and
:func:`~rag.interop.export_checkpoint_weights` write the files, from what this module reads off the configs).
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rag.build import check_required, checkpoint_config, instantiate, retriever_mode, set_threads
from rag.cli.app import hydra_entry
from rag.interop import (
    InteropError,
    export_checkpoint_weights,
    load_rag_generator,
    load_rag_query_encoder,
    write_import_checkpoint,
)
from rag.model import RagModel

USAGE = (
    "usage: rag-convert import <rag-train config overrides> out=FILE.ckpt\n"
    "       rag-convert export ckpt_path=FILE.ckpt out=FOLDER [head=...] [question_encoder=...]\n"
    "       rag-convert import --help | rag-convert export --help   (each direction's options)"
)
#: the retriever modes whose model has a query encoder (:func:`rag.build.retriever_mode`)
WITH_QUERY_ENCODER = ("learned", "frozen")
IMPORT_HINT = (
    "use experiment=nq_rag_token_released / nq_rag_sequence_released, or generator=rag_checkpoint "
    "query_encoder=rag_checkpoint +rag_checkpoint=<RAG folder or hub name>"
)


def rag_source(cfg: DictConfig) -> str:
    """The transformers RAG checkpoint a rag-train config loads its generator (and query encoder) from;
    :class:`~rag.interop.InteropError` if the config does not load both parts from one."""
    targets = {f"{fn.__module__}.{fn.__name__}": fn for fn in (load_rag_generator, load_rag_query_encoder)}
    if targets.get(cfg.generator.get("_target_")) is not load_rag_generator:
        raise InteropError(
            f"rag-convert import writes checkpoints of transformers RAG models, but the config's generator is "
            f"{cfg.generator.get('_target_')}: {IMPORT_HINT}"
        )
    source = str(cfg.generator.name_or_path)
    if retriever_mode(cfg) in WITH_QUERY_ENCODER:
        if targets.get(cfg.query_encoder.get("_target_")) is not load_rag_query_encoder:
            raise InteropError(
                f"the generator comes from {source} but the query encoder from {cfg.query_encoder.get('_target_')}: "
                f"a RAG checkpoint's two parts were trained together; {IMPORT_HINT}"
            )
        if str(cfg.query_encoder.name_or_path) != source:
            raise InteropError(
                f"the generator comes from {source} but the query encoder from {cfg.query_encoder.name_or_path}: "
                "set both with rag_checkpoint=..."
            )
    return source


def model_settings(run_cfg: DictConfig) -> dict:
    """The RagModel arguments of a run config, with RagModel's defaults for the ones it leaves out."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(RagModel.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    given = OmegaConf.to_container(run_cfg.model, resolve=True)
    return {**defaults, **{k: v for k, v in given.items() if not k.startswith("_")}}


def run_import(cfg: DictConfig) -> dict:
    """Write ``cfg.out``: a checkpoint of the transformers RAG model the config loads (config only, no weights)."""
    check_required(cfg)
    source = rag_source(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("out", None)  # the checkpoint stores the config without its `out`
    return write_import_checkpoint(
        cfg.out,
        source,
        head=cfg.model.head,
        run_config=config,
        optim=instantiate(cfg.optim),
        recall_ks=list(cfg.module.recall_ks),
        val_loss=bool(cfg.module.val_loss),
    )


def run_export(cfg: DictConfig) -> dict:
    """Write ``cfg.out``: the checkpoint ``cfg.ckpt_path`` as a transformers RAG folder."""
    check_required(cfg)
    set_threads(cfg.threads)
    path = Path(cfg.ckpt_path).expanduser()
    run_cfg = checkpoint_config(path)
    settings = model_settings(run_cfg)
    mode = retriever_mode(run_cfg)
    generator = instantiate(run_cfg.generator)
    query_encoder = instantiate(run_cfg.query_encoder) if mode in WITH_QUERY_ENCODER else None
    head = cfg.head or settings["head"]
    n_docs = int(cfg.n_docs or settings["eval_n_docs"] or settings["n_docs"])
    doc_encoder = run_cfg.get("doc_encoder")
    doc_encoder = None if doc_encoder is None else OmegaConf.to_container(doc_encoder, resolve=True)
    written = export_checkpoint_weights(
        path,
        cfg.out,
        generator,
        query_encoder,
        head=head,
        n_docs=n_docs,
        max_context_length=settings["max_context_length"],
        context_prefix=settings["context_prefix"],
        decoder=settings["decoder"] if head == settings["head"] else None,
        generation=settings["generation"],
        label_smoothing=settings["label_smoothing"],
        exclude_bos=settings["exclude_bos"],
        question_encoder=cfg.question_encoder,
        allow_pooling_mismatch=cfg.allow_pooling_mismatch,
        manifest={
            "checkpoint": str(path),
            "retriever_mode": mode,
            "corpus": OmegaConf.select(run_cfg, "corpus.name"),
            "document_encoder": doc_encoder,
        },
    )
    return {"out": str(written), "head": head, "n_docs": n_docs}


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help"):
        print(f"{__doc__.strip()}\n\n{USAGE}", flush=True)
        sys.exit(0)
    if len(sys.argv) < 2 or sys.argv[1] not in ("import", "export"):
        print(f"error: say what to convert\n{USAGE}", file=sys.stderr, flush=True)
        sys.exit(2)
    direction = sys.argv.pop(1)
    if direction == "import":
        return hydra_entry(run_import, "convert_import", "rag-convert import")
    hydra_entry(run_export, "convert_export", "rag-convert export")


if __name__ == "__main__":
    main()
