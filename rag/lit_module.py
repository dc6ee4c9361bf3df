"""RagLitModule: the training, validation and test steps of a :class:`~rag.model.RagModel`, its logging and
its optimiser. No maths here: the loss comes from the model, the prediction records and their scores from
:mod:`rag.evaluation`.

Logged keys: ``train/loss``; ``val/loss`` (teacher-forced, at the training ``n_docs``); ``{split}/em``,
``{split}/f1``, ``{split}/answer_recall@k`` (a gold answer string in the top-k passages the generator read,
DPR's criterion), ``{split}/gold_recall@k`` (the question's gold passage among them), for ``split`` in
val / test, over all sets of the split and, when a split mixes several, per set (``val/nq_gold/em``).

Checkpoints hold the trainable weights (query encoder in learned mode, generator), the optimiser state and
the run's config (``hparams.run_config``), never the index, the passages or a frozen query encoder: loading
rebuilds the model from that config and re-attaches the retriever (``rag.build.load_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pytorch_lightning as pl
import torch

from rag.data.datamodule import QABatch
from rag.errors import RagError
from rag.evaluation import Prediction, score_records
from rag.model import RagModel

__all__ = ["OptimConfig", "RagLitModule", "prediction_record"]

#: kept for callers of the old name (tests/test_lit_module.py); records are rag.evaluation.Prediction
prediction_record = Prediction.from_answer

SCHEDULERS = ("constant", "linear", "polynomial")
#: checkpoint key: "config" when every weight comes from the run config's checkpoints, none from the file
WEIGHTS_FROM_KEY = "rag_weights_from"


class LitModuleError(RagError, ValueError):
    """Optimiser or evaluation settings the module cannot use."""


@dataclass
class OptimConfig:
    """AdamW with warm-up then constant, linear or polynomial decay (transformers' schedules).

    ``query_encoder_lr`` sets a separate learning rate for q(x) (None: ``lr``). ``lr_scale`` maps regular
    expressions over parameter names (within the generator or query encoder) to a factor on their learning
    rate (the first that matches wins), e.g. ``{encoder_attn: 3.0}`` for the fresh cross-attention of a
    BERT-initialised BART; each must match some trainable parameter. Weight decay skips biases
    and LayerNorm weights, as transformers' fine-tuning scripts do. ``warmup_steps`` and the decay count
    optimiser steps; the decay ends at ``lr_end`` (polynomial) or 0 (linear) after the run's last step.
    """

    lr: float = 3e-5
    query_encoder_lr: float | None = None
    weight_decay: float = 0.001
    adam_epsilon: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: str = "polynomial"
    warmup_steps: int = 500
    lr_end: float = 1e-7
    power: float = 1.0
    lr_scale: dict[str, float] | None = None
    fused: bool = True  # torch's fused AdamW kernel (on CPU 2-3x faster than the per-tensor loop)

    def __post_init__(self) -> None:
        import re

        self.betas = tuple(float(b) for b in self.betas)
        self.lr_scale = {str(k): float(v) for k, v in (self.lr_scale or {}).items()}
        for pattern, factor in self.lr_scale.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise LitModuleError(
                    f"optim.lr_scale key {pattern!r} is not a regular expression: {e}"
                ) from None
            if factor <= 0:
                raise LitModuleError(f"optim.lr_scale[{pattern!r}] must be positive, got {factor}")
        if self.scheduler not in SCHEDULERS:
            raise LitModuleError(f"optim.scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.lr <= 0 or (self.query_encoder_lr is not None and self.query_encoder_lr <= 0):
            raise LitModuleError(
                f"learning rates must be positive, got lr={self.lr}, query_encoder_lr={self.query_encoder_lr}"
            )
        if self.warmup_steps < 0:
            raise LitModuleError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


class RagLitModule(pl.LightningModule):
    """Training / validation / test steps, logging and optimiser of a :class:`RagModel`.

    Args:
        model: the RagModel (built by the caller, e.g. ``rag.build.build_model``).
        optim: :class:`OptimConfig` (or the dict of its fields, as a checkpoint stores it).
        recall_ks: the k of answer / gold-passage recall@k at validation and test (k above the number of
            passages read is dropped; that number itself is always reported).
        val_loss: also log the teacher-forced ``val/loss`` (one more forward pass per validation batch).
        run_config: the run's full config as plain containers, saved in checkpoints so that they reload.
    """

    def __init__(
        self,
        model: RagModel,
        optim: OptimConfig | dict | None = None,
        recall_ks: Sequence[int] = (1, 5, 10),
        val_loss: bool = True,
        run_config: dict | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, RagModel):
            raise LitModuleError(f"model must be a rag.model.RagModel, got {type(model).__name__}")
        if optim is None:
            optim = OptimConfig()
        elif isinstance(optim, dict):
            optim = OptimConfig(**optim)
        if not recall_ks or any(int(k) < 1 for k in recall_ks):
            raise LitModuleError(f"recall_ks must be positive integers, got {list(recall_ks)}")
        self.model = model
        self.optim = optim
        self.recall_ks = sorted({int(k) for k in recall_ks})
        self.val_loss = bool(val_loss)
        self.save_hyperparameters(
            {
                "optim": dataclasses.asdict(optim),
                "recall_ks": self.recall_ks,
                "val_loss": self.val_loss,
                "run_config": run_config or {},
            }
        )
        self._records: dict[str, list[Prediction]] = {"val": [], "test": []}

    # ------------------------------------------------------------------------------------ steps

    def forward(self, questions, targets):
        return self.model(questions, targets)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        if isinstance(batch, QABatch):
            # text only: the model tokenises and puts its tensors on its own device
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_train_start(self) -> None:
        # models come out of their loaders in eval mode and Lightning keeps a module's mode as it finds it:
        # training needs dropout on (RagModel.train keeps a frozen query encoder in eval mode)
        self.model.train()

    def training_step(self, batch: QABatch, batch_idx: int) -> torch.Tensor:
        out = self.model(batch.questions, batch.targets)
        # the mean over ranks: with equal per-rank batches, the loss of the global batch (as one process logs it)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch), sync_dist=True)
        if out.n_truncated:
            self.log("train/truncated_contexts", float(out.n_truncated), batch_size=len(batch))
        return out.loss

    def _eval_step(self, batch: QABatch, split: str) -> list[Prediction]:
        if split == "val" and self.val_loss and all(t is not None for t in batch.targets):
            out = self.model(batch.questions, batch.targets)
            self.log("val/loss", out.loss, batch_size=len(batch), sync_dist=True)
        records = self._answer(batch, rank_deeper=False)
        self._records[split].extend(records)
        return records

    def _answer(self, batch: QABatch, rank_deeper: bool) -> list[Prediction]:
        """The batch's answers as records. ``rank_deeper``: one search at the largest recall k serves both
        the answers (the first K passages are read, as a search at K returns them) and recall@k for k above
        K (``rag-evaluate`` reports recall@10 of a model that reads 5); validation and test in training
        score recall up to K only, at no extra cost."""
        model = self.model
        k = model.eval_n_docs or model.n_docs
        depth = max(self.recall_ks)
        ranks_more = rank_deeper and model.retriever_mode in ("learned", "frozen", "bm25") and depth > k
        retrieval = None
        if ranks_more:
            depth = min(depth, model.retriever.n_passages)
            retrieval = model.retrieve(batch.questions, depth)
        answers = model.generate(batch.questions, n_docs=k, retrieval=retrieval)
        records = []
        for b, (q, a, name, i) in enumerate(zip(batch.questions, answers, batch.datasets, batch.indices)):
            after = ()
            if retrieval is not None:
                scores = retrieval.doc_scores[b].tolist()
                after = list(zip(retrieval.passages[b][k:], scores[k:]))
            records.append(Prediction.from_answer(q, a, name, i, ranked_after=after))
        return records

    def validation_step(self, batch: QABatch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: QABatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: QABatch, batch_idx: int, dataloader_idx: int = 0) -> list[Prediction]:
        return self._answer(batch, rank_deeper=True)

    def on_validation_epoch_start(self) -> None:
        self._records["val"] = []

    def on_test_epoch_start(self) -> None:
        self._records["test"] = []

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def gathered_records(self, split: str) -> list[Prediction]:
        """The split's prediction records of every rank, each question once (the distributed sampler pads
        shards with repeats)."""
        records = self._records[split]
        if self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            parts: list[list[Prediction] | None] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
        unique = {(r.dataset, r.index): r for r in records}
        return [unique[key] for key in sorted(unique)]

    def _log_scores(self, split: str) -> None:
        if self._trainer is not None and self.trainer.sanity_checking:
            return
        scores = score_records(self.gathered_records(split), self.recall_ks)
        # every rank holds the same gathered figures, so no further reduction is needed
        for key, value in scores.items():
            if key.rsplit("/", 1)[-1] != "n":
                self.log(f"{split}/{key}", value, prog_bar=key in ("em", "f1"), sync_dist=False)

    # ------------------------------------------------------------------------------------ optimiser

    def _param_groups(self) -> list[dict]:
        import re

        opt = self.optim
        groups = []
        parts = [("generator", self.model.generator, opt.lr)]
        if self.model.trains_query_encoder:
            parts.append(("query_encoder", self.model.query_encoder, opt.query_encoder_lr or opt.lr))
        scales = [(pattern, re.compile(pattern), factor) for pattern, factor in opt.lr_scale.items()]
        used = set()
        for name, module, lr in parts:
            buckets: dict[tuple[bool, str | None], list] = {}
            for param_name, param in module.named_parameters():
                if not param.requires_grad:
                    continue
                skip = param_name.endswith("bias") or "LayerNorm" in param_name or "layer_norm" in param_name
                scale = next((pattern for pattern, regex, _ in scales if regex.search(param_name)), None)
                used.add(scale)
                buckets.setdefault((skip or param.ndim < 2, scale), []).append(param)
            for (no_decay, scale), params in sorted(
                buckets.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
            ):
                factor = opt.lr_scale[scale] if scale is not None else 1.0
                group_name = name + ("/no_decay" if no_decay else "") + (f"/{scale}" if scale else "")
                groups.append(
                    {
                        "params": params,
                        "lr": lr * factor,
                        "weight_decay": 0.0 if no_decay else opt.weight_decay,
                        "name": group_name,
                    }
                )
        unused = [pattern for pattern in opt.lr_scale if pattern not in used]
        if unused:
            raise LitModuleError(
                f"optim.lr_scale pattern {unused[0]!r} matches no trainable parameter of the generator or query "
                "encoder (names look like 'model.decoder.layers.0.encoder_attn.q_proj.weight')"
            )
        return groups

    def configure_optimizers(self):
        from transformers.optimization import (
            get_constant_schedule_with_warmup,
            get_linear_schedule_with_warmup,
            get_polynomial_decay_schedule_with_warmup,
        )

        opt = self.optim
        groups = self._param_groups()
        device = groups[0]["params"][0].device if groups else torch.device("cpu")
        fused = bool(opt.fused) and device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW(groups, lr=opt.lr, eps=opt.adam_epsilon, betas=opt.betas, fused=fused)
        total = self._total_steps()
        warmup = min(opt.warmup_steps, max(total - 1, 0)) if total else opt.warmup_steps
        if opt.scheduler == "constant":
            scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
        elif opt.scheduler == "linear":
            scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
        else:
            lr_end = min(opt.lr_end, min(g["lr"] for g in optimizer.param_groups))
            scheduler = get_polynomial_decay_schedule_with_warmup(
                optimizer, warmup, total, lr_end=lr_end, power=opt.power
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        steps = self._trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        if not math.isfinite(steps):
            if self.optim.scheduler != "constant":
                raise LitModuleError(
                    f"optim.scheduler={self.optim.scheduler!r} decays over the run's steps, but the run has no end: "
                    "set trainer.max_steps or trainer.max_epochs, or use optim.scheduler=constant"
                )
            return 0
        return int(steps)

    # ------------------------------------------------------------------------------------ checkpoints

    def _frozen_prefixes(self) -> tuple[str, ...]:
        # weights the run never changes come back from the config on load: keep them out of checkpoints
        if self.model.query_encoder is not None and not self.model.trains_query_encoder:
            return ("model.query_encoder.",)
        return ()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        prefixes = self._frozen_prefixes()
        if prefixes:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(prefixes)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        prefixes = self._frozen_prefixes()
        if checkpoint.get(WEIGHTS_FROM_KEY) == "config":
            # rag-convert import writes no weights: its config loads them (a released RAG checkpoint, rag.interop)
            prefixes = ("",)
        if prefixes:
            state = checkpoint["state_dict"]
            for key, value in self.state_dict().items():
                if key.startswith(prefixes) and key not in state:
                    state[key] = value
