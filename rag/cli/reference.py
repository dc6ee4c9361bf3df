"""``rag-reference``: the README's main job. Evaluate the shipped reference models on the mini-wiki.

    rag-reference                          # test split, RAG-Token + RAG-Sequence + closed-book, K=5
    rag-reference split=val limit=100      # the first 100 questions of each dev set
    rag-reference n_docs=10 examples=5

Builds the mini-wiki's dense index if it is missing (as ``rag-index`` does, into ``$RAG_HOME`` or
``~/.cache/rag``), loads the reference RAG model and the closed-book baseline (``rag/reference_weights``,
checked against their SHA-256), answers every question of the split with each system, and prints a results
table and a few answers with the passages they came from. Writes ``results.json``, ``results.md`` and one
``predictions-<system>.jsonl`` per system to the run folder.

The systems are the training experiments' own models (``systems.*.experiment``: the default
``rag-train experiment=miniwiki_rag_token`` starts from exactly these weights), each decoded with its own
decoder: RAG-Token greedily, RAG-Sequence with thorough decoding (paper §2.5), closed-book BART greedily.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from rag.atomic import write_json_atomic, write_text_atomic
from rag.cli.index import ConfigError, check_required, set_threads
from rag.cli.train import build_model, hydra_entry
from rag.data.corpus import write_jsonl
from rag.replication.evaluate import answer_all, compose_train_config, load_split, peak_rss_mb

CONFIG_NAME = "reference"
SPLITS = ("train", "val", "test")


def _log(message: str) -> None:
    print(f"[rag-reference] {message}", file=sys.stderr, flush=True)


def results_table(rows: list[dict], sets: list[str]) -> str:
    """Markdown: one row per system; EM and F1 overall and per set, answer recall@K of the passages read."""
    head = ["system", "decoder", "EM", "F1", *(f"EM {s}" for s in sets), "answer recall@K", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for row in rows:
        m = row["metrics"]
        k = row["n_docs"]
        recall = m.get(f"answer_recall@{k}") if k else None
        cells = [
            row["system"],
            row["decoder"],
            f"{100 * m['em']:.1f}",
            f"{100 * m['f1']:.1f}",
            *(f"{100 * m.get(f'{s}/em', m['em'] if len(sets) == 1 else float('nan')):.1f}" for s in sets),
            "-" if recall is None else f"{100 * recall:.1f}",
            f"{row['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def examples_text(by_system: dict[str, list[dict]], n: int, seed: int, passages_shown: int = 2) -> str:
    """A few questions (a seeded draw) with every system's answer and the RAG passages they came from."""
    import random

    first = next(iter(by_system.values()))
    picks = sorted(random.Random(seed).sample(range(len(first)), min(n, len(first))))
    out = []
    for i in picks:
        r = first[i]
        out.append(f"Q: {r['question']}\n   gold: {' | '.join(r['answers'][:3])}")
        for name, records in by_system.items():
            out.append(f"   {name:>13}: {records[i]['prediction']!r}")
        rag = next((recs[i] for recs in by_system.values() if recs[i]["passages"]), None)
        if rag is not None:
            order = sorted(range(len(rag["passages"])), key=lambda j: -rag["passages"][j]["posterior"])
            for j in order[:passages_shown]:
                p = rag["passages"][j]
                text = p["text"] if len(p["text"]) <= 160 else p["text"][:157] + "..."
                out.append(
                    f"     p(z|x)={p['prior']:.2f} p(z|x,y)={p['posterior']:.2f}  [{p['title']}] {text}"
                )
        out.append("")
    return "\n".join(out)


def run(cfg: DictConfig) -> dict:
    from rag.reference import check_reference

    check_required(cfg)
    if cfg.split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {cfg.split!r}")
    if not cfg.systems:
        raise ConfigError("systems is empty: name at least one system to evaluate")
    set_threads(cfg.threads)
    started = time.perf_counter()
    manifest = check_reference(cfg.reference_dir)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    models: dict[str, object] = {}
    rows, by_system = [], {}
    sets: list[str] = []
    for name, system in cfg.systems.items():
        overrides = [f"cache_dir='{cfg.cache_dir}'", *system.get("overrides", [])]
        if cfg.reference_dir:
            overrides.append(f"+reference_dir='{cfg.reference_dir}'")
        key = system.experiment + " " + " ".join(overrides)
        train_cfg = compose_train_config(system.experiment, overrides)
        if key not in models:
            _log(f"{name}: building {system.experiment} ({train_cfg.model.retriever_mode} retrieval)")
            models[key] = (build_model(train_cfg).eval(), load_split(train_cfg, cfg.split, cfg.limit))
        model, split = models[key]
        sets = split.sets
        n_docs = None if model.closed_book else int(cfg.n_docs)
        answered = answer_all(
            model,
            split,
            decoder=system.decoder,
            n_docs=n_docs,
            batch_size=int(cfg.batch_size),
            desc=f"{name} ({system.decoder})",
        )
        records, seconds, metrics = answered.records, answered.seconds, answered.metrics
        write_jsonl(output_dir / f"predictions-{name}.jsonl", records)
        by_system[name] = records
        rows.append(
            {
                "system": name,
                "experiment": system.experiment,
                "decoder": system.decoder,
                "n_docs": n_docs,
                "metrics": metrics,
                "seconds": seconds,
            }
        )
        _log(f"{name}: EM {100 * metrics['em']:.1f}, F1 {100 * metrics['f1']:.1f} in {seconds:.0f} s")

    table = results_table(rows, sets)
    examples = examples_text(by_system, int(cfg.examples), int(cfg.seed))
    n_questions = len(next(iter(by_system.values())))
    header = (
        f"mini-wiki {cfg.split} split ({n_questions} questions: {', '.join(sets)}), K={cfg.n_docs} passages, "
        f"reference model trained at commit {manifest.get('commit', '?')[:10]}\n"
    )
    print("\n" + header + "\n" + table + "\n" + examples)
    report = {
        "split": cfg.split,
        "limit": cfg.limit,
        "n_docs": cfg.n_docs,
        "rows": rows,
        "reference": {k: manifest.get(k) for k in ("commit", "command", "created")},
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
    }
    write_json_atomic(output_dir / "results.json", report)
    write_text_atomic(output_dir / "results.md", header + "\n" + table + "\n```\n" + examples + "```\n")
    _log(
        f"done in {report['wall_seconds']:.0f} s (peak RSS {report['peak_rss_mb']:.0f} MB); results in {output_dir}"
    )
    return report


def main() -> None:
    hydra_entry(run, CONFIG_NAME, "rag-reference")


if __name__ == "__main__":
    main()
