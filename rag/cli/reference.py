"""``rag-reference``: the README's main job. Evaluate the shipped reference models on the mini-wiki.

    rag-reference                          # test split, RAG-Token + RAG-Sequence + closed-book, K=5
    rag-reference split=val limit=100      # the first 100 questions of each dev set
    rag-reference n_docs=10 examples=5

Builds the mini-wiki's dense index if it is missing (as ``rag-index`` does, into ``$RAG_HOME`` or
``~/.cache/rag``), loads the reference RAG model and the closed-book baseline (``rag/reference_weights``,
checked against their SHA-256), answers every question of the split with each system, and prints a results
table and a few answers with the passages they came from. This is the ``table1`` study of ``rag-replicate``
on the shipped weights: it writes the study's ``result.json`` (rows, command, commit, hardware; ``rag-aggregate
--result`` takes it), ``result.md`` (the table and the answers shown) and one ``predictions-<system>.jsonl``
per system to the run folder.

The systems are the training experiments' own models (``systems.*.experiment``: the default
``rag-train experiment=miniwiki_rag_token`` starts from exactly these weights), each decoded with its own
decoder: RAG-Token greedily, RAG-Sequence with thorough decoding (paper §2.5), closed-book BART greedily.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rag.atomic import write_text_atomic
from rag.build import check_required, set_threads
from rag.cli.app import hydra_entry
from rag.errors import ConfigError
from rag.evaluation import Prediction, read_predictions

CONFIG_NAME = "reference"
SPLITS = ("train", "val", "test")


log = logging.getLogger("rag.cli.reference")


def examples_text(by_system: dict[str, list[Prediction]], n: int, seed: int, passages_shown: int = 2) -> str:
    """A few questions (a seeded draw) with every system's answer and the RAG passages they came from."""
    import random

    first = next(iter(by_system.values()))
    picks = sorted(random.Random(seed).sample(range(len(first)), min(n, len(first))))
    out = []
    for i in picks:
        r = first[i]
        out.append(f"Q: {r.question}\n   gold: {' | '.join(r.answers[:3])}")
        for name, records in by_system.items():
            out.append(f"   {name:>13}: {records[i].prediction!r}")
        rag = next((recs[i] for recs in by_system.values() if recs[i].passages), None)
        if rag is not None:
            order = sorted(range(len(rag.passages)), key=lambda j: -rag.passages[j].posterior)
            for j in order[:passages_shown]:
                p = rag.passages[j]
                text = p.text if len(p.text) <= 160 else p.text[:157] + "..."
                out.append(f"     p(z|x)={p.prior:.2f} p(z|x,y)={p.posterior:.2f}  [{p.title}] {text}")
        out.append("")
    return "\n".join(out)


def run(cfg: DictConfig) -> dict:
    """The table1 study (rag.replication.studies) on the shipped reference, then a few answers shown."""
    from rag.reference import check_reference
    from rag.replication.aggregate import study_markdown
    from rag.replication.provenance import command_line
    from rag.replication.studies import run_study

    check_required(cfg)
    if cfg.split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {cfg.split!r}")
    if not cfg.systems:
        raise ConfigError("systems is empty: name at least one system to evaluate")
    set_threads(cfg.threads)
    manifest = check_reference(cfg.reference_dir)
    study = {
        "name": "table1",
        "kind": "systems",
        "title": "Table 1: open-domain QA, exact match (rag-reference, the shipped reference models)",
        "n_docs": int(cfg.n_docs),
        "systems": OmegaConf.to_container(cfg.systems, resolve=True),
    }
    study_cfg = OmegaConf.create(
        {
            "study": study,
            **{k: cfg[k] for k in ("split", "limit", "batch_size", "threads", "cache_dir", "reference_dir")},
            "train_root": None,
            "train_overrides": [],
            "output_dir": cfg.output_dir,
        }
    )
    reference = {k: manifest.get(k) for k in ("commit", "command", "created")}
    result = run_study(study_cfg, command_line("rag-reference"), extra={"reference": reference})
    print("\n" + study_markdown(result))
    output_dir = Path(cfg.output_dir)
    by_system = {
        row["system"]: read_predictions(output_dir / f"predictions-{row['system']}.jsonl")
        for row in result["rows"]
    }
    examples = examples_text(by_system, int(cfg.examples), int(cfg.seed))
    header = (
        f"reference model trained at commit {str(reference.get('commit') or '?')[:10]} "
        f"({reference.get('command')})\n"
    )
    print(header + "\n" + examples)
    write_text_atomic(
        output_dir / "result.md",
        (output_dir / "result.md").read_text() + "\n" + header + "\n```\n" + examples + "```\n",
    )
    return result


def main() -> None:
    hydra_entry(run, CONFIG_NAME, "rag-reference")


if __name__ == "__main__":
    main()
