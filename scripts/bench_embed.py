"""Corpus embedding throughput: ``rag.retrieval.embed.embed_corpus`` against a naive loop, side by side.

The naive loop is what a first version writes: the passages in corpus order, every batch padded to the
encoder's maximum length, under ``torch.no_grad``. Ours tokenizes once, sorts by token count, pads each
batch to its own longest passage and runs under ``torch.inference_mode``. Both embed the same passages with
the same encoder and batch size; the script checks that they give the same vectors, then prints
passages/s for each and the ratio (target >= 1.5x). Runs alternate and the best of ``--repeats`` counts,
so that other load on a shared machine hurts both alike.

    python scripts/bench_embed.py                   # 1,024 mini-wiki passages, MiniLM, 2 threads
    python scripts/bench_embed.py --passages 4096 --threads 4
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rag.data.miniwiki import load_corpus  # noqa: E402
from rag.retrieval.embed import embed_corpus, open_embeddings  # noqa: E402
from rag.retrieval.encoders import load_document_encoder  # noqa: E402


def naive_embed(encoder, passages, batch_size: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, len(passages), batch_size):
            batch = passages[start : start + batch_size]
            tokens = encoder.tokenizer(
                [p.title for p in batch],
                [p.text for p in batch],
                padding="max_length",
                truncation="longest_first",
                max_length=encoder.max_length,
                return_tensors="pt",
            )
            out.append(encoder(**tokens).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--passages", type=int, default=1024, help="mini-wiki passages to embed (spread evenly)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    corpus = load_corpus()
    # spread over the corpus: its SQuAD, NQ and wiki18 parts differ in length
    rows = np.linspace(0, len(corpus) - 1, num=min(args.passages, len(corpus))).astype(int)
    passages = [corpus[i] for i in rows]
    encoder = load_document_encoder()
    tokens = encoder.tokenizer(
        [p.title for p in passages],
        [p.text for p in passages],
        truncation="longest_first",
        max_length=encoder.max_length,
    )
    lengths = [len(ids) for ids in tokens["input_ids"]]
    print(
        f"{len(passages)} mini-wiki passages, {encoder.name} (max_length {encoder.max_length}), batch "
        f"{args.batch_size}, {args.threads} threads; tokens per passage: mean {np.mean(lengths):.0f}, "
        f"max {max(lengths)}"
    )

    best = {"naive": float("inf"), "ours": float("inf")}
    reference = ours = None
    for _ in range(args.repeats):
        start = time.perf_counter()
        reference = naive_embed(encoder, passages, args.batch_size)
        best["naive"] = min(best["naive"], time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            embed_corpus(encoder, passages, tmp, batch_size=args.batch_size, show_progress=False)
            best["ours"] = min(best["ours"], time.perf_counter() - start)
            ours = np.asarray(open_embeddings(tmp))

    diff = float(np.abs(ours - reference).max())
    rate = {k: len(passages) / v for k, v in best.items()}
    print(f"max |ours - naive| over all vectors: {diff:.2e}")
    print(f"naive fixed-padding loop : {rate['naive']:8.1f} passages/s  ({best['naive']:.1f} s)")
    print(f"rag embed_corpus         : {rate['ours']:8.1f} passages/s  ({best['ours']:.1f} s)")
    print(f"ratio ours / naive       : {rate['ours'] / rate['naive']:.2f}x  (target >= 1.5x)")


if __name__ == "__main__":
    main()
