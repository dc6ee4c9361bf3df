"""One weight fingerprint for everything that records one: indexes, embeddings and delta checkpoints written
before it was unified still verify."""

from __future__ import annotations

import hashlib

import pytest
import torch

from rag.model import tiny_bert_encoder
from rag.weights import DeltaError, check_delta_base, state_fingerprint


def fingerprint_by_hand(state, framing: str) -> str:
    """The two fingerprints the project wrote before they became one function, spelled out."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        sep = "|" if framing == "index" else ":"
        end = "|" if framing == "index" else ";"
        digest.update(f"{name}{sep}{t.dtype}{sep}{tuple(t.shape)}{end}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def test_the_encoder_checksum_of_existing_indexes_and_embeddings_is_unchanged():
    encoder = tiny_bert_encoder("document", seed=1)
    state = encoder.model.state_dict()
    assert encoder.weights_checksum() == state_fingerprint(state) == fingerprint_by_hand(state, "index")
    other = tiny_bert_encoder("document", seed=2)
    assert other.weights_checksum() != encoder.weights_checksum()


def test_delta_bases_recorded_in_either_framing_verify_and_other_weights_are_refused():
    base = tiny_bert_encoder("query", seed=1).model.state_dict()
    for framing in ("index", "delta"):
        manifest = {"base": "tiny", "base_sha256": fingerprint_by_hand(base, framing)}
        check_delta_base("delta", manifest, base, fix="load the base it was made from")
    other = tiny_bert_encoder("query", seed=2).model.state_dict()
    with pytest.raises(DeltaError, match="load the base it was made from"):
        check_delta_base(
            "delta",
            {"base": "tiny", "base_sha256": state_fingerprint(base)},
            other,
            fix="load the base it was made from",
        )
