#!/usr/bin/env python
"""Build the embedded mini-wiki (rag/data/miniwiki/) from the real data in ../shared/data.

    python scripts/build_miniwiki.py --data-dir ../shared/data            # (re)build in place
    python scripts/build_miniwiki.py --data-dir ../shared/data --check    # rebuild in a temp dir, compare

The output is deterministic: the same sources give byte-identical files (gzip without name or timestamp,
fixed orders, fixed splits). It writes corpus.jsonl.gz, {squad_open,nq_gold}.{train,dev,test}.jsonl.gz,
SHA256SUMS and DATA.md (provenance, licences, counts, checksums).
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from rag.data.corpus import read_passages, split_into_passages, write_passages
from rag.data.miniwiki import CHECKSUMS_FILE, DATASETS, MINIWIKI_DIR, SPLITS, sha256_file
from rag.data.qa import read_questions, write_questions
from rag.types import Passage, Question

N_WORDS = 100  # paper §2.2: 100-word passages, no overlap

# Sources (paths relative to --data-dir) with the provenance of ../shared/data/README.md.
SOURCES = {
    "squad_passages": "squad_open/passages.jsonl",
    "squad_questions": "squad_open/questions.jsonl",
    "nq_gold": "nq_gold/nq-open-oracle.jsonl.gz",
    "wiki18": "wiki_sample/flashrag_wiki18_sample_data.jsonl",
}

# SQuAD-open is split by article so that no paragraph (and no article) is in two splits. 30/5/5 of the 40
# articles; dev and test mix topics (history, science, places, institutions) and hold ~10% of questions each.
SQUAD_DEV_ARTICLES = (
    "Black_Death",
    "Computational_complexity_theory",
    "Genghis_Khan",
    "Packet_switching",
    "Victoria_(Australia)",
)
SQUAD_TEST_ARTICLES = (
    "Amazon_rainforest",
    "Harvard_University",
    "Oxygen",
    "Scottish_Parliament",
    "Steam_engine",
)


def squad_split(article: str, dev_articles=SQUAD_DEV_ARTICLES, test_articles=SQUAD_TEST_ARTICLES) -> str:
    if article in dev_articles:
        return "dev"
    if article in test_articles:
        return "test"
    return "train"


def gold_pieces(pieces: list[Passage], answers: tuple[str, ...]) -> tuple[list[str], bool]:
    """Ids of the pieces of a paragraph that contain an answer string, and whether none did (an answer
    straddling a piece boundary): then every piece of the paragraph is gold."""
    gold = [p.id for p in pieces if any(a in p.text for a in answers)]
    if gold:
        return gold, False
    return [p.id for p in pieces], True


def nq_split(question: str) -> str:
    """80/10/10 by a fixed hash of the question text (stable across machines and Python versions)."""
    bucket = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 10
    return "dev" if bucket == 8 else "test" if bucket == 9 else "train"


def check_sources(data_dir: Path) -> dict[str, str]:
    """SHA-256 of each source file, checked against the data folder's SHA256SUMS."""
    sums_path = data_dir / "SHA256SUMS"
    if not sums_path.is_file():
        sys.exit(f"error: {sums_path} not found; --data-dir must be the shared data folder (../shared/data)")
    recorded = {}
    for line in sums_path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            recorded[name.lstrip("*").removeprefix("./")] = digest
    sums = {}
    for rel in SOURCES.values():
        path = data_dir / rel
        if not path.is_file():
            sys.exit(f"error: source file {path} not found")
        sums[rel] = sha256_file(path)
        if recorded.get(rel) != sums[rel]:
            sys.exit(
                f"error: {path} does not match {sums_path}; the sources changed, check before rebuilding"
            )
    return sums


def build(
    data_dir: Path, dev_articles=SQUAD_DEV_ARTICLES, test_articles=SQUAD_TEST_ARTICLES
) -> tuple[list[Passage], dict[tuple[str, str], list[Question]], dict]:
    stats: dict = {}
    steps = tqdm(total=4, desc="mini-wiki", unit=" step")

    # SQuAD paragraphs -> <=100-word passages; a question's gold passages are the pieces holding an answer.
    paragraphs = read_passages(data_dir / SOURCES["squad_passages"], format="jsonl")
    pieces_of: dict[str, list[Passage]] = {}
    squad_passages = []
    for p in paragraphs:
        title = p.title.replace("_", " ")
        pieces = [
            Passage(id=f"squad:{p.id}:{i}", title=title, text=t)
            for i, t in enumerate(split_into_passages(title, p.text, N_WORDS))
        ]
        pieces_of[p.id] = pieces
        squad_passages += pieces
    article_of = {p.id: p.title for p in paragraphs}
    unknown = sorted((set(dev_articles) | set(test_articles)) - set(article_of.values()))
    if unknown:
        sys.exit(f"error: split lists name articles not in the source: {unknown}")
    stats["squad_paragraphs"] = len(paragraphs)
    stats["dev_articles"], stats["test_articles"] = tuple(dev_articles), tuple(test_articles)
    stats["squad_paragraphs_split"] = sum(len(v) > 1 for v in pieces_of.values())
    steps.update()

    questions: dict[tuple[str, str], list[Question]] = defaultdict(list)
    n_straddle = 0
    articles: dict[str, set[str]] = defaultdict(set)
    for q in read_questions(data_dir / SOURCES["squad_questions"], format="squad_open"):
        (paragraph,) = q.gold_passage_ids
        gold, straddles = gold_pieces(pieces_of[paragraph], q.answers)
        n_straddle += straddles
        split = squad_split(article_of[paragraph], dev_articles, test_articles)
        articles[split].add(article_of[paragraph])
        questions["squad_open", split].append(replace(q, gold_passage_ids=tuple(gold)))
    stats["squad_answer_straddles"] = n_straddle
    steps.update()

    # NQ gold passages (identical ones merged by the reader) and their questions; ids already match.
    nq_path = data_dir / SOURCES["nq_gold"]
    nq_passages = read_passages(nq_path, format="nq_gold")
    nq_text = {p.id: p.text for p in nq_passages}
    n_nq_answer_in_gold = 0
    n_nq_questions = 0
    for q in read_questions(nq_path, format="nq_gold"):
        n_nq_questions += 1
        n_nq_answer_in_gold += any(a in nq_text[g] for g in q.gold_passage_ids for a in q.answers)
        questions["nq_gold", nq_split(q.question)].append(q)
    stats["nq_questions"] = n_nq_questions
    stats["nq_answer_in_gold"] = n_nq_answer_in_gold
    stats["nq_over_100_words"] = sum(len(p.text.split()) > N_WORDS for p in nq_passages)
    stats["nq_max_words"] = max(len(p.text.split()) for p in nq_passages)
    steps.update()

    # wiki18 distractors. The FlashRAG export kept the TSV's doubled quotes ("" for ") in some passages;
    # undo that one escaping so the text reads as Wikipedia wrote it.
    wiki_passages = []
    n_unescaped = 0
    for p in read_passages(data_dir / SOURCES["wiki18"], format="jsonl_contents"):
        text = p.text.replace('""', '"')
        n_unescaped += text != p.text
        wiki_passages.append(Passage(id=f"wiki18:{p.id}", title=p.title.replace('""', '"'), text=text))
    stats["wiki18_unescaped"] = n_unescaped
    steps.update()
    steps.close()

    corpus = squad_passages + nq_passages + wiki_passages
    ids = [p.id for p in corpus]
    assert len(set(ids)) == len(ids), "passage ids must be unique"
    texts = Counter((p.title, p.text) for p in corpus)
    stats["duplicate_texts_across_sources"] = sum(n - 1 for n in texts.values() if n > 1)
    stats["passages"] = Counter(p.id.split(":", 1)[0] for p in corpus)
    stats["max_words"] = {
        src: max(len(p.text.split()) for p in ps)
        for src, ps in (("squad", squad_passages), ("nq", nq_passages), ("wiki18", wiki_passages))
    }
    stats["articles"] = {split: len(articles[split]) for split in SPLITS}
    return corpus, questions, stats


def write_all(out: Path, corpus, questions, stats, source_sums: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files = {"corpus.jsonl.gz": write_passages(out / "corpus.jsonl.gz", corpus)}
    for dataset in DATASETS:
        for split in SPLITS:
            name = f"{dataset}.{split}.jsonl.gz"
            files[name] = write_questions(out / name, questions[dataset, split])
    sums = {name: sha256_file(path) for name, path in files.items()}
    (out / CHECKSUMS_FILE).write_text("".join(f"{d}  {n}\n" for n, d in sums.items()), encoding="utf-8")
    (out / "DATA.md").write_text(data_md(corpus, questions, stats, sums, source_sums), encoding="utf-8")


def data_md(corpus, questions, stats, sums, source_sums) -> str:
    n = stats["passages"]
    q_rows = "\n".join(
        f"| `{d}` | "
        + " | ".join(f"{len(questions[d, s]):,}" for s in SPLITS)
        + f" | {sum(len(questions[d, s]) for s in SPLITS):,} |"
        for d in DATASETS
    )
    sum_rows = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in sums.items())
    src_rows = "\n".join(f"| `{rel}` | `{digest}` |" for rel, digest in source_sums.items())
    return f"""# The mini-wiki: provenance, licences, counts

The default corpus and question sets of `rag`, built from real public data by

```bash
python scripts/build_miniwiki.py --data-dir ../shared/data
```

(deterministic: rerunning gives byte-identical files; `--check` rebuilds in a temporary folder and compares).
Loading any file checks its SHA-256 against `SHA256SUMS`.

## Licences

The texts are Wikipedia text under **CC BY-SA** and the question sets keep their own licences: SQuAD
**CC BY-SA 4.0**, Natural Questions **CC BY-SA 3.0**. These data files are therefore shared under those
CC BY-SA terms (attribution: the Wikipedia authors, Rajpurkar et al. 2016 for SQuAD, Kwiatkowski et al. 2019
and Lee et al. 2019 for NQ / NQ-open, Karpukhin et al. 2020 for the DPR 2018 passages); the project's code
is Apache-2.0.

## Sources

| used for | file (in the shared data folder) | source (repository @ commit : path) | licence |
|---|---|---|---|
| SQuAD passages | `{SOURCES["squad_passages"]}` | SQuAD v1.1 dev paragraphs, 40 of its 48 articles: rajpurkar/SQuAD-explorer @ e0c66cfe : `explore/1.1/dev/*.html`, parsed to JSONL | CC BY-SA 4.0 (SQuAD) |
| `squad_open` questions | `{SOURCES["squad_questions"]}` | same | CC BY-SA 4.0 |
| NQ passages and `nq_gold` questions | `{SOURCES["nq_gold"]}` | NQ-open dev with its gold passage of DPR's Dec-2018 Wikipedia dump: nelson-liu/lost-in-the-middle @ 29b8a6d0 : `qa_data/nq-open-oracle.jsonl.gz` | repo MIT; NQ data CC BY-SA 3.0; Wikipedia text CC BY-SA |
| wiki18 distractors | `{SOURCES["wiki18"]}` | 1,000 random passages of DPR's Dec-2018 Wikipedia dump: RUC-NLPIR/FlashRAG @ adb2a8bc : `examples/quick_start/indexes/sample_data.jsonl` | repo MIT; Wikipedia text CC BY-SA |

Source checksums (SHA-256, as in the shared folder's `SHA256SUMS`):

| source file | SHA-256 |
|---|---|
{src_rows}

## Files

- `corpus.jsonl.gz`: `{{"id", "title", "text"}}` per line (`rag.data.miniwiki.load_corpus()`), in the order
  SQuAD, NQ, wiki18. Ids name the source, so experiments can drop or keep passages by source:
  - `squad:<article>#<paragraph>:<piece>`: a SQuAD paragraph split into pieces of at most {N_WORDS} words, no
    overlap (paper §2.2), each the exact substring of the paragraph; the title is the article name with
    underscores turned into spaces.
  - `nq:<first 16 hex digits of SHA-256(title + "\\n" + text)>`: an NQ-open gold passage, kept whole as
    published (the gold labels refer to it); identical gold passages of different questions are one passage.
  - `wiki18:<id>`: a distractor passage; the title is the first line of FlashRAG's `contents` without its
    quotes. The export left CSV-doubled quotes (`""`) in {stats["wiki18_unescaped"]} passages; they are undone to `"`.
- `<dataset>.<split>.jsonl.gz`: `{{"id", "question", "answers", "gold_passage_ids", "answers_are_regex"}}` per line
  (`rag.data.miniwiki.load_questions(dataset, split)`). Gold ids name passages of this corpus.
  - `squad_open`: split by article ({stats["articles"]["train"]}/{stats["articles"]["dev"]}/{stats["articles"]["test"]} articles, lists fixed in the build script; no article in two splits);
    dev: {", ".join(stats["dev_articles"])}; test: {", ".join(stats["test_articles"])}. Gold passages are the
    pieces of the question's paragraph that contain an answer string; when the answer straddles a piece
    boundary (no answer string lies within one piece: {stats["squad_answer_straddles"]} questions) all pieces of the paragraph are gold. SQuAD v1.1 has no unanswerable
    questions; any marked `is_impossible` would be left out. Duplicate answer strings are merged.
  - `nq_gold`: split 80/10/10 by `int(SHA-256(question)[:8], 16) % 10` (0-7 train, 8 dev, 9 test); ids are
    `nq_gold:<first 16 hex digits of SHA-256(question)>`; the gold id is the question's NQ passage.

## Counts

| passages | count | max words |
|---|---:|---:|
| `squad` ({stats["squad_paragraphs"]:,} paragraphs, {stats["squad_paragraphs_split"]:,} of them split) | {n["squad"]:,} | {stats["max_words"]["squad"]} |
| `nq` (the gold passages of {stats["nq_questions"]:,} questions, identical ones merged) | {n["nq"]:,} | {stats["max_words"]["nq"]} |
| `wiki18` | {n["wiki18"]:,} | {stats["max_words"]["wiki18"]} |
| total | {len(corpus):,} | |

{stats["nq_over_100_words"]} NQ gold passages are longer than {N_WORDS} words (up to {stats["nq_max_words"]}): they are kept
whole because they are the passages the NQ gold labels name. {stats["duplicate_texts_across_sources"]} passages repeat the title and
text of another passage.

| questions | train | dev | test | total |
|---|---:|---:|---:|---:|
{q_rows}

An answer string occurs in a gold passage for {stats["nq_answer_in_gold"]:,} of {stats["nq_questions"]:,} NQ questions and for all
SQuAD questions but the {stats["squad_answer_straddles"]} whose answers straddle a piece boundary.

## Checksums (SHA-256; also in `SHA256SUMS`)

| file | SHA-256 |
|---|---|
{sum_rows}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir", type=Path, required=True, help="the shared data folder (../shared/data)"
    )
    parser.add_argument(
        "--out", type=Path, default=MINIWIKI_DIR, help="output folder (default: the package's)"
    )
    parser.add_argument(
        "--check", action="store_true", help="rebuild in a temp folder and compare with --out"
    )
    args = parser.parse_args(argv)

    source_sums = check_sources(args.data_dir)
    corpus, questions, stats = build(args.data_dir)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            write_all(Path(tmp), corpus, questions, stats, source_sums)
            names = sorted(p.name for p in Path(tmp).iterdir())
            _, mismatch, errors = filecmp.cmpfiles(Path(tmp), args.out, names, shallow=False)
        if mismatch or errors:
            print(f"mini-wiki in {args.out} differs from a fresh build: {mismatch + errors}")
            return 1
        print(f"mini-wiki in {args.out} is byte-identical to a fresh build ({len(names)} files)")
        return 0
    write_all(args.out, corpus, questions, stats, source_sums)

    n = stats["passages"]
    print(f"corpus: {len(corpus):,} passages (squad {n['squad']:,}, nq {n['nq']:,}, wiki18 {n['wiki18']:,})")
    for dataset in DATASETS:
        counts = ", ".join(f"{s} {len(questions[dataset, s]):,}" for s in SPLITS)
        print(f"{dataset}: {counts}")
    print(f"squad answers straddling a piece boundary: {stats['squad_answer_straddles']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
