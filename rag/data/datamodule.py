"""The question sets of a run as a LightningDataModule: batches of :class:`~rag.types.Question` records.

Each split (train / val / test) is a mapping ``name -> list of Question`` (the mini-wiki's
``load_questions(dataset, split)``, or any file through ``rag.data.qa.read_questions``); several sets are
mixed into one split (e.g. ``squad_open`` + ``nq_gold``). Batches are :class:`QABatch` records holding the
questions themselves, the answer trained on, and where each question came from: tokenisation happens in the
model, which knows its tokenizers.

Determinism: the training order is a permutation drawn from ``(seed, epoch)``; Lightning tells the sampler
the epoch (``set_epoch``), so a resumed run draws the same orders as an uninterrupted one.

Target answer (``answer_choice``): a question may have several gold answers (NQ-open lists alternatives,
SQuAD lists one per annotator); one of them is the training target:

- ``first`` (default): the first gold answer, every epoch -- the single target per question that
  transformers' ``finetune_rag`` reads from its ``.target`` files;
- ``random``: one drawn per question and epoch from ``(seed, epoch, question)``;
- ``shortest``: the shortest (fewest characters; the first on ties).

Evaluation always scores against all gold answers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from rag.data.errors import DataError
from rag.types import Passage, Question

__all__ = [
    "ANSWER_CHOICES",
    "EpochSampler",
    "QABatch",
    "QuestionSet",
    "RagDataModule",
    "corpus_slice",
]

ANSWER_CHOICES = ("first", "random", "shortest")
SPLITS = ("train", "val", "test")


class DataModuleError(DataError, ValueError):
    """A data module configured with options or question sets it cannot use."""


@dataclass
class QABatch:
    """B questions, the answer each is trained on, and which set (and row of it) each came from."""

    questions: list[Question]
    targets: list[str | None]  # None where answers are regular expressions (no string to train on)
    datasets: list[str]
    indices: list[int]  # row of the question within its set

    def __len__(self) -> int:
        return len(self.questions)


class QuestionSet(Dataset):
    """Several named question lists mixed into one indexable set (in the order given).

    ``__getitem__`` takes an index or ``(index, epoch)`` (what :class:`EpochSampler` yields); the epoch
    only matters to ``answer_choice="random"``.
    """

    def __init__(
        self,
        sets: Mapping[str, Sequence[Question]],
        answer_choice: str = "first",
        seed: int = 0,
        limit: int | None = None,
        split: str = "train",
    ) -> None:
        if answer_choice not in ANSWER_CHOICES:
            raise DataModuleError(f"answer_choice must be one of {ANSWER_CHOICES}, got {answer_choice!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise DataModuleError(f"limit_{split} must be a positive integer or null, got {limit!r}")
        self.answer_choice = answer_choice
        self.seed = int(seed)
        self.rows: list[tuple[str, int, Question]] = []
        for name, questions in sets.items():
            if questions is None:
                continue  # a set switched off in the config (e.g. data.train.cloze=null)
            if isinstance(questions, (str, Question)) or not isinstance(questions, Sequence):
                raise DataModuleError(
                    f"{split} set {name!r} is a {type(questions).__name__}, not a list of Question: point it at a "
                    "loader such as rag.data.miniwiki.load_questions or rag.data.qa.read_questions"
                )
            for i, q in enumerate(questions[:limit] if limit else questions):
                if not isinstance(q, Question):
                    raise DataModuleError(
                        f"{split} set {name!r} row {i} is a {type(q).__name__}, not a rag.types.Question"
                    )
                if split == "train" and q.answers_are_regex:
                    raise DataModuleError(
                        f"train set {name!r} question {q.id!r} has regular-expression answers (CuratedTrec): "
                        "there is no answer string to train on; use it for val/test only"
                    )
                self.rows.append((name, i, q))

    def __len__(self) -> int:
        return len(self.rows)

    def target(self, question: Question, row: int, epoch: int) -> str | None:
        if question.answers_are_regex or not question.answers:
            return None
        if self.answer_choice == "first":
            return question.answers[0]
        if self.answer_choice == "shortest":
            return min(question.answers, key=len)
        # a private generator per draw: the target depends on (seed, epoch, row) only, not on the order
        # in which rows are visited or on which worker loads them
        return random.Random(f"{self.seed}:{epoch}:{row}").choice(question.answers)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[str, int, Question, str | None]:
        row, epoch = item if isinstance(item, tuple) else (item, 0)
        name, index, question = self.rows[row]
        return name, index, question, self.target(question, row, epoch)


class EpochSampler(DistributedSampler):
    """Yields ``(row, epoch)``: a permutation drawn from ``(seed, epoch)`` (or the rows in order), and in a
    distributed run (``torch.distributed`` initialised when the loader is made) this rank's share of it.

    Lightning calls ``set_epoch`` at every epoch start, which makes the order, and the ``random`` answer
    choice, a function of the seed and the epoch alone. Rank r of W takes rows ``r, r+W, ...`` of the epoch's
    order (padded with its first rows to a multiple of W, as DistributedSampler pads), so that the W batches
    of one step hold the rows that one process's batch of W times the size would hold: a W-process run
    trains on the same global batches as one process. Being a DistributedSampler, Lightning does not wrap
    it in its own, which would reshuffle the order for training.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        super().__init__(
            range(n),
            num_replicas=torch.distributed.get_world_size() if distributed else 1,
            rank=torch.distributed.get_rank() if distributed else 0,
            shuffle=shuffle,
            seed=seed,
        )
        self.n = n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.num_replicas > 1 and order:
            order += (order * self.num_replicas)[: self.total_size - self.n]
            order = order[self.rank : self.total_size : self.num_replicas]
        return iter([(i, self.epoch) for i in order])


def collate(items: list[tuple[str, int, Question, str | None]]) -> QABatch:
    return QABatch(
        questions=[q for _, _, q, _ in items],
        targets=[t for _, _, _, t in items],
        datasets=[name for name, _, _, _ in items],
        indices=[i for _, i, _, _ in items],
    )


class RagDataModule(pl.LightningDataModule):
    """Train / val / test question sets, each a mapping ``name -> list[Question]`` (several are mixed).

    Args:
        train, val, test: the sets of each split (an empty or missing split is allowed, e.g. no test).
        batch_size: questions per training batch.
        eval_batch_size: questions per val/test batch (None: ``batch_size``).
        answer_choice: which gold answer is the training target (module docstring).
        limit_train, limit_val, limit_test: keep only the first n questions of EACH set of the split
            (smoke runs, quick validation); None keeps all.
        seed: training order and random answer choice.
        shuffle: shuffle the training set every epoch.
        num_workers: DataLoader worker processes (0: load in the training process; batches are small
            lists of records, so workers rarely pay off).
        drop_last: drop a last, smaller training batch.
    """

    def __init__(
        self,
        train: Mapping[str, Sequence[Question]] | None = None,
        val: Mapping[str, Sequence[Question]] | None = None,
        test: Mapping[str, Sequence[Question]] | None = None,
        *,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        answer_choice: str = "first",
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataModuleError(f"{name} must be a positive integer, got {value!r}")
        limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        given = {"train": train, "val": val, "test": test}
        self.sets: dict[str, QuestionSet] = {}
        for split in SPLITS:
            sets = given[split] or {}
            if not isinstance(sets, Mapping):
                raise DataModuleError(
                    f"{split} must map set names to question lists, e.g. {{'nq': read_questions(...)}}, got "
                    f"{type(sets).__name__}"
                )
            self.sets[split] = QuestionSet(sets, answer_choice, seed, limits[split], split)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.answer_choice = answer_choice
        self.seed = int(seed)
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.drop_last = drop_last

    def set_names(self, split: str) -> list[str]:
        """The names of the sets mixed into ``split``, in order."""
        return list(dict.fromkeys(name for name, _, _ in self.sets[split].rows))

    def questions(self, split: str) -> list[Question]:
        return [q for _, _, q in self.sets[split].rows]

    def _loader(self, split: str, train: bool) -> DataLoader:
        data = self.sets[split]
        if len(data) == 0:
            raise DataModuleError(
                f"the {split} split has no questions: give it a question set (data.{split}) or do not run it"
            )
        return DataLoader(
            data,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochSampler(len(data), shuffle=train and self.shuffle, seed=self.seed),
            collate_fn=collate,
            num_workers=self.num_workers,
            drop_last=train and self.drop_last,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def loader(self, split: str) -> DataLoader:
        """The evaluation loader of any split (in order, no shuffling), e.g. for ``rag-evaluate split=val``."""
        if split not in SPLITS:
            raise DataModuleError(f"split must be one of {SPLITS}, got {split!r}")
        return self._loader(split, train=False)


def corpus_slice(passages: Sequence[Passage], limit: int, start: int = 0) -> list[Passage]:
    """Passages ``start .. start + limit`` of a corpus, in corpus order (small corpora for smoke runs)."""
    if limit < 1 or start < 0:
        raise DataModuleError(
            f"corpus_slice needs limit >= 1 and start >= 0, got limit={limit}, start={start}"
        )
    out = list(passages[start : start + limit])
    if not out:
        raise DataModuleError(f"the corpus has {len(passages)} passages: nothing left from start={start}")
    return out
