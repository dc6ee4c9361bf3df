"""``rag-convert``: between transformers' RAG format and this project's checkpoints (:mod:`rag.interop`).

    rag-convert import experiment=nq_rag_token_released corpus.passages.path=/data/psgs_w100.tsv \\
        data.train.nq.path=... data.val.nq.path=... data.test.nq.path=/data/nq-test.qa.csv out=rag-token-nq.ckpt
    rag-evaluate ckpt_path=rag-token-nq.ckpt

    rag-convert export ckpt_path=outputs/<run>/checkpoints/last.ckpt out=exported/my-rag

``import`` takes every key of rag-train's config (``conf/convert_import.yaml`` includes ``conf/train.yaml``) and
writes a checkpoint holding that config and no weights, marked so that :class:`~rag.lit_module.RagLitModule`
takes every weight from the config's own loaders: ``generator=rag_checkpoint query_encoder=rag_checkpoint``,
which read the transformers RAG checkpoint named by ``rag_checkpoint`` (a hub name or a folder). The released
models' files stay where the hub cache keeps them; ``rag-evaluate`` and ``rag.cli.train.load_checkpoint`` then
treat the file as any rag-train checkpoint. To fine-tune a released model, train the experiment itself
(``rag-train experiment=nq_rag_token_released ...``).

``export`` writes a rag-train checkpoint (or an imported one) as a transformers RAG folder
(``conf/convert_export.yaml``): the generator and query encoder are rebuilt from the checkpoint's config and
its weights, never its index.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rag.build import check_required, checkpoint_config, instantiate, set_threads
from rag.cli.app import hydra_entry
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

USAGE = (
    "usage: rag-convert import <rag-train config overrides> out=FILE.ckpt\n"
    "       rag-convert export ckpt_path=FILE.ckpt out=FOLDER [head=...] [question_encoder=...]"
)
DENSE_MODES = ("learned", "frozen")


log = logging.getLogger("rag.cli.convert")


def _target_name(fn) -> str:
    return f"{fn.__module__}.{fn.__name__}"


# ------------------------------------------------------------------------------------------------ import


def run_import(cfg: DictConfig) -> dict:
    """Write ``cfg.out``: a checkpoint of the transformers RAG model the config loads (config only, no weights)."""
    import pytorch_lightning as pl

    check_required(cfg)
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
    mode = cfg.model.retriever_mode
    if mode in DENSE_MODES:
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
    out = Path(cfg.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, out)
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


def run_export(cfg: DictConfig) -> dict:
    """Write ``cfg.out``: the checkpoint ``cfg.ckpt_path`` as a transformers RAG folder."""
    check_required(cfg)
    set_threads(cfg.threads)
    path = Path(cfg.ckpt_path).expanduser()
    run_cfg = checkpoint_config(path)
    settings = _model_settings(run_cfg)
    mode = settings["retriever_mode"]
    generator = instantiate(run_cfg.generator)
    query_encoder = instantiate(run_cfg.query_encoder) if mode in DENSE_MODES else None
    state = torch.load(path, map_location="cpu", weights_only=False).get("state_dict") or {}
    _load_part(generator, state, "model.generator.", path)
    if query_encoder is not None:
        _load_part(query_encoder, state, "model.query_encoder.", path)
    head = cfg.head or settings["head"]
    n_docs = cfg.n_docs or settings["eval_n_docs"] or settings["n_docs"]
    out = write_transformers_rag(
        cfg.out,
        generator,
        query_encoder,
        head=head,
        n_docs=int(n_docs),
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
            "document_encoder": OmegaConf.to_container(run_cfg.doc_encoder, resolve=True)
            if "doc_encoder" in run_cfg
            else None,
        },
    )
    cls = "RagTokenForGeneration" if head == "token" else "RagSequenceForGeneration"
    log.info(f"wrote {out}; load it with transformers.{cls}.from_pretrained and RagTokenizer.from_pretrained")
    return {"out": str(out), "head": head, "n_docs": int(n_docs)}


# ------------------------------------------------------------------------------------------------ entry point


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("import", "export"):
        print(f"error: say what to convert\n{USAGE}", file=sys.stderr, flush=True)
        sys.exit(2)
    direction = sys.argv.pop(1)
    if direction == "import":
        hydra_entry(run_import, "convert_import", "rag-convert import")
    else:
        hydra_entry(run_export, "convert_export", "rag-convert export")


if __name__ == "__main__":
    main()
