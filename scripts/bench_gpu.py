"""On a GPU: a bf16-mixed RAG training step at paper size, exact search over 1M vectors, and decoding throughput.

    python scripts/bench_gpu.py                      # on a CUDA machine: BART-large-sized generator, BERT-base
                                                     # query encoder, K = 5 and 10, 1M x 768 search (~5 min)
    python scripts/bench_gpu.py --size tiny --vectors 20000 --device cpu   # the same code paths on a laptop

It needs torch, transformers, numpy and faiss (CPU build; no Hydra, datasets, wandb or MiniLM package: the
tokenizer is the shipped reference one). On the project's lent H200, whose image lacks faiss:
``pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl
faiss-cpu==1.15.1`` here, then ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl &&
PYTHONPATH=/tmp/site:. python3 scripts/bench_gpu.py --out $OUT/gpu.json`` there (about 5 minutes).

Every figure is a ratio against a baseline measured in the same run:

1. ``train``: one RAG-Token training step (query encoding, retrieval from an exact index over the 6,536
   mini-wiki passages with seeded random 768-d document vectors, the marginal NLL forward, backward, AdamW)
   of a randomly initialised BART-large-sized generator (d_model 1024, 12 + 12 layers, 16 heads, FFN 4096,
   the shipped WordPiece vocabulary) with a BERT-base-sized DPR query encoder, at K = 5 and 10: median step
   time and peak allocated memory in bf16-mixed precision (``torch.autocast`` over float32 weights, what
   Lightning's ``precision=bf16-mixed`` does) against float32 steps.
2. ``search``: exact top-10 inner-product search over ``--vectors`` normalised 768-d vectors in batches of 64
   queries: rag's ``FlatIndex`` moved to the GPU (torch), faiss' GPU flat index where faiss has GPU support,
   against ``FlatIndex`` on the machine's CPU cores.
3. ``decode``: questions per second of RAG-Token greedy and RAG-Sequence thorough decoding (beam 4) with the
   same model at K = 5, bf16 autocast against float32.

Weights are random (no hub on the machines this was written on): speed and memory depend on shapes, not
values. Where the hub is reachable, ``--generator facebook/bart-large`` and ``--question-encoder
facebook/dpr-question_encoder-single-nq-base`` time the real models instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

TOKENIZER = Path(__file__).resolve().parents[1] / "rag" / "reference_weights" / "rag" / "generator"
SIZES = {  # generator d_model, layers, heads, ffn; query encoder hidden, layers, heads, ffn
    "large": ((1024, 12, 16, 4096), (768, 12, 12, 3072)),
    "tiny": ((64, 2, 2, 128), (768, 2, 2, 128)),  # 768-d queries even when tiny: the index is 768-d
}
DIM = 768


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=sorted(SIZES), default="large")
    p.add_argument("--generator", default=None, help="a BART folder or hub name instead of the random one")
    p.add_argument("--question-encoder", default=None, help="a DPR question encoder folder or hub name")
    p.add_argument("--batch", type=int, default=8, help="questions per training step")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--vectors", type=int, default=1_000_000, help="corpus size of the search benchmark")
    p.add_argument("--decode-questions", type=int, default=64)
    p.add_argument("--parts", default="train,search,decode")
    p.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:  # the CPU smoke run: peak resident set
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def build_model(args, device: torch.device, n_docs: int):
    from transformers import AutoTokenizer, DPRConfig, DPRQuestionEncoder

    from rag.data.miniwiki import load_corpus
    from rag.generation.generator import build_tiny_bart, load_generator
    from rag.model import RagModel
    from rag.retrieval.encoders import QueryEncoder
    from rag.retrieval.index import FlatIndex
    from rag.retrieval.retriever import DenseRetriever

    (g_dim, g_layers, g_heads, g_ffn), (q_dim, q_layers, q_heads, q_ffn) = SIZES[args.size]
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    if args.generator:
        generator = load_generator(args.generator)
    else:
        generator = build_tiny_bart(
            tokenizer, d_model=g_dim, layers=g_layers, attention_heads=g_heads, ffn_dim=g_ffn, dropout=0.0
        )
    if args.question_encoder:
        question_encoder = DPRQuestionEncoder.from_pretrained(args.question_encoder)
        q_tokenizer = AutoTokenizer.from_pretrained(args.question_encoder)
    else:
        torch.manual_seed(0)
        config = DPRConfig(
            vocab_size=len(tokenizer),
            hidden_size=q_dim,
            num_hidden_layers=q_layers,
            num_attention_heads=q_heads,
            intermediate_size=q_ffn,
            pad_token_id=tokenizer.pad_token_id,
        )
        question_encoder, q_tokenizer = DPRQuestionEncoder(config), tokenizer
    passages = load_corpus()
    rng = np.random.default_rng(0)
    doc_embeds = rng.standard_normal((len(passages), DIM)).astype(np.float32) / np.sqrt(DIM)
    index = FlatIndex(verbose=False).build(doc_embeds)
    if device.type == "cuda":
        index.to_gpu(device.index or 0)
    retriever = DenseRetriever(index, passages, None, doc_embeds=doc_embeds)
    encoder = QueryEncoder(question_encoder, q_tokenizer, pooling="cls", max_length=32)
    model = RagModel(
        generator,
        encoder,
        retriever,
        head="token",
        n_docs=n_docs,
        max_context_length=128,
        max_target_length=16,
    )
    return model.to(device)


def bench_train(args, device: torch.device, questions) -> list[dict]:
    print("\n## training step: bf16-mixed vs float32 (RAG-Token, AdamW)", flush=True)
    rows = []
    for k in (5, 10):
        model = build_model(args, device, k).train()
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        batches = [questions[i * args.batch : (i + 1) * args.batch] for i in range(args.steps + 2)]
        result = {}
        for bf16 in (False, True):
            times = []
            reset_peak(device)
            for i, batch in enumerate(batches):
                sync(device)
                t0 = time.perf_counter()
                with autocast(device, bf16):
                    loss = model(batch, [q.answers[0] for q in batch]).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync(device)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            result["bf16" if bf16 else "fp32"] = (statistics.median(times), peak_bytes(device))
        (t32, m32), (t16, m16) = result["fp32"], result["bf16"]
        print(
            f"  K={k:<2} B={args.batch} {n_params / 1e6:.0f}M trainable | bf16-mixed {t16 * 1e3:.0f} ms/step, peak "
            f"{m16 / 2**30:.1f} GiB | float32 {t32 * 1e3:.0f} ms, {m32 / 2**30:.1f} GiB | bf16 speed-up "
            f"{t32 / t16:.2f}x, memory {m16 / m32:.2f}x",
            flush=True,
        )
        rows.append(
            {
                "n_docs": k,
                "batch": args.batch,
                "params": n_params,
                "bf16_s": t16,
                "bf16_peak": m16,
                "fp32_s": t32,
                "fp32_peak": m32,
            }
        )
        del model, optimizer
        reset_peak(device)
    return rows


def bench_search(args, device: torch.device) -> dict:
    import faiss

    from rag.retrieval.index import FlatIndex

    print(f"\n## exact search: {args.vectors:,} x {DIM}, top-10, batches of 64", flush=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.vectors, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[rng.choice(args.vectors, 1024, replace=False)] + 0.1 * rng.standard_normal(
        (1024, DIM), np.float32
    )
    batches = [queries[i : i + 64] for i in range(0, len(queries), 64)]
    cpu = FlatIndex(verbose=False).build(x)
    methods = {f"rag FlatIndex, CPU ({torch.get_num_threads()} threads)": cpu.search}
    exact = cpu.search(queries, 10)[1]
    if device.type == "cuda":
        gpu = FlatIndex(verbose=False).build(x).to_gpu(device.index or 0)
        methods["rag FlatIndex on the GPU (torch)"] = gpu.search
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            resources = faiss.StandardGpuResources()
            flat = faiss.GpuIndexFlatIP(resources, DIM)
            flat.add(x)
            methods["faiss GpuIndexFlatIP"] = flat.search
        else:
            print("  (this faiss has no GPU support: faiss' GPU index not measured)", flush=True)
    qps = {}
    for name, search in methods.items():
        same = float(np.mean(search(queries, 10)[1] == exact))  # warm-up and agreement with the CPU index
        t0 = time.perf_counter()
        for b in batches:
            search(b, 10)
        qps[name] = len(queries) / (time.perf_counter() - t0)
        base = next(iter(qps.values()))
        print(
            f"  {name}: {qps[name]:,.0f} q/s, {qps[name] / base:.1f}x CPU, top-10 ids equal CPU's {same:.4f}",
            flush=True,
        )
    return qps


def bench_decode(args, device: torch.device, questions) -> dict:
    print(
        f"\n## decoding: {args.decode_questions} questions, K=5, questions/s, bf16 autocast vs float32",
        flush=True,
    )
    model = build_model(args, device, 5).eval()
    batch = questions[: args.decode_questions]
    rows = {}
    for decoder in ("token_greedy", "sequence_thorough"):
        settings = {"max_new_tokens": 16, **({"num_beams": 4} if decoder == "sequence_thorough" else {})}
        speed = {}
        for bf16 in (False, True):
            with torch.inference_mode(), autocast(device, bf16):
                model.generate(batch[:8], decoder=decoder, **settings)  # warm-up
                sync(device)
                t0 = time.perf_counter()
                for i in range(0, len(batch), 16):
                    model.generate(batch[i : i + 16], decoder=decoder, **settings)
                sync(device)
            speed["bf16" if bf16 else "fp32"] = len(batch) / (time.perf_counter() - t0)
        print(
            f"  {decoder}: bf16 {speed['bf16']:.1f} q/s, float32 {speed['fp32']:.1f} q/s "
            f"({speed['bf16'] / speed['fp32']:.2f}x)",
            flush=True,
        )
        rows[decoder] = speed
    return rows


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    from rag.data.miniwiki import load_questions

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# bench_gpu: {name}, torch {torch.__version__}, size={args.size}", flush=True)
    questions = load_questions("squad_open", "train")
    figures = {"device": name, "size": args.size}
    if "train" in parts:
        figures["train"] = bench_train(args, device, questions)
    if "search" in parts:
        figures["search"] = bench_search(args, device)
    if "decode" in parts:
        figures["decode"] = bench_decode(args, device, questions)
    if args.out is not None:
        from rag.atomic import write_json_atomic

        write_json_atomic(args.out, figures)


if __name__ == "__main__":
    main()
