"""Between transformers' RAG format and this project's checkpoints, from configs and checkpoint files
(what ``rag-convert`` does; the format itself is :mod:`rag.interop`'s).

    import_checkpoint(cfg, "rag-token-nq.ckpt")        # a rag-train config of a transformers RAG model
    export_checkpoint("outputs/<run>/checkpoints/last.ckpt", "exported/my-rag")

:func:`import_checkpoint` writes a checkpoint holding the run config and no weights, marked so that
:class:`~rag.lit_module.RagLitModule` takes every weight from the config's own loaders
(``generator=rag_checkpoint query_encoder=rag_checkpoint``, which read the transformers RAG checkpoint named
by ``rag_checkpoint``); :func:`rag.build.load_checkpoint` then treats the file as any rag-train checkpoint.
:func:`export_checkpoint` writes a rag-train checkpoint (or an imported one) as a transformers RAG folder: the
generator and the query encoder are rebuilt from the checkpoint's config and its weights, never its index.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rag.atomic import atomic_path
from rag.build import checkpoint_config, instantiate, retriever_mode
from rag.errors import ConfigError
from rag.interop import (
    RAG_ARCHITECTURES,
    InteropError,
    inspect_transformers_rag,
    load_rag_generator,
    load_rag_query_encoder,
    write_transformers_rag,
)
from rag.lit_module import WEIGHTS_FROM_KEY
from rag.model import RagModel

__all__ = ["DENSE_MODES", "export_checkpoint", "import_checkpoint"]

log = logging.getLogger(__name__)

#: the retriever modes whose model has a query encoder (its weights travel with the checkpoint)
DENSE_MODES = ("learned", "frozen")


def _target_name(fn) -> str:
    return f"{fn.__module__}.{fn.__name__}"


# ------------------------------------------------------------------------------------------------ import


def import_checkpoint(cfg: DictConfig, out: str | os.PathLike) -> dict:
    """Write ``out``: a checkpoint of the transformers RAG model the rag-train config ``cfg`` loads (its config
    less any ``out`` key, no weights). Returns ``out``, the resolved source and its architecture."""
    import pytorch_lightning as pl

    hint = (
        "use experiment=nq_rag_token_released / nq_rag_sequence_released, or generator=rag_checkpoint "
        "query_encoder=rag_checkpoint +rag_checkpoint=<RAG folder or hub name>"
    )
    if cfg.generator.get("_target_") != _target_name(load_rag_generator):
        raise InteropError(
            f"rag-convert import writes checkpoints of transformers RAG models, but the config's generator is "
            f"{cfg.generator.get('_target_')}: {hint}"
        )
    source = str(cfg.generator.name_or_path)
    if retriever_mode(cfg) in DENSE_MODES:
        if cfg.query_encoder.get("_target_") != _target_name(load_rag_query_encoder):
            raise InteropError(
                f"the generator comes from {source} but the query encoder from {cfg.query_encoder.get('_target_')}: "
                f"a RAG checkpoint's two parts were trained together; {hint}"
            )
        if str(cfg.query_encoder.name_or_path) != source:
            raise InteropError(
                f"the generator comes from {source} but the query encoder from {cfg.query_encoder.name_or_path}: "
                "set both with rag_checkpoint=..."
            )
    # fail now, not at evaluation: the checkpoint and its tokenizers must load (the weights are not read)
    _, architecture, resolved = inspect_transformers_rag(source, check_tokenizers=True)
    saved_head = RAG_ARCHITECTURES[architecture]
    if saved_head is not None and saved_head != cfg.model.head:
        log.info(f"note: {source} was saved as {architecture} but model.head={cfg.model.head}")

    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("out", None)
    optim = instantiate(cfg.optim)
    checkpoint = {
        "state_dict": {},
        WEIGHTS_FROM_KEY: "config",
        "rag_source": resolved,
        "hyper_parameters": {
            "optim": dataclasses.asdict(optim),
            "recall_ks": sorted({int(k) for k in cfg.module.recall_ks}),
            "val_loss": bool(cfg.module.val_loss),
            "run_config": config,
        },
        "pytorch-lightning_version": pl.__version__,
    }
    out = Path(out).expanduser()
    with atomic_path(out) as tmp:
        torch.save(checkpoint, tmp)
    log.info(
        f"wrote {out} ({architecture} from {resolved}; head={cfg.model.head}); evaluate: rag-evaluate ckpt_path={out}"
    )
    return {"out": str(out), "source": resolved, "architecture": architecture}


# ------------------------------------------------------------------------------------------------ export


def _load_part(module, state: dict, prefix: str, path: Path) -> None:
    """Load the checkpoint's ``prefix``-ed weights into ``module``; absent ones stay as the config loaded them."""
    part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not part:
        return  # frozen query encoder, or an imported checkpoint: the config's weights are the model's
    missing, unexpected = module.load_state_dict(part, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{path} does not fit the model its config builds: missing {list(missing)[:3]}, unexpected "
            f"{list(unexpected)[:3]}; was the checkpoint written by rag-train with this project's version?"
        )


def _model_settings(run_cfg: DictConfig) -> dict:
    """The RagModel arguments of a run config, with RagModel's defaults for the ones it leaves out."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(RagModel.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    given = OmegaConf.to_container(run_cfg.model, resolve=True)
    return {**defaults, **{k: v for k, v in given.items() if not k.startswith("_")}}


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    head: str | None = None,
    n_docs: int | None = None,
    question_encoder: str | None = None,
    allow_pooling_mismatch: bool = False,
) -> dict:
    """Write ``out``: the rag-train checkpoint ``ckpt_path`` as a transformers RAG folder. ``head`` and
    ``n_docs`` default to the checkpoint's; ``question_encoder`` names a DPR question encoder to export
    instead of the model's (needed for BM25 and closed-book runs)."""
    path = Path(ckpt_path).expanduser()
    run_cfg = checkpoint_config(path)
    settings = _model_settings(run_cfg)
    mode = retriever_mode(run_cfg)
    generator = instantiate(run_cfg.generator)
    query_encoder = instantiate(run_cfg.query_encoder) if mode in DENSE_MODES else None
    state = torch.load(path, map_location="cpu", weights_only=False).get("state_dict") or {}
    _load_part(generator, state, "model.generator.", path)
    if query_encoder is not None:
        _load_part(query_encoder, state, "model.query_encoder.", path)
    head = head or settings["head"]
    n_docs = int(n_docs or settings["eval_n_docs"] or settings["n_docs"])
    written = write_transformers_rag(
        out,
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
        question_encoder=question_encoder,
        allow_pooling_mismatch=allow_pooling_mismatch,
        manifest={
            "checkpoint": str(path),
            "retriever_mode": mode,
            "corpus": OmegaConf.select(run_cfg, "corpus.name"),
            "document_encoder": OmegaConf.to_container(run_cfg.doc_encoder, resolve=True)
            if "doc_encoder" in run_cfg
            else None,
        },
    )
    cls = "RagTokenForGeneration" if head == "token" else "RagSequenceForGeneration"
    log.info(
        f"wrote {written}; load it with transformers.{cls}.from_pretrained and RagTokenizer.from_pretrained"
    )
    return {"out": str(written), "head": head, "n_docs": n_docs}
