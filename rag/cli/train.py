"""``rag-train``: fine-tune a RAG model with PyTorch Lightning, configured by Hydra (``conf/train.yaml``).

    rag-train experiment=miniwiki_rag_token
    rag-train experiment=miniwiki_rag_token model.head=sequence n_docs=10
    rag-train experiment=miniwiki_rag_token model.retriever_mode=bm25
    rag-train experiment=smoke
    rag-train experiment=miniwiki_rag_token resume=true

Builds the pieces from their config groups (``build_model``): the generator, the query encoder (learned /
frozen retrievers), the retriever -- the dense index is loaded, or embedded and built first when missing or
stale, through the same code as ``rag-index`` -- and the :class:`~rag.model.RagModel`; then the data module,
the :class:`~rag.lit_module.RagLitModule`, loggers, callbacks and the Trainer. After training it evaluates
the best checkpoint on the test split and writes ``metrics.json`` to the run folder.

``load_checkpoint`` rebuilds a trained model from a checkpoint alone: the run's config is stored in it, the
index and the corpus are re-attached from that config, never unpickled.
"""

from __future__ import annotations

import difflib
import netrc
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from rag.atomic import write_json_atomic
from rag.cli import CONF_DIR
from rag.cli.index import (
    ConfigError,
    cache_dir,
    check_required,
    default_embeddings_dir,
    default_index_dir,
    ensure_index,
    fail,
    set_threads,
)
from rag.cli.index import known_errors as _index_errors
from rag.retrieval.embed import open_embeddings
from rag.retrieval.index import DenseIndex
from rag.retrieval.retriever import BM25Retriever, DenseRetriever, GoldRetriever, Retriever

CONFIG_NAME = "train"
CHECKPOINT_NAMES = ("last.ckpt", "interrupted.ckpt")


def _log(message: str) -> None:
    print(f"[rag-train] {message}", file=sys.stderr, flush=True)


def known_errors() -> tuple[type[Exception], ...]:
    from rag.data.datamodule import DataModuleError
    from rag.generation.context import ContextError
    from rag.generation.decoding import DecodingError
    from rag.generation.generator import GeneratorError
    from rag.lit_module import LitModuleError
    from rag.model import RagModelError

    return (
        *_index_errors(),
        RagModelError,
        LitModuleError,
        DataModuleError,
        GeneratorError,
        ContextError,
        DecodingError,
    )


def instantiate(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate`` that surfaces our own errors (one clear message) instead of Hydra's
    wrapper around them."""
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, known_errors()):
            raise err.__cause__ from None
        raise


# ---------------------------------------------------------------------------------------------- building


def build_retriever(cfg: DictConfig) -> Retriever | None:
    """The retriever the model's ``retriever_mode`` needs: dense (learned / frozen), BM25, or None."""
    mode = cfg.model.retriever_mode
    if mode == "none":
        return None
    passages = instantiate(cfg.corpus.passages)
    _log(f"corpus {cfg.corpus.name}: {len(passages):,} passages")
    if mode == "gold":
        return GoldRetriever.from_passages(passages, window_words=cfg.gold.window_words)
    if mode == "bm25":
        return BM25Retriever.from_passages(
            passages,
            k1=cfg.bm25.k1,
            b=cfg.bm25.b,
            stopwords=cfg.bm25.stopwords,
            index_dir=cache_dir(cfg.cache_dir) / "indexes" / f"{cfg.corpus.name}-bm25",
        )
    if cfg.index_dir is not None and not cfg.rebuild_index:
        # an index named explicitly is loaded as it is (it must fit the corpus), never rebuilt here
        return DenseRetriever.from_directory(cfg.index_dir, passages, embeddings_dir=cfg.embeddings_dir)
    doc_encoder = instantiate(cfg.doc_encoder)
    embed = OmegaConf.to_container(cfg.embed, resolve=True)
    index = instantiate(cfg.index)
    result = ensure_index(
        passages,
        doc_encoder,
        index,
        cfg.index_dir or default_index_dir(cfg.cache_dir, cfg.corpus.name, doc_encoder, index.kind),
        cfg.embeddings_dir
        or default_embeddings_dir(cfg.cache_dir, cfg.corpus.name, doc_encoder, embed["dtype"]),
        embed=embed,
        rebuild=cfg.rebuild_index,
        rebuild_command="rag-train ... rebuild_index=true (or rag-index ... rebuild=true)",
        corpus_name=cfg.corpus.name,
        mmap=True,  # training never adds to the index: the processes of a machine share one mapped copy
    )
    del doc_encoder  # the index holds d(z) for every passage; the encoder itself is not needed any more
    if result.index is None:
        raise ConfigError(
            "the document embeddings are incomplete (embed.num_shards > 1): embed every shard with rag-index "
            "first, then train"
        )
    index = result.index
    if result.built:  # from the file just written, mapped like the other processes' copies
        index = DenseIndex.load(result.index_dir, verify_checksum=False, verbose=False, mmap=True)
    doc_embeds = open_embeddings(result.embeddings_dir, expected_rows=len(passages))
    return DenseRetriever(index, passages, None, doc_embeds=doc_embeds)


def build_model(cfg: DictConfig):
    """The :class:`~rag.model.RagModel` of a run config: generator, query encoder, retriever, head."""
    mode = cfg.model.retriever_mode
    generator = instantiate(cfg.generator)
    query_encoder = instantiate(cfg.query_encoder) if mode in ("learned", "frozen") else None
    retriever = build_retriever(cfg)
    return instantiate(cfg.model, generator=generator, query_encoder=query_encoder, retriever=retriever)


def _logged_in_to_wandb() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_offline(offline: bool | None) -> bool:
    """``logger.wandb.offline``: as set, or (null) offline unless logged in or WANDB_MODE=online."""
    if offline is not None:
        return bool(offline)
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if mode == "online":
        return False
    return not _logged_in_to_wandb()


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, node in (cfg.logger or {}).items():
        if node is None:
            continue
        if name == "wandb":
            offline = wandb_offline(node.offline)
            if offline:
                os.environ.setdefault("WANDB_MODE", "offline")
            Path(node.save_dir).mkdir(parents=True, exist_ok=True)
            loggers.append(instantiate(node, offline=offline))
        else:
            loggers.append(instantiate(node))
    return loggers


def build_callbacks(cfg: DictConfig) -> list:
    return [instantiate(node) for node in (cfg.callbacks or {}).values() if node is not None]


def find_resume_checkpoint(runs_dir: str | os.PathLike) -> Path | None:
    """The newest ``last.ckpt`` / ``interrupted.ckpt`` under ``runs_dir/*/checkpoints`` (None if there is none)."""
    root = Path(runs_dir).expanduser()
    found = [p for name in CHECKPOINT_NAMES for p in root.glob(f"*/checkpoints/{name}") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _resolve_ckpt_path(cfg: DictConfig) -> str | None:
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} is not a file: give the path of a .ckpt file")
        return str(path)
    if cfg.resume:
        found = find_resume_checkpoint(cfg.runs_dir)
        if found is None:
            raise ConfigError(
                f"resume=true but there is no last.ckpt or interrupted.ckpt under {cfg.runs_dir}/*/checkpoints: "
                "give ckpt_path=..., or start a new run without resume"
            )
        return str(found)
    return None


def _metrics_dict(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items()) if isinstance(v, (int, float, torch.Tensor))}


# ---------------------------------------------------------------------------------------------- running


def run(cfg: DictConfig) -> dict:
    """Train (and test) as configured; returns the final validation and test metrics."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    check_required(cfg)
    set_threads(cfg.threads)
    started = time.perf_counter()
    ckpt_path = _resolve_ckpt_path(cfg)
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
        _log(f"resuming from {ckpt_path}")
    _log(f"{model.extra_repr()}; output in {output_dir}")
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
    summary["peak_rss_mb"] = _peak_rss_mb()
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "metrics.json", summary)
        _log(f"done in {summary['wall_seconds']:.0f} s; metrics in {output_dir / 'metrics.json'}")
    return summary


def init_weights(module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Start ``module``'s weights from another run: a ``.ckpt`` written by rag-train, or a reference-model
    folder (``rag/reference_weights/rag`` or ``.../closed_book``: float16 deltas over MiniLM, see
    :mod:`rag.reference`). Every tensor both have is copied; what the source lacks (e.g. a query encoder after
    a gold-passage reader warm-up) keeps its initial value. The optimiser and schedule start fresh (unlike
    ``ckpt_path``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        state = _reference_state(path)
    elif not path.is_file():
        raise ConfigError(
            f"init_from={path} is not a file: give a .ckpt written by rag-train or a reference-model folder"
        )
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which and why
            raise ConfigError(f"init_from={path} could not be read as a rag-train checkpoint ({e})") from None
    own = module.state_dict()
    loaded, kept = [], []
    for name, tensor in own.items():
        if name not in state:
            kept.append(name)
            continue
        if state[name].shape != tensor.shape:
            raise ConfigError(
                f"init_from={path}: {name} has shape {tuple(state[name].shape)} there but {tuple(tensor.shape)} "
                "here; the run must use the same generator / query encoder architecture as the checkpoint"
            )
        loaded.append(name)
    if not loaded:
        raise ConfigError(
            f"init_from={path} shares no weight with this model: is it a checkpoint of another model?"
        )
    module.load_state_dict({k: state[k] for k in loaded}, strict=False)
    kept_parts = sorted({".".join(k.split(".")[:2]) for k in kept})
    _log(
        f"init_from {path}: {len(loaded)} tensors loaded"
        + (f"; kept the initial values of {len(kept)} ({', '.join(kept_parts)})" if kept else "")
    )
    return {"loaded": loaded, "kept": kept}


def _reference_state(folder: Path) -> dict:
    """The state dict (RagLitModule names) of a reference-model folder: generator/ and query_encoder/ deltas."""
    from rag.generation.generator import load_delta
    from rag.reference import load_encoder_delta

    if not (folder / "generator").is_dir():
        raise ConfigError(
            f"init_from={folder} is a folder without generator/: give a reference-model folder such as "
            "rag/reference_weights/rag, or a .ckpt file"
        )
    state = {f"model.generator.{k}": v for k, v in load_delta(folder / "generator").state_dict().items()}
    if (folder / "query_encoder").is_dir():
        encoder = load_encoder_delta(folder / "query_encoder")
        state.update({f"model.query_encoder.{k}": v for k, v in encoder.state_dict().items()})
    return state


def _peak_rss_mb() -> float:
    import resource

    # ru_maxrss is in kilobytes on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_config(path: str | os.PathLike) -> DictConfig:
    """The run config stored in a checkpoint written by rag-train."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: give the path of a .ckpt written by rag-train")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    config = (checkpoint.get("hyper_parameters") or {}).get("run_config")
    if not config:
        raise ConfigError(
            f"{path} holds no run config (hyper_parameters.run_config): it was not written by rag-train; load it "
            "with RagLitModule.load_from_checkpoint(path, model=...) and build the model yourself"
        )
    return OmegaConf.create(config)


def load_checkpoint(path: str | os.PathLike, overrides: dict | DictConfig | None = None):
    """Rebuild a trained :class:`~rag.lit_module.RagLitModule` from a rag-train checkpoint.

    The model is built from the config stored in the checkpoint (merged with ``overrides``, e.g.
    ``{"model": {"eval_n_docs": 15}}``) and the trained weights are loaded into it; the retriever is
    re-attached from that config (the index loaded from the cache, or rebuilt when missing). Returns the
    module (in eval mode) and the config used.
    """
    from rag.lit_module import RagLitModule

    cfg = checkpoint_config(path)
    stored_cache = Path(str(cfg.get("cache_dir", ""))).expanduser()
    if not stored_cache.is_dir():
        # the run was trained where another cache folder existed: use this machine's, and say so
        cfg.cache_dir = os.environ.get("RAG_HOME", "~/.cache/rag")
        print(
            f"[rag] the checkpoint's cache_dir {stored_cache} does not exist here: indexes are looked up (and "
            f"built if missing) in {cfg.cache_dir}; set RAG_HOME or pass cache_dir=... to choose",
            file=sys.stderr,
            flush=True,
        )
    if overrides:
        cfg = OmegaConf.merge(cfg, overrides)
    model = build_model(cfg)
    module = RagLitModule.load_from_checkpoint(str(path), model=model, map_location="cpu", weights_only=False)
    module.eval()
    return module, cfg


# ---------------------------------------------------------------------------------------------- entry point


CONFIG_HINT = (
    "hint: keys are listed by `{prog} --cfg job`, a group's options are the files in {conf}/<group>/; "
    "a key the config does not have is added with a leading + (`+key=value`) only on purpose"
)


def check_overrides(config_name: str, overrides: Sequence[str], prog: str) -> None:
    """Compose the config once before Hydra runs, so that a typo (unknown key or group option) fails at once
    with Hydra's message and a short hint, before anything is loaded."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    plain = [o for o in overrides if not o.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose(config_name=config_name, overrides=plain)
    except (HydraException, OmegaConfBaseException) as err:
        message = str(err).strip()
        unknown = re.match(r"Could not override '([^']+)'", message)
        if unknown:
            message += "\n" + _unknown_key_line(config_name, plain, unknown.group(1))
        print(
            f"error: {message}\n{CONFIG_HINT.format(prog=prog, conf=CONF_DIR)}", file=sys.stderr, flush=True
        )
        sys.exit(2)


def _unknown_key_line(config_name: str, overrides: Sequence[str], key: str) -> str:
    """ "the config has no key X", with the closest keys of its parent node when the rest composes."""
    from hydra import compose, initialize_config_dir

    line = f"the config has no key '{key}'"
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    parent, _, name = key.rpartition(".")
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=rest)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        keys = list(node.keys()) if isinstance(node, DictConfig) else []
    except Exception:  # the suggestion is a courtesy: the error itself is reported either way
        keys = []
    close = difflib.get_close_matches(name, [str(k) for k in keys], n=3)
    if close:
        line += " (did you mean " + ", ".join(f"'{parent + '.' if parent else ''}{c}'" for c in close) + "?)"
    return line


def hydra_entry(task, config_name: str, prog: str) -> None:
    """Run ``task(cfg)`` under ``@hydra.main`` after checking the overrides (unless Hydra flags are given)."""
    args = sys.argv[1:]
    if not any(a.startswith("-") for a in args):
        check_overrides(config_name, args, prog)

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def _main(cfg: DictConfig) -> None:
        try:
            task(cfg)
        except known_errors() as err:
            fail(err)

    _main()


def main() -> None:
    hydra_entry(run, CONFIG_NAME, "rag-train")


if __name__ == "__main__":
    main()
