"""``rag-evaluate``: answer a split's questions with any model and score them.

    rag-evaluate pretrained=reference                          # the shipped mini-wiki model, its own test split
    rag-evaluate pretrained=outputs/miniwiki_rag_token/<run>/checkpoints/last.ckpt   # (or ckpt_path=...)
    rag-evaluate pretrained=rag/reference_weights/rag          # a reference-style folder (generator/ query_encoder/)
    rag-evaluate pretrained=/models/rag-token-nq doc_encoder=facebook/dpr-ctx_encoder-single-nq-base   # transformers
    rag-evaluate pretrained=... split=val n_docs=10 decoder=sequence_fast
    rag-evaluate pretrained=... n_docs=50 decoder=sequence_thorough +generation.num_beams=4  # paper's test setting

The model is loaded by the Python API (:meth:`rag.api.RAG.from_pretrained`): a rag-train checkpoint is rebuilt
from the config stored in it, with its index and corpus re-attached; the other sources take the data, corpus
and index of ``experiment`` (the embedded default unless set). Writes to the run folder:

- ``predictions.jsonl``: one line per question: id, set, question, gold answers, the prediction and its
  log-probability, and every passage the generator read (id, title, text, retrieval score, prior p(z|x),
  posterior p(z|x,y));
- ``metrics.json``: EM, F1, answer recall@k and gold-passage recall@k at 1, 5, 10 and K (overall and per set),
  with the settings used; the same figures are printed as a table.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rag.api import RAG
from rag.atomic import write_json_atomic
from rag.build import check_required, instantiate, set_threads
from rag.cli.app import hydra_entry
from rag.errors import ConfigError
from rag.evaluation import score_records, write_predictions
from rag.lit_module import RagLitModule

CONFIG_NAME = "evaluate"
SPLITS = ("train", "val", "test")
#: recall@k always reported (those up to K), beside recall@K itself
RECALL_KS = (1, 5, 10)


log = logging.getLogger("rag.cli.evaluate")


def _training_overrides(cfg: DictConfig) -> dict:
    """What the evaluation settings change in the model's training config."""
    overrides = OmegaConf.to_container(cfg.train, resolve=True) or {}
    model = overrides.setdefault("model", {})
    data = overrides.setdefault("data", {})
    if cfg.n_docs is not None:
        model["eval_n_docs"] = int(cfg.n_docs)
    if cfg.decoder is not None:
        model["decoder"] = cfg.decoder
    if cfg.generation:
        model["generation"] = OmegaConf.to_container(cfg.generation, resolve=True)
    if cfg.batch_size is not None:
        data["eval_batch_size"] = int(cfg.batch_size)
    if cfg.limit is not None:
        data[f"limit_{cfg.split}"] = int(cfg.limit)
    return {k: v for k, v in overrides.items() if v != {}}


def markdown_table(metrics: dict) -> str:
    rows = ["| metric | value |", "|---|---:|"]
    for key, value in metrics.items():
        shown = f"{int(value)}" if key.rsplit("/", 1)[-1] == "n" else f"{100 * value:.1f}"
        rows.append(f"| {key} | {shown} |")
    return "\n".join(rows) + "\n"


def model_source(cfg: DictConfig) -> str:
    """``pretrained=`` or (as before) ``ckpt_path=``; one of them, and the same one if both are set. (Not
    ``model=``: that names the model config group on the command line.)"""
    pretrained, ckpt = cfg.get("pretrained"), cfg.get("ckpt_path")
    if pretrained and ckpt and str(pretrained) != str(ckpt):
        raise ConfigError(f"pretrained={pretrained} and ckpt_path={ckpt} name two models: give one of them")
    source = pretrained or ckpt
    if not source:
        raise ConfigError(
            "no model to evaluate: give pretrained=reference, pretrained=<.ckpt>, pretrained=<reference-style "
            "folder> or pretrained=<transformers RAG folder or hub name> (ckpt_path=<.ckpt> works too)"
        )
    return str(source)


def run(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.pretrained`` (or ``cfg.ckpt_path``) on ``cfg.split``; returns the report (also written to
    ``output_dir``)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import TQDMProgressBar

    check_required(cfg)
    if cfg.split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {cfg.split!r}")
    source = model_source(cfg)
    set_threads(cfg.threads)
    started = time.perf_counter()
    loaded = RAG.from_pretrained(
        source,
        experiment=cfg.get("experiment"),
        doc_encoder=cfg.get("doc_encoder"),
        index_kind=cfg.get("index_kind"),
        overrides=_training_overrides(cfg),
    )
    train_cfg, model = loaded.config, loaded.model
    module = loaded.lit_module or RagLitModule(model, recall_ks=list(train_cfg.module.recall_ks))
    datamodule = instantiate(train_cfg.data)
    loader = datamodule.loader(cfg.split)
    log.info(
        f"{source}: {len(loader.dataset):,} {cfg.split} questions ({', '.join(datamodule.set_names(cfg.split))}); "
        f"n_docs={model.eval_n_docs or model.n_docs}, decoder={model.default_decoder()}, "
        f"generation={model.generation}"
    )
    trainer = pl.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        precision=cfg.precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[TQDMProgressBar(refresh_rate=1)],
    )
    batches = trainer.predict(module, dataloaders=loader)
    records = [record for batch in batches for record in batch]
    # recall at 1, 5, 10 and the model's own ks (those up to K); score_records adds K itself
    ks = list(cfg.recall_ks) if cfg.recall_ks else sorted({*RECALL_KS, *module.recall_ks})
    metrics = score_records(records, ks)
    output_dir = Path(cfg.output_dir)
    write_predictions(output_dir / "predictions.jsonl", records)
    report = {
        "model": source,
        "checkpoint": source,
        "split": cfg.split,
        "n_docs": model.eval_n_docs or model.n_docs,
        "decoder": model.default_decoder(),
        "generation": model.generation,
        "head": model.head,
        "retriever_mode": model.retriever_mode,
        "metrics": metrics,
        "wall_seconds": time.perf_counter() - started,
    }
    write_json_atomic(output_dir / "metrics.json", report)
    print(markdown_table(metrics))
    log.info(f"wrote {output_dir / 'predictions.jsonl'} and {output_dir / 'metrics.json'}")
    return report


def main() -> None:
    hydra_entry(run, CONFIG_NAME, "rag-evaluate")


if __name__ == "__main__":
    main()
