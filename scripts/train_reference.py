"""Train the mini-wiki reference models and export them to rag/reference_weights (what rag-reference loads).

    python scripts/train_reference.py                  # all stages, then export (hours on 2 CPU cores)
    python scripts/train_reference.py --stages reader  # one stage; rerun the command to continue
    python scripts/train_reference.py --export-only    # re-export finished stages

Six rag-train runs, each in its own fixed folder under --out (default outputs/reference):

1. ``reader``: experiment=miniwiki_reference_reader -- the gold-passage reader warm-up (QA + cloze questions)
   on 64-word windows around the answer;
2. ``reader_full``: experiment=miniwiki_reference_reader_full init_from=<reader> -- the same on whole passages;
3. ``rag``: experiment=miniwiki_reference_rag init_from=<reader_full> -- RAG fine-tuning, K=5, learned
   retriever;
4.-6. ``closed_book_reader``, ``closed_book_reader_full``, ``closed_book``: the same three runs with
   retriever=none (the question alone), so that the closed-book baseline is trained the same way
   on the same questions for the same number of steps.

Resumable: a finished stage (its metrics.json exists) is skipped; an unfinished one continues from its
``checkpoints/last.ckpt`` (written every 100 steps) or ``interrupted.ckpt`` (Ctrl-C), whichever is newer,
so stopping this script loses minutes at most. Extra Hydra
overrides for every stage go after ``--`` (e.g. ``-- trainer.max_steps=50`` for a quick try). A finished stage
asked for more steps than it ran continues from its last checkpoint (the reader uses a constant learning
rate after warm-up, so a continued run is the run it would have been):

    python scripts/train_reference.py --stages reader --no-export -- trainer.max_steps=6000
    python scripts/train_reference.py --restart rag closed_book_reader closed_book -- ...

The export writes float16 deltas against the installed MiniLM (rag.reference), the training logs, and a
MANIFEST.json with the command, the commit, the hardware, each stage's time and peak memory, and every
file's SHA-256; the folder is built beside the target and swapped in, so a crash leaves the old one whole.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from rag.replication.provenance import ROOT, git_commit, hardware
from rag.replication.training import is_finished, last_checkpoint, train_run

STAGES = {
    "reader": ["experiment=miniwiki_reference_reader"],
    "reader_full": ["experiment=miniwiki_reference_reader_full", "init_from={reader}"],
    "rag": ["experiment=miniwiki_reference_rag", "init_from={reader_full}"],
    "closed_book_reader": [
        "experiment=miniwiki_reference_reader",
        "retriever=none",
        "name=miniwiki_reference_closed_book_reader",
    ],
    "closed_book_reader_full": [
        "experiment=miniwiki_reference_reader_full",
        "retriever=none",
        "name=miniwiki_reference_closed_book_reader_full",
        "init_from={closed_book_reader}",
    ],
    "closed_book": [
        "experiment=miniwiki_reference_rag",
        "retriever=none",
        "name=miniwiki_reference_closed_book",
        "init_from={closed_book_reader_full}",
    ],
}


#: --continue-from: the reference-model folder each reader stage starts from
CONTINUE = {"reader": "rag", "closed_book_reader": "closed_book"}


def log(message: str) -> None:
    print(f"[train_reference] {message}", file=sys.stderr, flush=True)


def stage_dir(out: Path, stage: str) -> Path:
    return out / stage


def last_ckpt(out: Path, stage: str) -> Path:
    return last_checkpoint(stage_dir(out, stage))


def run_stage(out: Path, stage: str, extra: list[str], continue_from: Path | None = None) -> None:
    overrides = [o.format(**{s: last_ckpt(out, s) for s in STAGES}) for o in STAGES[stage]]
    if continue_from is not None and stage in CONTINUE:
        # a new session goes on from the shipped reference: the readers start from its weights
        overrides.append(f"init_from={continue_from / CONTINUE[stage]}")
    if not is_finished(stage_dir(out, stage)):
        for o in overrides:
            if o.startswith("init_from=") and not Path(o.split("=", 1)[1]).exists():
                raise SystemExit(
                    f"stage {stage} starts from {o.split('=', 1)[1]}, which does not exist: run its stage first"
                )
    train_run(stage_dir(out, stage), [*overrides, *extra], name=stage, log=log)


def export(out: Path, target: Path, command: str, continue_from: Path | None = None) -> dict:
    from rag.build import load_checkpoint
    from rag.generation.generator import save_delta
    from rag.reference import save_encoder_delta, write_manifest
    from rag.retrieval.encoders import load_query_encoder

    for stage in ("rag", "closed_book"):
        if not (stage_dir(out, stage) / "metrics.json").is_file():
            raise SystemExit(f"stage {stage} has not finished (no {stage_dir(out, stage) / 'metrics.json'})")
    commit = git_commit()  # before the export folder exists beside the code
    tmp = target.parent / f".{target.name}.export"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stages = {}
    for kind in ("rag", "closed_book"):
        module, cfg = load_checkpoint(last_ckpt(out, kind))
        gen = save_delta(module.model.generator, tmp / kind / "generator")
        log(f"{kind}: generator delta {gen['n_params'] / 1e6:.2f}M parameters")
        if module.model.query_encoder is not None:
            base = load_query_encoder(cfg.query_encoder.model_name_or_path)
            enc = save_encoder_delta(module.model.query_encoder, base, tmp / kind / "query_encoder")
            log(f"{kind}: query encoder delta {enc['n_params'] / 1e6:.2f}M parameters")
    for stage in STAGES:
        folder = stage_dir(out, stage)
        metrics_file = folder / "metrics.json"
        if not metrics_file.is_file():
            continue
        (tmp / "logs" / stage).mkdir(parents=True, exist_ok=True)
        shutil.copy(metrics_file, tmp / "logs" / stage / "metrics.json")
        csvs = sorted((folder / "csv").glob("version_*/metrics.csv"))
        for i, f in enumerate(csvs):
            shutil.copy(f, tmp / "logs" / stage / f"metrics-{i}.csv")
        config = folder / ".hydra" / "config.yaml"
        if config.is_file():
            shutil.copy(config, tmp / "logs" / stage / "config.yaml")
        summary = json.loads(metrics_file.read_text())
        stages[stage] = {
            "overrides": STAGES[stage],
            "global_step": summary.get("global_step"),
            "val": summary.get("val"),
            "wall_seconds": summary.get("wall_seconds"),
            "peak_rss_mb": summary.get("peak_rss_mb"),
        }
    record = {
        "command": command,
        "commit": commit,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "stages": stages,
    }
    if continue_from is not None:
        # the earlier reference this one continued from, with its own history
        record["continued_from"] = {
            k: v for k, v in json.loads((continue_from / "MANIFEST.json").read_text()).items() if k != "files"
        }
    write_manifest(tmp, record)
    if target.exists():
        old = target.parent / f".{target.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    manifest = json.loads((target / "MANIFEST.json").read_text())
    log(f"exported to {target}: {manifest['total_bytes'] / 1e6:.1f} MB")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "reference", help="stage run folders")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--export-to", type=Path, default=ROOT / "rag" / "reference_weights")
    parser.add_argument(
        "--restart",
        nargs="+",
        choices=list(STAGES),
        default=[],
        help="delete these stages' folders first (e.g. rag after continuing the reader it starts from)",
    )
    parser.add_argument(
        "--continue-from",
        type=Path,
        default=None,
        help="a reference folder (e.g. rag/reference_weights) the reader stages start from: train further "
        "in a new session (copy it aside first if it is also the export target)",
    )
    parser.add_argument("--no-export", action="store_true", help="train only")
    parser.add_argument("--export-only", action="store_true", help="skip training, export finished stages")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every stage (after --)")
    args = parser.parse_args()
    command = "python scripts/train_reference.py " + " ".join(sys.argv[1:])
    out = args.out.resolve()
    for stage in args.restart:
        if stage_dir(out, stage).exists():
            log(f"{stage}: --restart, removing {stage_dir(out, stage)}")
            shutil.rmtree(stage_dir(out, stage))
    if not args.export_only:
        for stage in args.stages:
            run_stage(out, stage, args.overrides, args.continue_from)
    if not args.no_export and all(
        (stage_dir(out, s) / "metrics.json").is_file() for s in ("rag", "closed_book")
    ):
        export(out, args.export_to.resolve(), command.strip(), args.continue_from)
    elif not args.no_export:
        log("not exported: stages rag and closed_book must both finish first")


if __name__ == "__main__":
    main()
