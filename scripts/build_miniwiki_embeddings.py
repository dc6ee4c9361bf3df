"""Build the mini-wiki's shipped document embeddings: ``rag/data/miniwiki/embeddings/`` (float16).

The first index build of the embedded default (``rag-reference``, ``rag-train``, ``rag.load("reference")``)
takes its rows from there instead of embedding the 6,536 passages (6 minutes on 2 cores), when the document
encoder's settings and weights fingerprint and the passages' SHA-256 are the ones recorded beside them
(:func:`rag.retrieval.embed.embed_corpus`, ``prebuilt=``). Rerun this after the corpus or the MiniLM package
changes; a stale copy is never used, only ignored.

    python scripts/build_miniwiki_embeddings.py                       # embed with all-MiniLM-L6-v2 (resumable)
    python scripts/build_miniwiki_embeddings.py --from ~/.cache/rag/embeddings/miniwiki-all-MiniLM-L6-v2-float32
        # cast embeddings already made by the same encoder from the same passages (checked) to float16
    python scripts/build_miniwiki_embeddings.py --compare ~/.cache/rag/embeddings/miniwiki-all-MiniLM-L6-v2-float32
        # what float16 changes: exact top-k of the test questions (reference query encoder) against float32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rag.atomic import write_json_atomic  # noqa: E402
from rag.build import compose, instantiate  # noqa: E402
from rag.data import miniwiki  # noqa: E402
from rag.retrieval.embed import embed_corpus, open_embeddings, read_embeddings_meta  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--from", dest="source", type=Path, help="an embeddings directory of the same encoder"
    )
    parser.add_argument("--out", type=Path, default=miniwiki.embeddings_dir())
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--compare", type=Path, help="a float32 embeddings directory to compare retrieval with"
    )
    args = parser.parse_args()
    if args.compare:
        compare(args.out, args.compare)
        return

    passages = miniwiki.load_corpus()
    # the document encoder exactly as the default configs build it: its settings are part of the record
    encoder = instantiate(compose("rag_index", ["doc_encoder=minilm", "corpus=miniwiki"]).doc_encoder)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "embeddings"
        report = embed_corpus(
            encoder,
            passages,
            staged,
            batch_size=args.batch_size,
            dtype="float16",
            rows_per_file=len(passages),  # one file: the unit a first build takes whole
            prebuilt=[args.source] if args.source else (),
        )
        if args.source and not report.seeded:
            raise SystemExit(
                f"{args.source} holds no embeddings of these passages by {encoder.name}: not used"
            )
        args.out.mkdir(parents=True, exist_ok=True)
        for stale in args.out.glob("embeds_*"):
            stale.unlink()
        for meta in read_embeddings_meta(staged):
            npy = Path(meta.pop("_path"))
            meta.pop("seeded_from", None)  # where this machine's copy came from means nothing elsewhere
            os.replace(npy, args.out / npy.name)
            write_json_atomic(args.out / npy.with_suffix(".json").name, meta)
    rows = open_embeddings(args.out, expected_rows=len(passages))
    size = sum(p.stat().st_size for p in args.out.glob("embeds_*.npy"))
    print(
        json.dumps({"out": str(args.out), "shape": list(rows.shape), "dtype": str(rows.dtype), "bytes": size})
    )


def compare(shipped: Path, full: Path, ks: tuple[int, ...] = (1, 5, 10, 50)) -> None:
    """Exact search of the mini-wiki's test questions, embedded by the reference query encoder, over the
    shipped float16 rows and over ``full`` (float32): identical top-k lists, and answer recall@k of each."""
    import numpy as np
    import torch

    from rag.build import compose_train_config
    from rag.metrics import has_answer

    cfg = compose_train_config("miniwiki_rag_token")
    encoder = instantiate(cfg.query_encoder).eval()
    passages = miniwiki.load_corpus()
    questions = [q for d in miniwiki.DATASETS for q in miniwiki.load_questions(d, "test")]
    with torch.inference_mode():
        q = encoder.encode([x.question for x in questions])  # (B, D)
    top = {}
    for name, directory in (("float16", shipped), ("float32", full)):
        rows = torch.from_numpy(
            np.array(open_embeddings(directory, expected_rows=len(passages)), dtype=np.float32)
        )
        top[name] = (q.float() @ rows.T).topk(max(ks), dim=1).indices  # (B, max k)
    report = {"questions": len(questions)}
    for k in ks:
        a, b = top["float16"][:, :k], top["float32"][:, :k]
        report[f"same_top{k}_list"] = float((a == b).all(dim=1).float().mean())
        report[f"same_top{k}_set"] = float(
            np.mean([set(x.tolist()) == set(y.tolist()) for x, y in zip(a, b)])
        )
        for name in top:
            hits = [
                any(has_answer(passages[i].text, qq.answers) for i in row[:k].tolist())
                for qq, row in zip(questions, top[name])
            ]
            report[f"answer_recall@{k}_{name}"] = float(np.mean(hits))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
