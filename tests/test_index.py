"""Dense indexes: exactness against numpy brute force, approximate recall against exact search, memory
accounting against faiss' own serialisation, add, save/load, manifest checks, atomic saves, corruption."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from rag.retrieval import base as index_mod
from rag.retrieval.errors import (
    IndexCorruptError,
    IndexDeviceError,
    IndexMismatchError,
    IndexNotFoundError,
    IndexStateError,
    RetrievalInputError,
)
from rag.retrieval.index import (
    INDEX_KINDS,
    DenseIndex,
    FlatIndex,
    HNSWIndex,
    IndexManifest,
    IVFPQIndex,
    estimate_memory_bytes,
    exact_search,
    make_index,
    recall_vs_exact,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "index"
N, D = 2000, 32


def clustered(
    n: int, d: int = D, n_clusters: int = 20, norm_spread: float = 0.0, seed: int = 0
) -> np.ndarray:
    """Unit vectors around random centres; norm_spread > 0 scales each by a log-normal factor, as
    DPR's unnormalised embeddings vary in norm."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, n_clusters, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if norm_spread:
        x *= rng.lognormal(0.0, norm_spread, (n, 1)).astype(np.float32)
    return x


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference: scores in float64, order by score then lower row."""
    scores = q.astype(np.float64) @ x.astype(np.float64).T
    ids = np.broadcast_to(np.arange(x.shape[0]), scores.shape)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, -1), order


# Small, fast settings for every kind (pq_nbits=4: 16 centroids train in milliseconds on 2,000 rows).
FAST = {
    "flat": dict(chunk_rows=512),
    "hnsw": dict(m=16, ef_construction=80, ef_search=128, recall_probes=0, chunk_rows=512),
    "hnsw_l2": dict(m=16, ef_construction=80, ef_search=128, mips="l2", recall_probes=0, chunk_rows=512),
    "hnsw_sq8": dict(m=16, ef_construction=80, ef_search=128, recall_probes=0, chunk_rows=512),
    "ivfpq": dict(nlist=16, pq_m=8, pq_nbits=4, nprobe=16, recall_probes=0, chunk_rows=512),
}


def fast_index(name: str) -> DenseIndex:
    kind = "hnsw" if name == "hnsw_l2" else name
    return make_index(kind, verbose=False, **FAST[name])


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(N), clustered(64, seed=1)


@pytest.fixture(scope="module")
def built(data) -> dict[str, DenseIndex]:
    x, _ = data
    return {name: fast_index(name).build(x) for name in FAST}


# ----------------------------------------------------------------------------------------------------
# Exact search


def test_flat_equals_brute_force_with_ties_across_blocks():
    # Small integer vectors: every inner product is exact in float32 whatever the summation order, and
    # many scores tie, also at the k-th place and across the 300-row blocks.
    rng = np.random.default_rng(0)
    x = rng.integers(-2, 3, (N, 8)).astype(np.float32)
    q = rng.integers(-2, 3, (40, 8)).astype(np.float32)
    ref_scores, ref_ids = brute_force(x, q, 25)
    assert (ref_scores[:, 24:25] == brute_force(x, q, 26)[0][:, 25:26]).any(), "fixture must tie at k"
    index = FlatIndex(chunk_rows=300, verbose=False).build(x)
    scores, ids = index.search(q, 25)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and scores.shape == (40, 25)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))


def test_flat_equals_brute_force_on_floats_any_input_type(data):
    x, q = data
    ref_scores, ref_ids = brute_force(x, q, 10)
    index = FlatIndex(chunk_rows=700, verbose=False).build(torch.from_numpy(x))
    for queries in (q, torch.from_numpy(q), torch.from_numpy(q).requires_grad_()):
        scores, ids = index.search(queries, 10)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    # the module-level reference streams a (float16) memmap-like array chunk by chunk
    x16 = x.astype(np.float16)
    s16, i16 = exact_search(x16, q, 10, chunk_rows=333)
    r16_scores, r16_ids = brute_force(x16.astype(np.float32), q, 10)
    np.testing.assert_array_equal(i16, r16_ids)
    np.testing.assert_allclose(s16, r16_scores, rtol=1e-5, atol=1e-5)


def test_flat_whole_corpus_and_single_block(data):
    x, q = data
    index = FlatIndex(verbose=False).build(x[:50])
    scores, ids = index.search(q, 50)
    ref_scores, ref_ids = brute_force(x[:50], q, 50)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_bad_inputs_get_clear_errors(built, data):
    x, q = data
    index = built["flat"]
    with pytest.raises(RetrievalInputError, match="dimension 16 .* 32-d"):
        index.search(q[:, :16], 5)
    with pytest.raises(RetrievalInputError, match="batch dimension"):
        index.search(q[0], 5)
    with pytest.raises(RetrievalInputError, match=f"at most {N}"):
        index.search(q, N + 1)
    with pytest.raises(RetrievalInputError, match="positive integer"):
        index.search(q, 0)
    bad = x[:10].copy()
    bad[7, 3] = np.nan
    with pytest.raises(RetrievalInputError, match="row 7"):
        FlatIndex(verbose=False).build(bad)
    with pytest.raises(RetrievalInputError, match="float32 or float16"):
        FlatIndex(verbose=False).build(np.ones((4, 4), np.int64))
    with pytest.raises(IndexStateError, match="empty"):
        HNSWIndex(verbose=False).search(q, 5)
    with pytest.raises(RetrievalInputError, match="unknown index kind 'annoy'"):
        make_index("annoy")
    with pytest.raises(RetrievalInputError, match="must divide the dimension 32"):
        IVFPQIndex(pq_m=5, verbose=False).build(x)


# ----------------------------------------------------------------------------------------------------
# Approximate search


@pytest.mark.parametrize(("name", "threshold"), [("hnsw", 0.95), ("hnsw_l2", 0.95), ("hnsw_sq8", 0.9)])
def test_hnsw_recall_at_10_against_exact(built, data, name, threshold):
    x, q = data
    index = built[name]
    rec = recall_vs_exact(index, built["flat"], q, k=(1, 10))
    assert rec["n_queries"] == len(q)
    assert rec["recall@10"] >= threshold, rec
    # recall is the mean overlap of the two top-10 lists, computed here by hand
    _, approx = index.search(q, 10)
    _, exact = brute_force(x, q, 10)
    by_hand = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert rec["recall@10"] == pytest.approx(by_hand)


def test_hnsw_scores_are_true_inner_products(built, data):
    x, q = data
    for name in ("hnsw", "hnsw_l2"):
        scores, ids = built[name].search(q, 10)
        np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", q, x[ids]), rtol=1e-5, atol=1e-5)
        assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_ef_search_below_n_docs_still_returns_n_docs(data):
    x, q = data
    index = HNSWIndex(m=8, ef_construction=20, ef_search=4, recall_probes=0, verbose=False).build(x)
    scores, ids = index.search(q, 50)
    assert (ids >= 0).all()
    assert all(len(set(r)) == 50 for r in ids)


@pytest.mark.filterwarnings("ignore:ivfpq index recall")
def test_ivfpq_low_nprobe_costs_recall_and_build_reports_it(data, capsys):
    x, q = data
    good = IVFPQIndex(nlist=16, pq_m=8, pq_nbits=4, nprobe=16, recall_probes=64).build(x)
    line = capsys.readouterr().err
    assert "ivfpq" in line and "recall vs exact on 64 perturbed corpus rows" in line and "@10" in line
    assert f"@10 {good.build_recall['recall@10']:.3f}" in line
    good.nprobe = 1
    with pytest.warns(UserWarning, match="raise nprobe"):
        poor = good.report_recall(x, q)
    good.nprobe = 16
    assert poor["recall@10"] < recall_vs_exact(good, x, q, (10,))["recall@10"]


# ----------------------------------------------------------------------------------------------------
# Memory


def test_memory_accounting_matches_faiss_serialisation(built):
    for name in ("hnsw", "hnsw_l2", "hnsw_sq8", "ivfpq"):
        index = built[name]
        on_disk = faiss.serialize_index(index.faiss_index).nbytes
        assert index.memory_bytes() == pytest.approx(on_disk, rel=0.02), name
    assert built["flat"].memory_bytes() == N * D * 4


@pytest.mark.parametrize("name", list(FAST))
def test_estimate_before_building_matches_the_built_index(built, name):
    index = built[name]
    params = {k: v for k, v in FAST[name].items() if k not in ("recall_probes", "chunk_rows")}
    estimate = estimate_memory_bytes(index.kind, N, D, **params)
    assert estimate == pytest.approx(index.memory_bytes(), rel=0.03)


def test_bytes_per_vector_of_the_compressed_kinds(built):
    m = FAST["hnsw_sq8"]["m"]
    sq8 = built["hnsw_sq8"]
    # faiss' figure for HNSW: D (codes) + 8M (level-0 links) per vector; the rest is the upper levels,
    # offsets and levels (~16 bytes) and the quantiser's 2D floats.
    per_vector = (sq8.memory_bytes() - 2 * 4 * D) / N
    assert D + 8 * m <= per_vector <= D + 8 * m + 20
    ivf = built["ivfpq"]
    fixed = 16 * D * 4 + 16 * D * 4  # nlist centroids + 2^nbits * D PQ centroids
    assert (ivf.memory_bytes() - fixed) / N == 8 * 4 / 8 + 8  # code bytes + id
    # the shipped config at 768-d: <= 100 bytes per vector at 21M passages
    shipped = instantiate(compose_index("ivfpq"))
    n_wiki = 21_000_000
    params = {k: getattr(shipped, k) for k in ("nlist", "pq_m", "pq_nbits", "train_size")}
    assert estimate_memory_bytes("ivfpq", n_wiki, 768, **params) / n_wiki <= 100


# ----------------------------------------------------------------------------------------------------
# add()


@pytest.mark.parametrize("name", list(FAST))
def test_add_then_search_finds_the_new_vectors(data, name):
    x, q = data
    index = fast_index(name).build(x[:1500])
    before_ids = index.search(q, 5)[1]
    index.add(x[1500:])
    assert index.ntotal == N
    scores, ids = index.search(x[1500:1600], 1)
    if name == "ivfpq":
        # 4-byte codes blur neighbours: added rows are found about as often as the rows built in
        found_new = np.mean(
            [row in r for row, r in zip(range(1500, 1600), index.search(x[1500:1600], 10)[1])]
        )
        found_old = np.mean([row in r for row, r in zip(range(100), index.search(x[:100], 10)[1])])
        assert found_new >= 0.7 and found_new >= found_old - 0.15
    else:
        np.testing.assert_array_equal(ids[:, 0], np.arange(1500, 1600))
    if name == "flat":  # exact: identical to a fresh build over all rows
        fresh = FlatIndex(chunk_rows=512, verbose=False).build(x)
        for a, b in zip(index.search(q, 20), fresh.search(q, 20)):
            np.testing.assert_array_equal(a, b)
        # the old rows were not touched
        np.testing.assert_array_equal(index.reconstruct(np.arange(1500)), x[:1500])
    assert before_ids.max() < 1500


@pytest.mark.parametrize("name", ["flat", "hnsw"])
def test_a_bad_row_leaves_no_partial_add_or_build(data, name):
    x, q = data
    index = fast_index(name).build(x[:1000])
    before = index.search(q, 5)
    bad = x[1000:].copy()
    bad[700, 3] = np.inf  # in the second chunk of 512 rows
    with pytest.raises(RetrievalInputError, match="row 700"):
        index.add(bad)
    assert index.ntotal == 1000
    for a, b in zip(index.search(q, 5), before):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RetrievalInputError, match="row 700"):
        index.build(bad)
    with pytest.raises(IndexStateError, match="empty"):
        index.search(q, 5)


def test_l2_trick_refuses_vectors_beyond_its_norm_bound(data):
    x, _ = data
    index = fast_index("hnsw_l2").build(x)
    with pytest.raises(IndexStateError, match="row 3 has squared norm"):
        index.add(np.concatenate([x[:3], 3 * x[:5]]))
    assert index.ntotal == N  # checked before anything went in
    roomy = HNSWIndex(mips="l2", max_norm=3.0, recall_probes=0, verbose=False).build(x)
    roomy.add(3 * x[:5])
    assert roomy.search(3 * x[:5], 1)[1][:, 0].tolist() == list(range(N, N + 5))


def test_reconstruct(built, data):
    x, _ = data
    ids = np.array([[0, 5, -1], [N - 1, 17, 3]])
    for name in ("flat", "hnsw", "hnsw_l2"):
        out = built[name].reconstruct(ids)
        assert out.shape == (2, 3, D)
        np.testing.assert_array_equal(out[ids >= 0], x[ids[ids >= 0]])
        assert (out[0, 2] == 0).all()
    approx = built["hnsw_sq8"].reconstruct(ids[:, :2])
    np.testing.assert_allclose(approx, x[ids[:, :2]], atol=0.02)
    with pytest.raises(RetrievalInputError, match="0..1999"):
        built["flat"].reconstruct([N])


# ----------------------------------------------------------------------------------------------------
# save / load, manifest


def manifest(**overrides) -> IndexManifest:
    base = dict(encoder_name="minilm", encoder_checksum="enc-1", corpus_checksum="corpus-1", n_passages=N)
    return IndexManifest(**{**base, **overrides})


@pytest.mark.parametrize("name", list(FAST))
def test_save_load_round_trip_gives_identical_results(built, data, tmp_path, name):
    _, q = data
    index = built[name]
    written = index.save(tmp_path / "idx", manifest(embed_dtype="float16"))
    loaded = DenseIndex.load(tmp_path / "idx", expected=manifest())
    assert type(loaded) is type(index) and loaded.ntotal == N and loaded.dim == D
    assert loaded.params() == index.params()
    for a, b in zip(index.search(q, 10), loaded.search(q, 10)):
        np.testing.assert_array_equal(a, b)
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert m["index_kind"] == index.kind and m["dim"] == D and m["n_passages"] == N
    assert m["metric"] == "inner_product" and m["embed_dtype"] == "float16"
    assert m["versions"]["faiss"] == faiss.__version__ and m["created_at"]
    assert m["files"]["index"]["bytes"] == (tmp_path / "idx" / m["files"]["index"]["name"]).stat().st_size
    assert written.files == m["files"]


@pytest.mark.parametrize("name", ["flat", "hnsw", "hnsw_sq8", "ivfpq"])
def test_memory_mapped_load_searches_alike_and_is_read_only(built, data, tmp_path, name):
    x, q = data
    built[name].save(tmp_path, manifest())
    mapped = DenseIndex.load(tmp_path, mmap=True)
    for a, b in zip(built[name].search(q, 10), mapped.search(q, 10)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(IndexStateError, match="mmap=True and is read-only"):
        mapped.add(x[:3])
    assert mapped.ntotal == N
    mapped.build(x[:100])  # a fresh build lives in memory again
    mapped.add(x[100:110])
    assert mapped.ntotal == 110


def test_load_refuses_another_encoder_dimension_or_corpus(built, tmp_path):
    built["hnsw"].save(tmp_path, manifest(rebuild_command="rag-index index=hnsw corpus=mini"))
    cases = {
        "encoder_name": manifest(encoder_name="dpr-ctx"),
        "encoder_checksum": manifest(encoder_checksum="enc-2"),
        "dim": manifest(dim=768),
        "corpus_checksum": manifest(corpus_checksum="corpus-2"),
        "n_passages": manifest(n_passages=N + 10),
    }
    for field, expected in cases.items():
        with pytest.raises(IndexMismatchError) as err:
            DenseIndex.load(tmp_path, expected=expected)
        saved_value, wanted = err.value.differences[field]
        assert list(err.value.differences) == [field]
        message = str(err.value)
        assert field in message and repr(saved_value) in message and repr(wanted) in message
        assert "rag-index index=hnsw corpus=mini" in message
    both = manifest(encoder_name="dpr-ctx", dim=768)
    with pytest.raises(
        IndexMismatchError, match=r"(?s)encoder_name: index has 'minilm', expected 'dpr-ctx'.*dim"
    ):
        DenseIndex.load(tmp_path, expected=both)
    # an expected manifest that leaves fields empty checks only the ones it sets
    assert DenseIndex.load(tmp_path, expected=IndexManifest(encoder_name="minilm")).ntotal == N
    with pytest.raises(RetrievalInputError, match="n_passages=7"):
        built["hnsw"].save(tmp_path / "other", IndexManifest(n_passages=7))
    with pytest.raises(RetrievalInputError, match="not a flat"):
        FlatIndex.load(tmp_path)


@pytest.mark.parametrize("name", ["flat", "hnsw"])
def test_a_crash_mid_save_leaves_the_old_index(built, data, tmp_path, monkeypatch, name):
    _, q = data
    index = built[name]
    old = (
        FlatIndex(verbose=False).build(clustered(300, seed=5))
        if name == "flat"
        else fast_index(name).build(clustered(300, seed=5))
    )
    old.save(tmp_path, manifest(n_passages=300))
    old_results = old.search(q, 5)

    real_replace = os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith("manifest.json"):
            raise KeyboardInterrupt("killed while saving")
        return real_replace(src, dst)

    monkeypatch.setattr(index_mod.os, "replace", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        index.save(tmp_path, manifest())
    monkeypatch.undo()
    survivor = DenseIndex.load(tmp_path)
    assert survivor.ntotal == 300
    for a, b in zip(survivor.search(q, 5), old_results):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    # a crash while the data file is written: nothing half-written is ever named by the manifest
    def half_write(self, path):
        Path(path).write_bytes(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(type(index), "_save_data", half_write)
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path, manifest())
    monkeypatch.undo()
    assert DenseIndex.load(tmp_path).ntotal == 300

    # a save that completes replaces the old index and removes its file
    index.save(tmp_path, manifest())
    assert DenseIndex.load(tmp_path).ntotal == N
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("index-")]) == 1


def test_a_crash_during_the_first_save_leaves_nothing_that_loads(built, tmp_path, monkeypatch):
    def crash(src, dst):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(index_mod.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        built["hnsw"].save(tmp_path / "new", manifest())
    monkeypatch.undo()
    with pytest.raises(IndexNotFoundError, match="no saved index"):
        DenseIndex.load(tmp_path / "new")


@pytest.mark.parametrize("name", ["flat", "hnsw", "ivfpq"])
def test_truncated_or_damaged_files_give_a_clear_error(built, tmp_path, name):
    built[name].save(tmp_path, manifest(rebuild_command="rag-index index=x"))
    m = json.loads((tmp_path / "manifest.json").read_text())
    data_path = tmp_path / m["files"]["index"]["name"]
    blob = data_path.read_bytes()

    data_path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IndexCorruptError, match="truncated.*rag-index index=x"):
        DenseIndex.load(tmp_path)

    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0xFF
    data_path.write_bytes(bytes(damaged))
    with pytest.raises(IndexCorruptError, match="SHA-256"):
        DenseIndex.load(tmp_path)

    # without the checksum, a damaged header is still caught by the reader, not a crash
    header_damaged = b"\x00" * 64 + blob[64:]
    data_path.write_bytes(header_damaged)
    with pytest.raises(IndexCorruptError, match="could not be read"):
        DenseIndex.load(tmp_path, verify_checksum=False)

    data_path.unlink()
    with pytest.raises(IndexCorruptError, match="missing"):
        DenseIndex.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(IndexCorruptError, match="not a valid index manifest"):
        DenseIndex.load(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Configs, devices


def compose_index(name: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name)


@pytest.mark.parametrize("name", ["flat", "hnsw", "hnsw_sq8", "ivfpq"])
def test_each_config_builds_its_kind(data, name):
    x, q = data
    cfg = compose_index(name)
    overrides = {"verbose": False, "recall_probes": 0}
    if name == "ivfpq":
        overrides.update(pq_m=8, pq_nbits=4)
    index = instantiate(cfg, **overrides)
    assert index.kind == name and isinstance(index, INDEX_KINDS[name])
    assert set(cfg) - {"_target_"} <= set(index.params()) | {"verbose"}
    index.build(x)
    assert index.search(q, 3)[1].shape == (len(q), 3)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="faiss has GPU support here")
def test_to_gpu_without_faiss_gpu_is_a_clear_error(built):
    with pytest.raises(IndexDeviceError, match="no GPU support"):
        built["ivfpq"].to_gpu()
    with pytest.raises(IndexDeviceError, match="no GPU support"):
        built["hnsw"].to_gpu()
