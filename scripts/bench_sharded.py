"""The sharded index against the replicated exact index, per training step: retrieval time, bytes moved between
the ranks and memory per rank, at N synthetic passages and W gloo processes on this machine.

Setup (not measured): N x D Gaussian float16 embeddings written in rag.retrieval.embed's layout (files of
262,144 rows) to a temporary folder, and the replicated baseline's index file: a FlatIndex over them
(float32, what ``index=flat`` builds), saved once. Then W processes (torch.multiprocessing spawn, gloo, one
thread each) each run, for ``--steps`` steps of ``--batch`` queries per rank and K = ``--n-docs``:

- ``replicated``: the saved FlatIndex loaded memory-mapped, as ``retriever=dense index=flat`` trains (every
  rank maps the whole index; a node's ranks share it in the page cache); each rank searches its own queries,
  nothing is moved;
- ``sharded fp16`` / ``sharded fp32``: ``ShardedIndex`` over the same embeddings files, the shard held in
  float16 (as embedded) or float32; each step is one collective search (gather, shard search, all_to_all).

A step's time is the slowest rank's (the others wait for it at the next collective of a DDP step), as the
median over the steps; the ranks start each step together (a barrier, not timed). Ratios are against the
replicated baseline measured in the same run. The results of the two are also compared (same ids).

    python scripts/bench_sharded.py                                   # 1M x 768, 4 processes, 8 x K=5
    python scripts/bench_sharded.py --rows 200000 --steps 5           # a quick check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS_PER_FILE = 262_144


def write_embeddings(directory: Path, rows: int, dim: int, seed: int = 0) -> None:
    from rag.retrieval.embed import array_checksum, record_embeddings_file

    rng = np.random.default_rng(seed)
    record = {
        "encoder": {"name": "synthetic", "weights_checksum": "0"},
        "dtype": "float16",
        "passages_sha256": "",
    }
    directory.mkdir(parents=True, exist_ok=True)
    for lo in range(0, rows, ROWS_PER_FILE):
        hi = min(lo + ROWS_PER_FILE, rows)
        block = (rng.standard_normal((hi - lo, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float16)
        np.save(directory / f"embeds_{lo:010d}_{hi:010d}.npy", block)
        record_embeddings_file(directory, lo, hi, dim, array_checksum(block), record)


def build_replicated(embeddings: Path, index_dir: Path) -> None:
    from rag.retrieval.embed import open_embeddings
    from rag.retrieval.index import FlatIndex

    source = open_embeddings(embeddings)
    flat = FlatIndex(verbose=False)  # added file by file: FlatIndex takes one array at a time
    for start in range(0, source.shape[0], ROWS_PER_FILE):
        flat.add(np.asarray(source[np.arange(start, min(start + ROWS_PER_FILE, source.shape[0]))]))
    flat.save(index_dir)


def queries_of(rank: int, step: int, batch: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng([step + 1, rank])
    return (rng.standard_normal((batch, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)


def worker(rank: int, world: int, args: argparse.Namespace, work: str) -> None:
    import torch
    import torch.distributed as dist

    from rag.retrieval.embed import open_embeddings
    from rag.retrieval.index import DenseIndex
    from rag.retrieval.sharded import ShardedIndex

    torch.set_num_threads(1)
    work = Path(work)
    dist.init_process_group("gloo", init_method=f"file://{work / 'init'}", rank=rank, world_size=world)
    results = {}
    ids = {}
    try:
        variants = {
            "replicated": lambda: DenseIndex.load(
                work / "flat", verify_checksum=False, verbose=False, mmap=True
            ),
            "sharded fp16": lambda: ShardedIndex(dtype="float16", verbose=False).build(
                open_embeddings(work / "embeds")
            ),
            "sharded fp32": lambda: ShardedIndex(dtype="float32", verbose=False).build(
                open_embeddings(work / "embeds")
            ),
        }
        for name, make in variants.items():
            index = make()
            index.search(queries_of(rank, -1, args.batch, args.dim), args.n_docs)  # loads the shard, warms up
            times, sent, received = [], [], []
            for step in range(args.steps):
                q = queries_of(rank, step, args.batch, args.dim)
                dist.barrier()
                start = time.perf_counter()
                _, found = index.search(q, args.n_docs)
                seconds = time.perf_counter() - start
                slowest = torch.tensor([seconds], dtype=torch.float64)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                times.append(float(slowest))
                traffic = getattr(index, "last_traffic", None)
                sent.append(traffic.sent_bytes if traffic else 0)
                received.append(traffic.received_bytes if traffic else 0)
                if step == 0:
                    ids[name] = found
            held = index.memory_bytes() if isinstance(index, ShardedIndex) else 0
            mapped = 0 if isinstance(index, ShardedIndex) else index.memory_bytes()
            results[name] = {
                "step_seconds": statistics.median(times),
                "sent": statistics.mean(sent),
                "received": statistics.mean(received),
                "held": held,
                "mapped": mapped,
            }
            del index
        same = all(np.array_equal(ids["replicated"], ids[name]) for name in ids)
        gathered = [None] * world
        dist.all_gather_object(gathered, (results, same))
        if rank == 0:
            report(args, world, gathered)
    finally:
        dist.destroy_process_group()


def report(args: argparse.Namespace, world: int, gathered: list) -> None:
    def mb(n: float) -> str:
        return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"

    base = gathered[0][0]["replicated"]
    print(
        f"\n{args.rows:,} x {args.dim} float16 embeddings, {world} gloo processes (1 thread each, "
        f"{os.cpu_count()} cores), {args.batch} queries per rank, K={args.n_docs}, median of {args.steps} steps\n"
    )
    print(
        "| index | step (slowest rank) | vs replicated | sent / rank / step | received / rank / step | "
        "held / rank | mapped / rank |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in gathered[0][0]:
        r = gathered[0][0][name]
        sent = statistics.mean(g[0][name]["sent"] for g in gathered)
        received = statistics.mean(g[0][name]["received"] for g in gathered)
        held = max(g[0][name]["held"] for g in gathered)
        print(
            f"| {name} | {r['step_seconds'] * 1e3:,.1f} ms | {r['step_seconds'] / base['step_seconds']:.2f}x | "
            f"{mb(sent)} | {mb(received)} | {mb(held)} | {mb(r['mapped'])} |"
        )
    print(f"\nsame ids as the replicated index on every rank: {all(g[1] for g in gathered)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="queries per rank per step")
    parser.add_argument("--n-docs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="default: a temporary folder, removed after"
    )
    args = parser.parse_args()

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        started = time.perf_counter()
        write_embeddings(work / "embeds", args.rows, args.dim)
        build_replicated(work / "embeds", work / "flat")
        print(
            f"setup: embeddings and the replicated index written in {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        mp.spawn(worker, args=(args.world, args, str(work)), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
