"""The allowed values of the configs' enum-like keys, checked as soon as a config is composed.

A typo such as ``model.head=sequnce`` composes (any string fits a string key), so without this check it would
surface only when the object that reads it is built, after the index and the models are loaded. Every
command checks its config before Hydra runs it (:func:`rag.cli.app.check_overrides`, also for each value of
a ``-m`` sweep and under ``--cfg``), and :func:`rag.build.compose` checks what it composes:

    validate(cfg)   # ConfigError: model.head='sequnce' is not allowed: use one of token, sequence (did you mean 'sequence'?)

The one table of checks is :data:`CHOICES` (a config path -> the allowed values, read from the code that
uses them) plus the index nodes (:data:`INDEX_NODES`); a key a config does not have is not checked, so one
table serves every command. To check a new key, add a line to :data:`CHOICES`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from functools import cache

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rag.config_dir import conf_dir
from rag.errors import ConfigError

__all__ = ["CHOICES", "INDEX_NODES", "REQUIRED_GROUPS", "SHARDED_INDEX_TARGET", "problems", "validate"]


def _heads() -> tuple:
    from rag.model import HEADS

    return HEADS


def _decoders() -> tuple:
    from rag.generation.decoding import DECODERS

    return (None, *DECODERS)


def _retriever_modes() -> tuple:
    from rag.model import RETRIEVER_MODES

    return RETRIEVER_MODES


def _reductions() -> tuple:
    from rag.model import REDUCTIONS

    return REDUCTIONS


def _schedulers() -> tuple:
    from rag.lit_module import SCHEDULERS

    return SCHEDULERS


def _splits() -> tuple:
    from rag.data.datamodule import SPLITS

    return SPLITS


def _verbosities() -> tuple:
    from rag.log import LEVELS, VERBOSITIES

    return (*LEVELS, *(name.upper() for name in LEVELS), *VERBOSITIES)


def _embed_dtypes() -> tuple:
    from rag.retrieval.embed import DTYPES

    return DTYPES


def _group_options(group: str) -> Callable[[], tuple]:
    def options() -> tuple:
        from pathlib import Path

        return tuple(sorted(p.stem for p in (Path(conf_dir()) / group).glob("*.yaml")))

    return options


#: config path (``fnmatch`` patterns allowed) -> the values it may take (None: null is allowed). A path a
#: config does not have is skipped: ``split`` is evaluate's / reference's / replicate's, ``head`` convert
#: export's, ``model.*`` every training config's.
CHOICES: dict[str, Callable[[], tuple]] = {
    "model.head": _heads,
    "model.decoder": _decoders,
    "model.retriever_mode": lambda: (None, *_retriever_modes()),  # legacy: the retriever group replaces it
    "model.reduction": _reductions,
    "optim.scheduler": _schedulers,
    "decoder": _decoders,  # rag-evaluate
    "head": lambda: (None, *_heads()),  # rag-convert export
    "split": _splits,
    "index_kind": lambda: (None, *_index_kind_names()),  # rag-evaluate
    "verbosity": _verbosities,
    "embed.dtype": _embed_dtypes,
}

#: config groups a command cannot run without (a ``null`` default, so that ``--help`` still composes)
REQUIRED_GROUPS: dict[str, Callable[[], tuple]] = {
    "study": _group_options("study"),  # rag-replicate
}

#: the config nodes that build a dense index: their ``_target_`` must be one of the index kinds
INDEX_NODES: tuple[str, ...] = ("index", "indexes.*")

#: the index sharded across DDP ranks (``index=sharded``): a run's ``index`` node may hold it, the saved
#: indexes that rag-eval-retrieval compares (``indexes.*``) may not
SHARDED_INDEX_TARGET = "rag.retrieval.sharded.ShardedIndex"


@cache
def _index_kinds() -> dict[str, str]:
    """``_target_`` -> kind for every index kind (its class path, and the path the shipped configs use)."""
    import rag.retrieval.index as index_module
    from rag.retrieval.index import INDEX_KINDS

    targets = {}
    for kind, cls in INDEX_KINDS.items():
        targets[f"{cls.__module__}.{cls.__qualname__}"] = kind
        targets[f"{index_module.__name__}.{cls.__qualname__}"] = kind
    return targets


def _index_kind_names() -> tuple:
    return tuple(dict.fromkeys(_index_kinds().values()))


def _paths(cfg: DictConfig, pattern: str) -> Iterator[str]:
    """The paths of ``cfg`` that match ``pattern`` (one ``*`` level at most, as the table uses)."""
    head, star, tail = pattern.partition("*")
    if not star:
        yield pattern
        return
    node = OmegaConf.select(cfg, head.rstrip("."), default=None) if head else cfg
    if isinstance(node, DictConfig):
        for key in node:
            yield f"{head}{key}{tail}"


_ABSENT = object()


def _value(cfg: DictConfig, path: str):
    """The resolved value at ``path``; _ABSENT when the config has no such key, it is unset (``???``) or it
    does not resolve here (another check reports those)."""
    try:
        return OmegaConf.select(cfg, path, default=_ABSENT, throw_on_missing=True)
    except OmegaConfBaseException:  # MissingMandatoryValue, InterpolationResolutionError, ...
        return _ABSENT


def _shown(value) -> str:
    return "null" if value is None else str(value)


def _problem(path: str, value, allowed: tuple, what: str = "is not allowed") -> str:
    shown = [_shown(v) for v in allowed]
    line = f"{path}={_shown(value)} {what}: use one of {', '.join(shown)}"
    close = difflib.get_close_matches(_shown(value), shown, n=1, cutoff=0.5)
    if close:
        line += f" (did you mean {path}={close[0]}?)"
    return line


def problems(cfg: DictConfig) -> list[str]:
    """One line per enum-like value of ``cfg`` outside its allowed values (empty: all fine)."""
    found = []
    for pattern, values in CHOICES.items():
        for path in _paths(cfg, pattern):
            value = _value(cfg, path)
            if value is _ABSENT or isinstance(value, (DictConfig, ListConfig)):
                continue
            allowed = values()
            if value not in allowed:
                found.append(_problem(path, value, allowed))
    for group, options in REQUIRED_GROUPS.items():
        if group in cfg and _value(cfg, group) is None:
            found.append(_problem(group, None, options(), what="is not set"))
    for pattern in INDEX_NODES:
        for path in _paths(cfg, pattern):
            node = _value(cfg, path)
            if not isinstance(node, DictConfig) or "_target_" not in node:
                continue
            target = str(node._target_)
            kinds = _index_kinds()
            if target == SHARDED_INDEX_TARGET:
                if path != "index":
                    found.append(
                        f"{path}._target_={target}: the sharded index serves DDP runs (index=sharded), not "
                        f"the saved indexes compared here: use index@{path}=flat (exact, the same passages)"
                    )
                continue
            if target not in kinds:
                group = "index" if path == "index" else f"index@{path}"
                names = "|".join(dict.fromkeys(kinds.values()))
                found.append(
                    f"{path}._target_={target} is not an index kind: choose one with {group}=<{names}>"
                )
    return found


def validate(cfg: DictConfig) -> DictConfig:
    """Raise :class:`~rag.errors.ConfigError` (one line) if an enum-like value of ``cfg`` is not allowed;
    returns ``cfg``."""
    found = problems(cfg)
    if found:
        raise ConfigError("; ".join(found))
    return cfg
