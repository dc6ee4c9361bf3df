"""Interoperability with transformers' RAG: load its checkpoints here, export ours to its format.

**Import.** A transformers RAG checkpoint -- the released ``facebook/rag-token-nq`` / ``facebook/rag-sequence-nq``
(Lewis et al. 2020, Table 1's NQ models), or any folder written by ``RagTokenForGeneration`` /
``RagSequenceForGeneration`` / ``RagModel.save_pretrained`` together with ``RagTokenizer.save_pretrained`` -- holds
a DPR question encoder, a seq2seq generator (BART) and their two tokenizers (``question_encoder_tokenizer/``,
``generator_tokenizer/``). :func:`load_transformers_rag` turns them into this project's
:class:`~rag.retrieval.encoders.QueryEncoder` (DPR's [CLS] ``pooler_output``, as transformers' RAG scores
documents) and :class:`~rag.generation.generator.Generator`; :func:`rag_model_from_transformers` builds the
:class:`~rag.model.RagModel` around a retriever. Hydra reaches the same loaders through
``generator=rag_checkpoint query_encoder=rag_checkpoint`` (``conf/experiment/nq_rag_*_released.yaml``), and
``rag-convert import`` writes a checkpoint that ``rag-evaluate`` reads (:func:`write_import_checkpoint`).

A RAG checkpoint holds no document index. The released models retrieve from DPR's 21M-passage Wikipedia
(``psgs_w100.tsv``) embedded by DPR's context encoder ``facebook/dpr-ctx_encoder-single-nq-base``
(:data:`RELEASED_CONTEXT_ENCODER`; ``doc_encoder=dpr_nq``, overridable with ``doc_encoder.model_name_or_path``):
build that index with ``rag-index`` before evaluating.

Settings carried over: the head (RAG-Token / RAG-Sequence, from the saved architecture), ``n_docs``,
``max_combined_length`` (our ``max_context_length``), label smoothing, ``exclude_bos_score``, the generator
config's ``prefix`` (transformers' ``RagRetriever`` prepends it to every generator input, so
``context_prefix=None`` does too), and for RAG-Token the RAG model's own generation config, which
transformers' ``RagTokenForGeneration.generate`` uses instead of the generator's.

**Export.** :func:`export_transformers_rag` writes a folder that ``RagTokenForGeneration.from_pretrained`` (or
``RagSequenceForGeneration``) loads, with ``RagTokenizer.from_pretrained``'s tokenizers (a rag-train
checkpoint's parts: :func:`export_checkpoint_weights`, which ``rag-convert export`` calls); given the same
``context_input_ids``, ``context_attention_mask`` and ``doc_scores`` it computes the same losses and generates
the same answers as the model here (tests/test_interop.py). The query encoder must be a DPR checkpoint or a
BERT pooled by its [CLS] vector without normalisation: transformers' RAG embeds questions with DPR's
``pooler_output`` (the [CLS] hidden state). A mean-pooled or normalised encoder (the shipped MiniLM) has no
DPR equivalent, so the export refuses it unless ``allow_pooling_mismatch=True`` (then the BERT weights go into
the DPR encoder and are pooled by [CLS] there: generation from given documents is exact, transformers' own
retrieval is not) or another DPR question encoder is named. The generator always exports.

Known differences that remain (those that concern an export are also listed in its ``rag_export.json``):

- transformers' RAG-Sequence ``generate`` ignores the contexts' attention mask when it searches candidates,
  so its answers depend on padding; ours do not (tests/test_parity_transformers.py);
- transformers' ``RagSequenceForGeneration`` keeps no generation settings of its own (transformers 5 refuses
  them in model configs): pass ``num_beams`` / ``max_length`` to its ``generate`` (the manifest lists them);
- transformers' ``RagTokenForGeneration.generate`` ignores ``max_new_tokens``: the export writes
  ``max_length = 1 + max_new_tokens``;
- transformers' BART hard-codes LayerNorm epsilon 1e-5, so a BART initialised from a BERT (epsilon 1e-12,
  :func:`~rag.generation.generator.bart_from_bert`) computes different logits there (on the MiniLM-initialised
  BART up to 0.07 apart on logits of magnitude 8; greedy answers agreed on 16 of 16 NQ questions); importing
  the export here restores 1e-12 (as :func:`~rag.generation.generator.load_generator` does);
- transformers' document priors are the softmax of the raw inner products: a ``doc_score_scale`` other than 1
  (the cosine-scoring MiniLM of the embedded default uses 20) has no setting there; the export's manifest
  records it;
- transformers feeds the generator the question decoded from the question encoder's ids (lowercased by an
  uncased BERT, :mod:`rag.generation.context`); here it is the question as written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rag.atomic import atomic_dir, atomic_path

# the same Generator construction, LayerNorm fix-up and quiet loading that load_generator uses
from rag.generation.generator import (
    Generator,
    quiet_transformers,
    resolve_model_path,
    set_layer_norm_eps,
    wrap_model,
)
from rag.model import DEFAULT_DECODER, HEADS, RagModel, RagModelError
from rag.retrieval.encoders import BertEncoder, QueryEncoder
from rag.retrieval.retriever import Retriever

if TYPE_CHECKING:
    from rag.lit_module import OptimConfig

__all__ = [
    "EXPORT_MANIFEST",
    "RAG_ARCHITECTURES",
    "RELEASED_CHECKPOINTS",
    "RELEASED_CONTEXT_ENCODER",
    "ExportError",
    "InteropError",
    "NotARagCheckpointError",
    "TokenizerMismatchError",
    "TransformersRag",
    "export_checkpoint_weights",
    "export_transformers_rag",
    "inspect_transformers_rag",
    "load_trained_part",
    "load_rag_generator",
    "load_rag_query_encoder",
    "load_transformers_rag",
    "rag_model_from_transformers",
    "write_import_checkpoint",
    "write_transformers_rag",
]

log = logging.getLogger(__name__)

#: saved architecture -> our head (None: a bare RagModel, which has no head of its own)
RAG_ARCHITECTURES: dict[str, str | None] = {
    "RagTokenForGeneration": "token",
    "RagSequenceForGeneration": "sequence",
    "RagModel": None,
}
HEAD_CLASSES = {"token": "RagTokenForGeneration", "sequence": "RagSequenceForGeneration"}
#: the RAG paper's NQ models as released on the model hub (Table 1: 44.1 / 44.5 EM on NQ test)
RELEASED_CHECKPOINTS = ("facebook/rag-token-nq", "facebook/rag-sequence-nq")
#: the document encoder whose index the released models were trained and evaluated with (DPR, single-NQ)
RELEASED_CONTEXT_ENCODER = "facebook/dpr-ctx_encoder-single-nq-base"
QUESTION_TOKENIZER_DIR = "question_encoder_tokenizer"
GENERATOR_TOKENIZER_DIR = "generator_tokenizer"
EXPORT_MANIFEST = "rag_export.json"
EXPORT_FORMAT = 1


class InteropError(RagModelError):
    """A checkpoint or a model that cannot cross between transformers' RAG format and ours; the message says why."""


class NotARagCheckpointError(InteropError):
    """The path or hub name does not hold a transformers RAG checkpoint (config.json with model_type 'rag')."""


class TokenizerMismatchError(InteropError):
    """A tokenizer does not belong to the model it was saved or given with."""


class ExportError(InteropError):
    """A model that cannot be written in transformers' RAG format as asked."""


# ------------------------------------------------------------------------------------------------ import


@dataclass
class TransformersRag:
    """The parts of one transformers RAG checkpoint, converted: generator and query encoder with tokenizers."""

    generator: Generator
    query_encoder: QueryEncoder
    config: Any  # transformers.RagConfig
    architecture: str  # RagTokenForGeneration | RagSequenceForGeneration | RagModel
    source: str

    @property
    def head(self) -> str | None:
        """``token`` / ``sequence`` from the saved architecture; None for a bare ``RagModel``."""
        return RAG_ARCHITECTURES[self.architecture]

    @property
    def context_prefix(self) -> str:
        """What transformers' RagRetriever prepends to each generator input: the generator config's prefix."""
        return getattr(self.config.generator, "prefix", None) or ""

    def model_kwargs(self) -> dict[str, Any]:
        """:class:`~rag.model.RagModel` settings that reproduce the checkpoint's own (head: token if unknown)."""
        return {
            "head": self.head or "token",
            "n_docs": int(self.config.n_docs),
            "max_context_length": int(self.config.max_combined_length),
            "context_prefix": self.context_prefix,
            "label_smoothing": float(self.config.label_smoothing),
            "exclude_bos": bool(self.config.exclude_bos_score),
        }


#: what a name that is no transformers RAG checkpoint is told
CHECKPOINT_HINT = (
    "pass a folder written by RagTokenForGeneration/RagSequenceForGeneration.save_pretrained plus "
    "RagTokenizer.save_pretrained, or a hub name such as facebook/rag-token-nq"
)


def inspect_transformers_rag(
    name_or_path: str | os.PathLike, *, check_tokenizers: bool = False
) -> tuple[Any, str, str]:
    """Read a RAG checkpoint's config without its weights: ``(RagConfig, architecture, source)``.

    Raises :class:`NotARagCheckpointError` for a folder or hub name that is not a RAG checkpoint; with
    ``check_tokenizers``, also loads its two tokenizers and checks them against the models (as
    :func:`load_transformers_rag` does).
    """
    from transformers import AutoConfig

    source = resolve_model_path(
        name_or_path,
        what="RAG checkpoint",
        hint=CHECKPOINT_HINT,
        error=NotARagCheckpointError,
        files=("config.json",),
    )
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NotARagCheckpointError(
            f"cannot read the config of {source!r} ({first_line}); give a local checkpoint folder, or a hub name "
            "with the hub reachable (unset HF_HUB_OFFLINE) or already in the hub cache"
        ) from None
    if config.model_type != "rag":
        raise NotARagCheckpointError(
            f"{source} is a {config.model_type!r} checkpoint, not a transformers RAG one (model_type 'rag'): load "
            "a plain generator with generator=bart_large / rag.generation.generator.load_generator, a DPR "
            "question encoder with query_encoder=dpr_nq / rag.retrieval.encoders.load_query_encoder"
        )
    architectures = [a for a in (config.architectures or []) if a in RAG_ARCHITECTURES]
    architecture = architectures[0] if architectures else "RagModel"
    if config.question_encoder.model_type != "dpr":
        raise InteropError(
            f"{source} has a {config.question_encoder.model_type!r} question encoder; only DPR question encoders "
            "(whose pooler_output transformers' RAG scores documents with) load here"
        )
    if not getattr(config.generator, "is_encoder_decoder", False):
        raise InteropError(
            f"{source} has a {config.generator.model_type!r} generator, which is not an encoder-decoder model"
        )
    if check_tokenizers:
        _checked_tokenizers(source, config, None, None)
    return config, architecture, source


def _checked_tokenizers(source: str, config, question_given, generator_given):
    question_tokenizer = _load_tokenizer(
        source, QUESTION_TOKENIZER_DIR, question_given, "question encoder", "question_encoder_tokenizer"
    )
    generator_tokenizer = _load_tokenizer(
        source, GENERATOR_TOKENIZER_DIR, generator_given, "generator", "generator_tokenizer"
    )
    _check_question_tokenizer(question_tokenizer, config.question_encoder, source)
    _check_generator_tokenizer(generator_tokenizer, config.generator, source)
    return question_tokenizer, generator_tokenizer


def _load_tokenizer(source: str, subfolder: str, given, what: str, option: str):
    from transformers import AutoTokenizer

    if given is not None:
        if not isinstance(given, (str, os.PathLike)):
            return given
        try:
            return AutoTokenizer.from_pretrained(os.fspath(given))
        except (OSError, ValueError, TypeError) as err:
            raise InteropError(
                f"cannot load the {what} tokenizer {os.fspath(given)!r} given as {option}: {err}"
            ) from None
    try:
        return AutoTokenizer.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError, TypeError):
        raise NotARagCheckpointError(
            f"{source} holds no {what} tokenizer in {subfolder}/: save the tokenizers with "
            f"RagTokenizer(question_encoder_tokenizer, generator_tokenizer).save_pretrained(folder), or pass "
            f"{option}=<tokenizer folder>"
        ) from None


def _first_id(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _check_generator_tokenizer(tokenizer, config, source: str) -> None:
    what = f"the generator tokenizer of {source}"
    vocab = int(config.vocab_size)
    if len(tokenizer) > vocab:
        raise TokenizerMismatchError(
            f"{what} has {len(tokenizer)} tokens but the generator's vocabulary only {vocab}: the tokenizer belongs "
            "to another model; save the generator's own tokenizer in generator_tokenizer/"
        )
    pad = _first_id(config.pad_token_id)
    if pad is not None and tokenizer.pad_token_id != pad:
        raise TokenizerMismatchError(
            f"{what} pads with id {tokenizer.pad_token_id} but the generator with id {pad}: the tokenizer belongs to "
            "another model; save the generator's own tokenizer in generator_tokenizer/"
        )
    eos = _first_id(config.eos_token_id)
    ends = {tokenizer.eos_token_id, tokenizer.sep_token_id} - {None}
    if eos is not None and ends and eos not in ends:
        raise TokenizerMismatchError(
            f"{what} ends sequences with id(s) {sorted(ends)} but the generator stops at {eos}: the tokenizer "
            "belongs to another model"
        )


def _check_question_tokenizer(tokenizer, config, source: str) -> None:
    what = f"the question encoder tokenizer of {source}"
    vocab = int(config.vocab_size)
    if len(tokenizer) > vocab:
        raise TokenizerMismatchError(
            f"{what} has {len(tokenizer)} tokens but the DPR question encoder's vocabulary only {vocab}: the "
            "tokenizer belongs to another model; save the encoder's own tokenizer in question_encoder_tokenizer/"
        )
    pad = getattr(config, "pad_token_id", None)
    if pad is not None and tokenizer.pad_token_id != pad:
        raise TokenizerMismatchError(
            f"{what} pads with id {tokenizer.pad_token_id} but the DPR question encoder with id {pad}: the tokenizer "
            "belongs to another model"
        )
    first = tokenizer("a")["input_ids"][:1]
    if tokenizer.cls_token_id is None or first != [tokenizer.cls_token_id]:
        raise TokenizerMismatchError(
            f"{what} does not start its inputs with a [CLS] token, whose vector DPR returns: use the BERT "
            "WordPiece tokenizer the encoder was trained with"
        )


def load_transformers_rag(
    name_or_path: str | os.PathLike,
    *,
    question_encoder_tokenizer=None,
    generator_tokenizer=None,
    dtype: torch.dtype | str | None = None,
    question_max_length: int = 256,
) -> TransformersRag:
    """Load a transformers RAG checkpoint (hub name or folder) as this project's parts.

    Args:
        name_or_path: ``facebook/rag-token-nq``, ``facebook/rag-sequence-nq`` or a folder written by a RAG class's
            ``save_pretrained`` (with ``RagTokenizer.save_pretrained`` for the tokenizers).
        question_encoder_tokenizer, generator_tokenizer: tokenizers (objects or folders) to use instead of the
            checkpoint's ``question_encoder_tokenizer/`` / ``generator_tokenizer/``; checked against the models.
        dtype: weights' dtype (None: as saved).
        question_max_length: question tokens at most for the query encoder.

    Both tokenizers are checked against their models before any weights are read (vocabulary size, padding and
    end ids, [CLS] first for DPR), so a mismatched tokenizer fails at once with :class:`TokenizerMismatchError`.
    """
    import transformers

    config, architecture, source = inspect_transformers_rag(name_or_path)
    question_tokenizer, gen_tokenizer = _checked_tokenizers(
        source, config, question_encoder_tokenizer, generator_tokenizer
    )

    kwargs = {"dtype": dtype} if dtype is not None else {}
    with quiet_transformers():
        hf = getattr(transformers, architecture).from_pretrained(source, **kwargs)
    hf.eval()
    generator_model, question_model = hf.generator, hf.question_encoder
    if architecture == "RagTokenForGeneration":
        # transformers' RagTokenForGeneration.generate reads the RAG model's generation config, not the
        # generator's: give ours the same defaults
        generator_model.generation_config = copy.deepcopy(hf.generation_config)
    eps = getattr(generator_model.config, "layer_norm_eps", None)
    if generator_model.config.model_type == "bart" and eps is not None:
        # a BART initialised from a BERT records BERT's epsilon, which transformers' BART does not apply
        set_layer_norm_eps(generator_model, eps)
    generator = wrap_model(generator_model, gen_tokenizer)
    name = Path(source.rstrip("/")).name or "rag"
    query_encoder = QueryEncoder(
        question_model,
        question_tokenizer,
        pooling="cls",
        normalize=False,
        # never more tokens than the encoder has positions
        max_length=min(int(question_max_length), int(question_model.config.max_position_embeddings)),
        name=f"{name}-question_encoder",
    )
    return TransformersRag(
        generator=generator,
        query_encoder=query_encoder,
        config=hf.config,
        architecture=architecture,
        source=source,
    )


# Hydra builds the generator and the query encoder one after the other (rag.build.build_model); both come
# from one load of the checkpoint: the part not yet asked for waits here, for one checkpoint at a time.
_waiting: dict[tuple, dict[str, nn.Module]] = {}


def _take(part: str, name_or_path, dtype) -> nn.Module:
    key = (os.fspath(name_or_path), str(dtype))
    parts = _waiting.pop(key, None)
    if parts is None or part not in parts:
        _waiting.clear()
        loaded = load_transformers_rag(name_or_path, dtype=dtype)
        parts = {"generator": loaded.generator, "query_encoder": loaded.query_encoder}
    taken = parts.pop(part)
    if parts:
        _waiting[key] = parts
    return taken


def load_rag_generator(name_or_path: str, dtype: str | None = None) -> Generator:
    """Hydra target (``generator=rag_checkpoint``): the generator of a transformers RAG checkpoint, its
    tokenizer, and (RAG-Token) the RAG model's generation settings."""
    return _take("generator", name_or_path, dtype)


def load_rag_query_encoder(
    name_or_path: str, max_length: int = 256, dtype: str | None = None
) -> QueryEncoder:
    """Hydra target (``query_encoder=rag_checkpoint``): the DPR question encoder of a transformers RAG
    checkpoint with its tokenizer, pooled by [CLS] as DPR and transformers' RAG do."""
    encoder = _take("query_encoder", name_or_path, dtype)
    encoder.max_length = min(int(max_length), int(encoder.model.config.max_position_embeddings))
    return encoder


def rag_model_from_transformers(
    name_or_path: str | os.PathLike,
    retriever: Retriever | None = None,
    *,
    retriever_mode: str = "learned",
    **model_kwargs,
) -> RagModel:
    """A :class:`~rag.model.RagModel` from a transformers RAG checkpoint and a retriever over its passages.

    The checkpoint's own settings (:meth:`TransformersRag.model_kwargs`) apply unless ``model_kwargs`` say
    otherwise. ``retriever`` must search an index built by the matching document encoder (for the released
    models :data:`RELEASED_CONTEXT_ENCODER` over DPR's Wikipedia).
    """
    loaded = load_transformers_rag(name_or_path)
    kwargs = loaded.model_kwargs()
    kwargs.update(model_kwargs)
    return RagModel(
        loaded.generator, loaded.query_encoder, retriever, retriever_mode=retriever_mode, **kwargs
    )


# ------------------------------------------------------------------------------------------------ export


def _dpr_question_encoder(encoder: BertEncoder, allow_pooling_mismatch: bool) -> tuple[nn.Module, str]:
    """A ``DPRQuestionEncoder`` computing ``encoder``'s vectors, and how it was made."""
    from transformers import DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    model = encoder.model
    if encoder.is_dpr:
        if isinstance(model, DPRQuestionEncoder):
            return copy.deepcopy(model), "dpr"
        if isinstance(model, DPRContextEncoder):
            converted = DPRQuestionEncoder(DPRConfig(**model.config.to_dict()))
            converted.question_encoder.load_state_dict(model.ctx_encoder.state_dict())
            return converted.eval(), "dpr (context encoder weights)"
        raise ExportError(f"unsupported DPR model {type(model).__name__} as query encoder")
    model_type = getattr(model.config, "model_type", None)
    if model_type != "bert":
        raise ExportError(
            f"the query encoder {encoder.name!r} is a {model_type!r} model; transformers' RAG question encoder is "
            "DPR, a BERT: export with question_encoder=<a DPR question encoder folder or hub name>"
        )
    if encoder.pooling != "cls" or encoder.normalize:
        how = f"{encoder.pooling} pooling" + (" with L2 normalisation" if encoder.normalize else "")
        if not allow_pooling_mismatch:
            raise ExportError(
                f"the query encoder {encoder.name!r} uses {how}, but transformers' RAG embeds questions with DPR's "
                "[CLS] vector, unnormalised: its retrieval would differ from this model's. Export with "
                "allow_pooling_mismatch=true to write the weights anyway (generation from given documents is "
                "exact; transformers' own retrieval is not), or pair the generator with a DPR question encoder "
                "(question_encoder=facebook/dpr-question_encoder-single-nq-base)"
            )
        made = f"bert weights, {how} here but [CLS] in transformers (allow_pooling_mismatch)"
    else:
        made = "bert, [CLS] pooled"
    bert_config = model.config.to_dict()
    keys = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
        "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id",
    )  # fmt: skip
    config = DPRConfig(**{k: bert_config[k] for k in keys if k in bert_config}, projection_dim=0)
    dpr = DPRQuestionEncoder(config).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")}
    missing, unexpected = dpr.question_encoder.bert_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"the query encoder's BERT does not fit DPR's: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return dpr, made


def _resolved_generation(head: str, decoder: str, generation: Mapping | None) -> dict:
    """The generation settings our decoder uses, in the form transformers' RAG ``generate`` reads them."""
    settings = dict(generation or {})
    if head == "token" and decoder != "token_beam":
        settings["num_beams"] = 1
    max_new = settings.pop("max_new_tokens", None)
    if max_new is not None:
        # transformers' RagTokenForGeneration.generate reads max_length only (it counts the decoder start)
        settings["max_length"] = 1 + int(max_new)
    return settings


def write_transformers_rag(
    path: str | os.PathLike,
    generator: Generator,
    query_encoder: BertEncoder | None,
    *,
    head: str = "token",
    n_docs: int = 5,
    max_context_length: int = 300,
    context_prefix: str | None = "",
    decoder: str | None = None,
    generation: Mapping[str, Any] | None = None,
    label_smoothing: float = 0.0,
    exclude_bos: bool = False,
    question_encoder: str | os.PathLike | BertEncoder | None = None,
    allow_pooling_mismatch: bool = False,
    manifest: Mapping[str, Any] | None = None,
) -> Path:
    """Write a generator and a query encoder as a transformers RAG folder (the parts-level
    :func:`export_transformers_rag`; :func:`export_checkpoint_weights` calls it with a checkpoint's settings).

    ``question_encoder`` (a folder / hub name of a DPR or [CLS]-pooled BERT encoder, or an encoder) replaces
    ``query_encoder``; it is required when there is none (BM25 and closed-book models). Returns the folder.
    """
    import transformers
    from transformers import RagConfig, RagTokenizer

    if head not in HEADS:
        raise ExportError(f"head must be one of {HEADS}, got {head!r}")
    if not isinstance(generator, Generator):
        raise ExportError(
            f"generator must be a rag.generation.generator.Generator, got {type(generator).__name__}"
        )
    if question_encoder is not None:
        query_encoder = (
            question_encoder
            if isinstance(question_encoder, BertEncoder)
            else QueryEncoder.from_pretrained(question_encoder)
        )
    if query_encoder is None:
        raise ExportError(
            "the model has no query encoder (retriever_mode bm25 or none), but transformers' RAG needs a DPR "
            "question encoder: pass question_encoder=<DPR question encoder folder or hub name>, e.g. "
            "facebook/dpr-question_encoder-single-nq-base"
        )
    decoder = decoder or DEFAULT_DECODER[head]
    prefix = getattr(generator.config, "prefix", None) if context_prefix is None else context_prefix
    dpr, made = _dpr_question_encoder(query_encoder, allow_pooling_mismatch)
    gen_model = copy.deepcopy(generator.model).eval()

    rag_config = RagConfig.from_question_encoder_generator_configs(
        dpr.config,
        gen_model.config,
        n_docs=int(n_docs),
        max_combined_length=int(max_context_length),
        label_smoothing=float(label_smoothing),
        exclude_bos_score=bool(exclude_bos),
        retrieval_vector_size=int(query_encoder.dim),
        index_name="custom",
    )
    # transformers' RagRetriever prepends the generator config's prefix: make it ours (no prefix: none)
    rag_config.generator.prefix = prefix or None
    cls = getattr(transformers, HEAD_CLASSES[head])
    rag = cls(config=rag_config, question_encoder=dpr, generator=gen_model).eval()
    _check_same_weights(rag.generator, generator.model, "generator")
    _check_same_weights(rag.question_encoder, dpr, "question encoder")
    settings = _resolved_generation(head, decoder, generation)
    if head == "token":
        rag.generation_config = copy.deepcopy(generator.model.generation_config)
        unknown = rag.generation_config.update(**settings)
        if unknown:
            raise ExportError(
                f"generation settings {sorted(unknown)} are not transformers GenerationConfig names"
            )
    eps = getattr(generator.config, "layer_norm_eps", None)
    notes = []
    if generator.config.model_type == "bart" and eps is not None and eps != 1e-5:
        notes.append(
            f"the generator's LayerNorms use epsilon {eps:g}, transformers' BART always 1e-5: its logits differ "
            "slightly there (rag.interop.load_transformers_rag restores the epsilon)"
        )
    if head == "sequence":
        notes.append(
            "RagSequenceForGeneration keeps no generation settings: pass the 'generation' entries to generate()"
        )
        notes.append(
            "RagSequenceForGeneration.generate attends to padding while searching: pass unpadded contexts"
        )
    notes.append(
        "index_name is 'custom': build a RagRetriever over the passages embedded by the same document encoder "
        "(passages_path / index_path), or pass context_input_ids, context_attention_mask and doc_scores"
    )
    record = {
        "format": EXPORT_FORMAT,
        "architecture": HEAD_CLASSES[head],
        "head": head,
        "decoder": decoder,
        "n_docs": int(n_docs),
        "max_context_length": int(max_context_length),
        "context_prefix": prefix or "",
        "generation": settings,
        "question_encoder": {**query_encoder.settings(), "exported_as": made},
        "notes": notes,
        **dict(manifest or {}),
    }
    path = Path(path).expanduser().resolve()
    with quiet_transformers(), atomic_dir(path) as tmp:
        rag.save_pretrained(tmp)
        RagTokenizer(question_encoder=query_encoder.tokenizer, generator=generator.tokenizer).save_pretrained(
            tmp
        )
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return path


def _check_same_weights(wrapped: nn.Module, original: nn.Module, what: str) -> None:
    # the RAG wrapper runs transformers' post_init over its parts: make sure it kept every trained weight
    reference = original.state_dict()
    for name, tensor in wrapped.state_dict().items():
        if name in reference and not torch.equal(tensor, reference[name]):
            raise ExportError(
                f"transformers changed the {what} weight {name} while building the RAG model; the export would "
                "not hold the trained weights (a transformers version issue): please report it"
            )


def export_transformers_rag(
    model,
    path: str | os.PathLike,
    *,
    head: str | None = None,
    question_encoder: str | os.PathLike | BertEncoder | None = None,
    allow_pooling_mismatch: bool = False,
    n_docs: int | None = None,
    manifest: Mapping[str, Any] | None = None,
) -> Path:
    """Write a :class:`~rag.model.RagModel` (or a :class:`~rag.lit_module.RagLitModule`) as a transformers RAG
    folder: ``RagTokenForGeneration.from_pretrained(path)`` (``RagSequenceForGeneration`` for the sequence head)
    and ``RagTokenizer.from_pretrained(path)`` load it.

    Args:
        head: ``token`` / ``sequence``; None: the model's own.
        question_encoder: a DPR (or [CLS]-pooled BERT) question encoder to export instead of the model's.
        allow_pooling_mismatch: export a mean-pooled / normalised query encoder's weights into DPR anyway.
        n_docs: the RAG config's ``n_docs``; None: the model's evaluation K (``eval_n_docs``, else ``n_docs``).
        manifest: extra entries for ``rag_export.json``.

    The folder also holds ``rag_export.json``: the settings used, the generation settings to pass to
    transformers' ``generate`` and the differences that remain (module docstring).
    """
    model = getattr(model, "model", model)
    if not isinstance(model, RagModel):
        raise ExportError(f"model must be a RagModel or RagLitModule, got {type(model).__name__}")
    head = head or model.head
    return write_transformers_rag(
        path,
        model.generator,
        model.query_encoder,
        head=head,
        n_docs=n_docs or model.eval_n_docs or model.n_docs,
        max_context_length=model.max_context_length,
        context_prefix=model.context_prefix,
        decoder=model.decoder if head == model.head else None,
        generation=model.generation,
        label_smoothing=model.label_smoothing,
        exclude_bos=model.exclude_bos,
        question_encoder=question_encoder,
        allow_pooling_mismatch=allow_pooling_mismatch,
        manifest={
            "retriever_mode": model.retriever_mode,
            "doc_score_scale": model.doc_score_scale,
            **dict(manifest or {}),
        },
    )


# ------------------------------------------------------------------------------------------------ rag-train checkpoints


def write_import_checkpoint(
    out: str | os.PathLike,
    source: str | os.PathLike,
    *,
    head: str,
    run_config: Mapping[str, Any],
    optim: OptimConfig,
    recall_ks: Sequence[int],
    val_loss: bool,
) -> dict[str, str]:
    """Write ``out``: a rag-train checkpoint of the transformers RAG checkpoint ``source`` (what
    ``rag-convert import`` writes) holding ``run_config`` -- a config that loads both parts from ``source``
    (``generator=rag_checkpoint query_encoder=rag_checkpoint``) -- and no weights, marked so that
    :class:`~rag.lit_module.RagLitModule` takes every weight from that config's loaders. ``source`` and its
    tokenizers are checked now (the weights are not read), not at evaluation. Returns ``out``, the resolved
    source and its architecture."""
    import pytorch_lightning as pl

    from rag.lit_module import WEIGHTS_FROM_KEY

    _, architecture, resolved = inspect_transformers_rag(source, check_tokenizers=True)
    saved_head = RAG_ARCHITECTURES[architecture]
    if saved_head is not None and saved_head != head:
        log.info(f"note: {source} was saved as {architecture} but model.head={head}")
    checkpoint = {
        "state_dict": {},
        WEIGHTS_FROM_KEY: "config",
        "rag_source": resolved,
        "hyper_parameters": {
            "optim": dataclasses.asdict(optim),
            "recall_ks": sorted({int(k) for k in recall_ks}),
            "val_loss": bool(val_loss),
            "run_config": dict(run_config),
        },
        "pytorch-lightning_version": pl.__version__,
    }
    out = Path(out).expanduser()
    with atomic_path(out) as tmp:
        torch.save(checkpoint, tmp)
    log.info(
        f"wrote {out} ({architecture} from {resolved}; head={head}); evaluate: rag-evaluate ckpt_path={out}"
    )
    return {"out": str(out), "source": resolved, "architecture": architecture}


def load_trained_part(module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str, path) -> None:
    """Load a rag-train checkpoint's ``prefix``-ed weights (``model.generator.``, ``model.query_encoder.``)
    into ``module``; without any (a frozen query encoder, an imported checkpoint) it stays as it was built."""
    part = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not part:
        return
    missing, unexpected = module.load_state_dict(part, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"{path} does not fit the model its config builds: missing {list(missing)[:3]}, unexpected "
            f"{list(unexpected)[:3]}; was the checkpoint written by rag-train with this project's version?"
        )


def export_checkpoint_weights(
    ckpt_path: str | os.PathLike,
    out: str | os.PathLike,
    generator: Generator,
    query_encoder: BertEncoder | None,
    *,
    head: str,
    n_docs: int,
    **settings: Any,
) -> Path:
    """Write ``out``: ``generator`` and ``query_encoder`` (None: the model has none; built from the
    checkpoint's config) with the trained weights of the rag-train checkpoint ``ckpt_path``, as a
    transformers RAG folder (what ``rag-convert export`` writes). ``settings`` are
    :func:`write_transformers_rag`'s other arguments. Returns the folder."""
    path = Path(ckpt_path).expanduser()
    state = torch.load(path, map_location="cpu", weights_only=True).get("state_dict") or {}
    load_trained_part(generator, state, "model.generator.", path)
    if query_encoder is not None:
        load_trained_part(query_encoder, state, "model.query_encoder.", path)
    written = write_transformers_rag(out, generator, query_encoder, head=head, n_docs=n_docs, **settings)
    log.info(
        f"wrote {written}; load it with transformers.{HEAD_CLASSES[head]}.from_pretrained and "
        "RagTokenizer.from_pretrained"
    )
    return written
