"""The sharded index (rag.retrieval.sharded) against one exact index: 2 and 4 gloo processes on CPU
(torch.multiprocessing spawn) retrieve the ids and scores a single FlatIndex / brute force gives, with batches
of unequal size per rank (one rank with none), exact ties across shard boundaries and K above a shard's size;
the query encoder's gradient through the recomputed doc scores equals the replicated index's; a rank's bad
call fails on every rank instead of hanging. A 2-process training run (torchrun, as tests/test_distributed.py
runs it) with index=sharded logs the losses and metrics of the one-process run over the replicated index
(slow).

Exactness: a float32 matmul's rounding depends on the shapes it is called with, so the sharded index ranks
by a canonical score (float64 accumulation, rounded once). On small-integer embeddings every order of
summation is exact, so there the scores must equal the FlatIndex's bit for bit; on Gaussian float16 ones
the ids must equal the FlatIndex's and the scores the float64 brute force's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rag.retrieval.embed import array_checksum, open_embeddings, record_embeddings_file, shard_range
from rag.retrieval.errors import IndexStateError, RetrievalInputError
from rag.retrieval.index import FlatIndex
from rag.retrieval.retriever import DenseRetriever
from rag.retrieval.sharded import (
    ShardedIndex,
    canonical_scores,
    merge_top_k,
    shard_plan,
    sharded_memory_table,
)
from rag.types import Passage

ROOT = Path(__file__).resolve().parents[1]

# each rank's batch size: unequal, one rank with no questions at 4 ranks
BATCHES = {1: [7], 2: [5, 2], 4: [3, 0, 5, 1]}
TIE_KS = (1, 4, 10, 23)  # 10 is above a shard's 5-6 rows at 4 ranks; 23 is every row
FLOAT_KS = (5, 20)
N_FLOAT, D_FLOAT, ROWS_PER_FILE = 3001, 48, 1024


# ---------------------------------------------------------------------------------------------- data


def tie_data() -> tuple[np.ndarray, np.ndarray]:
    """23 x 8 small-integer rows (every float32 dot product exact) with duplicates across shard boundaries,
    and integer queries, the first a zero vector (every row ties)."""
    rng = np.random.default_rng(7)
    embeds = rng.integers(-3, 4, size=(23, 8)).astype(np.float32)
    embeds[17] = embeds[3]  # shards 0 and 1 at 2 ranks, 0 and 3 at 4
    embeds[11] = embeds[22] = embeds[5]
    embeds[6] = embeds[10]  # inside one shard
    queries = rng.integers(-2, 3, size=(sum(BATCHES[4]) + 4, 8)).astype(np.float32)
    queries[0] = 0
    return embeds, queries


def float_queries() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((12, D_FLOAT)).astype(np.float32)


def write_float_embeddings(directory: Path) -> None:
    """Gaussian float16 embeddings in an embeddings directory of 3 files (rag.retrieval.embed's layout),
    so that shards span files."""
    embeds = np.random.default_rng(0).standard_normal((N_FLOAT, D_FLOAT)).astype(np.float16)
    directory.mkdir(parents=True, exist_ok=True)
    record = {"encoder": {"name": "synthetic", "weights_checksum": "0"}, "dtype": "float16"}
    for lo in range(0, N_FLOAT, ROWS_PER_FILE):
        hi = min(lo + ROWS_PER_FILE, N_FLOAT)
        rows = embeds[lo:hi]
        np.save(directory / f"embeds_{lo:010d}_{hi:010d}.npy", rows)
        record_embeddings_file(
            directory, lo, hi, D_FLOAT, array_checksum(rows), {**record, "passages_sha256": ""}
        )


def rank_rows(world: int, rank: int) -> slice:
    starts = np.cumsum([0, *BATCHES[world]])
    return slice(int(starts[rank]), int(starts[rank + 1]))


def passages(n: int) -> list[Passage]:
    return [Passage(str(i), f"t{i}", f"passage {i}") for i in range(n)]


def gradient_step(retriever: DenseRetriever, queries: np.ndarray, n_docs: int):
    """doc ids and d(sum_k w_k doc_scores)/d question_embeds for fixed weights w."""
    question_embeds = torch.tensor(queries, requires_grad=True)
    out = retriever.retrieve_by_embeds(question_embeds, n_docs)
    weights = torch.linspace(1.0, 0.2, n_docs)
    (out.doc_scores * weights).sum().backward()
    return out.doc_ids.numpy(), out.doc_scores.detach().numpy(), question_embeds.grad.numpy()


# ---------------------------------------------------------------------------------------------- the workers


def scenarios(rank: int, world: int, group, tmp: Path) -> None:
    """Every scenario on one process group of ``world`` ranks; the results saved for the test to compare."""
    out: dict[str, np.ndarray] = {}

    def index(**params) -> ShardedIndex:
        made = ShardedIndex(verbose=False, **params)
        made.process_group = group
        return made

    embeds, queries = tie_data()
    own = queries[rank_rows(world, rank)]
    tied = index(chunk_rows=4).build(embeds)
    for k in TIE_KS:
        out[f"tie_scores_{k}"], out[f"tie_ids_{k}"] = tied.search(own, k)
    out["shard"] = np.asarray(tied.shard_range)
    out["all_empty"] = np.asarray(tied.search(np.zeros((0, 8), np.float32), 3)[1].shape)  # no rank has any

    source = open_embeddings(tmp / "float")
    float_own = float_queries()[rank_rows(world, rank)]
    for dtype in (None, "float32"):
        floats = index(chunk_rows=500, dtype=dtype).build(source)
        for k in FLOAT_KS:
            out[f"float_{dtype}_scores_{k}"], out[f"float_{dtype}_ids_{k}"] = floats.search(float_own, k)
    traffic = floats.last_traffic
    out["traffic"] = np.asarray([traffic.sent_bytes, traffic.received_bytes, traffic.queries_searched])
    floats.search(float_queries()[:3], FLOAT_KS[-1])  # equal batches, as the memory plan assumes
    traffic = floats.last_traffic
    out["traffic_equal"] = np.asarray([traffic.sent_bytes, traffic.received_bytes])

    retriever = DenseRetriever(index().build(source), passages(N_FLOAT), doc_embeds=source)
    out["grad_ids"], out["grad_scores"], out["grad"] = gradient_step(retriever, float_own, 6)

    # a rank's bad call fails on every rank, each with its own reason (no rank waits forever)
    errors = []
    for bad in ("n_docs", "dim"):
        n_docs = 3 if bad == "n_docs" and rank == 0 else 4
        q = np.zeros((1, 5 if bad == "dim" and rank == world - 1 else 8), np.float32)
        try:
            index().build(embeds).search(q, n_docs)
            errors.append("none")
        except (RetrievalInputError, IndexStateError) as err:
            errors.append(type(err).__name__)
    (tmp / f"errors-{world}-{rank}.json").write_text(json.dumps(errors))
    np.savez(tmp / f"out-{world}-{rank}.npz", **out)


def search_worker(rank: int, tmp: str) -> None:
    """What each of the 4 spawned ranks runs: the scenarios on all 4, then on a group of ranks 0 and 1
    (one start of the processes serves both world sizes)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    tmp = Path(tmp)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'init'}", rank=rank, world_size=4)
    try:
        scenarios(rank, 4, None, tmp)
        pair = dist.new_group([0, 1])  # every rank takes part in making a group
        if rank < 2:
            scenarios(rank, 2, pair, tmp)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Each scenario at 4 gloo processes and on a 2-process group of them."""
    tmp = tmp_path_factory.mktemp("sharded")
    write_float_embeddings(tmp / "float")
    torch.multiprocessing.spawn(search_worker, args=(str(tmp),), nprocs=4, join=True)
    results = {"tmp": tmp}
    for world in (2, 4):
        results[world] = [dict(np.load(tmp / f"out-{world}-{r}.npz")) for r in range(world)]
        results[f"errors-{world}"] = [
            json.loads((tmp / f"errors-{world}-{r}.json").read_text()) for r in range(world)
        ]
    return results


# ---------------------------------------------------------------------------------------------- across ranks


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_hold_contiguous_shards_that_tile_the_rows(spawned, world):
    shards = [tuple(spawned[world][r]["shard"]) for r in range(world)]
    assert shards == [shard_range(23, r, world) for r in range(world)]
    assert shards[0][0] == 0 and shards[-1][1] == 23
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_search_with_ties_equals_one_flat_index_exactly(spawned, world):
    embeds, queries = tie_data()
    flat = FlatIndex(chunk_rows=4, verbose=False).build(embeds)
    for rank in range(world):
        own = queries[rank_rows(world, rank)]
        for k in TIE_KS:
            ref_scores, ref_ids = flat.search(own, k)
            got = spawned[world][rank]
            np.testing.assert_array_equal(got[f"tie_ids_{k}"], ref_ids)
            np.testing.assert_array_equal(got[f"tie_scores_{k}"], ref_scores)
    # the zero query ties every row: lowest ids first
    np.testing.assert_array_equal(spawned[world][0]["tie_ids_23"][0], np.arange(23))
    assert all(tuple(spawned[world][r]["all_empty"]) == (0, 3) for r in range(world))


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_search_equals_flat_index_and_float64_brute_force(spawned, world):
    source = open_embeddings(spawned["tmp"] / "float")
    rows = np.asarray(source, np.float32)
    flat = FlatIndex(verbose=False).build(np.asarray(source))  # FlatIndex takes one array (not the 3 files)
    exact = float_queries().astype(np.float64) @ rows.astype(np.float64).T  # (B, N)
    for rank in range(world):
        own = rank_rows(world, rank)
        for k in FLOAT_KS:
            ref_ids = np.argsort(-exact[own], axis=1, kind="stable")[:, :k]
            ref_scores = np.take_along_axis(exact[own], ref_ids, 1).astype(np.float32)
            flat_scores, flat_ids = flat.search(float_queries()[own], k)
            for dtype in ("None", "float32"):
                got = spawned[world][rank]
                np.testing.assert_array_equal(got[f"float_{dtype}_ids_{k}"], ref_ids)
                np.testing.assert_array_equal(got[f"float_{dtype}_ids_{k}"], flat_ids)
                np.testing.assert_array_equal(got[f"float_{dtype}_scores_{k}"], ref_scores)
                np.testing.assert_allclose(
                    got[f"float_{dtype}_scores_{k}"], flat_scores, rtol=1e-5, atol=1e-5
                )


@pytest.mark.parametrize("world", [2, 4])
def test_the_query_gradient_through_doc_scores_equals_the_replicated_index(spawned, world):
    source = open_embeddings(spawned["tmp"] / "float")
    flat = FlatIndex(verbose=False).build(np.asarray(source))
    replicated = DenseRetriever(flat, passages(N_FLOAT), doc_embeds=source)
    for rank in range(world):
        own = float_queries()[rank_rows(world, rank)]
        ids, scores, grad = gradient_step(replicated, own, 6)
        got = spawned[world][rank]
        np.testing.assert_array_equal(got["grad_ids"], ids)
        np.testing.assert_allclose(got["grad_scores"], scores, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got["grad"], grad, rtol=1e-6, atol=1e-6)
        assert np.abs(grad).sum() > 0 or own.shape[0] == 0


@pytest.mark.parametrize("world", [2, 4])
def test_traffic_counts_the_payload_of_the_gathers_and_the_all_to_all(spawned, world):
    k, dim, sizes = FLOAT_KS[-1], D_FLOAT, BATCHES[world]
    for rank in range(world):
        sent, received, searched = spawned[world][rank]["traffic"]
        gathered = (3 * 8 + max(sizes) * dim * 4) * (world - 1)
        assert searched == sum(sizes)
        assert sent == gathered + (sum(sizes) - sizes[rank]) * k * 16
        assert received == gathered + (world - 1) * sizes[rank] * k * 16


@pytest.mark.parametrize("world", [2, 4])
def test_a_bad_call_on_one_rank_fails_on_every_rank(spawned, world):
    for rank, errors in enumerate(spawned[f"errors-{world}"]):
        assert errors[0] == "RetrievalInputError"  # ranks disagree on n_docs: all say so
        # the rank with the wrong dimension names it; the others say that rank failed
        assert errors[1] == ("RetrievalInputError" if rank == world - 1 else "IndexStateError")


# ---------------------------------------------------------------------------------------------- one process


def test_one_process_is_a_plain_exact_search_over_all_rows():
    embeds, queries = tie_data()
    index = ShardedIndex(chunk_rows=5, verbose=False).build(torch.from_numpy(embeds))
    flat = FlatIndex(chunk_rows=4, verbose=False).build(embeds)
    for k in TIE_KS:
        scores, ids = index.search(queries, k)
        ref_scores, ref_ids = flat.search(queries, k)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(scores, ref_scores)
    assert index.shard_range == (0, 23) and index.last_traffic.sent_bytes == 0
    empty_scores, empty_ids = index.search(np.zeros((0, 8), np.float32), 3)
    assert empty_scores.shape == empty_ids.shape == (0, 3)


def test_results_do_not_depend_on_blocks_candidates_or_the_shard_split():
    """The union of the shards' top-K, merged, is the whole index's top-K, bit for bit, however the rows are
    cut (here without processes: each shard searched on its own)."""
    rng = np.random.default_rng(3)
    embeds = rng.standard_normal((997, 24)).astype(np.float32)
    queries = rng.standard_normal((9, 24)).astype(np.float32)
    whole = ShardedIndex(verbose=False).build(embeds).search(queries, 7)
    for world, chunk_rows, candidates in ((1, 50, 0), (3, 97, 2), (5, 1000, 8), (8, 13, 0)):
        parts = []
        for rank in range(world):
            index = ShardedIndex(chunk_rows=chunk_rows, candidates=candidates, verbose=False).build(embeds)
            index.load_shard(rank, world)
            parts.append(index.search_shard(queries, 7))
        merged = merge_top_k(
            np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1), 7
        )
        np.testing.assert_array_equal(merged[1], whole[1])
        np.testing.assert_array_equal(merged[0], whole[0])
    exact = queries.astype(np.float64) @ embeds.astype(np.float64).T
    np.testing.assert_array_equal(whole[1], np.argsort(-exact, axis=1, kind="stable")[:, :7])


def test_near_ties_within_float32_rounding_take_more_candidates_and_stay_exact():
    """Rows whose scores differ by less than float32 rounding: the float32 nomination alone could pick
    either; the rescoring must return the canonical order (ties: lower id)."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((1, 64)).astype(np.float32)
    embeds = np.repeat(base, 40, 0) + rng.standard_normal((40, 64)).astype(np.float32) * 1e-7
    embeds = np.concatenate([rng.standard_normal((200, 64)).astype(np.float32) * 0.1, embeds])
    queries = np.concatenate([base, rng.standard_normal((3, 64)).astype(np.float32)])
    index = ShardedIndex(chunk_rows=16, candidates=0, verbose=False).build(embeds)
    scores, ids = index.search(queries, 5)
    rows = embeds[ids]
    np.testing.assert_array_equal(scores, canonical_scores(queries, rows))
    every = canonical_scores(queries, np.broadcast_to(embeds, (4, *embeds.shape)))
    ref_scores, ref_ids = merge_top_k(every, np.broadcast_to(np.arange(len(embeds)), every.shape), 5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores)


def test_float16_shard_holds_half_the_memory_and_searches_the_same(tmp_path):
    write_float_embeddings(tmp_path)
    source = open_embeddings(tmp_path)
    halves = ShardedIndex(verbose=False).build(source)
    full = ShardedIndex(dtype="float32", verbose=False).build(source)
    q = float_queries()
    np.testing.assert_array_equal(halves.search(q, 5)[1], full.search(q, 5)[1])
    np.testing.assert_array_equal(halves.search(q, 5)[0], full.search(q, 5)[0])
    assert halves.memory_bytes() * 2 == full.memory_bytes() == N_FLOAT * D_FLOAT * 4
    np.testing.assert_array_equal(
        halves.reconstruct(np.array([[0, 2000, -1]])), full.reconstruct([[0, 2000, -1]])
    )
    np.testing.assert_array_equal(full.reconstruct([5, 3000]), np.asarray(source[[5, 3000]], np.float32))


def test_hot_swap_subset_and_extended_retrievers_keep_the_sharded_index():
    embeds, queries = tie_data()
    retriever = DenseRetriever(ShardedIndex(verbose=False).build(embeds), passages(23), doc_embeds=embeds)
    sub = retriever.subset(range(10, 23))
    assert isinstance(sub.index, ShardedIndex) and sub.n_passages == 13
    out = sub.retrieve_by_embeds(torch.from_numpy(queries[1:4]), 3)
    ref = FlatIndex(verbose=False).build(embeds[10:]).search(queries[1:4], 3)[1]
    np.testing.assert_array_equal(out.doc_ids.numpy(), ref)
    new = np.full((2, 8), 4, np.float32)  # above every integer row's score
    grown = retriever.extended(passages(2), new)
    assert isinstance(grown.index, ShardedIndex) and grown.index.ntotal == 25
    np.testing.assert_array_equal(grown.index.search(np.ones((1, 8), np.float32), 2)[1], [[23, 24]])


def test_bad_settings_and_inputs_are_one_clear_error():
    with pytest.raises(RetrievalInputError, match="index.dtype must be one of"):
        ShardedIndex(dtype="int8")
    with pytest.raises(RetrievalInputError, match="index.device must be one of"):
        ShardedIndex(device="tpu")
    with pytest.raises(IndexStateError, match="call build"):
        ShardedIndex().search(np.zeros((1, 8), np.float32), 1)
    embeds, _ = tie_data()
    index = ShardedIndex(verbose=False).build(embeds)
    with pytest.raises(RetrievalInputError, match="n_docs=24 but the index has 23"):
        index.search(np.zeros((1, 8), np.float32), 24)
    bad = embeds.copy()
    bad[9, 2] = np.nan
    with pytest.raises(RetrievalInputError, match="row 9"):
        ShardedIndex(verbose=False).build(bad).search(np.zeros((1, 8), np.float32), 1)


# ---------------------------------------------------------------------------------------------- memory plan


@pytest.mark.parametrize("world", [8, 64])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_memory_plan_per_rank_is_the_largest_shard(world, dtype):
    n, dim = 21_015_324, 768
    plan = shard_plan(n, dim, world, dtype)
    sizes = [end - start for start, end in (shard_range(n, r, world) for r in range(world))]
    assert sum(sizes) == n and plan.shard_rows == max(sizes)
    assert plan.shard_bytes == max(sizes) * dim * np.dtype(dtype).itemsize
    assert plan.replicated_bytes == FlatIndex.estimate_memory_bytes(n, dim)
    table = sharded_memory_table(n, dim)
    assert f"{plan.shard_rows:,}" in table and f"{world:>5} {dtype:>7}" in table


@pytest.mark.parametrize("world", [2, 4])
def test_memory_plan_traffic_is_what_a_search_moves(spawned, world):
    plan = shard_plan(N_FLOAT, D_FLOAT, world, queries_per_rank=3, n_docs=FLOAT_KS[-1])
    for rank in range(world):
        assert list(spawned[world][rank]["traffic_equal"]) == [plan.sent_bytes, plan.received_bytes]


# ---------------------------------------------------------------------------------------------- configs


def test_index_sharded_composes_validates_and_builds_a_sharded_retriever(tmp_path):
    from rag.build import build_retriever, compose_train_config
    from rag.errors import ConfigError

    cfg = compose_train_config("smoke", ["index=sharded", f"cache_dir={tmp_path}"])
    retriever = build_retriever(cfg)
    assert isinstance(retriever.index, ShardedIndex) and retriever.index.ntotal == 48
    assert not (tmp_path / "indexes").exists()  # no index file: the embeddings are the index
    with pytest.raises(ConfigError, match="use index@indexes.hnsw=flat"):
        from rag.build import compose

        compose("eval_retrieval", ["index@indexes.hnsw=sharded"])


def test_rag_index_sharded_embeds_prints_the_plan_per_rank_and_builds_no_index(tmp_path, monkeypatch, capsys):
    from rag.build import compose
    from rag.cli import index as index_cli

    monkeypatch.setenv("RAG_HOME", str(tmp_path))
    overrides = [
        "index=sharded",
        "doc_encoder=tiny",
        "corpus.name=first30",
        "corpus.passages._target_=rag.data.datamodule.corpus_slice",
        "+corpus.passages.passages={_target_:rag.data.miniwiki.load_corpus}",
        "+corpus.passages.limit=30",
        "embed.show_progress=false",
        "embed.rows_per_file=8",  # 4 files: the index reads them as one array
    ]
    result = index_cli.run(compose("rag_index", overrides))
    err = capsys.readouterr().err
    assert isinstance(result.index, ShardedIndex) and result.index.ntotal == 30
    assert result.embeddings_dir == tmp_path / "embeddings" / "first30-tiny-bert-float32"
    assert len(list(result.embeddings_dir.glob("*.npy"))) == 4 and not (tmp_path / "indexes").exists()
    assert "sharded index plan for 30 vectors x 32" in err and "embedded 30 passages" in err
    for world in (8, 64):
        assert f"{world:>5} float32 {shard_plan(30, 32, world).shard_rows:>11,}" in err
    again = index_cli.run(compose("rag_index", overrides))  # the embeddings are found done
    assert again.index.ntotal == 30 and "embedded 30 passages" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One process over the replicated flat index, then 2 torchrun processes over the sharded one."""
    from test_distributed import compose, small_corpus, train_overrides

    from rag.cli import train as train_cli
    from rag.data.corpus import write_passages

    tmp = tmp_path_factory.mktemp("sharded-ddp")
    write_passages(tmp / "corpus.jsonl", small_corpus())
    one = train_cli.run(
        compose([*train_overrides(tmp, "one"), "data.batch_size=4", "data.eval_batch_size=4"])
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*command, str(Path(__file__).resolve()), str(tmp)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp,
    )
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    two = json.loads((tmp / "two" / "out" / "metrics.json").read_text())
    return {"tmp": tmp, "one": one, "two": two, "log": proc.stderr}


@pytest.mark.slow
def test_two_process_sharded_training_equals_one_process_replicated(trained):
    from test_distributed import train_losses

    one = train_losses(trained["tmp"] / "one" / "out")
    two = train_losses(trained["tmp"] / "two" / "out")
    assert len(one) == len(two) == 4
    np.testing.assert_allclose(two, one, rtol=2e-5)
    for split in ("val", "test"):
        assert set(trained["one"][split]) == set(trained["two"][split])
        for key, value in trained["one"][split].items():
            assert trained["two"][split][key] == pytest.approx(value, rel=2e-5, abs=1e-6), (split, key)
    # each rank held its half of the 16 passages, and no index was built
    log = trained["log"]
    assert "sharded index: rank 0 of 2 holds rows 0..7 of 16" in log
    assert "sharded index: rank 1 of 2 holds rows 8..15 of 16" in log
    assert "built the flat index" not in log


def train_worker(tmp: Path) -> None:
    """What each of the 2 torchrun processes runs."""
    from test_distributed import compose, train_overrides

    from rag.cli import train as train_cli

    torch.set_num_threads(1)
    overrides = [
        *train_overrides(tmp, "two"),
        "index=sharded",
        "index.verbose=true",  # the smoke experiment quiets the index; the test reads the shards' lines
        "trainer=ddp_cpu",
        "data.batch_size=2",
        "data.eval_batch_size=2",
    ]
    train_cli.run(compose(overrides))


if __name__ == "__main__":
    train_worker(Path(sys.argv[1]))
