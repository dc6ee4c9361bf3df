"""RagDataModule: mixing sets, seeded order per epoch, target answer choice, limits, clear errors; real rows."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from rag.data.datamodule import DataModuleError, EpochSampler, RagDataModule, corpus_slice
from rag.data.miniwiki import load_questions
from rag.data.qa import read_questions
from rag.types import Passage, Question

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def sets():
    """Real rows: 12 SQuAD-open train questions of the mini-wiki and the NQ-open dev sample of the fixtures."""
    return {
        "squad_open": load_questions("squad_open", "train")[:12],
        "nq": read_questions(FIXTURES / "NQ-open.dev.jsonl"),
    }


def epoch_batches(dm: RagDataModule, epoch: int) -> list[list[tuple[str, int, str | None]]]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [list(zip(b.datasets, b.indices, b.targets)) for b in loader]


def test_each_epoch_visits_every_question_of_every_set_once(sets):
    dm = RagDataModule(train=sets, batch_size=4, seed=3)
    rows = [row for batch in epoch_batches(dm, 0) for row in batch]
    assert Counter((name, i) for name, i, _ in rows) == Counter(
        (name, i) for name, qs in sets.items() for i in range(len(qs))
    )
    batch = next(iter(dm.train_dataloader()))
    assert all(isinstance(q, Question) for q in batch.questions)  # the model tokenises, not the loader
    for q, name, i in zip(batch.questions, batch.datasets, batch.indices):
        assert q is sets[name][i]


def test_order_is_a_function_of_seed_and_epoch(sets):
    a = RagDataModule(train=sets, batch_size=4, seed=3)
    b = RagDataModule(train=sets, batch_size=4, seed=3)
    assert epoch_batches(a, 0) == epoch_batches(b, 0)
    assert epoch_batches(a, 1) == epoch_batches(b, 1)
    assert epoch_batches(a, 0) != epoch_batches(a, 1)
    assert epoch_batches(a, 0) != epoch_batches(RagDataModule(train=sets, batch_size=4, seed=4), 0)
    # a resumed run (a new loader told the epoch) sees the same order as an uninterrupted one
    assert epoch_batches(RagDataModule(train=sets, batch_size=4, seed=3), 1) == epoch_batches(a, 1)
    unshuffled = RagDataModule(train=sets, batch_size=4, shuffle=False)
    assert [i for batch in epoch_batches(unshuffled, 5) for _, i, _ in batch][:12] == list(range(12))


def test_evaluation_loaders_keep_file_order(sets):
    dm = RagDataModule(val=sets, eval_batch_size=5, batch_size=2)
    rows = [(name, i) for b in dm.val_dataloader() for name, i in zip(b.datasets, b.indices)]
    assert rows == [(name, i) for name, qs in sets.items() for i in range(len(qs))]
    assert len(next(iter(dm.val_dataloader()))) == 5
    assert dm.set_names("val") == ["squad_open", "nq"]


def test_target_answer_choice(sets):
    multi = Question("m", "which?", ("the longer answer", "short", "medium one"))
    one = {"x": [multi]}
    first = RagDataModule(train=one).sets["train"]
    assert first[(0, 0)][3] == "the longer answer" and first[(0, 7)][3] == "the longer answer"
    assert RagDataModule(train=one, answer_choice="shortest").sets["train"][0][3] == "short"
    rand = RagDataModule(train=one, answer_choice="random", seed=5).sets["train"]
    draws = [rand[(0, epoch)][3] for epoch in range(30)]
    # the draw is random.Random("seed:epoch:row").choice, the same on every call and in every process
    assert draws == [random.Random(f"5:{e}:0").choice(multi.answers) for e in range(30)]
    assert set(draws) == set(multi.answers)
    # evaluation targets are the first answer; regex answers have none
    regex = Question("r", "when?", ("19[0-9]{2}",), answers_are_regex=True)
    assert RagDataModule(test={"trec": [regex]}).sets["test"][0][3] is None


def test_limits_apply_to_each_set(sets):
    dm = RagDataModule(train=sets, val=sets, limit_train=2, limit_val=3)
    assert Counter(name for name, _, _ in dm.sets["train"].rows) == {"squad_open": 2, "nq": 2}
    assert [q.id for q in dm.questions("val")] == [q.id for q in sets["squad_open"][:3]] + [
        q.id for q in sets["nq"][:3]
    ]


def test_sampler_yields_rows_with_their_epoch():
    sampler = EpochSampler(5, shuffle=True, seed=1)
    sampler.set_epoch(4)
    items = list(sampler)
    assert sorted(i for i, _ in items) == list(range(5)) and {e for _, e in items} == {4}


def test_bad_sets_and_options_are_refused_with_the_fix(sets):
    regex = Question("r", "when?", ("19[0-9]{2}",), answers_are_regex=True)
    with pytest.raises(DataModuleError, match="regular-expression answers.*val/test only"):
        RagDataModule(train={"trec": [regex]})
    with pytest.raises(DataModuleError, match="answer_choice must be one of"):
        RagDataModule(train=sets, answer_choice="longest")
    with pytest.raises(DataModuleError, match="not a list of Question"):
        RagDataModule(train={"nq": "NQ-open.dev.jsonl"})
    with pytest.raises(DataModuleError, match="limit_val must be a positive integer"):
        RagDataModule(val=sets, limit_val=0)
    with pytest.raises(DataModuleError, match="batch_size must be a positive integer"):
        RagDataModule(train=sets, batch_size=0)
    with pytest.raises(DataModuleError, match="the test split has no questions"):
        RagDataModule(train=sets).test_dataloader()


def test_corpus_slice():
    passages = [Passage(str(i), "t", f"text {i}") for i in range(10)]
    assert [p.id for p in corpus_slice(passages, 3, start=2)] == ["2", "3", "4"]
    with pytest.raises(DataModuleError, match="nothing left"):
        corpus_slice(passages, 3, start=10)
