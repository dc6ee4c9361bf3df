"""Paired comparisons of a study's systems on the same questions.

At the mini-wiki's scale one question is a quarter or half of an EM point, so a gap between two systems in a
table can be noise. Two systems that answered the same questions are compared question by question: the
questions only the first answers exactly, the questions only the second does, and the exact McNemar test
(a two-sided binomial test on those discordant questions, p = 0.5 under "no difference"). Questions both
systems get right or both get wrong carry no information about which is better.

Which systems are paired: when the study's rows carry ``meta`` (e.g. ``{head, retriever}``), the pairs whose
meta differ in exactly one key (one factor changed, the others held), restricted to the keys in the study's
``paired_by`` when it names some; otherwise every pair. In sweeps only rows at the same K are paired.
Predictions are read from the run folder (``predictions-<system>.jsonl``, ``predictions-<system>-k<K>.jsonl``
for sweeps); hot-swap studies are not paired (their rows are different indexes, not rival systems).
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

from rag.evaluation import read_predictions


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: P(a binomial(n, 1/2) count is as far from n/2 as observed)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a}, {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def load_correct(path: Path) -> dict[tuple, bool]:
    """{(dataset, index, id): exact match} of a predictions JSONL file."""
    return {p.key: bool(p.exact_match()) for p in read_predictions(path)}


def compare(a: dict[tuple, bool], b: dict[tuple, bool]) -> dict:
    """EM of each, the discordant counts and the McNemar p-value; both must cover the same questions."""
    if a.keys() != b.keys():
        raise ValueError(
            f"the two systems answered different questions ({len(a.keys() - b.keys())} only in the first, "
            f"{len(b.keys() - a.keys())} only in the second)"
        )
    only_a = sum(1 for k in a if a[k] and not b[k])
    only_b = sum(1 for k in a if b[k] and not a[k])
    n = len(a)
    return {
        "n": n,
        "em_a": sum(a.values()) / n if n else 0.0,
        "em_b": sum(b.values()) / n if n else 0.0,
        "only_a": only_a,
        "only_b": only_b,
        "p": mcnemar_exact(only_a, only_b),
    }


def choose_pairs(rows: list[dict], paired_by: list[str] | None = None) -> list[tuple[int, int, str | None]]:
    """(i, j, factor) for the rows to compare: one meta key apart (within ``paired_by`` if given), else all."""
    metas = [r.get("meta") or {} for r in rows]
    if not all(metas):
        return [(i, j, None) for i, j in combinations(range(len(rows)), 2)]
    pairs = []
    for i, j in combinations(range(len(rows)), 2):
        keys = set(metas[i]) | set(metas[j])
        differ = [k for k in sorted(keys) if metas[i].get(k) != metas[j].get(k)]
        if len(differ) == 1 and (not paired_by or differ[0] in paired_by):
            pairs.append((i, j, differ[0]))
    return pairs


def _prediction_file(run_dir: Path, kind: str, row: dict) -> Path:
    name = row["system"]
    return run_dir / (
        f"predictions-{name}-k{row['n_docs']}.jsonl" if kind == "sweep" else f"predictions-{name}.jsonl"
    )


def paired_comparisons(result: dict, run_dir: Path) -> list[dict]:
    """The study's paired comparisons from the predictions in ``run_dir``; [] when there is nothing to pair.

    Raises FileNotFoundError naming the missing predictions file when a row's predictions are not there.
    """
    kind = result["kind"]
    if kind not in ("systems", "sweep"):
        return []
    study_cfg = (result.get("config") or {}).get("study") or {}
    paired_by = list(study_cfg.get("paired_by") or []) or None
    groups: dict = {}
    for row in result["rows"]:
        groups.setdefault(row.get("n_docs") if kind == "sweep" else None, []).append(row)
    cache: dict[Path, dict] = {}

    def correct(row: dict) -> dict[tuple, bool]:
        path = _prediction_file(run_dir, kind, row)
        if path not in cache:
            if not path.is_file():
                raise FileNotFoundError(f"no predictions for {row['label']!r}: {path} is missing")
            cache[path] = load_correct(path)
        return cache[path]

    out = []
    for k, rows in groups.items():
        for i, j, factor in choose_pairs(rows, paired_by):
            a, b = rows[i], rows[j]
            out.append(
                {
                    "a": a["label"],
                    "b": b["label"],
                    "factor": factor,
                    "n_docs": k,
                    **compare(correct(a), correct(b)),
                }
            )
    return out


def format_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _cell(c: dict) -> str:
    return f"{100 * (c['em_a'] - c['em_b']):+.1f} ({c['only_a']}/{c['only_b']}, p={format_p(c['p'])})"


def paired_markdown(result: dict) -> str:
    """The paired comparisons as a markdown table ('' when there are none)."""
    pairs = result.get("paired") or []
    if not pairs:
        return ""
    intro = (
        "Paired on the same questions: EM of A minus EM of B, the questions only A / only B answers exactly, "
        "and the exact McNemar p-value (small p: the gap is unlikely to be chance).\n\n"
    )
    if result["kind"] == "sweep":
        ks = sorted({c["n_docs"] for c in pairs})
        by_pair: dict[tuple, dict] = {}
        for c in pairs:
            by_pair.setdefault((c["a"], c["b"]), {})[c["n_docs"]] = c
        lines = ["| A | B | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|---|" + "---:|" * len(ks)]
        for (a, b), cells in by_pair.items():
            lines.append(
                f"| {a} | {b} | " + " | ".join(_cell(cells[k]) if k in cells else "-" for k in ks) + " |"
            )
    else:
        lines = [
            "| A | B | EM A | EM B | A - B | only A right | only B right | p |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in pairs:
            lines.append(
                f"| {c['a']} | {c['b']} | {100 * c['em_a']:.1f} | {100 * c['em_b']:.1f} | "
                f"{100 * (c['em_a'] - c['em_b']):+.1f} | {c['only_a']} | {c['only_b']} | {format_p(c['p'])} |"
            )
    return intro + "\n".join(lines) + "\n"
