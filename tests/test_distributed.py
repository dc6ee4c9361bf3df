"""Two CPU processes (torchrun, gloo) against one: the same training losses, validation and test metrics, and
the same embeddings; each rank embeds its own files, finished files are kept, interrupted runs resume.

The 2-process run is this file started by ``python -m torch.distributed.run --nproc_per_node=2`` (see
``worker`` at the bottom): it embeds a corpus with ``embed_corpus_distributed`` and then trains, validates and
tests with ``rag.cli.train.run`` under ``trainer=ddp_cpu``, as ``torchrun -m rag.cli.train`` does. Dropout
is off in both runs, so that a training step is a function of its global batch alone; the global batch is
the same (1 x 4 questions against 2 x 2), and so are the losses and metrics up to float summation order.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rag.types import Passage

ROOT = Path(__file__).resolve().parents[1]
ROWS_PER_FILE = 8
N_EMBED = 44  # 6 files of 8 rows (the last one 4): 3 per rank


# ---------------------------------------------------------------------------------------------- shared setup


def small_corpus():
    """The gold passages of the first 4 val and test questions of both mini-wiki sets plus 4 distractors:
    real passages among which the tiny retriever finds some gold passages and misses others."""
    from rag.data.miniwiki import load_corpus, load_questions

    corpus = load_corpus()
    gold = {
        g
        for dataset in ("squad_open", "nq_gold")
        for split in ("dev", "test")
        for q in load_questions(dataset, split)[:4]
        for g in q.gold_passage_ids
    }
    keep = [p for p in corpus if p.id in gold]
    return keep + [p for p in corpus if p.id not in gold][:4]


def train_overrides(tmp: Path, name: str) -> list[str]:
    return [
        "experiment=smoke",
        "corpus=file",
        "corpus.name=ddp-test",
        "corpus.passages._target_=rag.data.arrow.load_passages",
        "~corpus.passages.passages",  # the smoke experiment's corpus slice
        "~corpus.passages.limit",
        f"corpus.passages.path={tmp / 'corpus.jsonl'}",
        f"+corpus.passages.arrow_dir={tmp / name / 'arrow'}",
        f"cache_dir={tmp / name / 'cache'}",
        f"runs_dir={tmp / name / 'runs'}",
        f"output_dir={tmp / name / 'out'}",
        "threads=1",
        "generator.dropout=0.0",
        "+query_encoder.dropout=0.0",
        "+doc_encoder.dropout=0.0",
        "logger=csv",
        "callbacks=none",
        "trainer.enable_progress_bar=false",
        "data.limit_train=8",
        "data.limit_val=4",
        "data.limit_test=4",
    ]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rag.config_dir import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def embed_encoder():
    from rag.model import tiny_bert_encoder

    return tiny_bert_encoder("document", seed=3)


def train_losses(out: Path) -> list[float]:
    rows = csv.DictReader(next(out.glob("csv/version_*/metrics.csv")).read_text().splitlines())
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One reference process in pytest, then one torchrun launch of 2 processes over the same data."""
    from rag.cli import train as train_cli
    from rag.data.corpus import write_passages
    from rag.retrieval.embed import embed_corpus

    tmp = tmp_path_factory.mktemp("ddp")
    write_passages(tmp / "corpus.jsonl", small_corpus())
    # embeddings: the reference, and a directory where an earlier run finished files 0 and 3 only
    passages = [Passage(f"{p.id}#{i}", p.title, p.text) for i, p in enumerate((small_corpus() * 3)[:N_EMBED])]
    write_passages(tmp / "embed.jsonl", passages)
    encoder = embed_encoder()
    embed_corpus(
        encoder, passages, tmp / "embed-ref", rows_per_file=ROWS_PER_FILE, batch_size=3, show_progress=False
    )
    (tmp / "embed-dist").mkdir()
    for stem in ("embeds_0000000000_0000000008", "embeds_0000000024_0000000032"):
        for suffix in (".npy", ".json"):
            shutil.copy(tmp / "embed-ref" / f"{stem}{suffix}", tmp / "embed-dist" / f"{stem}{suffix}")
    # a temporary file that a killed run left for a file rank 1 will embed
    (tmp / "embed-dist" / "embeds_0000000008_0000000016.npy.tmp-99999").write_bytes(b"partial")

    summary = train_cli.run(
        compose([*train_overrides(tmp, "one"), "data.batch_size=4", "data.eval_batch_size=4"])
    )

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(__file__).resolve()),
        str(tmp),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return {
        "tmp": tmp,
        "one": summary,
        "two": json.loads((tmp / "two" / "out" / "metrics.json").read_text()),
        "log": proc.stderr,
    }


# ---------------------------------------------------------------------------------------------- training


def test_two_process_training_losses_equal_one_process(runs):
    one = train_losses(runs["tmp"] / "one" / "out")
    two = train_losses(runs["tmp"] / "two" / "out")
    assert len(one) == len(two) == 4
    # logged with sync_dist: the mean of the two ranks' halves is the loss of the whole batch
    np.testing.assert_allclose(two, one, rtol=2e-5)
    assert runs["one"]["global_step"] == runs["two"]["global_step"] == 4


def test_two_process_validation_and_test_metrics_equal_one_process(runs):
    one, two = runs["one"], runs["two"]
    assert set(one["val"]) == set(two["val"]) and set(one["test"]) == set(two["test"])
    for split in ("val", "test"):
        for key, value in one[split].items():
            assert two[split][key] == pytest.approx(value, rel=2e-5, abs=1e-6), (split, key)
    # the figures are over every question once: 4 per set and split, gathered from both ranks
    recalls = [v for k, v in one["test"].items() if "recall" in k] + [
        v for k, v in one["val"].items() if "recall" in k
    ]
    assert any(0 < v < 1 for v in recalls)  # retrieval found some gold passages and missed others


def test_ranks_share_one_index_build_and_one_corpus_conversion(runs):
    log = runs["log"]
    assert log.count("[rag.indexer] built the flat index") == 1
    assert log.count("[rag.indexer] reusing the flat index") == 1
    for corpus in ("embed.jsonl", "corpus.jsonl"):  # each converted by one rank, opened by the other
        assert log.count(f"[rag.arrow] converting {runs['tmp'] / corpus}") == 1


# ---------------------------------------------------------------------------------------------- embedding


def test_each_rank_embeds_its_own_files_and_keeps_finished_ones(runs):
    tmp = runs["tmp"]
    reports = [json.loads((tmp / f"embed-rank{r}.json").read_text()) for r in (0, 1)]
    files = [(s, min(s + ROWS_PER_FILE, N_EMBED)) for s in range(0, N_EMBED, ROWS_PER_FILE)]
    for rank, report in enumerate(reports):
        own = [list(f) for f in files[rank::2]]
        assert report["world_size"] == 2 and report["rank"] == rank
        assert sorted(report["computed"] + report["skipped"]) == own
        assert report["complete"] and report["consolidated"] == (rank == 0)
    assert reports[0]["skipped"] == [[0, 8]] and reports[1]["skipped"] == [[24, 32]]
    assert not list((tmp / "embed-dist").glob("*.tmp-*"))


def test_distributed_embeddings_equal_single_process(runs):
    from rag.retrieval.embed import open_embeddings, read_embeddings_meta

    tmp = runs["tmp"]
    reference = np.asarray(open_embeddings(tmp / "embed-ref", verify=True))
    merged = open_embeddings(tmp / "embed-dist", expected_rows=N_EMBED, verify=True)
    assert isinstance(merged, np.memmap)  # merged into one file by rank 0
    np.testing.assert_array_equal(np.asarray(merged), reference)
    (record,) = read_embeddings_meta(tmp / "embed-dist")
    assert (record["start"], record["end"]) == (0, N_EMBED)


# ---------------------------------------------------------------------------------------------- one process


def test_interrupted_embedding_resumes_and_equals_plain_embedding(tmp_path):
    from rag.retrieval.distributed_embed import embed_corpus_distributed
    from rag.retrieval.embed import embed_corpus, open_embeddings

    passages = small_corpus()  # 16 passages: files of rows 0-5, 6-11, 12-15
    encoder = embed_encoder()
    embed_corpus(encoder, passages, tmp_path / "ref", rows_per_file=6, batch_size=3, show_progress=False)
    calls, forward = [], encoder.forward

    def failing(*args, **kwargs):
        if len(calls) == 3:  # the second batch of the second file
            raise RuntimeError("simulated failure")
        calls.append(1)
        return forward(*args, **kwargs)

    encoder.forward = failing
    options = {
        "rows_per_file": 6,
        "batch_size": 3,
        "trainer": {"accelerator": "cpu", "devices": 1},
        "show_progress": False,
    }
    with pytest.raises(RuntimeError, match="simulated failure"):
        embed_corpus_distributed(encoder, passages, tmp_path / "run", **options)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["embeds_0000000000_0000000006.json", "embeds_0000000000_0000000006.npy"]  # no temp file
    encoder.forward = forward
    report = embed_corpus_distributed(encoder, passages, tmp_path / "run", **options)
    assert report.skipped == [(0, 6)] and report.computed == [(6, 12), (12, 16)]
    assert report.complete and report.consolidated
    np.testing.assert_array_equal(
        np.asarray(open_embeddings(tmp_path / "run", verify=True)),
        np.asarray(open_embeddings(tmp_path / "ref")),
    )


def test_embeddings_of_another_encoder_are_refused(tmp_path):
    from rag.model import tiny_bert_encoder
    from rag.retrieval.distributed_embed import embed_corpus_distributed
    from rag.retrieval.embed import EmbeddingsError

    passages = small_corpus()[:8]
    options = {"rows_per_file": 8, "trainer": {"accelerator": "cpu", "devices": 1}, "show_progress": False}
    embed_corpus_distributed(embed_encoder(), passages, tmp_path, **options)
    with pytest.raises(EmbeddingsError, match="made by another run"):
        embed_corpus_distributed(tiny_bert_encoder("document", seed=4), passages, tmp_path, **options)
    report = embed_corpus_distributed(
        tiny_bert_encoder("document", seed=4), passages, tmp_path, overwrite=True, **options
    )
    assert report.computed == [(0, 8)]


# ---------------------------------------------------------------------------------------------- the worker


def worker(tmp: Path) -> None:
    """What each of the 2 torchrun processes runs."""
    from rag.cli import train as train_cli
    from rag.data.arrow import load_passages
    from rag.retrieval.distributed_embed import embed_corpus_distributed

    torch.set_num_threads(1)
    passages = load_passages(tmp / "embed.jsonl", arrow_dir=tmp / "embed-arrow")
    report = embed_corpus_distributed(
        embed_encoder(),
        passages,
        tmp / "embed-dist",
        rows_per_file=ROWS_PER_FILE,
        batch_size=3,
        trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp"},
        show_progress=False,
    )
    record = {
        "rank": report.rank,
        "world_size": report.world_size,
        "computed": sorted(map(list, report.computed)),
        "skipped": sorted(map(list, report.skipped)),
        "complete": report.complete,
        "consolidated": report.consolidated,
    }
    (tmp / f"embed-rank{report.rank}.json").write_text(json.dumps(record))
    overrides = [
        *train_overrides(tmp, "two"),
        "trainer=ddp_cpu",
        "data.batch_size=2",
        "data.eval_batch_size=2",
    ]
    train_cli.run(compose(overrides))


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
