"""Paper-scale pipeline on this machine: N synthetic passages through convert, embed, build and search, with
the wall time, CPU time and peak memory of each stage, and the extrapolation to DPR's 21,015,324 passages.

Stages (each runs in its own process, so that its peak resident memory is its own):

1. ``generate``: a DPR-layout ``psgs_w100.tsv`` of N passages of 100 words (Zipf-distributed words of the
   MiniLM WordPiece vocabulary, so that tokenization behaves as on English text). Setup, not measured.
2. ``convert``: ``rag.data.arrow.convert_passages`` into memory-mapped Arrow files; then a full pass
   (the corpus checksum) and random row lookups. Baseline: ``read_passages`` into a Python list.
3. ``embed``: ``rag.retrieval.distributed_embed`` (Lightning ``Trainer.predict``, one CPU device) with a tiny
   BERT (2 layers, hidden ``--dim``), then the merge into one file. Baseline: ``embed_corpus`` (the plain
   loop) on the first file's rows. A calibration run times a BERT-base-shaped encoder (12 layers, 768) and
   the real MiniLM on a few hundred passages for the extrapolation.
4. ``build-<kind>``: the index memory plan, then the build and save (``--kinds``, default hnsw and ivfpq);
   the plan's predicted build peak is printed beside the measured one.
5. ``search-<kind>``: the saved index loaded memory-mapped, ``--queries`` probe queries in batches of 32,
   n_docs=5, the retrieved passages looked up in the Arrow table; recall@5 and speed against exact search
   over the embeddings (the baseline).

    python scripts/bench_scale.py --passages 1000000 --workdir /tmp/rag-scale      # ~1 h on 2 busy cores
    python scripts/bench_scale.py --passages 20000 --workdir /tmp/rag-scale-small   # a quick check

Results go to ``<workdir>/results.json``; the extrapolation is printed at the end. A stage already in the
results is skipped on a rerun (``--redo`` to run it again).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DPR_PASSAGES = 21_015_324
DPR_DIM = 768
QUERY_BATCH = 32
N_DOCS = 5


def _usage() -> dict:
    """Peak resident memory and CPU seconds of this process so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_bytes": own.ru_maxrss * 1024, "cpu_seconds": own.ru_utime + own.ru_stime}


def _rss_now(field: str = "VmRSS") -> int:
    """Resident memory now; ``RssAnon``: the private part, without the pages of memory-mapped files (the
    Arrow corpus, the embeddings, a mapped index), which the page cache shares and can reclaim."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def _private_now() -> int:
    return _rss_now("RssAnon")


def _import_everything() -> None:
    """The libraries every stage loads, imported before the stage's baseline memory is taken, so that the
    stage's own memory (peak minus baseline) is what grows with N."""
    import faiss  # noqa: F401
    import pyarrow  # noqa: F401
    import pytorch_lightning  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import rag.data.arrow  # noqa: F401
    import rag.retrieval.distributed_embed  # noqa: F401
    import rag.retrieval.index  # noqa: F401


def _threads(n: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def _tiny_encoder(dim: int):
    from rag.model import tiny_bert_encoder

    return tiny_bert_encoder(
        "document", hidden_size=dim, layers=2, attention_heads=2, intermediate_size=2 * dim, max_length=160
    )


# ---------------------------------------------------------------------------------------------- stages


def stage_generate(args) -> dict:
    import numpy as np

    from rag.generation.generator import default_bert_path

    vocab = (Path(default_bert_path()) / "vocab.txt").read_text(encoding="utf-8").split("\n")
    words = np.array([w for w in vocab if w.isalpha() and w.isascii() and len(w) > 1])
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, len(words) + 1)  # Zipf's law
    weights /= weights.sum()
    path = args.workdir / "psgs_w100.tsv"
    tmp = path.with_suffix(".tmp")
    block = 20_000
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        for start in range(0, args.passages, block):
            n = min(block, args.passages - start)
            text_ids = rng.choice(len(words), size=(n, 100), p=weights)
            title_ids = rng.choice(len(words), size=(n, 2), p=weights)
            for i in range(n):
                text = " ".join(words[text_ids[i]])
                title = " ".join(words[title_ids[i]]).title()
                f.write(f"{start + i + 1}\t{text}\t{title}\n")
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size}


def stage_convert(args) -> dict:
    import numpy as np

    from rag.data.arrow import convert_passages
    from rag.retrieval.embed import corpus_checksum

    out = args.workdir / "psgs_w100.arrow"
    started = time.perf_counter()
    passages = convert_passages(args.workdir / "psgs_w100.tsv", out, overwrite=True, show_progress=False)
    convert_s = time.perf_counter() - started
    convert_peak = max(_SAMPLER[0].peak, _rss_now())
    started = time.perf_counter()
    assert corpus_checksum(passages) == passages.corpus_checksum
    checksum_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(passages), size=10_000)
    started = time.perf_counter()
    for r in rows[:2000]:
        passages[int(r)]
    single_us = (time.perf_counter() - started) / 2000 * 1e6
    started = time.perf_counter()
    for b in range(0, len(rows), QUERY_BATCH * N_DOCS):
        passages.take(rows[b : b + QUERY_BATCH * N_DOCS])
    batch_ms = (time.perf_counter() - started) / math.ceil(len(rows) / (QUERY_BATCH * N_DOCS)) * 1e3
    disk = sum(p.stat().st_size for p in out.iterdir())
    return {
        "seconds": convert_s,
        "passages_per_s": len(passages) / convert_s,
        "convert_peak_rss_bytes": convert_peak,
        "convert_work_rss_bytes": convert_peak - _BASELINE[0],
        "mapped_rss_bytes": _rss_now() - _BASELINE[0],
        "convert_private_bytes": _SAMPLER[0].peak_private - _BASELINE[1],
        "checksum_pass_seconds": checksum_s,
        "row_lookup_us": single_us,
        "batch_lookup_ms": batch_ms,
        "arrow_disk_bytes": disk,
    }


def stage_read_list(args) -> dict:
    from rag.data.corpus import read_passages

    started = time.perf_counter()
    passages = read_passages(args.workdir / "psgs_w100.tsv")
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "n": len(passages),
        "held_rss_bytes": _rss_now() - _BASELINE[0],
        "held_private_bytes": _private_now() - _BASELINE[1],
    }


def stage_embed(args) -> dict:
    import warnings

    from rag.data.arrow import ArrowPassages
    from rag.retrieval.distributed_embed import embed_corpus_distributed

    warnings.filterwarnings("ignore")
    passages = ArrowPassages(args.workdir / "psgs_w100.arrow")
    encoder = _tiny_encoder(args.dim)
    started = time.perf_counter()
    report = embed_corpus_distributed(
        encoder,
        passages,
        args.workdir / "embeddings",
        batch_size=256,
        rows_per_file=65536,
        trainer={"accelerator": "cpu", "devices": 1},
        consolidate=False,
        show_progress=False,
    )
    embed_s = time.perf_counter() - started
    from rag.retrieval.embed import consolidate_embeddings

    started = time.perf_counter()
    consolidate_embeddings(args.workdir / "embeddings", passages, show_progress=False)
    merge_s = time.perf_counter() - started
    disk = sum(p.stat().st_size for p in (args.workdir / "embeddings").iterdir())
    return {
        "seconds": embed_s,
        "passages_per_s": len(passages) / embed_s,
        "files_computed": len(report.computed),
        "merge_seconds": merge_s,
        "embeddings_disk_bytes": disk,
    }


def stage_embed_baseline(args) -> dict:
    import shutil

    from rag.data.arrow import ArrowPassages
    from rag.retrieval.embed import embed_corpus

    passages = ArrowPassages(args.workdir / "psgs_w100.arrow")[:65536]
    out = args.workdir / "embeddings-baseline"
    shutil.rmtree(out, ignore_errors=True)
    encoder = _tiny_encoder(args.dim)
    started = time.perf_counter()
    embed_corpus(encoder, passages, out, batch_size=256, rows_per_file=65536, show_progress=False)
    seconds = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "passages_per_s": len(passages) / seconds}


def stage_calibrate(args) -> dict:
    """Passages/s of a BERT-base-shaped encoder (DPR's) and of MiniLM on this CPU, for the extrapolation."""
    import shutil

    from transformers import BertConfig, BertModel

    from rag.data.arrow import ArrowPassages
    from rag.retrieval.embed import embed_corpus
    from rag.retrieval.encoders import DocumentEncoder, load_document_encoder

    passages = ArrowPassages(args.workdir / "psgs_w100.arrow")
    out = {}
    minilm = load_document_encoder()
    base_model = BertModel(BertConfig(vocab_size=len(minilm.tokenizer)), add_pooling_layer=False).eval()
    base = DocumentEncoder(
        base_model, minilm.tokenizer, pooling="cls", max_length=256, name="bert-base-shape"
    )
    for name, encoder, n in (("minilm", minilm, 1024), ("bert_base", base, 256)):
        target = args.workdir / f"calibrate-{name}"
        shutil.rmtree(target, ignore_errors=True)
        started = time.perf_counter()
        embed_corpus(encoder, passages[:n], target, batch_size=64, show_progress=False)
        out[f"{name}_passages_per_s"] = n / (time.perf_counter() - started)
        shutil.rmtree(target, ignore_errors=True)
    return out


def _index_config(kind: str) -> dict:
    from omegaconf import OmegaConf

    from rag.build import conf_dir

    CONF_DIR = conf_dir()

    cfg = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "index" / f"{kind}.yaml"))
    cfg.pop("_target_")
    cfg["verbose"] = False
    return cfg


def _bench_index_config(kind: str, dim: int) -> dict:
    """The shipped config, with IVF-PQ's code keeping the shipped 12 dimensions per sub-quantiser (768/64)."""
    cfg = _index_config(kind)
    if kind == "ivfpq":
        cfg["pq_m"] = max(1, dim // 12)
        while dim % cfg["pq_m"]:
            cfg["pq_m"] -= 1
    return cfg


def stage_build(args, kind: str) -> dict:
    from rag.retrieval.embed import open_embeddings
    from rag.retrieval.index import IndexManifest, make_index
    from rag.retrieval.memory import plan_for_index

    embeds = open_embeddings(args.workdir / "embeddings")
    params = _bench_index_config(kind, args.dim)
    index = make_index(kind, **params)
    plan = plan_for_index(index, *embeds.shape)
    print(plan.table(), file=sys.stderr)
    started = time.perf_counter()
    index.build(embeds)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    index.save(args.workdir / f"index-{kind}", IndexManifest())
    save_s = time.perf_counter() - started
    disk = sum(p.stat().st_size for p in (args.workdir / f"index-{kind}").iterdir())
    return {
        "seconds": build_s,
        "save_seconds": save_s,
        "index_memory_bytes": index.memory_bytes(),
        "planned_index_bytes": plan.estimate(kind).index_bytes,
        "planned_build_bytes": plan.estimate(kind).build_bytes,
        "index_disk_bytes": disk,
        "recall_vs_exact": index.build_recall,
        "params": params,
    }


def stage_search(args, kind: str) -> dict:
    import numpy as np

    from rag.data.arrow import ArrowPassages
    from rag.retrieval.embed import open_embeddings
    from rag.retrieval.index import DenseIndex, exact_search, probe_queries

    passages = ArrowPassages(args.workdir / "psgs_w100.arrow")
    embeds = open_embeddings(args.workdir / "embeddings")
    started = time.perf_counter()
    index = DenseIndex.load(args.workdir / f"index-{kind}", verify_checksum=False, **_mmap_kwargs())
    load_s = time.perf_counter() - started
    after_load = _usage()["peak_rss_bytes"]
    private_after_load = _private_now() - _BASELINE[1]
    queries = probe_queries(embeds, args.queries, seed=1)
    started = time.perf_counter()
    ids = []
    for b in range(0, len(queries), QUERY_BATCH):
        _, doc_ids = index.search(queries[b : b + QUERY_BATCH], N_DOCS)  # (32, K)
        passages.take(doc_ids.reshape(-1))
        ids.append(doc_ids)
    search_s = time.perf_counter() - started
    ids = np.concatenate(ids)
    started = time.perf_counter()
    _, exact_ids = exact_search(embeds, queries, N_DOCS)
    exact_s = time.perf_counter() - started
    recall = float(np.mean([len(np.intersect1d(a, e)) / N_DOCS for a, e in zip(ids, exact_ids)]))
    return {
        "load_seconds": load_s,
        "rss_after_load_bytes": after_load,
        "private_after_load_bytes": private_after_load,
        "queries_per_s": len(queries) / search_s,
        "exact_queries_per_s": len(queries) / exact_s,
        "recall_at_5": recall,
    }


def _mmap_kwargs() -> dict:
    import inspect

    from rag.retrieval.index import DenseIndex

    return {"mmap": True} if "mmap" in inspect.signature(DenseIndex.load).parameters else {}


# ---------------------------------------------------------------------------------------------- driver


def run_stage(args, name: str) -> dict:
    """Run one stage in a child process; its result plus wall time, CPU time and peak RSS."""
    command = [
        sys.executable,
        __file__,
        "--stage",
        name,
        "--workdir",
        str(args.workdir),
        "--passages",
        str(args.passages),
        "--dim",
        str(args.dim),
        "--threads",
        str(args.threads),
        "--queries",
        str(args.queries),
    ]
    print(f"== {name}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"stage {name} failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall
    print(
        f"   {name}: {result['stage_wall_seconds']:.0f} s wall, {result['stage_cpu_seconds']:.0f} s CPU, peak RSS "
        f"{result['peak_rss_bytes'] / 1e9:.2f} GB ({result['work_rss_bytes'] / 1e9:.2f} GB above the imports)",
        file=sys.stderr,
        flush=True,
    )
    return result


class _PeakSampler:
    """Highest resident memory seen while the stage runs (sampled every 20 ms): ru_maxrss also counts the
    transient peak of the imports, which would hide a small stage."""

    def __init__(self) -> None:
        import threading

        self.peak = _rss_now()
        self.peak_private = _private_now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_now())
            self.peak_private = max(self.peak_private, _private_now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_now())


_BASELINE = [0, 0]  # resident, private
_SAMPLER: list[_PeakSampler | None] = [None]


def child(args) -> None:
    _threads(args.threads)
    _import_everything()
    baseline = _BASELINE[0] = _rss_now()
    _BASELINE[1] = _private_now()
    cpu0, wall0 = _usage()["cpu_seconds"], time.perf_counter()
    sampler = _SAMPLER[0] = _PeakSampler()
    name = args.stage
    if name.startswith("build-"):
        result = stage_build(args, name[6:])
    elif name.startswith("search-"):
        result = stage_search(args, name[7:])
    else:
        result = globals()[f"stage_{name.replace('-', '_')}"](args)
    peak = sampler.stop()
    result["stage_wall_seconds"] = time.perf_counter() - wall0
    result["stage_cpu_seconds"] = _usage()["cpu_seconds"] - cpu0
    result["peak_rss_bytes"] = peak
    result["baseline_rss_bytes"] = baseline
    result["work_rss_bytes"] = peak - baseline
    result["private_bytes"] = max(sampler.peak_private, _private_now()) - _BASELINE[1]
    print(json.dumps(result))


def gb(x: float) -> str:
    return f"{x / 1e9:.1f} GB" if x >= 1e8 else f"{x / 1e6:.0f} MB"


def mem(
    result: dict, peak: str = "peak_rss_bytes", work: str = "work_rss_bytes", private: str = "private_bytes"
) -> str:
    """Peak resident memory (with mapped file pages), and the stage's own private memory above the imports
    (or, for results measured before private memory was recorded, its resident memory above them, marked *)."""
    if private in result:
        return f"{gb(result[peak])} / {gb(result[private])}"
    return f"{gb(result[peak])} / {gb(result[work])}*"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def report(args, results: dict) -> None:
    from rag.retrieval.memory import plan_index_memory

    n = args.passages
    scale = DPR_PASSAGES / n
    print(
        f"\n## Measured: {n:,} synthetic passages, tiny encoder dim {args.dim}, {args.threads} threads "
        f"(2 shared cores: CPU time is the steadier figure)\n"
    )
    print("| stage | wall | CPU | peak RSS / private above imports | notes |\n|---|---:|---:|---:|---|")
    conv, lst = results["convert"], results.get("read-list")
    notes = (
        f"{conv['passages_per_s']:,.0f} passages/s; Arrow {gb(conv['arrow_disk_bytes'])} on disk; full pass "
        f"{conv['checksum_pass_seconds']:.0f} s; row {conv['row_lookup_us']:.0f} us, 160-row batch "
        f"{conv['batch_lookup_ms']:.1f} ms"
    )
    print(
        f"| convert | {duration(conv['stage_wall_seconds'])} | {duration(conv['stage_cpu_seconds'])} | "
        f"{mem(conv, 'convert_peak_rss_bytes', 'convert_work_rss_bytes', 'convert_private_bytes')} | {notes} |"
    )
    if lst:
        print(
            f"| baseline: read into a list | {duration(lst['stage_wall_seconds'])} | {duration(lst['stage_cpu_seconds'])} | "
            f"{mem(lst, private='held_private_bytes')} | the list stays resident in every process that reads it; "
            f"the Arrow corpus is mapped and shared (the converter's private peak: "
            f"{gb(conv.get('convert_private_bytes', 0))}) |"
        )
    emb = results["embed"]
    base = results.get("embed-baseline")
    ratio = f"; {emb['passages_per_s'] / base['passages_per_s']:.2f}x the plain loop's rate" if base else ""
    print(
        f"| embed (tiny, 1 device) | {duration(emb['stage_wall_seconds'])} | {duration(emb['stage_cpu_seconds'])} | "
        f"{mem(emb)} | {emb['passages_per_s']:,.0f} passages/s{ratio}; merge "
        f"{emb['merge_seconds']:.0f} s; {gb(emb['embeddings_disk_bytes'])} on disk |"
    )
    for kind in args.kinds:
        b, s = results.get(f"build-{kind}"), results.get(f"search-{kind}")
        if b:
            rec = (b.get("recall_vs_exact") or {}).get("recall@10")
            print(
                f"| build {kind} | {duration(b['stage_wall_seconds'])} | {duration(b['stage_cpu_seconds'])} | "
                f"{mem(b)} | plan said {gb(b['planned_build_bytes'])} peak; index "
                f"{gb(b['index_memory_bytes'])} (plan {gb(b['planned_index_bytes'])}); recall@10 {rec} |"
            )
        if s:
            print(
                f"| search {kind} | {duration(s['stage_wall_seconds'])} | {duration(s['stage_cpu_seconds'])} | "
                f"{mem(s)} | {s['queries_per_s']:,.0f} q/s = {s['queries_per_s'] / s['exact_queries_per_s']:.1f}x "
                f"exact ({s['exact_queries_per_s']:,.0f} q/s); recall@5 {s['recall_at_5']:.3f}; RSS after mmap load "
                f"{gb(s['rss_after_load_bytes'])}, private {gb(s.get('private_after_load_bytes', 0))} |"
            )
    cal = results.get("calibrate", {})
    print(f"\n## Extrapolation to {DPR_PASSAGES:,} passages (x{scale:.1f})\n")
    print(
        f"- convert: {duration(conv['stage_cpu_seconds'] * scale)} CPU on one core; Arrow files "
        f"{gb(conv['arrow_disk_bytes'] * scale)} on disk; private memory "
        f"{gb(conv.get('convert_private_bytes', conv['convert_work_rss_bytes']) * scale)} above "
        "the imports (the duplicate-id set grows with N); opening them afterwards maps, it does not load."
    )
    if lst:
        print(
            f"- the same corpus as a Python list: {gb(lst.get('held_private_bytes', lst['held_rss_bytes']) * scale)} "
            "in every process that loads it."
        )
    if cal:
        per_core = cal["bert_base_passages_per_s"] / args.threads
        print(
            f"- embed with DPR's BERT-base on CPU: {cal['bert_base_passages_per_s']:.1f} passages/s on {args.threads} threads "
            f"here -> {DPR_PASSAGES / cal['bert_base_passages_per_s'] / 3600:,.0f} h on this machine, "
            f"{DPR_PASSAGES / per_core / 3600 / 64:,.0f} h on one 64-core machine; MiniLM "
            f"{cal['minilm_passages_per_s']:.0f} passages/s here -> {DPR_PASSAGES / cal['minilm_passages_per_s'] / 3600:.0f} h. "
            "On GPUs DPR reports about 8.8 h on 8 GPUs for its BERT-base encoder, and 8.5 h to build its HNSW index on one server (Karpukhin et al. 2020, sec. 5.4)."
        )
    print(
        f"- embeddings: {gb(DPR_PASSAGES * DPR_DIM * 4)} float32 ({gb(DPR_PASSAGES * DPR_DIM * 2)} float16) on disk, "
        "and as much again while the merge runs."
    )
    plan = plan_index_memory(DPR_PASSAGES, DPR_DIM, "hnsw", _index_config("hnsw"), available_bytes=None)
    for e in plan.estimates:
        print(f"- index {e.describe()}: {gb(e.index_bytes)} held, {gb(e.build_bytes)} peak while building")
    for kind in args.kinds:
        b = results.get(f"build-{kind}")
        if b:
            # HNSW inserts cost ~log N each; IVF assigns each vector to one of nlist ~ sqrt(N) cells
            hnsw = kind.startswith("hnsw")
            growth = scale * (math.log(DPR_PASSAGES) / math.log(n) if hnsw else math.sqrt(scale))
            dim_factor = DPR_DIM / args.dim
            print(
                f"- build {kind}: measured {duration(b['stage_cpu_seconds'])} CPU at {n:,} x {args.dim}; at 21M x 768 about "
                f"{duration(b['stage_cpu_seconds'] * growth * dim_factor)} CPU (x{growth:.0f} for N"
                f"{' log N' if hnsw else '^1.5, an upper bound: training does not grow'}, x{dim_factor:.0f} for the "
                "dimension), i.e. "
                f"{duration(b['stage_cpu_seconds'] * growth * dim_factor / 32)} on 32 cores"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--passages", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rag-scale"))
    parser.add_argument(
        "--dim", type=int, default=64, help="hidden size of the tiny encoder (the index dimension)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--kinds", nargs="+", default=["hnsw", "ivfpq"])
    parser.add_argument("--redo", nargs="*", default=[], help="stages to run again")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        child(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    results_path = args.workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if results.get("passages") not in (None, args.passages):
        raise SystemExit(
            f"{args.workdir} holds a run with {results['passages']:,} passages: use another --workdir"
        )
    results["passages"] = args.passages
    stages = ["generate", "convert", "read-list", "embed", "embed-baseline", "calibrate"]
    stages += [f"{verb}-{kind}" for kind in args.kinds for verb in ("build", "search")]
    for name in stages:
        if name in results and name not in args.redo:
            continue
        results[name] = run_stage(args, name)
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, results_path)
    report(args, results)


if __name__ == "__main__":
    main()
