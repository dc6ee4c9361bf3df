"""IVF-PQ re-scored from the memory-mapped embeddings (``ivfpq_refine``): results against a brute-force
re-ranking of the same candidates, recall against plain IVF-PQ and exact search, float16 and float32 files,
save / load with the reference to the embeddings, the errors for missing, moved or other embeddings, and the
memory figures against the built index."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import faiss
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import rag.retrieval.kinds as kinds
from rag.retrieval.base import IndexEmbeddingsError
from rag.retrieval.errors import IndexCorruptError, IndexStateError
from rag.retrieval.index import (
    DenseIndex,
    IndexManifest,
    IVFPQIndex,
    IVFPQRefineIndex,
    estimate_memory_bytes,
    exact_search,
    make_index,
)
from rag.retrieval.memory import plan_for_index, plan_index_memory

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "index"
N, D, K = 4000, 32, 10
# 2^6 centroids per sub-quantiser and 6 bytes of code: fast to train, and coarse enough that plain IVF-PQ
# misses half of the exact top-10 (recall@10 0.46; re-scoring 10x the candidates: 0.98)
FAST = dict(k_factor=10, nlist=16, pq_m=8, pq_nbits=6, nprobe=16, recall_probes=0, verbose=False)


def clustered(n: int, d: int = D, n_clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres (the structure real passage embeddings have)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, n_clusters, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def save_npy(path: Path, x: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """Write x as an embeddings file and open it memory-mapped, as rag-index's embedding step leaves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, x.astype(dtype))
    return np.load(path, mmap_mode="r")


def rerank_oracle(stored: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int):
    """Brute force: each candidate's inner product in float64 from the stored values, rounded to float32,
    best first, equal scores by lower row; -1 candidates (none found) last."""
    vecs = np.asarray(stored, np.float64)
    out_s, out_i = [], []
    for q, cand in zip(queries.astype(np.float64), candidates):
        cand = cand[cand >= 0]
        scores = (vecs[cand] @ q).astype(np.float32)
        order = np.lexsort((cand, -scores))[:k]
        out_s.append(scores[order])
        out_i.append(cand[order])
    return np.array(out_s), np.array(out_i)


def recall(approx: np.ndarray, exact: np.ndarray, k: int = K) -> float:
    return float(np.mean([len(np.intersect1d(a[:k], e[:k])) / k for a, e in zip(approx, exact)]))


def candidates_of(index: IVFPQRefineIndex, queries: np.ndarray, n: int) -> np.ndarray:
    """The IVF-PQ candidate list the refined index re-scores, from faiss directly."""
    params = faiss.SearchParametersIVF(nprobe=min(index.nprobe, index.faiss_index.nlist))
    return index.faiss_index.search(queries, n, params=params)[1]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = clustered(N)
    rng = np.random.default_rng(1)
    q = x[rng.choice(N, 64, replace=False)] + 0.3 * rng.standard_normal((64, D)).astype(np.float32)
    return x, q


@pytest.fixture(scope="module")
def built(data, tmp_path_factory) -> dict[str, tuple[IVFPQRefineIndex, np.ndarray]]:
    x, _ = data
    out = {}
    for dtype in ("float32", "float16"):
        stored = save_npy(tmp_path_factory.mktemp(f"embeds-{dtype}") / "embeds.npy", x, dtype)
        out[dtype] = (IVFPQRefineIndex(**FAST).build(stored), stored)
    return out


# ----------------------------------------------------------------------------------------------------
# Results


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_results_equal_a_brute_force_reranking_of_the_same_candidates(built, data, dtype):
    _, q = data
    index, stored = built[dtype]
    scores, ids = index.search(q, K)
    want_scores, want_ids = rerank_oracle(stored, q, candidates_of(index, q, FAST["k_factor"] * K), K)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    # the scores are the true inner products with the stored rows (float16 ones for a float16 file)
    np.testing.assert_allclose(
        scores, np.einsum("bd,bkd->bk", q, np.asarray(stored, np.float32)[ids]), rtol=1e-5, atol=1e-6
    )
    # reconstruct gives the stored rows themselves, not the decoded codes
    np.testing.assert_array_equal(index.reconstruct(ids[:3]), np.asarray(stored, np.float32)[ids[:3]])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_recall_beats_plain_ivfpq_and_reaches_095(built, data, dtype):
    _, q = data
    index, stored = built[dtype]
    exact_ids = exact_search(stored, q, K)[1]
    plain = recall(candidates_of(index, q, K), exact_ids)  # the same codes, ranked by their PQ scores
    refined = recall(index.search(q, K)[1], exact_ids)
    assert plain < 0.8 and refined >= 0.95 and refined > plain + 0.15, (plain, refined)
    # more candidates re-scored, more of the exact top-10 found
    index.k_factor = 1
    assert recall(index.search(q, K)[1], exact_ids) < refined
    index.k_factor = FAST["k_factor"]


def test_too_few_candidates_fill_with_minus_one_and_warn(built, data):
    _, q = data
    index, stored = built["float32"]
    index.nprobe = 1  # one cell of the 16: fewer rows than asked for
    try:
        with pytest.warns(UserWarning, match="fewer than n_docs=600 .* raise k_factor or nprobe"):
            scores, ids = index.search(q[:4], 600)
        cands = candidates_of(index, q[:4], 6000)
    finally:
        index.nprobe = FAST["nprobe"]
    missing = ids < 0
    assert missing.any() and (scores[missing] == -np.inf).all() and np.isfinite(scores[~missing]).all()
    # what was found comes first, ranked as the oracle ranks it
    for i, (row, found) in enumerate(zip(ids, missing)):
        assert (found[:-1] <= found[1:]).all()
        want = rerank_oracle(stored, q[i : i + 1], cands[i : i + 1], 600)[1][0]
        np.testing.assert_array_equal(row[~found], want)


def test_equal_scores_are_ordered_by_row_as_exact_search_orders_them(tmp_path):
    # small integer vectors: every inner product is exact in float32, and many rows repeat
    rng = np.random.default_rng(3)
    distinct = rng.integers(-2, 3, (40, 16)).astype(np.float32)
    x = distinct[rng.integers(0, 40, 1200)]
    q = distinct[:8] + rng.integers(0, 2, (8, 16)).astype(np.float32)
    stored = save_npy(tmp_path / "embeds.npy", x)
    index = IVFPQRefineIndex(k_factor=40, nlist=4, pq_m=4, pq_nbits=4, nprobe=4, recall_probes=0).build(
        stored
    )
    scores, ids = index.search(q, 20)
    assert (np.diff(scores, axis=1) <= 0).all()
    ties = (np.diff(scores, axis=1) == 0) & (np.diff(ids, axis=1) != 0)
    assert ties.sum() > 50 and (np.diff(ids, axis=1)[ties] > 0).all()  # equal scores: lower row first
    want_s, want_i = rerank_oracle(stored, q, candidates_of(index, q, 40 * 20), 20)
    np.testing.assert_array_equal(ids, want_i)
    # wherever the candidate list holds the whole exact top-20, the results are exact search's, ties too
    exact_s, exact_i = exact_search(stored, q, 20)
    np.testing.assert_array_equal(scores, exact_s)
    complete = (ids == exact_i).all(1)
    assert complete.sum() >= 6


def test_a_small_candidate_buffer_gives_the_same_results_within_its_bound(built, data, monkeypatch):
    _, q = data
    index, stored = built["float16"]
    want = index.search(q, K)
    monkeypatch.setattr(kinds, "REFINE_BUFFER_BYTES", 40 * D * 12)  # 40 rows at a time: many blocks
    tracemalloc.start()
    got = index.search(q[:1], K)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # faiss' (1, k_factor*K) candidate list, its scores and the block of 40 rows: a few kB, not the corpus
    assert peak < 40 * D * 12 + 20 * FAST["k_factor"] * K + 64 * 1024
    got = index.search(q, K)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


def test_add_rescores_the_new_rows_from_their_own_file(data, tmp_path):
    x, q = data
    first = save_npy(tmp_path / "a" / "embeds.npy", x[:3000], "float16")
    second = save_npy(tmp_path / "b" / "embeds.npy", x[3000:], "float16")
    index = IVFPQRefineIndex(**FAST).build(first)
    index.add(second)
    assert index.ntotal == N
    both = np.concatenate([np.asarray(first), np.asarray(second)])
    scores, ids = index.search(q, K)
    np.testing.assert_array_equal(ids, rerank_oracle(both, q, candidates_of(index, q, 10 * K), K)[1])
    assert (ids >= 3000).any()
    index.save(tmp_path / "index")
    parts = json.loads((tmp_path / "index" / "manifest.json").read_text())["files"]["embeddings"]["parts"]
    assert [(p["start"], p["rows"], p["path"]) for p in parts] == [
        (0, 3000, "../a/embeds.npy"),
        (3000, 1000, "../b/embeds.npy"),
    ]
    loaded = DenseIndex.load(tmp_path / "index")
    for a, b in zip(loaded.search(q, K), (scores, ids)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------------
# Save / load and the reference to the embeddings


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_save_load_round_trip_refers_to_the_embeddings(built, data, tmp_path, dtype):
    _, q = data
    index, stored = built[dtype]
    index.save(tmp_path / "index")
    m = json.loads((tmp_path / "index" / "manifest.json").read_text())
    (part,) = m["files"]["embeddings"]["parts"]
    assert m["index_kind"] == "ivfpq_refine" and m["embed_dtype"] == dtype
    assert Path(part["absolute"]) == Path(stored.filename) and part["dtype"] == dtype
    assert (part["rows"], part["dim"], part["bytes"]) == (N, D, Path(stored.filename).stat().st_size)
    assert (tmp_path / "index" / part["path"]).resolve() == Path(stored.filename).resolve()
    want = index.search(q, K)
    for mmap in (False, True):
        loaded = DenseIndex.load(tmp_path / "index", mmap=mmap)
        assert type(loaded) is IVFPQRefineIndex and loaded.params() == index.params()
        for a, b in zip(want, loaded.search(q, K)):
            np.testing.assert_array_equal(a, b)
        # RAM: the compressed index only, as before saving
        assert loaded.memory_bytes() == index.memory_bytes()


def test_an_index_moved_with_its_embeddings_still_loads(data, tmp_path):
    x, q = data
    stored = save_npy(tmp_path / "cache" / "embeddings" / "embeds.npy", x, "float16")
    index = IVFPQRefineIndex(**FAST).build(stored)
    index.save(tmp_path / "cache" / "indexes" / "refine")
    want = index.search(q, K)
    shutil.move(tmp_path / "cache", tmp_path / "moved")  # the whole cache: the relative path still holds
    loaded = DenseIndex.load(tmp_path / "moved" / "indexes" / "refine")
    np.testing.assert_array_equal(loaded.search(q, K)[1], want[1])


def test_missing_moved_or_other_embeddings_give_one_clear_line(data, tmp_path):
    x, q = data
    home = tmp_path / "embeddings"
    stored = save_npy(home / "embeds.npy", x, "float16")
    index = IVFPQRefineIndex(**FAST).build(stored)
    index.save(tmp_path / "index", IndexManifest(rebuild_command="rag-index index=ivfpq_refine rebuild=true"))
    want = index.search(q, K)[1]
    del index, stored

    def refused(match: str, **kwargs) -> str:
        with pytest.raises(IndexEmbeddingsError, match=match) as err:
            DenseIndex.load(tmp_path / "index", **kwargs)
        message = str(err.value)
        assert "\n" not in message and "rag-index index=ivfpq_refine rebuild=true" in message
        return message

    # moved: refused naming where they were, found again when told where they are now
    shutil.move(home, tmp_path / "elsewhere")
    message = refused("missing")
    assert str(home / "embeds.npy") in message and "embeddings=" in message
    loaded = DenseIndex.load(tmp_path / "index", embeddings=tmp_path / "elsewhere")
    np.testing.assert_array_equal(loaded.search(q, K)[1], want)
    loaded = DenseIndex.load(tmp_path / "index", embeddings=tmp_path / "elsewhere" / "embeds.npy")
    np.testing.assert_array_equal(loaded.search(q, K)[1], want)

    # other embeddings of the same shape and dtype (another encoder): refused, whichever way they are named
    save_npy(home / "embeds.npy", clustered(N, seed=7), "float16")
    message = refused("other values")
    assert str(home / "embeds.npy") in message
    shutil.copy(home / "embeds.npy", tmp_path / "elsewhere" / "other.npy")
    refused("other values", embeddings=tmp_path / "elsewhere" / "other.npy")
    # the right ones given explicitly win over the wrong ones where the manifest points
    np.testing.assert_array_equal(
        DenseIndex.load(tmp_path / "index", embeddings=tmp_path / "elsewhere").search(q, K)[1], want
    )

    # another dtype or row count (re-embedded in float32, or another corpus)
    save_npy(home / "embeds.npy", x, "float32")
    shutil.rmtree(tmp_path / "elsewhere")
    assert "float32" in refused("holds .* float32, the index was built from .4000, 32. float16")
    save_npy(home / "embeds.npy", x[:-1], "float16")
    refused(r"holds \(3999, 32\)")
    (home / "embeds.npy").write_bytes(b"not an array")
    refused("not a readable .npy file")

    # a manifest that lost the record is a damaged index
    m = json.loads((tmp_path / "index" / "manifest.json").read_text())
    del m["files"]["embeddings"]
    (tmp_path / "index" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexCorruptError, match="not the embeddings of all its 4000 rows"):
        DenseIndex.load(tmp_path / "index")


def test_embeddings_in_memory_cannot_be_saved_and_nothing_is_written(data, tmp_path):
    x, q = data
    index = IVFPQRefineIndex(**FAST).build(x)  # re-scores from the array itself
    scores, ids = index.search(q, K)
    np.testing.assert_array_equal(ids, rerank_oracle(x, q, candidates_of(index, q, 10 * K), K)[1])
    with pytest.raises(IndexStateError, match=r"held in memory.*mmap_mode='r'"):
        index.save(tmp_path / "index")
    assert not any((tmp_path / "index").iterdir())
    # a view of part of a file is not the file either
    stored = save_npy(tmp_path / "embeds.npy", np.concatenate([x, x[:10]]))
    part = IVFPQRefineIndex(**FAST).build(stored[:N])
    with pytest.raises(IndexStateError, match="a view of part of"):
        part.save(tmp_path / "index")


# ----------------------------------------------------------------------------------------------------
# Memory


def test_memory_is_the_compressed_index_and_the_estimate_matches_it(built, data):
    x, _ = data
    index, _ = built["float16"]
    params = {k: v for k, v in FAST.items() if k not in ("recall_probes", "verbose")}
    plain = IVFPQIndex(**{k: v for k, v in FAST.items() if k != "k_factor"}).build(x)
    assert index.memory_bytes() == plain.memory_bytes()  # no vectors in RAM
    assert estimate_memory_bytes("ivfpq_refine", N, D, **params) == pytest.approx(
        index.memory_bytes(), rel=0.03
    )
    estimate = index.memory_estimate(N, D, "float16")
    assert estimate.disk_bytes == N * D * 2  # the embeddings stay on disk, outside index_bytes
    assert 0 < estimate.search_bytes <= 1.1 * kinds.REFINE_BUFFER_BYTES
    assert estimate.build_bytes >= estimate.index_bytes + estimate.search_bytes
    plan = plan_for_index(IVFPQRefineIndex(**FAST), N, D, "float16", available_bytes=None)
    assert plan.estimate("ivfpq_refine").index_bytes == estimate.index_bytes


def test_the_memory_plan_at_paper_scale():
    n = 21_015_324
    plan = plan_index_memory(n, 768, "ivfpq_refine", {}, available_bytes=None, embed_dtype="float16")
    refine, ivf = plan.estimate("ivfpq_refine"), plan.estimate("ivfpq")
    # pq_m=64 code bytes + 8 id bytes, the centroids and codebooks: under 100 B/vector, about 1.5 GB
    assert refine.index_bytes == ivf.index_bytes and refine.index_bytes / n <= 100
    assert 1.4e9 < refine.index_bytes + refine.search_bytes < 2e9
    assert refine.disk_bytes == n * 768 * 2
    table = plan.table()
    assert "ivfpq_refine (pq_m=64, pq_nbits=8, nlist=4584)" in table and "<- asked for" in table
    assert "re-scores from the 32.3 GB of float16 embeddings on disk" in table
    fits = plan_index_memory(n, 768, "hnsw", {}, available_bytes=26 * 10**9).fitting_kinds()
    assert [e.kind for e in fits] == ["hnsw_sq8", "ivfpq_refine", "ivfpq"]


# ----------------------------------------------------------------------------------------------------
# Config and rag-index


def test_the_config_builds_the_kind(data, tmp_path):
    x, q = data
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="ivfpq_refine")
    index = instantiate(cfg, verbose=False, recall_probes=0, pq_m=8, pq_nbits=6)
    assert index.kind == "ivfpq_refine" and isinstance(index, IVFPQRefineIndex)
    assert set(cfg) - {"_target_"} <= set(index.params()) | {"verbose"}
    index.build(save_npy(tmp_path / "embeds.npy", x, "float16"))
    assert index.search(q, 3)[1].shape == (len(q), 3)


def test_ensure_index_refers_to_its_embeddings_and_rebuilds_when_they_are_gone(tmp_path, capsys):
    from rag.build import ensure_index
    from rag.data.miniwiki import load_corpus
    from rag.model import tiny_bert_encoder

    passages = load_corpus()[:40]
    encoder = tiny_bert_encoder("document")
    params = dict(k_factor=4, pq_m=8, pq_nbits=4, recall_probes=0, verbose=False)
    embed = {"show_progress": False}
    index_dir, embeddings_dir = tmp_path / "indexes" / "refine", tmp_path / "embeddings" / "mini"

    def ensure(where: Path):
        return ensure_index(
            passages,
            encoder,
            make_index("ivfpq_refine", **params),
            index_dir,
            where,
            embed=embed,
            prebuilt=[],
        )

    first = ensure(embeddings_dir)
    assert first.built
    (part,) = json.loads((index_dir / "manifest.json").read_text())["files"]["embeddings"]["parts"]
    assert Path(part["absolute"]).parent == embeddings_dir and part["path"].startswith(
        "../../embeddings/mini/"
    )
    q = np.asarray(first.index.reconstruct(np.arange(5)))
    want = first.index.search(q, 3)[1]
    again = ensure(embeddings_dir)
    assert not again.built
    np.testing.assert_array_equal(again.index.search(q, 3)[1], want)
    # the embeddings moved and rag-index told where: loaded from there, not rebuilt
    shutil.move(embeddings_dir, tmp_path / "moved")
    moved = ensure(tmp_path / "moved")
    assert not moved.built
    np.testing.assert_array_equal(moved.index.search(q, 3)[1], want)
    # gone: embedded again and rebuilt, the reason logged
    shutil.rmtree(tmp_path / "moved")
    capsys.readouterr()
    rebuilt = ensure(embeddings_dir)
    assert rebuilt.built and "which are missing (moved or deleted)" in capsys.readouterr().err
    np.testing.assert_array_equal(rebuilt.index.search(q, 3)[1], want)
