"""``rag-convert-passages SOURCE OUT_DIR``: convert a passage file into a memory-mapped Arrow corpus.

    rag-convert-passages /data/psgs_w100.tsv /data/psgs_w100.tsv.arrow     # DPR's 21M passages, resumable

The conversion is :func:`rag.data.arrow.convert_passages`; an interrupted run resumes after its last finished
part. Prints the corpus and its checksum once done.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rag.cli.app import add_verbosity_flags, fail, verbosity_of
from rag.data.arrow import convert_passages
from rag.errors import RagError
from rag.log import configure_logging


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="rag-convert-passages", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="passage file: psgs_w100.tsv, JSONL, ... (gzip or not)")
    parser.add_argument("out_dir", help="directory for the Arrow files (created; resumes an interrupted run)")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--rows-per-part", type=int, default=1_000_000)
    parser.add_argument("--split-words", type=int, default=None)
    parser.add_argument("--lenient", action="store_true", help="skip malformed rows with a warning")
    parser.add_argument("--overwrite", action="store_true")
    add_verbosity_flags(parser)
    args = parser.parse_args(argv)
    configure_logging(verbosity_of(args))
    try:
        passages = convert_passages(
            args.source,
            args.out_dir,
            format=args.format,
            strict=not args.lenient,
            split_words=args.split_words,
            rows_per_part=args.rows_per_part,
            overwrite=args.overwrite,
        )
    except RagError as err:
        fail(err)
    print(f"{passages!r}: checksum {passages.corpus_checksum}")


if __name__ == "__main__":
    main()
