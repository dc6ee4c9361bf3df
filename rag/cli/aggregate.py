"""``rag-aggregate``: the latest run of each study -> tables (markdown, CSV) and plots (PNG), and RESULTS.md.

    rag-aggregate                                  # outputs/replicate -> results/, RESULTS.md's tables
    rag-aggregate --runs outputs/replicate --out results --results-md RESULTS.md

For each study the newest ``result.json`` under ``--runs/<study>/`` (or the ones given with ``--result``) is
copied to ``results/<study>.json`` without its predictions, and rendered as ``<study>.md`` and ``<study>.csv``
laid out like the paper's table, with the paper's numbers beside ours where the paper has them, and
``<study>.png`` (Figure 3-style curves for the sweeps, bars for the others). Where the run folder holds the
predictions, rival systems are also compared question by question (``rag.replication.paired``: discordant
questions and the exact McNemar p-value), so a gap can be told from noise. Every table names the command,
config and commit that made it. In ``RESULTS.md`` the text between ``<!-- study:<name> -->`` and
``<!-- /study:<name> -->`` is replaced by the study's table, so the document's numbers are always the runs'.
The work is :func:`rag.replication.aggregate.aggregate`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from rag.cli.app import add_verbosity_flags, fail, verbosity_of
from rag.errors import RagError
from rag.log import configure_logging
from rag.replication.aggregate import aggregate


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="rag-aggregate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
