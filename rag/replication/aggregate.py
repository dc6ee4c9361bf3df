"""The latest run of each study -> tables (markdown, CSV) and plots (PNG), and RESULTS.md (``rag-aggregate``).

For each study the newest ``result.json`` under ``runs/<study>/`` (or the ones given as ``extra``) is
copied to ``<out>/<study>.json`` without its predictions, and rendered as ``<study>.md`` and ``<study>.csv``
laid out like the paper's table, with the paper's numbers beside ours where the paper has them, and
``<study>.png`` (Figure 3-style curves for the sweeps, bars for the others). Where the run folder holds the
predictions, rival systems are also compared question by question (``rag.replication.paired``: discordant
questions and the exact McNemar p-value), so a gap can be told from noise. Every table names the command,
config and commit that made it. In ``RESULTS.md`` the text between ``<!-- study:<name> -->`` and
``<!-- /study:<name> -->`` is replaced by the study's table, so the document's numbers are always the runs'.
The command line is :mod:`rag.cli.aggregate`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import textwrap
from pathlib import Path

from rag.atomic import atomic_path, write_json_atomic, write_text_atomic
from rag.errors import RagError
from rag.replication.paired import paired_comparisons, paired_markdown
from rag.replication.paper import paper_numbers

log = logging.getLogger(__name__)


class NoResultsError(RagError, FileNotFoundError):
    """No ``result.json`` to aggregate: no study has been run into the folder given."""


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _sets(result: dict) -> list[str]:
    sets: list[str] = []
    for row in result["rows"]:
        for key in row:
            if key.endswith("/em") and key[:-3] not in sets:
                sets.append(key[:-3])
    return sets


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the study's table: one row per result row, in the layout of its kind."""
    kind, sets = result["kind"], _sets(result)
    paper = paper_numbers(result["study"])
    if kind == "sweep":
        head = ["system", "K", "EM", "F1", *(f"EM {s}" for s in sets), "answer recall@K", "seconds"]
        body = [
            [
                r["label"],
                str(r["n_docs"]),
                _pct(r["em"]),
                _pct(r["f1"]),
                *(_pct(r.get(f"{s}/em")) for s in sets),
                _pct(r.get("answer_recall")),
                f"{r['seconds']:.0f}",
            ]
            for r in result["rows"]
        ]
        return head, body
    if kind == "hotswap":
        head = [
            "system",
            "index",
            "passages",
            "EM",
            *(f"EM {s}" for s in sets),
            "answer recall@K",
            "gold recall@K",
        ]
        body = [
            [
                r["label"],
                r["index"],
                "; ".join(f"{k}: {v:,}" for k, v in r["index_passages"].items()),
                _pct(r["em"]),
                *(_pct(r.get(f"{s}/em")) for s in sets),
                _pct(r.get("answer_recall")),
                _pct(r.get("gold_recall")),
            ]
            for r in result["rows"]
        ]
        return head, body
    fastest = min((r["seconds"] for r in result["rows"]), default=0.0) or 1e-9
    head = [
        "system",
        "decoder",
        "K",
        "EM",
        "F1",
        *(f"EM {s}" for s in sets),
        "answer recall@K",
        "seconds",
        "q/s",
        "time vs fastest",
    ]
    if paper:
        head.append(paper["column"])
    body = []
    for r in result["rows"]:
        cells = [
            r["label"],
            r["decoder"],
            "-" if r["n_docs"] is None else str(r["n_docs"]),
            _pct(r["em"]),
            _pct(r["f1"]),
            *(_pct(r.get(f"{s}/em")) for s in sets),
            _pct(r.get("answer_recall")),
            f"{r['seconds']:.0f}",
            f"{r['questions_per_second']:.2f}",
            f"{r['seconds'] / fastest:.2f}x",
        ]
        if paper:
            value = paper["values"].get(r["label"])
            cells.append("-" if value is None else f"{value:.1f}")
        body.append(cells)
    return head, body


def _markdown_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def short_commit(commit: str) -> str:
    """The first 12 hex digits, keeping the ``+uncommitted`` mark."""
    commit = str(commit)
    return commit[:12] + ("+uncommitted" if commit.endswith("+uncommitted") else "")


def provenance_line(result: dict) -> str:
    hw = result.get("hardware") or {}
    n = sum(1 for _ in result["rows"]) and result["rows"][0].get("n")
    where = f"{hw.get('cpu_count', '?')}-core {hw.get('cpu', 'CPU')}" if not hw.get("cuda") else hw["cuda"]
    return (
        f"`{result['command']}` -- split {result['split']}"
        + (f" (first {result['limit']} per set)" if result.get("limit") else "")
        + f", {int(n) if n else '?'} questions; commit {short_commit(result['commit'])}; {where}; "
        f"{result['created']}; {result['wall_seconds'] / 60:.1f} min"
    )


def study_markdown(result: dict) -> str:
    """The study's table in markdown, under its title, with the command / commit / hardware that made it."""
    head, body = table_rows(result)
    paper = paper_numbers(result["study"])
    text = f"**{result['title']}** ({result['study']})\n\n" + _markdown_table(head, body)
    if paper:
        text += f"\nPaper column: {paper['source']}\n"
    paired = paired_markdown(result)
    if paired:
        text += "\n" + paired
    return text + "\nMade by " + provenance_line(result) + "\n"


def study_csv(result: dict) -> str:
    head, body = table_rows(result)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(head)
    writer.writerows(body)
    return out.getvalue()


def plot_study(result: dict, path: Path) -> Path | None:
    """Figure 3-style curves (EM and answer recall vs K) for sweeps, bars of EM for the other kinds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result["rows"]
    if not rows:
        return None
    if result["kind"] == "sweep":
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for label in dict.fromkeys(r["label"] for r in rows):
            mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["n_docs"])
            ks = [r["n_docs"] for r in mine]
            axes[0].plot(ks, [100 * r["em"] for r in mine], marker="o", label=label)
            axes[1].plot(ks, [100 * (r.get("answer_recall") or 0) for r in mine], marker="o", label=label)
        for ax, what in zip(axes, ("exact match", "answer recall@K")):
            ax.set_xscale("log")
            ax.set_xlabel("K retrieved documents (test time)")
            ax.set_ylabel(f"{what} (%)")
            ks = sorted({r["n_docs"] for r in rows})
            ax.set_xticks(ks, [str(k) for k in ks])
            top = max(
                100 * (r.get("answer_recall" if what.startswith("answer") else "em") or 0) for r in rows
            )
            ax.set_ylim(0, min(100.0, 1.15 * top + 1))  # from 0: small gaps look small
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4.5))
        labels = [r["label"] + (f"\n{r['index']}" if "index" in r else "") for r in rows]
        paper = paper_numbers(result["study"])
        published = [paper["values"].get(r["label"]) if paper else None for r in rows]
        x = np.arange(len(rows))
        width = 0.4 if any(v is not None for v in published) else 0.8
        offset = width / 2 if width < 0.8 else 0.0
        bars = ax.bar(x - offset, [100 * r["em"] for r in rows], width, color="tab:blue", label="this run")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        if width < 0.8:
            heights = [v if v is not None else 0.0 for v in published]
            theirs = ax.bar(x + offset, heights, width, color="0.75", hatch="//", label=paper["column"])
            ax.bar_label(theirs, labels=[f"{v:.1f}" if v is not None else "" for v in published], fontsize=7)
            ax.legend(fontsize=8)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("exact match (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("\n".join(textwrap.wrap(result["title"], 70)), fontsize=10)
    fig.text(0.01, 0.01, f"{result['command']}  @ {short_commit(result['commit'])}", fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    try:
        with atomic_path(path) as tmp:  # a temporary name without the suffix: say the format
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def latest_results(runs: Path) -> dict[str, Path]:
    """{study: newest result.json} under ``runs/<study>/<run>/``."""
    found: dict[str, tuple[str, Path]] = {}
    for path in sorted(Path(runs).glob("*/*/result.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning(f"skipped {path}: {err}")
            continue
        study = result.get("study")
        if study and (study not in found or result.get("created", "") >= found[study][0]):
            found[study] = (result.get("created", ""), path)
    return {study: path for study, (_, path) in found.items()}


def update_results_md(path: Path, sections: dict[str, str]) -> list[str]:
    """Replace each ``<!-- study:X -->...<!-- /study:X -->`` block of ``path``; returns the studies filled."""
    text = path.read_text()
    filled = []
    for study, body in sections.items():
        pattern = re.compile(
            rf"(<!-- study:{re.escape(study)} -->\n).*?(<!-- /study:{re.escape(study)} -->)", re.S
        )
        if pattern.search(text):
            text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
            filled.append(study)
    write_text_atomic(path, text)
    return filled


def aggregate(
    runs: Path, out: Path, results_md: Path | None = None, extra: list[Path] = ()
) -> dict[str, Path]:
    chosen = latest_results(runs) if Path(runs).is_dir() else {}
    for path in extra:
        chosen[json.loads(Path(path).read_text())["study"]] = Path(path)
    if not chosen:
        raise NoResultsError(f"no result.json under {runs}/<study>/<run>/: run rag-replicate study=... first")
    out.mkdir(parents=True, exist_ok=True)
    sections = {}
    for study, path in sorted(chosen.items()):
        result = json.loads(path.read_text())
        if "paired" not in result:
            try:
                result["paired"] = paired_comparisons(result, path.parent)
            except (FileNotFoundError, ValueError) as err:
                log.warning(f"{study}: no paired comparisons ({err})")
        write_json_atomic(out / f"{study}.json", result)
        markdown = study_markdown(result)
        write_text_atomic(out / f"{study}.md", markdown)
        write_text_atomic(out / f"{study}.csv", study_csv(result))
        png = plot_study(result, out / f"{study}.png")
        sections[study] = markdown + (
            f"\n![{study}]({png.relative_to(results_md.parent) if results_md else png})\n"
            if png and results_md
            else ""
        )
        log.info(f"{study}: {path} -> {out}/{study}.{{json,md,csv,png}}")
    if results_md is not None and results_md.is_file():
        filled = update_results_md(results_md, sections)
        log.info(f"{results_md}: tables of {', '.join(filled) or 'no study'} updated")
    return chosen
