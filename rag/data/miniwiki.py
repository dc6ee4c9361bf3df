"""The embedded mini-wiki: the default corpus and question sets, shipped inside the package.

A few thousand real Wikipedia passages (SQuAD-open paragraphs split into <=100-word passages, the NQ-open
gold passages, 1,000 random passages of DPR's 2018 dump as distractors) and two question sets with fixed
train/dev/test splits whose gold passage ids name passages of this corpus. ``miniwiki/DATA.md`` gives the
provenance, licences (CC BY-SA), counts and how to rebuild it (``scripts/build_miniwiki.py``).

Passage ids name their source (``squad:<article>#<paragraph>:<piece>``, ``nq:<hash>``, ``wiki18:<id>``) so
that experiments can drop or keep passages by source. Every load checks the file's SHA-256 against
``miniwiki/SHA256SUMS``.
"""

from __future__ import annotations

from pathlib import Path

from rag.atomic import sha256_file
from rag.data.corpus import read_passages
from rag.data.errors import ChecksumError, DataFileNotFoundError
from rag.data.qa import read_questions
from rag.types import Passage, Question

MINIWIKI_DIR = Path(__file__).with_name("miniwiki")
DATASETS = ("squad_open", "nq_gold")
SPLITS = ("train", "dev", "test")
SOURCES = ("squad", "nq", "wiki18")
CHECKSUMS_FILE = "SHA256SUMS"
REBUILD = (
    "rebuild it with `python scripts/build_miniwiki.py --data-dir ../shared/data` or reinstall the package"
)

_verified: dict[Path, tuple[int, int]] = {}


def embeddings_dir() -> Path:
    """The mini-wiki's document embeddings by all-MiniLM-L6-v2, shipped (float16, an embeddings directory as
    :mod:`rag.retrieval.embed` writes them; made by ``scripts/build_miniwiki_embeddings.py``): the first index
    build takes them instead of embedding the corpus, when encoder and passages are the same."""
    return MINIWIKI_DIR / "embeddings"


def corpus_path() -> Path:
    """The mini-wiki corpus file (``{"id", "title", "text"}`` JSONL, gzip)."""
    return MINIWIKI_DIR / "corpus.jsonl.gz"


def questions_path(dataset: str, split: str) -> Path:
    """The question file of ``dataset`` in ``DATASETS`` and ``split`` in ``SPLITS`` (``"rag"`` JSONL, gzip)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown mini-wiki dataset {dataset!r}; expected one of {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"unknown mini-wiki split {split!r}; expected one of {SPLITS}")
    return MINIWIKI_DIR / f"{dataset}.{split}.jsonl.gz"


def recorded_checksums(directory: Path = MINIWIKI_DIR) -> dict[str, str]:
    """File name -> SHA-256 from ``SHA256SUMS`` (``sha256sum`` format, so ``sha256sum -c`` checks it too)."""
    path = directory / CHECKSUMS_FILE
    if not path.is_file():
        raise DataFileNotFoundError(path, "mini-wiki checksum file", REBUILD)
    sums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest
    return sums


def verify(path: Path) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has the SHA-256 recorded in ``SHA256SUMS``.

    Checked once per process per file version (size and mtime), since the files do not change under us.
    """
    if not path.is_file():
        raise DataFileNotFoundError(path, "mini-wiki file", REBUILD)
    stat = path.stat()
    if _verified.get(path) == (stat.st_size, stat.st_mtime_ns):
        return
    expected = recorded_checksums(path.parent).get(path.name)
    if expected is None:
        raise ChecksumError(path, None, f"no checksum recorded for {path.name} in {CHECKSUMS_FILE}", REBUILD)
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            path,
            None,
            f"SHA-256 {actual[:12]}... differs from the recorded {expected[:12]}... (corrupt, truncated or edited)",
            REBUILD.capitalize(),
        )
    _verified[path] = (stat.st_size, stat.st_mtime_ns)


def load_corpus(verify_checksum: bool = True) -> list[Passage]:
    """All mini-wiki passages, in corpus order (SQuAD, then NQ, then wiki18 passages)."""
    path = corpus_path()
    if verify_checksum:
        verify(path)
    return read_passages(path, format="jsonl")


def load_questions(dataset: str, split: str, verify_checksum: bool = True) -> list[Question]:
    """The questions of ``dataset`` (``"squad_open"`` or ``"nq_gold"``) in ``split`` (train/dev/test)."""
    path = questions_path(dataset, split)
    if verify_checksum:
        verify(path)
    return read_questions(path, format="rag")


def passage_source(passage_id: str) -> str:
    """The source a mini-wiki passage id names: ``"squad"``, ``"nq"`` or ``"wiki18"``."""
    source = passage_id.split(":", 1)[0]
    if source not in SOURCES or ":" not in passage_id:
        raise ValueError(f"{passage_id!r} is not a mini-wiki passage id (expected a prefix in {SOURCES})")
    return source
