"""The generator p(y|x,z): loading, inputs, marginalisation (RAG-Token / RAG-Sequence) and decoding."""

from rag.generation.context import build_context_inputs, build_labels, render_context
from rag.generation.decoding import DECODERS, RagGenerationOutput, rag_generate
from rag.generation.generator import Generator, bart_from_bert, build_tiny_bart, load_generator
from rag.generation.marginalize import rag_sequence_nll, rag_token_nll

__all__ = [
    "DECODERS",
    "Generator",
    "RagGenerationOutput",
    "bart_from_bert",
    "build_context_inputs",
    "build_labels",
    "build_tiny_bart",
    "load_generator",
    "rag_generate",
    "rag_sequence_nll",
    "rag_token_nll",
    "render_context",
]
