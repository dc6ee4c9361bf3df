"""Corpus embedding on many devices and machines through Lightning: ``Trainer.predict`` under DDP.

The output is the embeddings directory of :mod:`rag.retrieval.embed` (``embeds_<start>_<end>.npy`` + ``.json``
per file of ``rows_per_file`` rows), so everything downstream (``open_embeddings``, ``rag-index``, the
retrievers) reads it unchanged, and the two ways of embedding resume each other's work.

How the work is split: the corpus (or shard ``shard`` of ``num_shards``, the CLI's machine-level sharding)
is cut into files; file i goes to rank ``i % world_size``. Each rank tokenizes its files one at a time,
sorts each file's passages by length (a batch pads only to its own longest passage), and its
:class:`EmbeddingsWriter` callback writes every predicted batch into that file's memory-mapped ``.npy``,
which is renamed into place and recorded once all its rows are in. No rank waits for another until the
end, when rank 0 checks that the files tile the corpus and merges them into one file
(``consolidate_embeddings``) for the index build. Finished files are skipped on a rerun, so an interrupted
job resumes where it stopped, with any number of devices.

Launch (every rank runs the same command; Lightning reads the rank from the launcher's environment)::

    # one machine, 8 GPUs (Lightning starts the 8 processes itself)
    python -m rag.cli.embed corpus=file corpus.name=wiki18 \\
        corpus.passages._target_=rag.data.arrow.load_passages corpus.passages.path=psgs_w100.tsv \\
        doc_encoder=dpr_nq embed.batch_size=512 trainer.devices=8 trainer.precision=bf16-mixed
    # or through torchrun, 2 machines x 8 GPUs (run on each machine, NODE_RANK 0 and 1)
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER --master_port=29500 \\
        -m rag.cli.embed ... trainer.devices=8 trainer.num_nodes=2
    # or SLURM: #SBATCH --nodes=2 --ntasks-per-node=8 --gpus-per-node=8, then
    srun python -m rag.cli.embed ... trainer.devices=8 trainer.num_nodes=2

then ``rag-index`` with the same corpus / doc_encoder / embed settings finds the embeddings done and builds
the index.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from rag.atomic import replace_atomic, temporary_sibling
from rag.retrieval.embed import (
    DTYPES,
    EmbeddingsError,
    array_checksum,
    clear_embeddings_file,
    consolidate_embeddings,
    open_embeddings,
    plan_embedding,
    record_embeddings_file,
    remove_embeddings,
    shard_range,
)
from rag.retrieval.encoders import BertEncoder
from rag.retrieval.errors import RetrievalInputError
from rag.types import Passage

__all__ = ["DistributedEmbedReport", "EmbeddingsWriter", "embed_corpus_distributed"]


log = logging.getLogger(__name__)


@dataclass
class DistributedEmbedReport:
    """What one rank did in :func:`embed_corpus_distributed`."""

    out_dir: Path
    rank: int
    world_size: int
    computed: list[tuple[int, int]] = field(default_factory=list)  # files this rank embedded
    skipped: list[tuple[int, int]] = field(default_factory=list)  # its files found finished
    complete: bool = False  # the directory holds the whole corpus (known on every rank)
    consolidated: bool = False
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- data


class _FileBatches(Dataset):
    """The batches of one rank's files: item i is one padded, length-sorted batch of one file.

    Files are tokenized when first reached (one file held at a time) and sorted longest first, as
    ``embed_corpus`` does, so that both give the same batches.
    """

    def __init__(
        self, passages: Sequence[Passage], files: list[tuple[int, int]], encoder: BertEncoder, batch_size: int
    ):
        self.passages = passages
        self.files = files
        self.tokenizer = encoder.tokenizer
        self.max_length = encoder.max_length
        self.batch_size = batch_size
        self.items = [
            (f, b) for f, (lo, hi) in enumerate(files) for b in range(math.ceil((hi - lo) / batch_size))
        ]
        self._cached: tuple[int, dict, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def _file(self, f: int) -> tuple[dict, np.ndarray]:
        if self._cached is None or self._cached[0] != f:
            self._cached = None  # one file's tokens at a time: a file of 65,536 passages holds ~1 GB of them
            lo, hi = self.files[f]
            chunk = self.passages[lo:hi]
            tokens = self.tokenizer(
                [p.title for p in chunk],
                [p.text for p in chunk],
                truncation="longest_first",
                max_length=self.max_length,
            )
            lengths = np.array([len(ids) for ids in tokens["input_ids"]])
            order = np.argsort(-lengths, kind="stable")
            self._cached = (f, tokens, order)
        return self._cached[1], self._cached[2]

    def __getitem__(self, i: int) -> dict:
        f, b = self.items[i]
        tokens, order = self._file(f)
        idx = order[b * self.batch_size : (b + 1) * self.batch_size]
        batch = self.tokenizer.pad(
            [{k: tokens[k][j] for k in tokens} for j in idx], padding=True, return_tensors="pt"
        )
        batch = dict(batch)
        batch["file"] = torch.tensor(f)
        batch["rows"] = torch.from_numpy(idx.astype(np.int64))  # rows within the file
        return batch


class _EmbedData(pl.LightningDataModule):
    """Plans the run on each rank once the process group exists: which files are this rank's and undone."""

    def __init__(self, passages, encoder, out_dir: Path, options: dict):
        super().__init__()
        self.passages = passages
        self.encoder = encoder
        self.out_dir = out_dir
        self.options = options
        self.todo: list[tuple[int, int]] = []
        self.expected: list[dict] = []
        self.skipped: list[tuple[int, int]] = []

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        opts = self.options
        if opts["overwrite"] and trainer.is_global_zero:
            remove_embeddings(
                self.out_dir, *shard_range(len(self.passages), opts["shard"], opts["num_shards"])
            )
        # nobody plans before the overwrite is done; after this, assignment depends on the ranges alone
        trainer.strategy.barrier("rag-embed-plan")
        files = _rank_files(len(self.passages), opts, trainer.global_rank, trainer.world_size)
        todo, self.skipped = plan_embedding(self.encoder, self.passages, self.out_dir, files, opts["dtype"])
        self.todo = [(lo, hi) for lo, hi, _ in todo]
        self.expected = [expected for _, _, expected in todo]

    def predict_dataloader(self) -> DataLoader:
        dataset = _FileBatches(self.passages, self.todo, self.encoder, self.options["batch_size"])
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=0)


def _rank_files(n: int, opts: dict, rank: int, world_size: int) -> list[tuple[int, int]]:
    start, end = shard_range(n, opts["shard"], opts["num_shards"])
    rows_per_file = opts["rows_per_file"]
    files = [(s, min(s + rows_per_file, end)) for s in range(start, end, rows_per_file)]
    return files[rank::world_size]


# ---------------------------------------------------------------------------------------------- model


class _EmbedModule(pl.LightningModule):
    def __init__(self, encoder: BertEncoder):
        super().__init__()
        self.encoder = encoder

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        inputs = {k: v for k, v in batch.items() if k not in ("file", "rows")}
        embeds = self.encoder(**inputs)  # (b, D)
        return {"file": int(batch["file"]), "rows": batch["rows"], "embeds": embeds.float()}


class EmbeddingsWriter(BasePredictionWriter):
    """Writes each predicted batch into its file's memmap; a file is finished (renamed into place, then its
    JSON record written) when all its rows are in. A failure removes the unfinished temporary files."""

    def __init__(self, out_dir: Path, dtype: str, dim: int):
        super().__init__(write_interval="batch")
        self.out_dir, self.dtype, self.dim = out_dir, dtype, dim
        self.open: dict[int, tuple[np.memmap, Path, Path, int]] = {}  # rows, temporary, target, count
        self.finished: list[tuple[int, int]] = []

    def _data(self, trainer) -> _EmbedData:
        return trainer.datamodule

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        data = self._data(trainer)
        f = prediction["file"]
        lo, hi = data.todo[f]
        if f not in self.open:
            npy_path = clear_embeddings_file(self.out_dir, lo, hi)  # the file is this rank's
            tmp = temporary_sibling(npy_path)
            rows = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.dtype(self.dtype), shape=(hi - lo, self.dim)
            )
            self.open[f] = (rows, tmp, npy_path, 0)
        rows, tmp, npy_path, count = self.open[f]
        idx = prediction["rows"].cpu().numpy()
        rows[idx] = prediction["embeds"].cpu().numpy().astype(self.dtype, copy=False)
        count += len(idx)
        self.open[f] = (rows, tmp, npy_path, count)
        if count == hi - lo:
            self._finish(f, lo, hi, data.expected[f])

    def _finish(self, f: int, lo: int, hi: int, expected: dict) -> None:
        rows, tmp, npy_path, _ = self.open.pop(f)
        rows.flush()
        checksum = array_checksum(np.asarray(rows))
        del rows
        # the .npy in place (fsynced) before the JSON that marks it finished
        replace_atomic(tmp, npy_path)
        record_embeddings_file(self.out_dir, lo, hi, self.dim, checksum, expected)
        self.finished.append((lo, hi))

    def _discard_open(self) -> None:
        for rows, tmp, _, _ in self.open.values():
            del rows
            tmp.unlink(missing_ok=True)
        self.open.clear()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._discard_open()

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.open:
            missing = sorted(self._data(trainer).todo[f] for f in self.open)
            self._discard_open()
            raise EmbeddingsError(f"the prediction loop ended with files unfinished: {missing}")


# ---------------------------------------------------------------------------------------------- entry


def embed_corpus_distributed(
    encoder: BertEncoder,
    passages: Sequence[Passage],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    dtype: str = "float32",
    rows_per_file: int = 65536,
    shard: int = 0,
    num_shards: int = 1,
    overwrite: bool = False,
    consolidate: bool = True,
    trainer: dict | None = None,
    show_progress: bool = True,
) -> DistributedEmbedReport:
    """Embed the passages (title, text) with ``encoder`` into ``out_dir`` on every device of the run.

    ``trainer`` holds ``pytorch_lightning.Trainer`` arguments (``accelerator``, ``devices``, ``num_nodes``,
    ``strategy``, ``precision``); the default is every visible device of one machine. Every rank calls this
    function (the launcher starts them: Lightning itself, torchrun or srun) and gets its own report. With
    ``consolidate``, rank 0 merges the files into one once the whole corpus is in.
    """
    if dtype not in DTYPES:
        raise RetrievalInputError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if batch_size < 1 or rows_per_file < 1:
        raise RetrievalInputError(
            f"batch_size and rows_per_file must be >= 1, got {batch_size} and {rows_per_file}"
        )
    if len(passages) == 0:
        raise RetrievalInputError("the corpus has no passages: nothing to embed")
    shard_range(len(passages), shard, num_shards)  # checks the shard settings before any process starts
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    options = {
        "batch_size": batch_size,
        "dtype": dtype,
        "rows_per_file": rows_per_file,
        "shard": shard,
        "num_shards": num_shards,
        "overwrite": overwrite,
    }
    started = time.perf_counter()
    writer = EmbeddingsWriter(out, dtype, encoder.dim)
    kwargs = {"accelerator": "auto", "devices": "auto", "strategy": "auto", **(trainer or {})}
    pl_trainer = pl.Trainer(
        **kwargs,
        callbacks=[writer],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=show_progress,
        use_distributed_sampler=False,  # each rank's dataset already holds its own files only
        inference_mode=True,
    )
    data = _EmbedData(passages, encoder, out, options)
    with warnings.catch_warnings():
        # the writer finds each row's place from the batch itself, not from Lightning's batch indices
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        pl_trainer.predict(_EmbedModule(encoder), datamodule=data, return_predictions=False)
    report = DistributedEmbedReport(
        out_dir=out,
        rank=pl_trainer.global_rank,
        world_size=pl_trainer.world_size,
        computed=list(writer.finished),
        skipped=list(data.skipped),
    )
    # every rank's files are in before anyone looks at the whole directory
    pl_trainer.strategy.barrier("rag-embed-done")
    try:
        open_embeddings(out, expected_rows=len(passages))
        report.complete = True
    except EmbeddingsError:
        report.complete = False
    if report.complete and consolidate and pl_trainer.is_global_zero:
        consolidate_embeddings(out, passages, show_progress=show_progress)
        report.consolidated = True
    pl_trainer.strategy.barrier("rag-embed-merged")
    report.seconds = time.perf_counter() - started
    n = sum(hi - lo for lo, hi in report.computed)
    log.info(
        f"rank {report.rank}/{report.world_size}: embedded {n:,} passages in {len(report.computed)} files, "
        f"{len(report.skipped)} files were done already ({report.seconds:.1f} s)"
        + ("; the corpus is complete" if report.complete else "")
    )
    return report
