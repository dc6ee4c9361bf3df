"""The notebooks run top to bottom (slow: ``pytest -m slow tests/test_notebooks.py``).

``walkthrough.ipynb`` needs the shipped reference model and the mini-wiki's MiniLM index (built into the cache
on first use, a few minutes on a CPU). ``results.ipynb`` is run on results made here: a tiny Figure 3 sweep of
the ``smoke`` models through ``rag-replicate``'s entry point, aggregated into a temporary folder; and once on
an empty folder, where it must say how to make results instead of failing.

Each notebook is executed in memory (the committed file is never written) in a ``python3`` kernel started in
``notebooks/``, which inherits this process's environment.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rag.reference import write_manifest

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, monkeypatch, **env: str):
    """Run ``notebooks/<name>`` top to bottom with ``env`` set for its kernel; the executed notebook."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for key, value in {"RAG_NOTEBOOK_THREADS": "1", "OMP_NUM_THREADS": "1", **env}.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError on the first cell that raises
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    return nb


def _outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _text(nb) -> str:
    """Everything the notebook printed or displayed as text (streams, markdown, plain text)."""
    parts = []
    for o in _outputs(nb):
        if o.output_type == "stream":
            parts.append(o.text)
        elif o.output_type in ("display_data", "execute_result"):
            parts.append(o.data.get("text/markdown", o.data.get("text/plain", "")))
    return "\n".join(parts)


def _pngs(nb) -> list[str]:
    return [o.data["image/png"] for o in _outputs(nb) if "image/png" in o.get("data", {})]


def test_walkthrough_runs_end_to_end(monkeypatch):
    nb = _execute("walkthrough.ipynb", monkeypatch)
    text = _text(nb)
    assert "passages in the index: 6,536" in text
    # the answers tables (RAG-Token; RAG-Token vs RAG-Sequence) and the passages of the first question
    assert "| question | gold | RAG-Token answer | log p(y|x) |" in text
    assert "| question | gold | RAG-Token (token_greedy) | RAG-Sequence (sequence_thorough) |" in text
    assert "| # | title | text (first 120 characters) | gold | prior | posterior |" in text
    assert "Who wrote the novel Pride and Prejudice?" in text
    # Figure 2's heatmap is drawn, and the posteriors table beside it
    assert _pngs(nb), "no figure in the walkthrough's outputs"
    assert "p(z|x,y) gold answer" in text
    # the index hot-swap: removing the gold passage drops it from what is read; adding it back restores it
    assert "6,535 passages" in text and "gold read: 0" in text
    assert "same answer and passages as with the full index: True" in text


def _tiny_results(tmp: Path, monkeypatch) -> Path:
    """A two-question Figure 3 sweep of the smoke models (K = 1, 2), aggregated into ``tmp/results``."""
    from rag.cli import replicate as cli
    from rag.replication.aggregate import aggregate

    ref = tmp / "ref"
    ref.mkdir()
    write_manifest(ref, {"commit": "0" * 40, "command": "python scripts/train_reference.py"})
    overrides = f"['runs_dir={tmp}/r','threads=1']"
    argv = [
        "rag-replicate",
        "study=figure3",
        f"reference_dir={ref}",
        f"cache_dir={tmp}/cache",
        f"train_root={tmp}/train",
        "threads=1",
        f"hydra.run.dir={tmp}/runs/figure3/r1",
        "limit=2",
        "study.ks=[1,2]",
        "study.systems.rag_token.experiment=smoke",
        "study.systems.rag_sequence.experiment=smoke",
        "study.systems.rag_sequence.decoder=sequence_fast",
        f"+study.systems.rag_token.overrides={overrides}",
        f"+study.systems.rag_sequence.overrides={overrides}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    cli.main()
    # the same rows as a "systems" study too, so that the notebook's bar-chart branch is drawn as well
    result = json.loads((tmp / "runs" / "figure3" / "r1" / "result.json").read_text())
    result.update(study="systems_demo", kind="systems", title="figure3's rows as a systems table")
    (tmp / "runs" / "systems_demo" / "r1").mkdir(parents=True)
    (tmp / "runs" / "systems_demo" / "r1" / "result.json").write_text(json.dumps(result))
    aggregate(tmp / "runs", tmp / "results", None)
    return tmp / "results"


def test_results_notebook_draws_the_aggregated_studies(tmp_path, monkeypatch):
    results = _tiny_results(tmp_path, monkeypatch)
    assert {p.name for p in results.glob("*.json")} == {"figure3.json", "systems_demo.json"}
    nb = _execute("results.ipynb", monkeypatch, RAG_RESULTS_DIR=str(results))
    text = _text(nb)
    assert "2 studies in" in text
    # each study's table with the command that made it
    assert "### figure3" in text and "### systems_demo" in text
    assert "| system | K | EM | F1 |" in text  # the sweep's layout
    assert "| system | decoder | K | EM | F1 |" in text  # the systems layout
    assert text.count("rag-replicate study=figure3") >= 2
    assert len(_pngs(nb)) == 2  # the sweep's two panels (one figure) and the bars


def test_results_notebook_without_results_says_how_to_make_them(tmp_path, monkeypatch):
    nb = _execute("results.ipynb", monkeypatch, RAG_RESULTS_DIR=str(tmp_path / "none"))
    text = _text(nb)
    assert "No aggregated results in" in text and "rag-replicate study=<name>" in text
    assert "rag-aggregate" in text and not _pngs(nb)
