"""The composition root: configs in, objects out.

Every command (``rag/cli/``), study (``rag/replication/``), script, notebook and the Python API builds its
pieces here, and this is the only library module that knows Hydra and OmegaConf besides the studies. The
modules it builds take typed arguments and never see a config.

    cfg = compose_train_config("miniwiki_rag_token", ["n_docs=10"])   # as `rag-train experiment=...` would
    model = build_model(cfg)                                           # RagModel with its retriever attached
    module, cfg = load_checkpoint("outputs/.../last.ckpt")             # a trained rag-train run

- configs: :func:`conf_dir`, :func:`compose` (Hydra's composition errors as one :class:`OverrideError` line),
  :func:`compose_train_config`, :func:`check_required`, :func:`instantiate` (Hydra's, with the package's own
  errors surfaced as they are);
- overrides: :func:`format_overrides` (a nested mapping as command-line strings), :func:`parse_override`
  (one string read by Hydra's grammar), :func:`check_override_keys`, :func:`index_override`,
  :func:`checkpoint_overrides`;
- builders: :func:`build_retriever`, :func:`build_model`, :func:`build_loggers`, :func:`build_callbacks`;
- checkpoints: :func:`checkpoint_config`, :func:`load_checkpoint`, :func:`init_weights`,
  :func:`find_resume_checkpoint`, :func:`resolve_ckpt_path`;
- indexes: :func:`rag.retrieval.indexer.ensure_index` and its default folders, re-exported here.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import HydraException, InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict

from rag.config_dir import conf_dir
from rag.config_schema import validate
from rag.errors import ConfigError, RagError
from rag.generation.generator import load_delta
from rag.lit_module import RagLitModule
from rag.model import RagModel
from rag.reference import load_encoder_delta
from rag.retrieval.embed import open_embeddings
from rag.retrieval.encoders import BertEncoder
from rag.retrieval.index import DenseIndex
from rag.retrieval.indexer import (
    IndexResult,
    cache_dir,
    default_cache_dir,
    default_embeddings_dir,
    default_index_dir,
    ensure_index,
)
from rag.retrieval.retriever import BM25Retriever, DenseRetriever, GoldRetriever, Retriever
from rag.retrieval.sharded import ShardedIndex, ensure_embeddings
from rag.types import Passage

__all__ = [
    "OPEN_NODES",
    "IndexResult",
    "OverrideError",
    "build_callbacks",
    "build_loggers",
    "build_model",
    "build_retriever",
    "dense_retriever",
    "no_retriever",
    "upgrade_config",
    "cache_dir",
    "check_override_keys",
    "check_required",
    "checkpoint_config",
    "checkpoint_overrides",
    "compose",
    "compose_train_config",
    "conf_dir",
    "default_embeddings_dir",
    "default_index_dir",
    "ensure_index",
    "find_resume_checkpoint",
    "format_overrides",
    "format_value",
    "index_override",
    "init_weights",
    "instantiate",
    "load_checkpoint",
    "parse_override",
    "read_checkpoint",
    "resolve_ckpt_path",
    "retriever_mode",
    "set_threads",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAMES = ("last.ckpt", "interrupted.ckpt")


class OverrideError(ConfigError):
    """An override the config does not take: an unknown key, a group option that does not exist, a value that
    cannot be read. The message is one line naming the override and the fix."""


# ---------------------------------------------------------------------------------------------- configs


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``config_name`` (a file of ``conf/``) with command-line ``overrides``, outside any Hydra run.

    Safe to call from inside another Hydra app: the global Hydra state is cleared first. An override Hydra
    cannot apply (an unknown key: add it with ``+key=...``; a missing group option: the options are listed)
    raises :class:`OverrideError` with one line; a value outside :mod:`rag.config_schema`'s allowed ones a
    :class:`~rag.errors.ConfigError`.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except HydraException as err:  # ConfigCompositionException, MissingConfigException, ...
        raise _composition_error(err, config_name, overrides) from None
    return validate(cfg)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _composition_error(err: BaseException, config_name: str, overrides: Sequence[str]) -> OverrideError:
    """One line for Hydra's failure to compose ``config_name`` with ``overrides``."""
    experiments = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    if config_name == "train" and experiments:
        experiment = experiments[-1]
        described = f"the rag-train config of experiment {experiment!r}"
        keys = f"rag-train experiment={experiment} --cfg job prints the keys"
    else:
        described = f"the {config_name} config (conf/{config_name}.yaml)"
        keys = "the command's --cfg job prints the keys"
    text = str(err)
    bad_key = re.search(r"Could not override '([^']+)'", text)
    if bad_key:
        key = bad_key.group(1)
        return OverrideError(
            f"overrides: {key} is not a key of {described}: check its spelling ({keys}), or write '+{key}=...' "
            "to add a new one"
        )
    missing = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", text, re.M)
        allowed = f": choose one of {', '.join(options)}" if options else ""
        return OverrideError(f"{group}={option} is not a config of conf/{group}/{allowed}")
    return OverrideError(f"{described} does not compose with the overrides given: {_first_line(err)}")


def compose_train_config(experiment: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The ``rag-train`` config of ``experiment`` with ``overrides`` (as the command line would give them)."""
    cfg = compose("train", [f"experiment={experiment}", *overrides])
    # keys that name Hydra's run folder mean nothing outside a Hydra run
    cfg.output_dir = "."
    cfg.runs_dir = "."
    return cfg


def check_required(cfg: DictConfig) -> None:
    """Name every required (``???``) config value left unset, in one message."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        example = " ".join(f"{key}=..." for key in missing)
        raise ConfigError(
            f"required config values are not set: {', '.join(missing)}. Set them, e.g. {example}"
        )


def instantiate(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate`` that surfaces the package's own errors (one clear message) instead of
    Hydra's wrapper around them."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, RagError):
            raise err.__cause__ from None
        raise


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in torch and faiss (None: their defaults)."""
    if threads:
        import faiss

        torch.set_num_threads(int(threads))
        faiss.omp_set_num_threads(int(threads))


# ---------------------------------------------------------------------------------------------- overrides

#: config nodes whose keys are open (transformers generation settings): overrides below them may add keys
OPEN_NODES = ("model.generation",)


def _open(key: str) -> bool:
    return any(key.startswith(f"{node}.") for node in OPEN_NODES)


def format_value(value: Any) -> str:
    """``value`` as the command line writes it: ``null``, ``true``, ``5``, ``'text'`` (quoted, so that any
    string stays a string), ``[1,2]``, ``{k:1}``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def format_overrides(mapping: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Command-line overrides from a nested mapping, one per leaf, in its order::

        format_overrides({"model": {"eval_n_docs": 5, "generation": {"num_beams": 2}}})
        # ["model.eval_n_docs=5", "++model.generation.num_beams=2"]

    Keys below :data:`OPEN_NODES` (``model.generation``) get ``++`` (set or add); every other key must be one
    the config has, which :func:`compose` checks. An empty mapping as a value is a leaf (``key={}``).
    """
    out = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.extend(format_overrides(value, f"{name}."))
        else:
            out.append(f"{'++' if _open(name) else ''}{name}={format_value(value)}")
    return out


def parse_override(
    item: str, *, fix: str = "write it as key=value, e.g. model.eval_n_docs=10"
) -> tuple[str, Any]:
    """``(key, value)`` of one ``key=value`` command-line override, the value read by Hydra's grammar (``1e-5``
    a float, ``'text'`` a string, ``[1,2]`` a list, ``{k:1}`` a dict); a leading ``+`` / ``++`` is dropped.

    Raises :class:`OverrideError` for a deletion (``~key``), a string that is not ``key=value`` or cannot be
    read (the message ends with ``fix``), and a sweep (``a=1,2``).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    key, sep, _ = item.lstrip("+").partition("=")
    if not sep or not key or key.startswith("~"):
        raise OverrideError(f"override {item!r} is not key=value: {fix}")
    try:
        override = OverridesParser.create().parse_override(item)
    except HydraException as err:
        raise OverrideError(f"override {item!r} cannot be read ({_first_line(err)}): {fix}") from None
    if override.is_sweep_override():
        raise OverrideError(f"override {item!r} lists several values: give one value per key")
    return override.key_or_group, override.value()


def check_override_keys(
    config: DictConfig, overrides: Mapping[str, Any], where: str, prefix: str = ""
) -> None:
    """Every key of the nested ``overrides`` is one ``config`` (described in messages as ``where``) has, a node
    where it is a node and a value where it is a value; below :data:`OPEN_NODES` any key goes. Raises
    :class:`OverrideError` naming the first key that is not."""
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if _open(f"{name}."):
            continue
        if not isinstance(config, DictConfig) or key not in list(config.keys()):  # ??? values too
            raise OverrideError(f"overrides: {name} is not a key of {where}: check its spelling")
        child = OmegaConf.select(config, key, throw_on_resolution_failure=False)
        if isinstance(value, Mapping) and value:
            if not isinstance(child, DictConfig):
                raise OverrideError(f"overrides: {name} is a value in {where}, not a node with settings")
            check_override_keys(child, value, where, f"{name}.")
        elif isinstance(child, DictConfig) and not isinstance(value, Mapping):
            raise OverrideError(
                f"overrides: {name} is a config node (its settings are {name}.<key>=...), not a value; a "
                "checkpoint keeps the groups it was trained with"
                + (" (another index: index_kind=...)" if name in ("index", "retriever.index") else "")
            )


def _index_node(kind: str) -> DictConfig:
    path = Path(conf_dir()) / "index" / f"{kind}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise OverrideError(
            f"index={kind} is not a config of conf/index/: choose one of {', '.join(options)}"
        )
    return OmegaConf.load(path)


def index_override(
    kind: str, settings: Mapping[str, Any] | None = None, *, replacing: DictConfig | None = None
) -> dict:
    """The ``index`` node of ``conf/index/<kind>.yaml`` with ``settings`` (a nested mapping, its keys checked)
    merged in, as a plain dict: what a config composed with ``index=<kind> index.<key>=...`` holds. With
    ``replacing`` (the index node it stands in for), that node's ``verbose`` carries over."""
    node = _index_node(kind)
    settings = settings or {}
    check_override_keys(node, settings, f"conf/index/{kind}.yaml", "index.")
    if replacing is not None:
        node.verbose = replacing.get("verbose", node.verbose)
    return OmegaConf.to_container(OmegaConf.merge(node, settings))


def checkpoint_overrides(
    stored: DictConfig, overrides: Mapping[str, Any], *, where: str, index_kind: str | None = None
) -> tuple[dict, dict | None]:
    """The overrides to :func:`load_checkpoint` with, checked against the checkpoint's ``stored`` config
    (:func:`checkpoint_config`; described in messages as ``where``), and the index node to use instead of its
    own.

    ``overrides`` is a nested mapping; every key must be one ``stored`` has (:func:`check_override_keys`).
    ``index_kind`` (``flat`` | ``hnsw`` | ...): another kind of index than the checkpoint's; its node is
    :func:`index_override` of that kind with ``overrides``' ``index`` settings (None when the checkpoint's index
    is of that kind already: its own node and settings stay). Raises :class:`OverrideError`.
    """
    mapping = dict(overrides)
    index = None
    if index_kind and stored.index.get("_target_") != _index_node(index_kind)._target_:
        index = index_override(index_kind, mapping.pop("index", None), replacing=stored.index)
    check_override_keys(stored, mapping, where)
    return mapping, index


# ---------------------------------------------------------------------------------------------- building


#: the retriever group option each legacy ``model.retriever_mode`` value stands for (configs and checkpoints
#: written before ``retriever`` became a config group), and whether it trained the query encoder
LEGACY_RETRIEVER_MODES = {
    "learned": ("dense", True),
    "frozen": ("dense", False),
    "bm25": ("bm25", None),
    "gold": ("gold", None),
    "none": ("none", None),
}


def upgrade_config(cfg: DictConfig) -> DictConfig:
    """Bring a run config written before the ``retriever`` group up to date, in place (and return it).

    Such configs (in checkpoints, or ``model.retriever_mode=...`` given on a command line) chose the retriever
    by the string ``model.retriever_mode`` and kept BM25's and the gold reader's settings in top-level
    ``bm25`` / ``gold`` nodes. They become ``retriever`` (the group option, its settings carried over) and
    ``model.train_query_encoder``, so that they build and evaluate as they did.
    """
    model = cfg.get("model")
    mode = model.get("retriever_mode") if model is not None else None
    if mode is None:
        return cfg
    if mode not in LEGACY_RETRIEVER_MODES:
        raise ConfigError(
            f"model.retriever_mode={mode!r} is not one of {sorted(LEGACY_RETRIEVER_MODES)}: choose the retriever "
            "with retriever=dense|bm25|gold|none and model.train_query_encoder=true|false instead"
        )
    option, trains = LEGACY_RETRIEVER_MODES[mode]
    with open_dict(cfg):
        node = OmegaConf.load(Path(conf_dir()) / "retriever" / f"{option}.yaml")
        legacy = cfg.get({"bm25": "bm25", "gold": "gold"}.get(option, ""), None)
        if legacy is not None:
            node = OmegaConf.merge(node, legacy)
        cfg.retriever = node
        cfg.pop("bm25", None)
        cfg.pop("gold", None)
        cfg.model.retriever_mode = None
        if trains is not None:
            cfg.model.train_query_encoder = trains
    return cfg


_INCOMPLETE_EMBEDDINGS = (
    "the document embeddings are incomplete (embed.num_shards > 1): embed every shard with rag-index first, "
    "then train"
)


def dense_retriever(
    passages: Sequence[Passage],
    doc_encoder: BertEncoder,
    index: DenseIndex | ShardedIndex,
    *,
    corpus_name: str,
    cache_dir: str | None = None,
    index_dir: str | None = None,
    embeddings_dir: str | None = None,
    embed: dict | None = None,
    rebuild: bool = False,
    mmap: bool = True,
) -> DenseRetriever:
    """``retriever=dense``: a :class:`DenseRetriever` over ``passages`` embedded by ``doc_encoder`` into
    ``index`` (an empty index of the wanted kind), loaded from ``index_dir`` when one there fits, otherwise
    embedded and built first (:func:`ensure_index`). The query encoder is attached by the model.

    ``mmap``: the index is memory-mapped, so the processes of a machine (DDP ranks) share one copy; training
    never adds to it.

    ``index=sharded`` (a :class:`~rag.retrieval.sharded.ShardedIndex`): no index is built; the embeddings are
    embedded when missing (:func:`~rag.retrieval.sharded.ensure_embeddings`) and each DDP rank reads its
    shard of them at the first search; ``index_dir``, ``rebuild`` and ``mmap`` do not apply.
    """
    log.info(f"corpus {corpus_name}: {len(passages):,} passages")
    embed = dict(embed or {})
    cache_dir = cache_dir or str(default_cache_dir())
    if isinstance(index, ShardedIndex):
        embeddings_dir = embeddings_dir or default_embeddings_dir(
            cache_dir, corpus_name, doc_encoder, embed.get("dtype", "float32")
        )
        doc_embeds = ensure_embeddings(passages, doc_encoder, embeddings_dir, embed=embed)
        if doc_embeds is None:
            raise ConfigError(_INCOMPLETE_EMBEDDINGS)
        return DenseRetriever(index.build(doc_embeds), passages, None, doc_embeds=doc_embeds)
    result = ensure_index(
        passages,
        doc_encoder,
        index,
        index_dir or default_index_dir(cache_dir, corpus_name, doc_encoder, index.kind),
        embeddings_dir
        or default_embeddings_dir(cache_dir, corpus_name, doc_encoder, embed.get("dtype", "float32")),
        embed=embed,
        rebuild=rebuild,
        rebuild_command="rag-train ... rebuild_index=true (or rag-index ... rebuild=true)",
        corpus_name=corpus_name,
        mmap=mmap,
    )
    if result.index is None:
        raise ConfigError(_INCOMPLETE_EMBEDDINGS)
    index = result.index
    if result.built and mmap:  # from the file just written, mapped like the other processes' copies
        index = DenseIndex.load(result.index_dir, verify_checksum=False, verbose=False, mmap=True)
    doc_embeds = open_embeddings(result.embeddings_dir, expected_rows=len(passages))
    return DenseRetriever(index, passages, None, doc_embeds=doc_embeds)


def no_retriever(**unused) -> None:
    """``retriever=none``: closed book. Settings meant for another retriever (an experiment's
    ``retriever.window_words``) do not apply and are ignored."""
    return None


def retriever_mode(cfg: DictConfig) -> str:
    """The mode (``learned`` | ``frozen`` | ``bm25`` | ``gold`` | ``none``) a run config's model runs in, read
    off its ``retriever`` node and ``model.train_query_encoder`` without building anything."""
    from hydra.utils import get_object

    upgrade_config(cfg)
    target = get_object(str(cfg.retriever._target_))
    if target is dense_retriever:
        return "learned" if cfg.model.get("train_query_encoder", True) is not False else "frozen"
    modes = {no_retriever: "none", GoldRetriever.from_passages: "gold", BM25Retriever.from_passages: "bm25"}
    for builder, mode in modes.items():
        if target == builder:
            return mode
    raise ConfigError(
        f"retriever._target_={cfg.retriever._target_} is none of the retriever group's builders: choose "
        "retriever=dense|bm25|gold|none"
    )


def build_retriever(cfg: DictConfig) -> Retriever | None:
    """The retriever of a run config's ``retriever`` group (dense, bm25, gold, none)."""
    upgrade_config(cfg)
    return instantiate(cfg.retriever)


def build_model(cfg: DictConfig) -> RagModel:
    """The :class:`~rag.model.RagModel` of a run config: generator, retriever, query encoder (when the
    retriever searches dense embeddings), head."""
    upgrade_config(cfg)
    generator = instantiate(cfg.generator)
    retriever = build_retriever(cfg)
    query_encoder = instantiate(cfg.query_encoder) if isinstance(retriever, DenseRetriever) else None
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


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
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
        state = read_checkpoint(path, what=f"init_from={path}").get("state_dict")
        if not isinstance(state, dict):
            raise ConfigError(f"init_from={path} could not be read as a rag-train checkpoint (no state_dict)")
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
    log.info(
        f"init_from {path}: {len(loaded)} tensors loaded"
        + (f"; kept the initial values of {len(kept)} ({', '.join(kept_parts)})" if kept else "")
    )
    return {"loaded": loaded, "kept": kept}


def _reference_state(folder: Path) -> dict:
    """The state dict (RagLitModule names) of a reference-model folder: generator/ and query_encoder/ deltas."""
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


def read_checkpoint(path: str | os.PathLike, what: str | None = None) -> dict:
    """A rag-train checkpoint's contents, read without unpickling arbitrary objects (``weights_only``: tensors
    and plain data, all a rag-train checkpoint holds); a file that is not one is one :class:`ConfigError`."""
    what = what or str(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which and why, in one line
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        raise ConfigError(
            f"{what} could not be read as a rag-train checkpoint ({reason}): give a .ckpt written by rag-train"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{what} holds a {type(checkpoint).__name__}, not a rag-train checkpoint")
    return checkpoint


def checkpoint_config(path: str | os.PathLike) -> DictConfig:
    """The run config stored in a checkpoint written by rag-train."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: give the path of a .ckpt written by rag-train")
    checkpoint = read_checkpoint(path)
    config = (checkpoint.get("hyper_parameters") or {}).get("run_config")
    if not config:
        raise ConfigError(
            f"{path} holds no run config (hyper_parameters.run_config): it was not written by rag-train; load it "
            "with RagLitModule.load_from_checkpoint(path, model=...) and build the model yourself"
        )
    return upgrade_config(OmegaConf.create(config))


def load_checkpoint(
    path: str | os.PathLike,
    overrides: Mapping[str, Any] | DictConfig | None = None,
    config: DictConfig | None = None,
    *,
    index: Mapping[str, Any] | None = None,
):
    """Rebuild a trained :class:`~rag.lit_module.RagLitModule` from a rag-train checkpoint.

    The model is built from the config stored in the checkpoint (merged with ``overrides``, e.g.
    ``{"model": {"eval_n_docs": 15}}``) and the trained weights are loaded into it; the retriever is
    re-attached from that config (the index loaded from the cache, or rebuilt when missing). Returns the
    module (in eval mode) and the config used.

    ``config``: the checkpoint's config when already read (:func:`checkpoint_config`; changed in place), so
    that the file is not read for it again. ``index``: an index node (:func:`index_override`,
    :func:`checkpoint_overrides`) used whole instead of the checkpoint's (another kind takes other settings,
    so they are not merged): its folder is the new kind's default unless ``overrides`` set ``index_dir``, its
    embeddings the ones the checkpoint's own index was built from; the config returned holds it as if
    composed with ``index=<kind>``.
    """
    cfg = checkpoint_config(path) if config is None else config
    stored_cache = Path(str(cfg.get("cache_dir", ""))).expanduser()
    if not stored_cache.is_dir():
        # the run was trained where another cache folder existed: use this machine's, and say so
        cfg.cache_dir = str(default_cache_dir())
        log.warning(
            f"the checkpoint's cache_dir {stored_cache} does not exist here: indexes are looked up (and "
            f"built if missing) in {cfg.cache_dir}; set RAG_HOME or pass cache_dir=... to choose"
        )
    if overrides:
        cfg = OmegaConf.merge(cfg, overrides)
    if index is not None:
        whole = {"retriever": {"index": dict(index)}}
        if "index_dir" not in (overrides or {}):
            whole["index_dir"] = None
        cfg = OmegaConf.merge(cfg, whole)
    model = build_model(cfg)
    module = RagLitModule.load_from_checkpoint(str(path), model=model, map_location="cpu", weights_only=True)
    module.eval()
    if index is not None:
        cfg.index = dict(index)
        cfg.retriever.index = "${index}"
    return module, cfg
