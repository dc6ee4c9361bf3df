"""One RAG training step (retrieval, forward, backward, AdamW) of ours against transformers' RAG, and the
share of retrieval in our step on the mini-wiki.

    python scripts/bench_train_step.py                       # tiny weights, both heads, then the mini-wiki share
    python scripts/bench_train_step.py --sizes tiny,small --steps 8 --threads 1

Part 1, same weights, same batch, same retrieved documents: a DPR question encoder and a BART generator of the
given size (random, seeded, the shipped MiniLM WordPiece tokenizer on both sides), and an exact inner-product
index over the 6,536 mini-wiki passages with seeded random document vectors. Ours is ``rag.model.RagModel``
(exact torch index, ``DenseRetriever``); the baseline is transformers' ``RagTokenForGeneration`` /
``RagSequenceForGeneration`` with a ``RagRetriever`` over a ``datasets`` index (faiss ``IndexFlatIP``, the
same vectors). Each step starts from the question strings and gold answers (tokenisation, retrieval, context
building included on both sides). Each implementation runs in its own process; time is the median step after
warm-up, memory the peak resident set during the timed steps above the resident set before them (the
transient memory of a step: activations, gradients, temporaries). The first-batch losses are printed side by
side: they agree to float precision where every input fits the context length; where a passage does not,
transformers cuts the end of ``passage // question`` (the question) and we cut the passage, so the inputs,
and the losses, differ slightly. transformers pads every input to the context length, we to the longest.

Part 2, the embedded default: MiniLM query encoder, MiniLM-initialised BART, the exact MiniLM index of the
mini-wiki (built in the cache by the retrieval code if missing): the share of our training step spent in
the index search (search, stored-vector lookup, doc scores) and in retrieval as a whole (plus q(x)).

Timings are ratios within one run of this script; compare runs only on the same machine and load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SIZES = {
    # hidden, layers, heads, ffn
    "tiny": (32, 2, 2, 64),
    "small": (128, 2, 4, 512),
}


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    # Linux: writing 5 resets the peak resident set size (VmHWM) to the current one
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_shared(size: str, seed: int = 0):
    """Weights, corpus, document vectors and questions that both implementations share (seeded)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, DPRConfig, DPRQuestionEncoder

    from rag.data.miniwiki import load_corpus, load_questions
    from rag.generation.generator import build_tiny_bart, default_bert_path

    hidden, layers, heads, ffn = SIZES[size]
    tokenizer = AutoTokenizer.from_pretrained(default_bert_path())
    generator = build_tiny_bart(
        tokenizer, d_model=hidden, layers=layers, attention_heads=heads, ffn_dim=ffn, dropout=0.0, seed=seed
    )
    q_config = DPRConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    question_encoder = DPRQuestionEncoder(q_config)
    passages = load_corpus()
    rng = np.random.default_rng(seed)
    doc_embeds = rng.standard_normal((len(passages), hidden)).astype(np.float32) / np.sqrt(hidden)
    questions = load_questions("squad_open", "train")
    return tokenizer, generator, question_encoder, q_config, passages, doc_embeds, questions


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    tokenizer, generator, question_encoder, q_config, passages, doc_embeds, questions = build_shared(
        args.size
    )
    b, k = args.batch_size, args.n_docs
    batches = [questions[i * b : (i + 1) * b] for i in range(args.warmup + args.steps)]

    if args.worker == "ours":
        from rag.model import RagModel
        from rag.retrieval.encoders import QueryEncoder
        from rag.retrieval.index import FlatIndex
        from rag.retrieval.retriever import DenseRetriever

        retriever = DenseRetriever(
            FlatIndex(verbose=False).build(doc_embeds), passages, None, doc_embeds=doc_embeds
        )
        encoder = QueryEncoder(
            question_encoder, tokenizer, pooling="cls", max_length=args.max_question_length
        )
        model = RagModel(
            generator,
            encoder,
            retriever,
            head=args.head,
            n_docs=k,
            max_context_length=args.max_context_length,
            max_target_length=args.max_target_length,
            reduction="sum",
        ).train()

        def loss_of(batch):
            return model(batch, [q.answers[0] for q in batch]).loss

    else:
        import datasets
        import faiss
        from transformers import RagConfig, RagRetriever, RagSequenceForGeneration, RagTokenForGeneration
        from transformers.models.rag.retrieval_rag import CustomHFIndex

        from rag.generation.context import build_labels

        config = RagConfig.from_question_encoder_generator_configs(
            q_config,
            generator.model.config,
            n_docs=k,
            max_combined_length=args.max_context_length,
            index_name="custom",
            label_smoothing=0.0,
        )
        dataset = datasets.Dataset.from_dict(
            {
                "title": [p.title for p in passages],
                "text": [p.text for p in passages],
                "embeddings": list(doc_embeds),
            }
        )
        flat = faiss.IndexFlatIP(doc_embeds.shape[1])
        dataset.add_faiss_index("embeddings", custom_index=flat)
        retriever = RagRetriever(
            config, tokenizer, generator.tokenizer, index=CustomHFIndex(doc_embeds.shape[1], dataset)
        )
        cls = RagTokenForGeneration if args.head == "token" else RagSequenceForGeneration
        model = cls(
            config=config, question_encoder=question_encoder, generator=generator.model, retriever=retriever
        )
        model.train()
        start = generator.decoder_start_token_id

        def loss_of(batch):
            enc = tokenizer(
                [q.question for q in batch],
                padding=True,
                truncation=True,
                max_length=args.max_question_length,
                return_tensors="pt",
            )
            labels = build_labels([q.answers[0] for q in batch], generator, args.max_target_length)
            labels = torch.cat([torch.full((len(batch), 1), start), labels], dim=1)  # transformers' labels
            out = model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                labels=labels,
                reduce_loss=True,
            )
            return out.loss.sum()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    n_params = sum(p.numel() for p in params)
    first_loss = None
    times = []
    for i, batch in enumerate(batches):
        if i == args.warmup:
            baseline_kb = rss_kb("VmRSS")
            reset_peak_rss()
        start_time = time.perf_counter()
        loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start_time
        if i == 0:
            first_loss = float(loss)
        if i >= args.warmup:
            times.append(elapsed)
    return {
        "median_step_s": statistics.median(times),
        "step_times_s": times,
        "peak_step_mb": (rss_kb("VmHWM") - baseline_kb) / 1024,
        "peak_rss_mb": rss_kb("VmHWM") / 1024,
        "first_loss": first_loss,
        "trainable_params": n_params,
    }


def share_worker(args) -> dict:
    """Our training step on the embedded default, timing the index search and q(x) inside it."""
    import torch

    torch.set_num_threads(args.threads)
    from rag.build import default_embeddings_dir, default_index_dir, ensure_index
    from rag.data.miniwiki import load_corpus, load_questions
    from rag.generation.generator import bart_from_bert
    from rag.model import RagModel
    from rag.retrieval.embed import open_embeddings
    from rag.retrieval.encoders import load_document_encoder, load_query_encoder
    from rag.retrieval.index import FlatIndex
    from rag.retrieval.retriever import DenseRetriever

    cache = os.environ.get("RAG_HOME", "~/.cache/rag")
    passages = load_corpus()
    doc_encoder = load_document_encoder()
    index = FlatIndex(verbose=False)
    result = ensure_index(
        passages,
        doc_encoder,
        index,
        default_index_dir(cache, "miniwiki", doc_encoder, index.kind),
        default_embeddings_dir(cache, "miniwiki", doc_encoder, "float32"),
        corpus_name="miniwiki",
    )
    del doc_encoder
    retriever = DenseRetriever(
        result.index, passages, None, doc_embeds=open_embeddings(result.embeddings_dir)
    )
    model = RagModel(
        bart_from_bert(),
        load_query_encoder(),
        retriever,
        head=args.head,
        n_docs=args.n_docs,
        max_context_length=args.max_context_length,
        max_target_length=args.max_target_length,
    ).train()
    timers = {"search": 0.0, "query_encoder": 0.0}

    def timed(name, fn):
        def wrapper(*a, **kw):
            start_time = time.perf_counter()
            out = fn(*a, **kw)
            timers[name] += time.perf_counter() - start_time
            return out

        return wrapper

    retriever.retrieve_by_embeds = timed("search", retriever.retrieve_by_embeds)
    model.embed_questions = timed("query_encoder", model.embed_questions)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    questions = load_questions("squad_open", "train")
    b = args.batch_size
    steps, search, encode = [], [], []
    for i in range(args.warmup + args.share_steps):
        batch = questions[i * b : (i + 1) * b]
        timers.update(search=0.0, query_encoder=0.0)
        start_time = time.perf_counter()
        model(batch, [q.answers[0] for q in batch]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            steps.append(time.perf_counter() - start_time)
            search.append(timers["search"])
            encode.append(timers["query_encoder"])
    total = sum(steps)
    return {
        "median_step_s": statistics.median(steps),
        "search_share": sum(search) / total,
        "retrieval_share": (sum(search) + sum(encode)) / total,
        "search_ms_per_step": 1000 * sum(search) / len(steps),
        "peak_rss_mb": rss_kb("VmHWM") / 1024,
    }


def run_child(args, **extra) -> dict:
    argv = [sys.executable, __file__, "--json"]
    for key, value in {**vars(args), **extra}.items():
        if key in ("json", "sizes", "heads", "skip_share") or value is None:
            continue
        argv += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"worker {extra} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--heads", default="token,sequence")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-docs", type=int, default=5)
    parser.add_argument("--max-context-length", type=int, default=128)
    parser.add_argument("--max-target-length", type=int, default=25)
    parser.add_argument("--max-question-length", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--share-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-share", action="store_true", help="skip part 2 (the MiniLM mini-wiki step)")
    # internal: one measurement in a child process
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["ours", "transformers", "share"], help=argparse.SUPPRESS)
    parser.add_argument("--size", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--head", default="token", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.json:
        result = share_worker(args) if args.worker == "share" else worker(args)
        print(json.dumps(result))
        return

    base = {k: v for k, v in vars(args).items() if k not in ("worker", "size", "head")}
    shared = argparse.Namespace(**base)
    print(
        f"one training step, batch {args.batch_size}, n_docs {args.n_docs}, context <= {args.max_context_length} "
        f"tokens, {args.threads} thread(s), median of {args.steps} steps after {args.warmup} warm-up\n"
    )
    print(
        "| size | head | ours s/step | transformers s/step | time ratio (ours / theirs) | ours step MB | "
        "transformers step MB | memory ratio | loss ours | loss transformers |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        for head in args.heads.split(","):
            ours = run_child(shared, worker="ours", size=size, head=head)
            theirs = run_child(shared, worker="transformers", size=size, head=head)
            print(
                f"| {size} | {head} | {ours['median_step_s']:.3f} | {theirs['median_step_s']:.3f} | "
                f"{ours['median_step_s'] / theirs['median_step_s']:.2f} | {ours['peak_step_mb']:.1f} | "
                f"{theirs['peak_step_mb']:.1f} | {ours['peak_step_mb'] / max(theirs['peak_step_mb'], 1e-9):.2f} | "
                f"{ours['first_loss']:.4f} | {theirs['first_loss']:.4f} |",
                flush=True,
            )
    if not args.skip_share:
        share = run_child(shared, worker="share", size="tiny", head="token")
        print(
            f"\nmini-wiki (MiniLM query encoder, MiniLM-initialised BART, exact index of 6,536 x 384): "
            f"{share['median_step_s']:.2f} s per step; index search {share['search_ms_per_step']:.1f} ms per step = "
            f"{100 * share['search_share']:.2f}% of the step; retrieval with q(x) "
            f"{100 * share['retrieval_share']:.2f}%; peak RSS {share['peak_rss_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
