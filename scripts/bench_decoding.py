# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch is imported)
"""Decoding speed: this project's RAG decoders against transformers' RAG classes, side by side in one run.

Same generator weights, documents, doc scores and beam settings for both; the outputs are compared token for
token and the wall-clock ratio transformers / ours is printed (higher is better for ours). Timings are the
median of ``--repeats`` runs after one warm-up run each.

    python scripts/bench_decoding.py                       # B=16, K=5, beam 4, BART d_model 256, 4+4 layers
    python scripts/bench_decoding.py --n-docs 10 --threads 2

The generator is a randomly initialised BART (no hub access needed). A random BART rarely ends an answer, so
an EOS logit that rises with every generated token (``--eos-ramp``, the same logits processor on both sides)
gives answers of varied, short lengths, as a trained model's are; ``--eos-ramp 0`` runs every answer to
``--max-length``. Contexts carry no padding because transformers' RAG-Sequence generates its
candidates without the attention mask (see tests/test_parity_transformers.py), which would make the outputs
differ for reasons other than speed.
"""

from __future__ import annotations

import os

# idle OpenMP threads spin-wait by default; on a CPU shared with other jobs that swamps the timings of both
# sides (tens of times slower at 2 threads); must be set before torch starts its thread pool
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import time

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DPRConfig,
    DPRQuestionEncoder,
    LogitsProcessor,
    LogitsProcessorList,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)
from transformers.utils import logging as hf_logging

from rag.generation.decoding import rag_sequence_generate, rag_token_generate


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16, help="questions B")
    parser.add_argument("--n-docs", type=int, default=5, help="documents per question K")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--context-len", type=int, default=64, help="tokens per passage + question, Lc")
    parser.add_argument("--max-length", type=int, default=20, help="answer length cap, start token included")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4, help="encoder layers = decoder layers")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--eos-ramp", type=float, default=1.0, help="EOS logit added per generated token")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class EosRamp(LogitsProcessor):
    """Adds ``slope * generated tokens`` to the EOS score: answers end at context-dependent, short lengths."""

    def __init__(self, eos_token_id: int, slope: float):
        self.eos_token_id, self.slope = eos_token_id, slope

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.eos_token_id] += self.slope * (input_ids.shape[1] - 1)
        return scores


def build(args):
    torch.manual_seed(args.seed)
    config = BartConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        encoder_attention_heads=max(1, args.d_model // 64),
        decoder_attention_heads=max(1, args.d_model // 64),
        encoder_ffn_dim=4 * args.d_model,
        decoder_ffn_dim=4 * args.d_model,
        max_position_embeddings=max(128, args.context_len + 2),
        dropout=0.0,
        init_std=0.1,
    )
    bart = BartForConditionalGeneration(config).eval()
    question_config = DPRConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    rag_config = RagConfig.from_question_encoder_generator_configs(
        question_config, config, n_docs=args.n_docs
    )
    question_encoder = DPRQuestionEncoder(question_config)
    rag_token = RagTokenForGeneration(
        config=rag_config, question_encoder=question_encoder, generator=bart
    ).eval()
    rag_sequence = RagSequenceForGeneration(
        config=rag_config, question_encoder=question_encoder, generator=bart
    ).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(3, args.vocab, (args.batch, args.n_docs, args.context_len), generator=g)
    ids[:, :, 0] = config.bos_token_id
    ids[:, :, -1] = config.eos_token_id
    mask = torch.ones_like(ids)
    doc_scores = 3.0 * torch.randn(args.batch, args.n_docs, generator=g)
    return bart, rag_token, rag_sequence, ids, mask, doc_scores


def compare(reference, ours, repeats: int):
    """Median wall-clock seconds of two decoders run alternately (so load changes hit both), and outputs."""
    out_ref, out_ours = reference(), ours()  # warm-up: allocator, kernels, lazy init
    times_ref, times_ours = [], []
    for i in range(repeats):
        for fn, times in ((reference, times_ref), (ours, times_ours))[:: 1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_ref), statistics.median(times_ours), out_ref, out_ours


def rows(sequences: torch.Tensor, pad: int) -> list[list[int]]:
    out = []
    for row in sequences.reshape(-1, sequences.shape[-1]).tolist():
        while row and row[-1] == pad:
            row.pop()
        out.append(row)
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    bart, rag_token, rag_sequence, ids, mask, doc_scores = build(args)
    b, k, lc = ids.shape
    pad = bart.config.pad_token_id
    processors = LogitsProcessorList([EosRamp(bart.config.eos_token_id, args.eos_ramp)])
    settings = dict(
        num_beams=args.beams,
        max_length=args.max_length,
        forced_bos_token_id=bart.config.bos_token_id,  # as facebook/bart-large generates
        logits_processor=processors,
    )
    flat = dict(context_input_ids=ids.view(b * k, lc), context_attention_mask=mask.view(b * k, lc))
    print(
        f"CPU, {torch.get_num_threads()} threads | BART d_model={args.d_model} layers={args.layers}+{args.layers} "
        f"vocab={args.vocab} | B={b} K={k} Lc={lc} beams={args.beams} max_length={args.max_length} "
        f"eos_ramp={args.eos_ramp} | median of {args.repeats}, run alternately"
    )

    results = []
    with torch.no_grad():
        t_hf, t_ours, hf_out, ours = compare(
            lambda: rag_sequence.generate(**flat, doc_scores=doc_scores, n_docs=k, **settings),
            lambda: rag_sequence_generate(bart, ids, mask, doc_scores, **settings),
            args.repeats,
        )
        lengths = [len(r) - 1 for r in rows(ours.sequences, pad)]
        results.append(
            ("RAG-Sequence thorough", t_hf, t_ours, rows(hf_out, pad) == rows(ours.sequences, pad))
        )
        for name, beams in (("RAG-Token beam", args.beams), ("RAG-Token greedy", 1)):
            kw = dict(settings, num_beams=beams)
            t_hf, t_ours, hf_out, ours = compare(
                lambda kw=kw: rag_token.generate(**flat, doc_scores=doc_scores, n_docs=k, **kw),
                lambda kw=kw: rag_token_generate(bart, ids, mask, doc_scores, **kw),
                args.repeats,
            )
            results.append((name, t_hf, t_ours, rows(hf_out, pad) == rows(ours.sequences, pad)))
        t_thorough, t_fast, _, _ = compare(
            lambda: rag_sequence_generate(bart, ids, mask, doc_scores, **settings),
            lambda: rag_sequence_generate(bart, ids, mask, doc_scores, fast=True, **settings),
            args.repeats,
        )

    print(
        f"RAG-Sequence answers (tokens after the start token): min {min(lengths)} "
        f"mean {statistics.mean(lengths):.1f} max {max(lengths)}"
    )
    print(f"{'decoder':<24}{'transformers s':>16}{'ours s':>10}{'speed-up':>10}  identical outputs")
    for name, t_hf, t_ours, same in results:
        print(f"{name:<24}{t_hf:>16.3f}{t_ours:>10.3f}{t_hf / t_ours:>9.2f}x  {same}")
    print(
        f"ours, RAG-Sequence fast vs thorough: {t_fast:.3f} s vs {t_thorough:.3f} s ({t_thorough / t_fast:.2f}x)"
    )


if __name__ == "__main__":
    main()
