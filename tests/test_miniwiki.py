"""The shipped mini-wiki: invariants, counts against DATA.md, checksums, and the build script on fixtures."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from rag.data import miniwiki
from rag.data.corpus import read_passages
from rag.data.errors import ChecksumError, DataFileNotFoundError
from rag.data.qa import read_questions
from rag.types import Passage

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def corpus():
    return miniwiki.load_corpus()


@pytest.fixture(scope="module")
def questions():
    return {(d, s): miniwiki.load_questions(d, s) for d in miniwiki.DATASETS for s in miniwiki.SPLITS}


def _article(passage_id: str) -> str:
    paragraph = passage_id.removeprefix("squad:").rsplit(":", 1)[0]
    return paragraph.rsplit("#", 1)[0]


def _data_md() -> str:
    return (miniwiki.MINIWIKI_DIR / "DATA.md").read_text(encoding="utf-8")


def _int(s: str) -> int:
    return int(s.replace(",", ""))


def test_the_files_live_inside_the_package():
    assert miniwiki.MINIWIKI_DIR == ROOT / "rag" / "data" / "miniwiki"
    assert miniwiki.corpus_path().is_file()
    assert miniwiki.questions_path("nq_gold", "dev").name == "nq_gold.dev.jsonl.gz"
    with pytest.raises(ValueError, match="unknown mini-wiki split 'validation'"):
        miniwiki.questions_path("nq_gold", "validation")
    with pytest.raises(ValueError, match="unknown mini-wiki dataset 'trivia'"):
        miniwiki.load_questions("trivia", "dev")


def test_passage_ids_are_unique_and_name_their_source(corpus):
    ids = [p.id for p in corpus]
    assert len(set(ids)) == len(ids)
    assert {miniwiki.passage_source(i) for i in ids} == {"squad", "nq", "wiki18"}
    assert all(p.title.strip() and p.text.strip() for p in corpus)
    assert all("_" not in p.title for p in corpus if p.id.startswith("squad:"))
    assert all(len(p.text.split()) <= 100 for p in corpus if not p.id.startswith("nq:"))


def test_counts_match_data_md(corpus, questions):
    md = _data_md()
    by_source = Counter(miniwiki.passage_source(p.id) for p in corpus)
    for source in miniwiki.SOURCES:
        row = re.search(rf"^\| `{source}` [^|]*\| ([\d,]+) \|", md, re.M)
        assert row, source
        assert _int(row.group(1)) == by_source[source]
    assert _int(re.search(r"^\| total \| ([\d,]+) \|", md, re.M).group(1)) == len(corpus)
    for dataset in miniwiki.DATASETS:
        cells = re.search(
            rf"^\| `{dataset}` \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|", md, re.M
        ).groups()
        counts = [len(questions[dataset, s]) for s in miniwiki.SPLITS]
        assert [_int(c) for c in cells] == counts + [sum(counts)]


def test_every_gold_id_exists_and_answers_are_in_gold_passages(corpus, questions):
    text = {p.id: p.text for p in corpus}
    for (dataset, split), qs in questions.items():
        assert qs, (dataset, split)
        for q in qs:
            assert q.gold_passage_ids and all(g in text for g in q.gold_passage_ids)
        found = sum(any(a in text[g] for g in q.gold_passage_ids for a in q.answers) for q in qs)
        # SQuAD answers that straddle a 100-word boundary are found in no single piece (39 of 8,763)
        assert found / len(qs) >= (1.0 if dataset == "nq_gold" else 0.99), (dataset, split)
    straddles = int(
        re.search(r"boundary \(no answer string lies within one piece: (\d+) questions\)", _data_md())[1]
    )
    missing = sum(
        not any(a in text[g] for g in q.gold_passage_ids for a in q.answers)
        for s in miniwiki.SPLITS
        for q in questions["squad_open", s]
    )
    assert missing == straddles


def test_squad_splits_share_no_article_and_gold_pieces_share_one_paragraph(questions):
    articles = {}
    for split in miniwiki.SPLITS:
        qs = questions["squad_open", split]
        articles[split] = {_article(g) for q in qs for g in q.gold_passage_ids}
        for q in qs:
            assert len({g.rsplit(":", 1)[0] for g in q.gold_passage_ids}) == 1
    assert not articles["train"] & articles["dev"]
    assert not articles["train"] & articles["test"]
    assert not articles["dev"] & articles["test"]
    assert [len(articles[s]) for s in miniwiki.SPLITS] == [30, 5, 5]


def test_nq_gold_split_follows_the_fixed_question_hash(questions):
    want = {0: "train", 1: "train", 2: "train", 3: "train", 4: "train", 5: "train", 6: "train", 7: "train"}
    want |= {8: "dev", 9: "test"}
    all_ids = []
    for split in miniwiki.SPLITS:
        for q in questions["nq_gold", split]:
            digest = hashlib.sha256(q.question.encode()).hexdigest()
            assert want[int(digest[:8], 16) % 10] == split
            assert q.id == f"nq_gold:{digest[:16]}"
            assert all(g.startswith("nq:") for g in q.gold_passage_ids)
            all_ids.append(q.id)
    assert len(set(all_ids)) == len(all_ids)


def test_checksums_are_recorded_in_both_places_and_match_the_files():
    recorded = miniwiki.recorded_checksums()
    data_files = {p.name for p in miniwiki.MINIWIKI_DIR.glob("*.jsonl.gz")}
    assert (
        set(recorded)
        == data_files
        == {"corpus.jsonl.gz"}
        | {miniwiki.questions_path(d, s).name for d in miniwiki.DATASETS for s in miniwiki.SPLITS}
    )
    for name, digest in recorded.items():
        assert hashlib.sha256((miniwiki.MINIWIKI_DIR / name).read_bytes()).hexdigest() == digest
    in_md = dict(re.findall(r"^\| `([\w.]+\.jsonl\.gz)` \| `([0-9a-f]{64})` \|", _data_md(), re.M))
    assert in_md == recorded


def test_a_corrupt_or_missing_file_is_refused_with_how_to_rebuild(tmp_path, monkeypatch):
    for name in ("corpus.jsonl.gz", "SHA256SUMS"):
        shutil.copy(miniwiki.MINIWIKI_DIR / name, tmp_path / name)
    monkeypatch.setattr(miniwiki, "MINIWIKI_DIR", tmp_path)
    assert len(miniwiki.load_corpus()) > 0
    data = (tmp_path / "corpus.jsonl.gz").read_bytes()
    (tmp_path / "corpus.jsonl.gz").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ChecksumError, match=r"corpus.jsonl.gz: SHA-256 .* differs .*build_miniwiki.py"):
        miniwiki.load_corpus()
    with pytest.raises(DataFileNotFoundError, match=r"mini-wiki file not found: .*squad_open.dev.jsonl.gz"):
        miniwiki.load_questions("squad_open", "dev")


# ------------------------------------------------------------------------------------------------ build script


@pytest.fixture(scope="module")
def build_script():
    spec = importlib.util.spec_from_file_location("build_miniwiki", ROOT / "scripts" / "build_miniwiki.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gold_pieces_are_those_holding_an_answer_else_the_whole_paragraph(build_script):
    pieces = [
        Passage("p:0", "T", "The crisis began in October"),
        Passage("p:1", "T", "1973 and ended in 1974."),
    ]
    assert build_script.gold_pieces(pieces, ("1974",)) == (["p:1"], False)
    assert build_script.gold_pieces(pieces, ("October", "1974")) == (["p:0", "p:1"], False)
    assert build_script.gold_pieces(pieces, ("October 1973",)) == (["p:0", "p:1"], True)  # straddles


def test_the_build_is_deterministic_and_keeps_its_invariants_on_real_rows(build_script, tmp_path):
    data_dir = tmp_path / "data"
    sources = {
        "squad_passages": "squad_passages.jsonl",
        "squad_questions": "squad_questions.jsonl",
        "nq_gold": "nq-open-oracle.jsonl.gz",
        "wiki18": "wiki18_contents.jsonl",
    }
    lines = []
    for key, rel in build_script.SOURCES.items():
        (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / sources[key], data_dir / rel)
        lines.append(f"{hashlib.sha256((data_dir / rel).read_bytes()).hexdigest()}  ./{rel}\n")
    (data_dir / "SHA256SUMS").write_text("".join(lines))
    sums = build_script.check_sources(data_dir)
    outs = []
    for name in ("a", "b"):
        corpus, qs, stats = build_script.build(data_dir, ("Black_Death",), ("Amazon_rainforest",))
        build_script.write_all(tmp_path / name, corpus, qs, stats, sums)
        outs.append({p.name: p.read_bytes() for p in (tmp_path / name).iterdir()})
    assert outs[0] == outs[1]  # byte-identical, DATA.md and SHA256SUMS included

    out = tmp_path / "a"
    passages = read_passages(out / "corpus.jsonl.gz")
    paragraphs = read_passages(DATA / "squad_passages.jsonl")
    squad = [p for p in passages if p.id.startswith("squad:")]
    # each paragraph becomes ceil(words / 100) pieces whose words are the paragraph's words
    assert len(squad) == sum(-(-len(p.text.split()) // 100) for p in paragraphs)
    for p in paragraphs:
        mine = [q for q in squad if q.id.startswith(f"squad:{p.id}:")]
        assert [w for q in mine for w in q.text.split()] == p.text.split()
        assert all(q.title == p.title.replace("_", " ") for q in mine)
    assert sum(p.id.startswith("nq:") for p in passages) == 3  # 4 questions, one shared gold passage
    wiki = [p for p in passages if p.id.startswith("wiki18:")]
    assert [p.id for p in wiki] == ["wiki18:0", "wiki18:7", "wiki18:29", "wiki18:32"]
    assert not any('""' in p.text for p in wiki) and 'city of "Havn"' in wiki[3].text

    ids = {p.id for p in passages}
    split_of = {"Black_Death": "dev", "Amazon_rainforest": "test", "1973_oil_crisis": "train"}
    for split in miniwiki.SPLITS:
        squad_qs = read_questions(out / f"squad_open.{split}.jsonl.gz")
        assert squad_qs == qs["squad_open", split]
        assert {split_of[_article(g)] for q in squad_qs for g in q.gold_passage_ids} == {split}
    nq_qs = [q for s in miniwiki.SPLITS for q in qs["nq_gold", s]]
    assert len(nq_qs) == 4
    assert all(g in ids for (_, _), split_qs in qs.items() for q in split_qs for g in q.gold_passage_ids)
    oil = read_questions(out / "squad_open.train.jsonl.gz")
    assert oil[0].gold_passage_ids == ("squad:1973_oil_crisis#0:0",)  # "October 1973" lies in the first piece
    assert stats["squad_answer_straddles"] == 0
