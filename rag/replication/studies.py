"""The paper's experiments on whatever corpus, models and split the config names (``rag-replicate``).

Each study answers the questions of a split with a list of *systems* (a model and a decoder) and writes the
rows of its table to ``result.json``:

- ``systems`` (Table 1, Table 6, the decoding comparison, training K): each system once at the study's K;
- ``sweep`` (Figure 3): each system at every K of ``ks``, from one search at the largest K per model;
- ``hotswap`` (section 4.5): each system with the index swapped for others built from the same stored
  document vectors: the full corpus, the corpus without the test questions' gold passages, only the other
  dataset's passages, and the reduced index extended again with those gold passages encoded anew.

A system's model is a ``rag-train`` experiment's starting weights (``train: false``: the shipped reference
for the mini-wiki experiments), or that experiment trained first (``train: true``) into a fixed, resumable
folder under ``train_root/<study>/<run>`` and loaded from its last checkpoint. Systems with the same model
(same experiment, overrides and run) share one model and one retrieval.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rag.atomic import write_json_atomic, write_text_atomic
from rag.build import compose_train_config, retriever_mode
from rag.errors import ConfigError
from rag.evaluation import score_records, write_predictions
from rag.replication.evaluate import (
    Split,
    answer_all,
    load_split,
    peak_rss_mb,
    retrieve_all,
    row_metrics,
)

KINDS = ("systems", "sweep", "hotswap")
INDEX_VARIANTS = ("full", "minus_test_gold", "other_dataset", "extended")
SYSTEM_KEYS = {"label", "experiment", "overrides", "train", "run", "decoder", "n_docs", "generation", "meta"}


log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ systems


def check_study(cfg: DictConfig) -> None:
    """Fail at once, before any model loads, on a study the code cannot run."""
    study = cfg.study
    if study.kind not in KINDS:
        raise ConfigError(f"study.kind must be one of {KINDS}, got {study.kind!r}")
    if not study.systems:
        raise ConfigError(f"study {study.name} has no systems: name at least one under study.systems")
    for name, system in study.systems.items():
        unknown = set(system) - SYSTEM_KEYS
        if unknown:
            raise ConfigError(
                f"study.systems.{name} has unknown keys {sorted(unknown)}: a system takes {sorted(SYSTEM_KEYS)}"
            )
        for key in ("experiment", "decoder"):
            if not system.get(key):
                raise ConfigError(f"study.systems.{name}.{key} is missing")
        if system.get("train") and not system.get("run"):
            raise ConfigError(
                f"study.systems.{name} trains (train: true) but names no run: give it run: <folder name>; "
                "systems with the same run share one trained model"
            )
    if study.kind == "sweep":
        ks = list(study.ks)
        if not ks or any(int(k) < 1 for k in ks):
            raise ConfigError(f"study.ks must be positive K values, got {ks}")
    if study.kind == "hotswap":
        bad = [v for v in study.indexes if v not in INDEX_VARIANTS]
        if bad:
            raise ConfigError(f"study.indexes: unknown {bad}; choose from {INDEX_VARIANTS}")


def effective_limit(cfg: DictConfig) -> int | None:
    """``limit`` when given, else the study's own default (``study.limit``: the CPU-sized sweeps), else all."""
    if cfg.get("limit") is not None:
        return int(cfg.limit)
    limit = cfg.study.get("limit")
    return None if limit is None else int(limit)


def model_key(system: DictConfig) -> str:
    overrides = " ".join(system.get("overrides") or [])
    run = system.get("run") if system.get("train") else ""
    return f"{system.experiment} {overrides} train={bool(system.get('train'))} {run or ''}".strip()


class ModelCache:
    """Builds (or trains, then loads) each distinct model once; the split's questions come with it."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.models: dict[str, tuple] = {}
        self.info: dict[str, dict] = {}

    def _eval_overrides(self) -> list[str]:
        overrides = [f"cache_dir='{self.cfg.cache_dir}'"]
        if self.cfg.reference_dir:
            overrides.append(f"+reference_dir='{self.cfg.reference_dir}'")
        return overrides

    def get(self, system: DictConfig):
        """(model in eval mode, its training config, the split) for ``system``."""
        key = model_key(system)
        if key in self.models:
            return self.models[key]
        cfg = self.cfg
        overrides = list(system.get("overrides") or [])
        if system.get("train"):
            from rag.build import load_checkpoint
            from rag.replication.training import train_run

            folder = Path(cfg.train_root).expanduser() / cfg.study.name / system.run
            train_overrides = [
                f"experiment={system.experiment}",
                *overrides,
                *self._eval_overrides(),
                *(cfg.study.get("train_overrides") or []),
                *(cfg.train_overrides or []),
            ]
            ckpt = train_run(folder, train_overrides, name=f"{cfg.study.name}/{system.run}")
            module, train_cfg = load_checkpoint(ckpt, {"cache_dir": str(cfg.cache_dir)})
            model = module.model.eval()
            self.info[key] = {"source": "trained", "run_dir": str(folder), "overrides": train_overrides}
        else:
            from rag.build import build_model

            train_cfg = compose_train_config(system.experiment, [*overrides, *self._eval_overrides()])
            log.info(f"building {system.experiment} ({retriever_mode(train_cfg)} retrieval)")
            model = build_model(train_cfg).eval()
            self.info[key] = {
                "source": "experiment weights",
                "experiment": system.experiment,
                "overrides": overrides,
            }
        split = load_split(train_cfg, cfg.split, effective_limit(cfg))
        self.models[key] = (model, train_cfg, split)
        return self.models[key]


def _row(study: DictConfig, name: str, system: DictConfig, model, train_cfg, answered, split: Split, **extra):
    n_docs = extra.pop("n_docs", None)
    row = {
        "study": study.name,
        "system": name,
        "label": system.get("label") or name,
        "meta": {} if not system.get("meta") else OmegaConf.to_container(system.meta, resolve=True),
        "experiment": system.experiment,
        "overrides": list(system.get("overrides") or []),
        "trained": bool(system.get("train")),
        "head": model.head,
        "retriever_mode": model.retriever_mode,
        "train_n_docs": None if model.closed_book else int(train_cfg.n_docs),
        "decoder": system.decoder,
        "n_docs": n_docs,
        **extra,
        **row_metrics(answered.metrics, n_docs, split.sets),
        "seconds": answered.seconds,
        "questions_per_second": len(answered.records) / max(answered.seconds, 1e-9),
    }
    return row


def _generation(system: DictConfig) -> dict:
    generation = system.get("generation")
    return {} if not generation else OmegaConf.to_container(generation, resolve=True)


def _answer(model, split, system, n_docs, cfg, desc, retrievals=None, recall_ks=(1,)):
    return answer_all(
        _with_generation(model, _generation(system)),
        split,
        decoder=system.decoder,
        n_docs=n_docs,
        batch_size=int(cfg.batch_size),
        desc=desc,
        retrievals=retrievals,
        recall_ks=recall_ks,
    )


class _with_generation:
    """``model`` whose ``generate`` also passes a system's generation settings (e.g. num_beams)."""

    def __init__(self, model, generation: dict):
        self._model, self._generation = model, generation

    def generate(self, *args, **kwargs):
        return self._model.generate(*args, **{**self._generation, **kwargs})


def _k(system: DictConfig, study: DictConfig, model) -> int | None:
    if model.closed_book:
        return None
    return int(system.get("n_docs") or study.get("n_docs") or model.eval_n_docs or model.n_docs)


def _retrievals(cache: dict, key: str, model, split: Split, k: int, batch_size: int):
    """One search per model at the largest K asked of it (later calls with smaller K reuse it)."""
    have = cache.get(key)
    if have is None or have[0] < k:
        started = time.perf_counter()
        have = (k, retrieve_all(model, split, k, batch_size, desc=f"retrieving K={k}"), 0.0)
        have = (have[0], have[1], time.perf_counter() - started)
        cache[key] = have
    return have[1], have[2]


def run_systems(cfg: DictConfig, models: ModelCache, out: Path) -> list[dict]:
    study, rows, searches = cfg.study, [], {}
    for name, system in study.systems.items():
        model, train_cfg, split = models.get(system)
        k = _k(system, study, model)
        retrievals, search_s = (
            (None, 0.0)
            if k is None
            else _retrievals(searches, model_key(system), model, split, k, int(cfg.batch_size))
        )
        answered = _answer(model, split, system, k, cfg, f"{name} ({system.decoder})", retrievals)
        write_predictions(out / f"predictions-{name}.jsonl", answered.records)
        rows.append(
            _row(study, name, system, model, train_cfg, answered, split, n_docs=k, search_seconds=search_s)
        )
        log.info(
            f"{name}: EM {100 * answered.metrics['em']:.1f}, F1 {100 * answered.metrics['f1']:.1f} "
            f"in {answered.seconds:.0f} s"
        )
    return rows


def run_sweep(cfg: DictConfig, models: ModelCache, out: Path) -> list[dict]:
    study, rows, searches = cfg.study, [], {}
    ks = sorted({int(k) for k in study.ks})
    for name, system in study.systems.items():
        model, train_cfg, split = models.get(system)
        if model.closed_book:
            raise ConfigError(f"study.systems.{name} is closed-book: a sweep over K needs retrieval")
        k_max = min(ks[-1], model.retriever.n_passages)
        retrievals, _ = _retrievals(searches, model_key(system), model, split, k_max, int(cfg.batch_size))
        for k in ks:
            if k > k_max:
                continue
            answered = _answer(
                model, split, system, k, cfg, f"{name} K={k}", [r.top(k) for r in retrievals], recall_ks=[k]
            )
            write_predictions(out / f"predictions-{name}-k{k}.jsonl", answered.records)
            rows.append(_row(study, name, system, model, train_cfg, answered, split, n_docs=k))
            log.info(
                f"{name} K={k}: EM {100 * answered.metrics['em']:.1f}, answer recall@{k} "
                f"{100 * answered.metrics.get(f'answer_recall@{k}', float('nan')):.1f}"
            )
    return rows


# ------------------------------------------------------------------------------------------------ hot-swap


def _passage_source(passage_id: str) -> str:
    """The source a passage id names (``squad:...`` -> ``squad``; rag.data.miniwiki's id scheme)."""
    return passage_id.split(":", 1)[0] if ":" in passage_id else ""


def index_variants(model, split: Split, variants, sources: dict, doc_encoder_cfg) -> dict:
    """{variant: {set name or "": retriever}} for the hot-swap study (see the module docstring)."""
    from rag.build import instantiate
    from rag.retrieval.retriever import DenseRetriever

    base = model.retriever
    if not isinstance(base, DenseRetriever):
        raise ConfigError(
            f"the index hot-swap needs a dense retriever; this model's retriever_mode is {model.retriever_mode!r}"
        )
    ids = [p.id for p in base.passages]
    gold = {g for q in split.questions for g in q.gold_passage_ids}
    removed = [i for i, pid in enumerate(ids) if pid in gold]
    if not removed:
        raise ConfigError(
            "the split's questions name no gold passage of this corpus: nothing to remove or add"
        )
    kept = [i for i, pid in enumerate(ids) if pid not in gold]
    out: dict[str, dict] = {}
    for variant in variants:
        if variant == "full":
            out[variant] = {"": base}
        elif variant == "minus_test_gold":
            out[variant] = {"": base.subset(kept)}
        elif variant == "extended":
            reduced = out.get("minus_test_gold", {}).get("") or base.subset(kept)
            new = [base.passages[i] for i in removed]
            encoder = instantiate(doc_encoder_cfg)
            log.info(f"extended: encoding the {len(new)} removed passages with {encoder.name}")
            embeds = encoder.encode(([p.title for p in new], [p.text for p in new]))
            out[variant] = {"": reduced.extended(new, embeds)}
        elif variant == "other_dataset":
            per_set = {}
            for s in split.sets:
                own = sources.get(s)
                if own is None:
                    raise ConfigError(
                        f"study.sources names no passage source for question set {s!r}: add {s}: <id prefix>"
                    )
                others = {v for k, v in sources.items() if k != s}
                rows = [i for i, pid in enumerate(ids) if _passage_source(pid) in others]
                if not rows:
                    raise ConfigError(f"no passage of sources {sorted(others)} in the corpus for set {s}")
                per_set[s] = base.subset(rows)
            out[variant] = per_set
    return out


def run_hotswap(cfg: DictConfig, models: ModelCache, out: Path) -> list[dict]:
    study, rows = cfg.study, []
    sources = OmegaConf.to_container(study.sources, resolve=True)
    built: dict[str, dict] = {}
    for name, system in study.systems.items():
        model, train_cfg, split = models.get(system)
        k = _k(system, study, model)
        key = model_key(system)
        if key not in built:
            built[key] = index_variants(model, split, list(study.indexes), sources, train_cfg.doc_encoder)
        original = model.retriever
        try:
            for variant, retrievers in built[key].items():
                records, seconds = [], 0.0
                for s, retriever in retrievers.items():
                    part = split if s == "" else split.only(s)
                    model.retriever = retriever
                    answered = _answer(
                        model, part, system, k, cfg, f"{name} index={variant}{'/' + s if s else ''}"
                    )
                    records.extend(answered.records)
                    seconds += answered.seconds
                from rag.replication.evaluate import Answered

                merged = Answered(records, seconds, score_records(records, [k]))
                write_predictions(out / f"predictions-{name}-{variant}.jsonl", records)
                sizes = {s or "all": r.n_passages for s, r in retrievers.items()}
                rows.append(
                    _row(
                        study,
                        name,
                        system,
                        model,
                        train_cfg,
                        merged,
                        split,
                        n_docs=k,
                        index=variant,
                        index_passages=sizes,
                    )
                )
                log.info(f"{name} index={variant} ({sizes}): EM {100 * merged.metrics['em']:.1f}")
        finally:
            model.retriever = original
    return rows


RUNNERS = {"systems": run_systems, "sweep": run_sweep, "hotswap": run_hotswap}


def run_study(cfg: DictConfig, command: str, extra: dict | None = None) -> dict:
    """Run ``cfg.study``; writes ``result.json`` and ``result.md`` (and predictions) to ``cfg.output_dir``."""
    from rag.replication.aggregate import study_markdown
    from rag.replication.provenance import record

    check_study(cfg)
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    provenance = record(command)  # the commit before anything is written
    models = ModelCache(cfg)
    rows = RUNNERS[cfg.study.kind](cfg, models, out)
    result = {
        "study": cfg.study.name,
        "kind": cfg.study.kind,
        "title": cfg.study.get("title") or cfg.study.name,
        "split": cfg.split,
        "limit": effective_limit(cfg),
        **provenance,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "models": models.info,
        **(extra or {}),
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
    }
    write_json_atomic(out / "result.json", result)
    markdown = study_markdown(result)
    write_text_atomic(out / "result.md", markdown)
    log.info(
        f"done in {result['wall_seconds']:.0f} s (peak RSS {result['peak_rss_mb']:.0f} MB); results in {out}"
    )
    return result
