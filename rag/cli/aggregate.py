"""``rag-aggregate``: the latest run of each study -> tables (markdown, CSV) and plots (PNG), and RESULTS.md.

    rag-aggregate                                  # outputs/replicate -> results/, RESULTS.md's tables
    rag-aggregate --runs outputs/replicate --out results --results-md RESULTS.md

The work, and what it writes (shown by ``--help`` too): :mod:`rag.replication.aggregate`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from rag.cli.app import add_verbosity_flags, fail, verbosity_of
from rag.errors import RagError
from rag.log import configure_logging
from rag.replication import aggregate as aggregate_module
from rag.replication.aggregate import aggregate


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="rag-aggregate",
        description=f"{__doc__.strip()}\n\n{aggregate_module.__doc__.strip()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--runs", type=Path, default=Path("outputs/replicate"), help="rag-replicate run folders"
    )
    parser.add_argument("--result", type=Path, nargs="*", default=[], help="result.json files to use as well")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--results-md", type=Path, default=Path("RESULTS.md"))
    add_verbosity_flags(parser)
    args = parser.parse_args(argv)
    configure_logging(verbosity_of(args))
    try:
        aggregate(args.runs, args.out, args.results_md, args.result)
    except RagError as err:
        fail(err)


if __name__ == "__main__":
    main()
