"""``rag-evaluate``: answer a split's questions with a rag-train checkpoint and score them.

    rag-evaluate ckpt_path=outputs/miniwiki_rag_token/<run>/checkpoints/last.ckpt
    rag-evaluate ckpt_path=... split=val n_docs=10 decoder=sequence_fast
    rag-evaluate ckpt_path=... n_docs=50 decoder=sequence_thorough generation.num_beams=4   # paper's test setting

The model is rebuilt from the config stored in the checkpoint (``rag.cli.train.load_checkpoint``), with the
index and corpus re-attached from it. Writes to the run folder:

- ``predictions.jsonl``: one line per question: id, set, question, gold answers, the prediction and its
  log-probability, and every passage the generator read (id, title, text, retrieval score, prior p(z|x),
  posterior p(z|x,y));
- ``metrics.json``: EM, F1, answer recall@k and gold-passage recall@k (overall and per set), with the
  settings used; the same figures are printed as a table.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rag.atomic import write_json_atomic
from rag.build import check_required, instantiate, load_checkpoint, set_threads
from rag.cli.app import hydra_entry
from rag.errors import ConfigError
from rag.evaluation import score_records, write_predictions

CONFIG_NAME = "evaluate"
SPLITS = ("train", "val", "test")


log = logging.getLogger("rag.cli.evaluate")


def _training_overrides(cfg: DictConfig) -> dict:
    """What the evaluation settings change in the checkpoint's training config."""
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
    return overrides


def markdown_table(metrics: dict) -> str:
    rows = ["| metric | value |", "|---|---:|"]
    for key, value in metrics.items():
        shown = f"{int(value)}" if key.rsplit("/", 1)[-1] == "n" else f"{100 * value:.1f}"
        rows.append(f"| {key} | {shown} |")
    return "\n".join(rows) + "\n"


def run(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split``; returns the metrics (also written to ``output_dir``)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import TQDMProgressBar

    check_required(cfg)
    if cfg.split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {cfg.split!r}")
    set_threads(cfg.threads)
    started = time.perf_counter()
    module, train_cfg = load_checkpoint(cfg.ckpt_path, _training_overrides(cfg))
    datamodule = instantiate(train_cfg.data)
    loader = datamodule.loader(cfg.split)
    model = module.model
    log.info(
        f"{len(loader.dataset):,} {cfg.split} questions ({', '.join(datamodule.set_names(cfg.split))}); "
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
    ks = list(cfg.recall_ks) if cfg.recall_ks else module.recall_ks
    metrics = score_records(records, ks)
    output_dir = Path(cfg.output_dir)
    write_predictions(output_dir / "predictions.jsonl", records)
    report = {
        "checkpoint": str(cfg.ckpt_path),
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
