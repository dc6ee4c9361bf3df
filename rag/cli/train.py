"""``rag-train``: fine-tune a RAG model with PyTorch Lightning, configured by Hydra (``conf/train.yaml``).

    rag-train experiment=miniwiki_rag_token
    rag-train experiment=miniwiki_rag_token model.head=sequence n_docs=10
    rag-train experiment=miniwiki_rag_token retriever=bm25
    rag-train experiment=miniwiki_rag_token model.train_query_encoder=false
    rag-train experiment=smoke
    rag-train experiment=miniwiki_rag_token resume=true

Builds the pieces from their config groups (:func:`rag.build.build_model`): the generator, the query encoder (learned /
frozen retrievers), the retriever -- the dense index is loaded, or embedded and built first when missing or
stale, through the same code as ``rag-index`` -- and the :class:`~rag.model.RagModel`; then the data module,
the :class:`~rag.lit_module.RagLitModule`, loggers, callbacks and the Trainer. After training it evaluates
the best checkpoint on the test split and writes ``metrics.json`` to the run folder.

``rag.build.load_checkpoint`` rebuilds a trained model from a checkpoint alone: the run's config is stored in it, the
index and the corpus are re-attached from that config, never unpickled.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rag.atomic import write_json_atomic
from rag.build import (
    build_callbacks,
    build_loggers,
    build_model,
    check_required,
    init_weights,
    instantiate,
    resolve_ckpt_path,
    set_threads,
)
from rag.cli.app import hydra_entry
from rag.replication.evaluate import peak_rss_mb

log = logging.getLogger("rag.cli.train")

CONFIG_NAME = "train"


def _metrics_dict(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items()) if isinstance(v, (int, float, torch.Tensor))}


def run(cfg: DictConfig) -> dict:
    """Train (and test) as configured; returns the final validation and test metrics."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    check_required(cfg)
    set_threads(cfg.threads)
    started = time.perf_counter()
    ckpt_path = resolve_ckpt_path(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    datamodule = instantiate(cfg.data)
    model = build_model(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    # the run config goes in after Hydra is done: instantiated through Hydra its _target_ nodes would be built
    module = instantiate(cfg.module, _partial_=True)(model=model, run_config=config)
    if cfg.get("init_from") and not ckpt_path:
        # a resumed run has its weights in the checkpoint it resumes from
        init_weights(module, cfg.init_from)
    callbacks = build_callbacks(cfg)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=build_loggers(cfg) or False)
    if ckpt_path:
        log.info(f"resuming from {ckpt_path}")
    log.info(f"{model.extra_repr()}; output in {output_dir}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    val = {k: v for k, v in _metrics_dict(trainer.callback_metrics).items() if k.startswith("val/")}
    last = None
    if callbacks and any(isinstance(c, ModelCheckpoint) for c in callbacks):
        # the final state, whatever the validation schedule: a finished run can be continued with more steps
        last = output_dir / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(last)
    best = next(
        (
            c.best_model_path
            for c in callbacks
            if type(c) is ModelCheckpoint and c.monitor and c.best_model_path
        ),
        None,
    )
    summary = {
        "name": cfg.name,
        "global_step": trainer.global_step,
        "val": val,
        "best_checkpoint": best,
        "last_checkpoint": str(last) if last else None,
        "resumed_from": ckpt_path,
    }
    if cfg.test and len(datamodule.sets["test"]):
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best)
        summary["test"] = _metrics_dict(results[0]) if results else {}
    summary["wall_seconds"] = time.perf_counter() - started
    summary["peak_rss_mb"] = peak_rss_mb()
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "metrics.json", summary)
        log.info(f"done in {summary['wall_seconds']:.0f} s; metrics in {output_dir / 'metrics.json'}")
    return summary


def main() -> None:
    hydra_entry(run, CONFIG_NAME, "rag-train")


if __name__ == "__main__":
    main()
