"""The Python API: load a ready model, answer, score and explain, index your own passages, encode.

Each step is one call, in the field's idioms (transformers' ``from_pretrained`` / ``generate``,
sentence-transformers' ``encode_query`` / ``encode_document``, ColBERT's index-then-search)::

    import rag

    model = rag.RAG.from_pretrained("reference")          # or rag.load(...): the shipped mini-wiki model
    answers = model.generate(["Who wrote Hamlet?"], n_docs=5, decoder="token_greedy")
    answers[0].answer, answers[0].passages, answers[0].doc_priors, answers[0].doc_posteriors
    model.score(["Who wrote Hamlet?"], ["William Shakespeare"])     # (B,) log p(y|x), teacher-forced
    model.explain(["Who wrote Hamlet?"], ["William Shakespeare"])   # the paper's Figure 2 posteriors

    index = model.index(["Ada Lovelace wrote the first program.", ...], "my_index")  # (N, D) d(z) + faiss
    model.use_index(index)                                 # the model now retrieves from your passages
    rag.PassageIndex.load("my_index")                      # ... later, reloaded as it was saved

    model.encode_query(["Who wrote Hamlet?"])              # (N, D) q(x)
    model.encode_document(["Hamlet is a tragedy ..."])     # (N, D) d(z)

A model comes from (:meth:`RAG.from_pretrained`):

- ``"reference"``: the shipped mini-wiki RAG-Token model (``rag/reference_weights``) with its retriever over
  the embedded mini-wiki (``rag-train experiment=miniwiki_rag_token``'s starting point; the index is built
  in the cache on first use, about a minute on a CPU); ``"reference-closed-book"`` its closed-book
  baseline; a folder laid out like ``rag/reference_weights`` (``MANIFEST.json``, ``rag/``) likewise;
- a ``.ckpt`` written by ``rag-train`` (its stored config rebuilds the model and re-attaches its index);
- a reference-style folder: ``generator/`` (and ``query_encoder/``) deltas over MiniLM, like
  ``rag/reference_weights/rag``; the rest (corpus, document encoder, index) as the reference's;
- a transformers RAG checkpoint folder or hub name (``facebook/rag-token-nq``): its DPR question encoder and
  generator, with an index built by ``doc_encoder`` (default: the released models' DPR context encoder)
  over the mini-wiki, or over ``passages=`` of your own.

Every error of this module is a :class:`rag.errors.RagError` that names the problem and the fix, raised
before any weights load or any passage is embedded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from rag import build
from rag.data.corpus import read_passages, split_into_passages, write_passages
from rag.errors import RagError
from rag.generation.decoding import DECODERS
from rag.generation.marginalize import rag_sequence_nll, rag_token_nll
from rag.model import HEADS, Explanation, RagAnswer, RagModel
from rag.retrieval.embed import corpus_checksum, open_embeddings
from rag.retrieval.encoders import BertEncoder
from rag.retrieval.index import INDEX_KINDS, MANIFEST_NAME, DenseIndex, read_manifest
from rag.retrieval.retriever import DenseRetriever
from rag.types import Passage, Question, RetrievalOutput

if TYPE_CHECKING:  # configs come from rag.build, the one place that composes them
    from omegaconf import DictConfig

__all__ = [
    "RAG",
    "ApiError",
    "Explanation",
    "PassageIndex",
    "RagAnswer",
    "as_passages",
    "load",
]

log = logging.getLogger(__name__)

#: source names of the shipped models -> the rag-train experiment that loads them
SHIPPED = {"reference": "miniwiki_rag_token", "reference-closed-book": "miniwiki_closed_book"}
#: the experiment whose corpus, document encoder and index a reference-style folder or a transformers RAG
#: checkpoint is given
BASE_EXPERIMENT = "miniwiki_rag_token"
CLOSED_BOOK_EXPERIMENT = "miniwiki_closed_book"
TEXT_SUFFIXES = (".txt", ".md")
PASSAGES_FILE = "passages.jsonl"
PASSAGE_WORDS = 100  # the paper's (and DPR's) passage length


class ApiError(RagError, ValueError):
    """A call of the Python API with an argument it cannot use; the message says the fix."""


# ------------------------------------------------------------------------------------------------ passages


def _folder_passages(folder: Path, n_words: int) -> list[Passage]:
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ApiError(f"{folder} holds no .txt or .md file: put your documents there, one per file")
    out = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise ApiError(f"{f} is empty: remove it or give it some text")
        rel = f.relative_to(folder).as_posix()
        title = f.stem.replace("_", " ")
        for i, piece in enumerate(split_into_passages(title, text, n_words)):
            out.append(Passage(id=f"{rel}:{i}", title=title, text=piece))
    return out


def as_passages(
    source: Sequence[str | Passage | Mapping[str, str]] | str | os.PathLike,
    *,
    split_words: int | None = PASSAGE_WORDS,
) -> list[Passage]:
    """Your passages as a list of :class:`Passage`, checked (no empty text, unique ids).

    ``source`` is a list of strings (ids ``"0"``, ``"1"``, ... and no title), of :class:`Passage`, or of
    dicts with ``text`` (and ``id``, ``title``); a passage file (JSONL ``{"id", "title", "text"}``, DPR's
    TSV, ... see :mod:`rag.data.corpus`), kept as it is; or a folder of ``.txt`` / ``.md`` files, each split
    into passages of ``split_words`` words (the paper's 100) titled by the file name.

    >>> as_passages(["Ada Lovelace wrote the first program."])[0]
    Passage(id='0', title='', text='Ada Lovelace wrote the first program.')
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            passages = _folder_passages(path, split_words or PASSAGE_WORDS)
        elif path.is_file():
            passages = read_passages(path)
        else:
            raise ApiError(
                f"no file or folder {path}: give a passage file (.jsonl, .tsv), a folder of .txt / .md files, "
                "or a list of strings"
            )
    else:
        passages = []
        for i, item in enumerate(source):
            if isinstance(item, Passage):
                passages.append(item)
            elif isinstance(item, str):
                passages.append(Passage(id=str(i), title="", text=item))
            elif isinstance(item, Mapping) and "text" in item:
                passages.append(
                    Passage(
                        id=str(item.get("id", i)), title=str(item.get("title", "")), text=str(item["text"])
                    )
                )
            else:
                raise ApiError(
                    f"passage {i} is a {type(item).__name__}: give strings, rag.Passage records or dicts with "
                    "'text' (and 'id', 'title')"
                )
    if not passages:
        raise ApiError("no passages given: pass at least one passage to index")
    seen: set[str] = set()
    for i, p in enumerate(passages):
        if not isinstance(p.text, str) or not p.text.strip():
            raise ApiError(f"passage {i} (id {p.id!r}) has an empty text: remove it or give it some words")
        if p.id in seen:
            raise ApiError(f"passage id {p.id!r} appears twice (passage {i}): passage ids must be unique")
        seen.add(p.id)
    return passages


def _texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        raise ApiError(f"pass a list of {what}, not a single string: wrap it in a list")
    texts = list(texts)
    if not texts:
        raise ApiError(f"no {what} given: pass at least one")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ApiError(f"{what} {i} is {t!r}: every one must be a non-empty string")
    return texts


def _questions(questions: Sequence[Question | str]) -> list[Question | str]:
    if isinstance(questions, (str, Question)):
        raise ApiError("pass a list of questions, not a single question: wrap it in a list")
    questions = list(questions)
    _texts([q.question if isinstance(q, Question) else q for q in questions], "questions")
    return questions


# ------------------------------------------------------------------------------------------------ index


def _stored_passages(root: Path) -> list[Passage] | None:
    """The passages of the index saved in ``root`` (None: none there, or unreadable)."""
    try:
        return read_passages(root / PASSAGES_FILE) if (root / PASSAGES_FILE).is_file() else None
    except (RagError, ValueError, OSError):
        return None


def _stored_encoder(root: Path) -> str | None:
    """The weights checksum of the document encoder that built the index saved in ``root`` (None: none)."""
    if not (root / "index" / MANIFEST_NAME).is_file():
        return None
    try:
        return read_manifest(root / "index").encoder_checksum or None
    except (RagError, ValueError, OSError):
        return None


@dataclass
class PassageIndex:
    """A dense index over your own passages, saved to a folder and reloadable (ColBERT's Indexer/Searcher).

    The folder holds ``passages.jsonl``, ``embeddings/`` (the (N, D) document embeddings d(z)) and
    ``index/`` (the faiss or exact index with its manifest naming the document encoder that built it).

    >>> index = PassageIndex.build(["Ada Lovelace wrote the first program."], doc_encoder, "my_index")
    >>> PassageIndex.load("my_index").search(query_embeds, n_docs=1)  # query_embeds (B, D)
    """

    path: Path
    passages: list[Passage]
    retriever: DenseRetriever
    encoder_name: str
    encoder_checksum: str

    @property
    def kind(self) -> str:
        return self.retriever.index.kind

    @property
    def dim(self) -> int:
        return self.retriever.dim

    def __len__(self) -> int:
        return len(self.passages)

    @classmethod
    def build(
        cls,
        passages: Sequence[str | Passage | Mapping[str, str]] | str | os.PathLike,
        doc_encoder: BertEncoder,
        path: str | os.PathLike,
        *,
        kind: str = "flat",
        batch_size: int = 64,
        rebuild: bool = False,
        **index_params: Any,
    ) -> PassageIndex:
        """Embed ``passages`` (see :func:`as_passages`) with ``doc_encoder`` into an index of ``kind``
        (flat | hnsw | hnsw_sq8 | ivfpq) saved in ``path``; an index there that already fits (same passages,
        encoder and kind) is loaded instead. Other passages or another encoder than the folder's are embedded
        afresh (as everything is with ``rebuild``); ``passages.jsonl`` is written once the index is saved."""
        passages = as_passages(passages)
        if kind not in INDEX_KINDS:
            raise ApiError(f"unknown index kind {kind!r}: choose one of {', '.join(INDEX_KINDS)}")
        root = Path(path).expanduser()
        if root.exists() and not root.is_dir():
            raise ApiError(f"{root} is a file: give a folder (new or an index's) to save the index in")
        try:
            empty = DenseIndex.create(kind, verbose=False, **index_params)
        except TypeError as err:
            raise ApiError(f"index kind {kind!r} cannot take {sorted(index_params)} ({err})") from None
        stored = _stored_passages(root)
        own_encoder = doc_encoder.weights_checksum()
        fresh = rebuild or stored != passages or _stored_encoder(root) not in (None, own_encoder)
        root.mkdir(parents=True, exist_ok=True)
        result = build.ensure_index(
            passages,
            doc_encoder,
            empty,
            root / "index",
            root / "embeddings",
            embed={"batch_size": batch_size, "show_progress": False, "overwrite": fresh},
            rebuild=rebuild,
            rebuild_command="model.index(passages, path, rebuild=True)",
            corpus_name=root.name,
        )
        if stored != passages:  # only now: the folder's passages are those of its index
            write_passages(root / PASSAGES_FILE, passages)
        doc_embeds = open_embeddings(result.embeddings_dir, expected_rows=len(passages))
        retriever = DenseRetriever(result.index, passages, None, doc_embeds=doc_embeds)
        log.info(f"index of {len(passages):,} passages ({kind}, {doc_encoder.name}) in {root}")
        return cls(root, passages, retriever, doc_encoder.name, own_encoder)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PassageIndex:
        """The index saved in ``path`` by :meth:`build` (or :meth:`RAG.index`)."""
        root = Path(path).expanduser()
        if not (root / PASSAGES_FILE).is_file() or not (root / "index" / MANIFEST_NAME).is_file():
            raise ApiError(
                f"{root} is not a passage index (no {PASSAGES_FILE} and index/{MANIFEST_NAME}): build one with "
                "model.index(passages, path)"
            )
        passages = read_passages(root / PASSAGES_FILE)
        retriever = DenseRetriever.from_directory(
            root / "index", passages, embeddings_dir=root / "embeddings"
        )
        manifest = read_manifest(root / "index")
        return cls(root, passages, retriever, manifest.encoder_name, manifest.encoder_checksum)

    def search(self, query_embeds: torch.Tensor, n_docs: int = 5) -> RetrievalOutput:
        """The ``n_docs`` passages of largest inner product with each of the (B, D) ``query_embeds``:
        ``doc_ids`` (B, K), ``doc_scores`` (B, K), ``passages`` (B lists of K), best first."""
        return self.retriever.retrieve_by_embeds(query_embeds, n_docs)


# ------------------------------------------------------------------------------------------------ overrides

#: the fix named when an override of a checkpoint's config cannot be read
CHECKPOINT_OVERRIDE_HINT = (
    "a checkpoint's config takes settings such as model.eval_n_docs=10 (groups and deletions apply to "
    "experiments, not checkpoints)"
)


@contextmanager
def _override_errors() -> Iterator[None]:
    """:class:`rag.build.OverrideError` (an override the config does not take) as :class:`ApiError`, the
    same line."""
    try:
        yield
    except build.OverrideError as err:
        raise ApiError(str(err)) from None


def override_strings(overrides: Mapping[str, Any] | Sequence[str], prefix: str = "") -> list[str]:
    """Command-line overrides (``model.eval_n_docs=5``) from a nested mapping
    (:func:`rag.build.format_overrides`); strings pass through, checked to be ``key=value`` (or ``~key``).

    Every key must be one the config has (a typo fails when the config is composed), except below
    :data:`rag.build.OPEN_NODES` (``model.generation``), whose settings may be new
    (``++model.generation.top_k=5``).
    """
    if isinstance(overrides, Mapping):
        return build.format_overrides(overrides, prefix)
    if isinstance(overrides, str):
        raise ApiError(f"overrides={overrides!r}: pass a list of key=value strings or a mapping")
    out = [str(o) for o in overrides]
    for item in out:
        key, sep, _ = item.partition("=")
        if not key.strip("+~") or not (sep or key.startswith("~")):
            raise ApiError(f"override {item!r} is not key=value: write e.g. model.eval_n_docs=10")
    return out


def override_mapping(overrides: Mapping[str, Any] | Sequence[str]) -> dict:
    """A nested mapping (what :func:`rag.build.load_checkpoint` merges) from ``key.sub=value`` strings, their
    values read as the command line reads them (:func:`rag.build.parse_override`: ``1e-5`` a float,
    ``'text'`` a string, ``[1,2]`` a list)."""
    if isinstance(overrides, Mapping):
        return _nested(overrides)
    if isinstance(overrides, str):
        raise ApiError(f"overrides={overrides!r}: pass a list of key=value strings or a mapping")
    out: dict = {}
    for item in overrides:
        with _override_errors():
            key, value = build.parse_override(str(item), fix=CHECKPOINT_OVERRIDE_HINT)
        _put(out, key, value, item)
    return out


def _nested(mapping: Mapping[str, Any]) -> dict:
    """A copy of ``mapping`` with dotted keys (``{"model.eval_n_docs": 5}``) nested."""
    out: dict = {}
    for key, value in mapping.items():
        _put(out, str(key), _nested(value) if isinstance(value, Mapping) else value, key)
    return out


def _put(out: dict, key: str, value: Any, given: Any) -> None:
    """Set the dotted ``key`` of the nested ``out`` to ``value``, merging mappings."""
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ApiError(
                f"override {given!r} sets a key below {part}, which another override set to a value"
            )
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        for k, v in value.items():
            _put(node[leaf], k, v, given)
    else:
        node[leaf] = value


def _compose(experiment: str, settings: Sequence[str]) -> DictConfig:
    """:func:`rag.build.compose_train_config`, an override it does not take as one :class:`ApiError` line."""
    with _override_errors():
        return build.compose_train_config(experiment, settings)


# ------------------------------------------------------------------------------------------------ sources


SourceKind = Literal["shipped", "reference_root", "reference_folder", "checkpoint", "transformers"]


#: suffixes of the files that hold passages, not a model (see :mod:`rag.data.corpus`)
PASSAGE_SUFFIXES = (".jsonl", ".json", ".tsv", ".csv", ".txt", ".md", ".gz", ".parquet", ".arrow")
#: the first bytes of what torch.save writes: a zip archive, or (before torch 1.6) a pickle
CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")
SOURCES_HINT = (
    "give 'reference', 'reference-closed-book', a .ckpt written by rag-train, a reference-style folder, a "
    "transformers RAG folder or hub name (facebook/rag-token-nq)"
)


def _source_kind(source: str) -> tuple[SourceKind, Path | None]:
    if source in SHIPPED:
        return "shipped", None
    path = Path(source).expanduser()
    if path.is_file():
        _check_checkpoint_file(path)
        return "checkpoint", path
    if path.is_dir():
        if (path / "MANIFEST.json").is_file() and (path / "rag" / "generator").is_dir():
            return "reference_root", path
        if (path / "generator").is_dir():
            return "reference_folder", path
        if (path / "config.json").is_file():
            return "transformers", path
        raise ApiError(
            f"{path} is a folder but not a model: give a reference-style folder (generator/ and query_encoder/ "
            "deltas), a transformers RAG folder (config.json), a .ckpt written by rag-train, or 'reference'"
        )
    if _missing_path(source):
        raise ApiError(f"no such file or folder {path}: {SOURCES_HINT}")
    if source.count("/") == 1:
        return "transformers", None  # a hub name such as facebook/rag-token-nq
    raise ApiError(f"no model {source!r}: {SOURCES_HINT}")


def _missing_path(name: str) -> bool:
    """Whether ``name``, which does not exist, was meant as a local path rather than a hub name: it starts
    like a path, has more than one ``/``, ends in ``.ckpt``, or its parent folder exists (runs/last.ckpt)."""
    path = Path(name).expanduser()
    if path.exists():
        return False
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or path.suffix in (".ckpt", ".pt", ".pth")
        or ("/" in name and path.parent.is_dir())
    )


def _check_checkpoint_file(path: Path) -> None:
    """A file given as a model is a torch checkpoint (its first bytes), not passages or anything else."""
    if path.suffix.lower() in PASSAGE_SUFFIXES:
        raise ApiError(
            f"{path} is a passage file, not a model: load a model (rag.load('reference') or a .ckpt) and pass "
            "it as passages=... or to model.index(...)"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise ApiError(f"cannot read {path} ({err.strerror}): {SOURCES_HINT}") from None
    if not head.startswith(CHECKPOINT_MAGIC):
        raise ApiError(f"{path} is not a checkpoint (a .ckpt written by rag-train): {SOURCES_HINT}")


def _check_device(device: str | torch.device | None) -> None:
    if device is None:
        return
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ApiError(f"device={device!r} is not a torch device: use 'cpu', 'cuda' or 'cuda:1'") from None
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise ApiError(f"device={device!r} but torch sees no CUDA GPU here: use device='cpu'")
    if wanted.type == "cuda" and wanted.index is not None and wanted.index >= torch.cuda.device_count():
        raise ApiError(f"device={device!r} but torch sees {torch.cuda.device_count()} CUDA GPU(s) here")
    if wanted.type == "mps" and not torch.backends.mps.is_available():
        raise ApiError(f"device={device!r} but MPS is not available here: use device='cpu'")


def _load_checkpoint(
    path: Path, overrides: Mapping[str, Any] | Sequence[str], cache_dir: Any, index_kind: str | None
) -> tuple[Any, DictConfig]:
    """:func:`rag.build.load_checkpoint` with ``overrides`` checked against the stored config first, and
    ``index_kind`` built over the checkpoint's own corpus from the embeddings its own index was built from
    (``overrides``' ``index`` settings then apply to the new kind)."""
    mapping = override_mapping(overrides)
    if not mapping and not index_kind:
        if cache_dir is not None:
            mapping["cache_dir"] = str(cache_dir)
        return build.load_checkpoint(path, mapping or None)
    stored = build.checkpoint_config(path)
    if index_kind:
        mode = build.retriever_mode(stored)
        if mode not in ("learned", "frozen"):
            raise ApiError(
                f"index_kind={index_kind}: the model in {path} does not search a dense index ({mode} retriever)"
            )
    with _override_errors():
        mapping, index = build.checkpoint_overrides(
            stored, mapping, where=f"the config stored in {path}", index_kind=index_kind
        )
    if cache_dir is not None:
        mapping["cache_dir"] = str(cache_dir)
    return build.load_checkpoint(path, mapping, stored, index=index)


class _Holder(torch.nn.Module):
    """Names a RagModel's weights as a RagLitModule does (``model.``), for :func:`rag.build.init_weights`."""

    def __init__(self, model: RagModel) -> None:
        super().__init__()
        self.model = model


# ------------------------------------------------------------------------------------------------ the model


class RAG:
    """A ready RAG model with its retriever attached: answer, score, explain, index, encode.

    Wraps a :class:`rag.model.RagModel` (``.model``; its generator, query encoder q(x) and retriever), the
    rag-train config it was built from where there is one (``.config``), and its document encoder d(z)
    (``.doc_encoder``, loaded on first use). Build one with :meth:`from_pretrained` or :func:`rag.load`.
    """

    def __init__(
        self,
        model: RagModel,
        *,
        config: Any = None,
        source: str = "",
        doc_encoder: BertEncoder | None = None,
        lit_module: Any = None,
    ) -> None:
        if not isinstance(model, RagModel):
            raise ApiError(f"model must be a rag.model.RagModel, got {type(model).__name__}")
        self.model = model.eval()
        self.config = config
        self.source = source
        self.lit_module = lit_module
        self._doc_encoder = doc_encoder
        self._own_retriever = model.retriever
        self.passage_index: PassageIndex | None = None
        self._uncapped_k: tuple[int | None] | None = None  # eval_n_docs before _cap_k capped it
        self._cap_k()

    # -------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike = "reference",
        *,
        head: str | None = None,
        n_docs: int | None = None,
        decoder: str | None = None,
        device: str | torch.device | None = None,
        index_kind: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        doc_encoder: str | None = None,
        passages: Sequence[str | Passage] | str | os.PathLike | None = None,
        experiment: str | None = None,
        overrides: Mapping[str, Any] | Sequence[str] = (),
    ) -> RAG:
        """Load a model with its retriever attached (see the module docstring for the sources).

        Args:
            source: ``"reference"`` (default), ``"reference-closed-book"``, a ``.ckpt`` path, a reference-style
                folder, a transformers RAG folder or hub name.
            head: ``token`` | ``sequence`` marginalisation; None: the model's own.
            n_docs: K passages read per question by ``generate`` / ``score`` / ``explain``; None: the model's.
            decoder: ``token_greedy`` | ``token_beam`` | ``sequence_thorough`` | ``sequence_fast``; None: the
                head's own.
            device: where the model runs (``"cuda"``); the index stays on the CPU.
            index_kind: ``flat`` (exact) | ``hnsw`` | ``hnsw_sq8`` | ``ivfpq`` for the model's corpus (a
                checkpoint's is built from the embeddings of its own index; ``overrides``' ``index`` settings
                apply to the new kind); None: the model's own.
            cache_dir: where indexes and embeddings are cached; None: ``$RAG_HOME`` or ``~/.cache/rag``.
            doc_encoder: transformers RAG sources only: the document encoder (name or folder) its index is
                built with; None: the released models' DPR context encoder.
            passages: retrieve from these passages instead of the model's corpus (see :func:`as_passages`);
                indexed in the cache with the model's document encoder.
            experiment: the rag-train experiment whose corpus / document encoder / index a non-checkpoint
                source takes (default ``miniwiki_rag_token``).
            overrides: further rag-train config settings, ``["model.max_context_length=256"]`` or a nested
                mapping; every key must be one the config has (``model.generation`` settings may be new).

        >>> model = RAG.from_pretrained("reference", n_docs=5, decoder="token_greedy")
        """
        if not isinstance(source, (str, os.PathLike)):
            raise ApiError(f"source must be a name or a path, got {type(source).__name__}: {SOURCES_HINT}")
        source = os.fspath(source)
        if head is not None and head not in HEADS:
            raise ApiError(f"head must be one of {HEADS}, got {head!r}")
        if decoder is not None and decoder not in DECODERS:
            raise ApiError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if index_kind is not None and index_kind not in INDEX_KINDS:
            raise ApiError(f"index_kind must be one of {', '.join(INDEX_KINDS)}, got {index_kind!r}")
        if n_docs is not None and (isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs < 1):
            raise ApiError(f"n_docs must be a positive integer, got {n_docs!r}")
        _check_device(device)
        own = None if passages is None else as_passages(passages)
        kind, path = _source_kind(source)
        if doc_encoder is not None and kind != "transformers":
            raise ApiError(
                f"doc_encoder= applies to transformers RAG sources; {source!r} brings its own document encoder"
            )
        if experiment is not None and kind == "checkpoint":
            raise ApiError(
                f"experiment= applies to sources without a config; the checkpoint {path} carries its own (change "
                "its settings with overrides=...)"
            )
        settings = override_strings(overrides)
        if cache_dir is not None:
            settings.append(f"cache_dir={build.format_value(str(cache_dir))}")
        lit_module, config = None, None
        if kind == "checkpoint":
            lit_module, config = _load_checkpoint(path, overrides, cache_dir, index_kind)
            model = lit_module.model
        elif kind == "transformers":
            from rag.interop import (
                RELEASED_CONTEXT_ENCODER,
                inspect_transformers_rag,
                rag_model_from_transformers,
            )

            rag_source = source if path is None else str(path)
            inspect_transformers_rag(rag_source)  # a clear error before any index is built
            encoder = doc_encoder or RELEASED_CONTEXT_ENCODER
            if _missing_path(encoder):
                raise ApiError(
                    f"doc_encoder={encoder}: no such folder; give a DPR context encoder folder or hub name "
                    f"(default {RELEASED_CONTEXT_ENCODER})"
                )
            settings = [
                "doc_encoder=dpr_nq",
                f"doc_encoder.model_name_or_path={build.format_value(encoder)}",
                *([f"index={index_kind}"] if index_kind else []),
                *settings,
            ]
            config = _compose(experiment or BASE_EXPERIMENT, settings)
            if own is not None:
                doc = build.instantiate(config.doc_encoder)
                retriever = _cached_index(own, doc, config.cache_dir, index_kind or "flat").retriever
            else:
                doc = None
                retriever = build.build_retriever(config)
            model = rag_model_from_transformers(rag_source, retriever)
            rag_model = cls(model, config=config, source=source, doc_encoder=doc)
            own = None  # already attached
        else:
            if kind == "shipped":
                name = experiment or SHIPPED[source]
            elif kind == "reference_root":
                name = experiment or BASE_EXPERIMENT
                settings.insert(0, f"++reference_dir={build.format_value(str(path))}")
            else:
                closed_book = not (path / "query_encoder").is_dir()
                name = experiment or (CLOSED_BOOK_EXPERIMENT if closed_book else BASE_EXPERIMENT)
            if index_kind:
                settings.insert(0, f"index={index_kind}")
            config = _compose(name, settings)
            model = build.build_model(config)
            if kind == "reference_folder":
                build.init_weights(_Holder(model), path)
        if kind != "transformers":
            rag_model = cls(model, config=config, source=source, lit_module=lit_module)
        if own is not None:
            rag_model.use_index(
                _cached_index(own, rag_model.doc_encoder, config.cache_dir, index_kind or "flat")
            )
        return rag_model.configure(head=head, n_docs=n_docs, decoder=decoder, device=device)

    def configure(
        self,
        *,
        head: str | None = None,
        n_docs: int | None = None,
        decoder: str | None = None,
        device: str | torch.device | None = None,
    ) -> RAG:
        """Change the head, the test-time K, the default decoder or the device in place; returns self."""
        m = self.model
        if head is not None:
            if head not in HEADS:
                raise ApiError(f"head must be one of {HEADS}, got {head!r}")
            m.head = head
        if decoder is not None:
            if decoder not in DECODERS:
                raise ApiError(f"decoder must be one of {DECODERS}, got {decoder!r}")
            m.decoder = decoder
        _check_device(device)
        if n_docs is not None:
            m.eval_n_docs = self._k(n_docs)
            self._uncapped_k = None  # chosen, not capped
        if device is not None:
            m.to(device)
            if self._doc_encoder is not None:
                self._doc_encoder.to(device)
        return self

    # -------------------------------------------------------------------------------- properties

    @property
    def head(self) -> str:
        return self.model.head

    @property
    def n_docs(self) -> int:
        """K passages read per question unless a call says otherwise."""
        return self.model.eval_n_docs or self.model.n_docs

    @property
    def decoder(self) -> str:
        return self.model.default_decoder()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def retriever(self):
        return self.model.retriever

    @property
    def query_encoder(self) -> BertEncoder:
        if self.model.query_encoder is None:
            raise ApiError(
                f"this model ({self.model.retriever_mode} retriever) has no query encoder: load a dense RAG model"
            )
        return self.model.query_encoder

    @property
    def doc_encoder(self) -> BertEncoder:
        """d(z), the frozen passage encoder of the model's index (loaded on first use)."""
        if self._doc_encoder is None:
            if self.config is None:
                raise ApiError(
                    "this model was built without a config: pass doc_encoder= to RAG(...) to index or encode passages"
                )
            self._doc_encoder = build.instantiate(self.config.doc_encoder).eval().to(self.device)
        return self._doc_encoder

    def _k(self, n_docs: int | None) -> int:
        k = self.n_docs if n_docs is None else n_docs
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ApiError(f"n_docs must be a positive integer, got {k!r}")
        if self.model.retriever is not None and k > self.model.retriever.n_passages:
            raise ApiError(
                f"n_docs={k} but the index holds {self.model.retriever.n_passages} passages: ask for at most that many"
            )
        return k

    def __repr__(self) -> str:
        return f"RAG(source={self.source!r}, {self.model.extra_repr()})"

    # -------------------------------------------------------------------------------- answering

    def retrieve(self, questions: Sequence[Question | str], n_docs: int | None = None) -> RetrievalOutput:
        """The K passages of each of B questions, best first: ``doc_ids`` (B, K), ``doc_scores`` (B, K)."""
        questions = _questions(questions)
        if self.model.closed_book:
            raise ApiError("a closed-book model retrieves no passages: load a RAG model to retrieve")
        with torch.no_grad():
            return self.model.retrieve(questions, self._k(n_docs))

    def generate(
        self,
        questions: Sequence[Question | str],
        *,
        n_docs: int | None = None,
        decoder: str | None = None,
        **generation_kwargs: Any,
    ) -> list[RagAnswer]:
        """Answer B questions, each from its K = ``n_docs`` retrieved passages.

        Returns B :class:`~rag.model.RagAnswer`: ``answer``, ``score`` (log p(y|x)), and the K ``passages``
        read with their ``doc_scores``, priors p(z|x) and posteriors p(z|x,y). ``decoder``:
        ``token_greedy`` | ``token_beam`` | ``sequence_thorough`` | ``sequence_fast`` (None: the model's);
        ``generation_kwargs``: transformers generation settings (``num_beams=4``, ``max_new_tokens=20``).

        >>> model.generate(["Who wrote Hamlet?"], n_docs=5)[0].answer
        """
        questions = _questions(questions)
        if decoder is not None and decoder not in DECODERS:
            raise ApiError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        k = None if self.model.closed_book else self._k(n_docs)
        return self.model.generate(questions, n_docs=k, decoder=decoder, **generation_kwargs)

    def score(
        self, questions: Sequence[Question | str], answers: Sequence[str], *, n_docs: int | None = None
    ) -> torch.Tensor:
        """log p(y|x) of the given answers under the model's head, teacher-forced: (B,) float32.

        RAG-Token: Σ_i log Σ_z p(z|x) p(y_i|x,z,y_<i); RAG-Sequence: log Σ_z p(z|x) Π_i p(y_i|x,z,y_<i),
        over the K = ``n_docs`` retrieved passages, without label smoothing.
        """
        questions = _questions(questions)
        answers = self._answers(answers, len(questions))
        k = None if self.model.closed_book else self._k(n_docs)
        m = self.model
        with torch.no_grad():
            out = m(questions, answers, n_docs=k)
            nll = rag_token_nll if m.head == "token" else rag_sequence_nll
            values = nll(
                out.seq_logits,
                out.doc_scores,
                out.labels,
                pad_token_id=m.generator.pad_token_id,
                bos_token_id=m.generator.bos_token_id,
                exclude_bos=m.exclude_bos,
                label_smoothing=0.0,
                reduction="none",
            )  # (B,)
        return (-values).float().cpu()

    def explain(
        self,
        questions: Sequence[Question | str],
        answers: Sequence[str] | None = None,
        *,
        n_docs: int | None = None,
    ) -> list[Explanation]:
        """Which passage each answer came from (the paper's Figure 2), one teacher-forced pass.

        ``answers``: one per question (None: the model's own, generated first). Each
        :class:`~rag.model.Explanation` holds ``tokens`` (T), ``token_posteriors`` (T, K) p(z_t|x,y_t,y_<t),
        ``doc_posteriors`` (K,) p(z|x,y), ``doc_priors`` (K,) p(z|x) and the K ``passages``.
        """
        questions = _questions(questions)
        if self.model.closed_book:
            raise ApiError("a closed-book model reads no passages: there is nothing to explain")
        k = self._k(n_docs)
        if answers is None:
            answers = [a.answer for a in self.model.generate(questions, n_docs=k)]
        answers = self._answers(answers, len(questions))
        return self.model.explain(questions, answers, n_docs=k)

    @staticmethod
    def _answers(answers: Sequence[str], n: int) -> list[str]:
        if isinstance(answers, str):
            raise ApiError("pass a list of answers (one per question), not a single string")
        answers = list(answers)
        if len(answers) != n:
            raise ApiError(f"got {n} questions but {len(answers)} answers: pass one answer per question")
        for i, a in enumerate(answers):
            if not isinstance(a, str):
                raise ApiError(f"answer {i} is a {type(a).__name__}, not a string")
        return answers

    # -------------------------------------------------------------------------------- encoding

    def encode_query(self, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """q(x) of N questions: (N, D) float tensor on the model's device, no gradient."""
        texts = _texts(texts, "questions")
        with torch.no_grad():
            return self.query_encoder.encode(texts, batch_size=batch_size)

    def encode_document(self, passages: Sequence[str | Passage], *, batch_size: int = 64) -> torch.Tensor:
        """d(z) of N passages (strings, or :class:`Passage` whose title is encoded with the text): (N, D)."""
        passages = as_passages(passages)
        with torch.no_grad():
            return self.doc_encoder.encode(
                ([p.title for p in passages], [p.text for p in passages]), batch_size=batch_size
            )

    def encode(
        self,
        texts: Sequence[str | Passage],
        kind: Literal["query", "document"] = "query",
        *,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """(N, D) embeddings: questions with the query encoder, or passages with the document encoder."""
        if kind == "query":
            return self.encode_query(texts, batch_size=batch_size)
        if kind == "document":
            return self.encode_document(texts, batch_size=batch_size)
        raise ApiError(f"kind must be 'query' or 'document', got {kind!r}")

    # -------------------------------------------------------------------------------- your own passages

    def index(
        self,
        passages: Sequence[str | Passage | Mapping[str, str]] | str | os.PathLike,
        path: str | os.PathLike | None = None,
        *,
        kind: str = "flat",
        batch_size: int = 64,
        use: bool = True,
        rebuild: bool = False,
    ) -> PassageIndex:
        """Index your passages (see :func:`as_passages`) with the model's document encoder, saved in ``path``
        (None: the cache), and (``use``) retrieve from them from now on. Reload it with
        :meth:`PassageIndex.load` and :meth:`use_index`.

        >>> model.index(["Ada Lovelace wrote the first program."], "my_index")
        """
        passages = as_passages(passages)
        if self.model.query_encoder is None:
            raise ApiError(
                f"this model ({self.model.retriever_mode} retriever) does not search a dense index: load a dense "
                "RAG model to index passages"
            )
        if path is None:
            index = _cached_index(
                passages, self.doc_encoder, self._cache_dir(), kind, batch_size=batch_size, rebuild=rebuild
            )
        else:
            index = PassageIndex.build(
                passages, self.doc_encoder, path, kind=kind, batch_size=batch_size, rebuild=rebuild
            )
        if use:
            self.use_index(index)
        return index

    def use_index(self, index: PassageIndex | str | os.PathLike | None) -> RAG:
        """Retrieve from ``index`` (a :class:`PassageIndex` or its folder); None: back to the model's own."""
        if index is None:
            self.model.retriever = self._own_retriever
            self.passage_index = None
            self._cap_k()
            return self
        if not isinstance(index, (PassageIndex, str, os.PathLike)):
            raise ApiError(f"index must be a rag.PassageIndex or its folder, got {type(index).__name__}")
        if not isinstance(index, PassageIndex):
            index = PassageIndex.load(index)
        if self.model.query_encoder is None:
            raise ApiError("this model does not search a dense index: load a dense RAG model")
        if index.dim != self.model.query_encoder.dim:
            raise ApiError(
                f"the index in {index.path} holds {index.dim}-d vectors but this model's query encoder makes "
                f"{self.model.query_encoder.dim}-d ones: rebuild it with model.index(passages, path)"
            )
        own = self.doc_encoder.weights_checksum()
        if index.encoder_checksum and index.encoder_checksum != own:
            raise ApiError(
                f"the index in {index.path} was built by document encoder {index.encoder_name!r} "
                f"({index.encoder_checksum[:12]}), not this model's {self.doc_encoder.name!r} ({own[:12]}): "
                "rebuild it with model.index(passages, path, rebuild=True)"
            )
        self.model.retriever = index.retriever
        self.passage_index = index
        self._cap_k()
        return self

    def _cap_k(self) -> None:
        """Read at most as many passages as the index holds by default (explicit ``n_docs`` are checked)."""
        m = self.model
        if self._uncapped_k is not None:
            m.eval_n_docs = self._uncapped_k[0]
            self._uncapped_k = None
        if m.retriever is None or m.closed_book:
            return
        k, n = m.eval_n_docs or m.n_docs, m.retriever.n_passages
        if k > n:
            log.info(f"the index holds {n} passages, fewer than the default K={k}: reading {n} per question")
            self._uncapped_k = (m.eval_n_docs,)
            m.eval_n_docs = n

    def _cache_dir(self) -> str:
        if self.config is not None and self.config.get("cache_dir"):
            return str(self.config.cache_dir)
        return os.environ.get("RAG_HOME", "~/.cache/rag")


def _cached_index(
    passages: list[Passage],
    doc_encoder: BertEncoder,
    cache: str,
    kind: str,
    *,
    batch_size: int = 64,
    rebuild: bool = False,
) -> PassageIndex:
    """A :class:`PassageIndex` of ``passages`` in the cache, named by their checksum and the encoder."""
    name = f"own-{corpus_checksum(passages)[:12]}-{doc_encoder.name}-{kind}"
    return PassageIndex.build(
        passages,
        doc_encoder,
        Path(cache).expanduser() / "passage_indexes" / name,
        kind=kind,
        batch_size=batch_size,
        rebuild=rebuild,
    )


def load(source: str | os.PathLike = "reference", **options: Any) -> RAG:
    """:meth:`RAG.from_pretrained`: ``rag.load("reference")``, ``rag.load("run/last.ckpt", n_docs=10)``."""
    return RAG.from_pretrained(source, **options)
