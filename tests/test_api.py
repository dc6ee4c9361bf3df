"""The Python API (rag.api, exported from rag): every source loads, answers equal RagModel.generate's, scores equal
the head's teacher-forced log-likelihood, an index over your own passages returns the planted passage first and
reloads, encode equals the encoders' own output, bad input fails with one RagError before any work, and
rag-evaluate takes the new sources. The README's "Python API" block runs exactly as written (slow: it embeds the
whole mini-wiki on first use).

The fast tests use the shipped reference over the first 48 mini-wiki passages (the real MiniLM encoders, a
48-row exact index in a temporary cache), the smoke experiment's tiny models, and a tiny transformers RAG saved
to a folder (as tests/test_interop.py does).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    DPRConfig,
    DPRContextEncoder,
    DPRQuestionEncoder,
    RagConfig,
    RagTokenForGeneration,
    RagTokenizer,
)

import rag
from rag import build
from rag.api import RAG, ApiError, PassageIndex, as_passages, override_mapping, override_strings
from rag.cli import evaluate as evaluate_cli
from rag.generation.generator import save_delta
from rag.generation.marginalize import rag_token_nll
from rag.reference import REFERENCE_DIR

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
FIRST48 = [
    "corpus=miniwiki",
    "corpus.name=first48",
    "corpus.passages._target_=rag.data.datamodule.corpus_slice",
    "++corpus.passages.passages={_target_: rag.data.miniwiki.load_corpus}",
    "++corpus.passages.limit=48",
    "embed.show_progress=false",
    "++index.verbose=false",
]
SMOKE_QUESTIONS = ["who is aaron", "what is the capital of france"]
PLANTED = [
    "Zorblat is the capital city of the planet Quux, founded by the engineer Mira Tess.",
    "The oceans of the planet Quux are made of liquid methane.",
    "Ada Lovelace wrote the first computer program for the Analytical Engine.",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(cache) -> RAG:
    """The shipped reference over the first 48 mini-wiki passages."""
    return rag.load("reference", overrides=FIRST48, cache_dir=cache)


@pytest.fixture(scope="module")
def smoke(cache) -> RAG:
    """The smoke experiment's tiny random model (tiny BERT encoders, tiny BART, 48 passages)."""
    return RAG.from_pretrained("reference", experiment="smoke", cache_dir=cache)


# ---------------------------------------------------------------------------------------------- answering


def test_the_package_exports_the_api_and_the_error_root():
    assert {"RAG", "load", "PassageIndex", "RagError", "ConfigError", "Passage", "Question"} <= set(dir(rag))
    assert issubclass(rag.ApiError, rag.RagError) and rag.__version__
    with pytest.raises(AttributeError):
        rag.no_such_name  # noqa: B018


def test_generate_equals_the_models_own_with_passages_priors_and_posteriors(reference):
    questions = ["Who was Aaron?", "What is anarchism?"]
    answers = reference.generate(questions, n_docs=3, decoder="token_greedy")
    expected = reference.model.generate(questions, n_docs=3, decoder="token_greedy")
    assert [a.answer for a in answers] == [e.answer for e in expected]
    assert [a.score for a in answers] == pytest.approx([e.score for e in expected])
    for a, e in zip(answers, expected):
        assert [p.id for p in a.passages] == [p.id for p in e.passages] and len(a.passages) == 3
        assert sum(a.doc_priors) == pytest.approx(1, abs=1e-4)
        assert sum(a.doc_posteriors) == pytest.approx(1, abs=1e-4)
    sequence = reference.generate(questions[:1], n_docs=2, decoder="sequence_thorough")
    assert len(sequence[0].passages) == 2


def test_score_is_the_heads_teacher_forced_log_likelihood(reference):
    questions = ["Who was Aaron?", "What is anarchism?"]
    answers = ["a prophet", "a political philosophy"]
    scores = reference.score(questions, answers, n_docs=3)
    m = reference.model
    with torch.no_grad():
        out = m(questions, answers, n_docs=3)
        nll = rag_token_nll(
            out.seq_logits,
            out.doc_scores,
            out.labels,
            pad_token_id=m.generator.pad_token_id,
            bos_token_id=m.generator.bos_token_id,
            reduction="none",
        )
    assert scores.shape == (2,) and torch.allclose(scores, -nll.float(), atol=1e-5)
    assert (scores < 0).all()
    # the answer the model gives itself scores higher than a wrong one
    own = reference.generate(questions[:1], n_docs=3)[0].answer
    assert reference.score(questions[:1], [own], n_docs=3) > reference.score(
        questions[:1], ["zzz qqq"], n_docs=3
    )


def test_explain_gives_figure_2_posteriors_of_the_models_own_answers(reference):
    questions = ["Who was Aaron?"]
    (ex,) = reference.explain(questions, n_docs=3)
    assert ex.answer == reference.generate(questions, n_docs=3)[0].answer
    assert ex.token_posteriors.shape == (len(ex.tokens), 3)
    assert torch.allclose(ex.token_posteriors.sum(-1), torch.ones(len(ex.tokens)), atol=1e-4)
    assert ex.doc_priors.shape == ex.doc_posteriors.shape == (3,)
    (given,) = reference.explain(questions, ["a prophet"], n_docs=3)
    assert given.answer == "a prophet"


def test_options_head_n_docs_decoder_device(reference):
    m = RAG(reference.model, config=reference.config)
    assert reference.n_docs == reference.model.eval_n_docs or reference.model.n_docs
    m.configure(n_docs=2, decoder="token_beam", device="cpu")
    assert (m.n_docs, m.decoder, m.device.type) == (2, "token_beam", "cpu")
    assert len(m.generate(["Who was Aaron?"], num_beams=2)[0].passages) == 2
    m.configure(head="sequence")
    assert m.head == "sequence" and m.decoder == "token_beam"
    m.configure(head="token", decoder="token_greedy", n_docs=5)


# ---------------------------------------------------------------------------------------------- encoding


def test_encode_equals_the_encoders_own_output(reference):
    texts = ["Who was Aaron?", "What is anarchism?"]
    q = reference.encode_query(texts)
    with torch.no_grad():
        assert torch.allclose(q, reference.model.query_encoder.encode(texts), atol=1e-6)
    assert q.shape == (2, 384) and not q.requires_grad
    passages = as_passages(PLANTED)
    d = reference.encode_document(passages)
    own = reference.doc_encoder.encode(([p.title for p in passages], [p.text for p in passages]))
    assert d.shape == (3, 384) and torch.allclose(d, own, atol=1e-6)
    assert torch.equal(reference.encode(texts, kind="query"), q)
    assert torch.allclose(reference.encode(PLANTED, kind="document"), d, atol=1e-6)


# ---------------------------------------------------------------------------------------------- own passages


def test_an_index_over_own_passages_returns_the_planted_passage_first_and_reloads(reference, tmp_path):
    folder = tmp_path / "my_index"
    index = reference.index(PLANTED, folder)
    try:
        assert len(index) == 3 and index.kind == "flat" and reference.retriever is index.retriever
        answer = reference.generate(["What is the capital city of the planet Quux?"], n_docs=2)[0]
        assert answer.passages[0].text == PLANTED[0]
        # reloaded from its folder as it was saved
        again = PassageIndex.load(folder)
        assert [p.text for p in again.passages] == PLANTED
        q = reference.encode_query(["Who wrote the first computer program?"])
        hit = again.search(q, n_docs=1)
        assert hit.passages[0][0].text == PLANTED[2] and hit.doc_ids.shape == (1, 1)
        reference.use_index(None)
        assert reference.retriever.n_passages == 48
        reference.use_index(folder)
        assert (
            reference.generate(["What is the capital city of the planet Quux?"], n_docs=1)[0].passages[0].text
            == PLANTED[0]
        )
        # building again over the same passages and encoder loads it
        assert reference.index(PLANTED, folder, use=False).retriever.n_passages == 3
    finally:
        reference.use_index(None)


def test_passages_from_a_jsonl_file_and_a_folder_of_text_files(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"id": f"x{i}", "title": "T", "text": t}) for i, t in enumerate(PLANTED))
    )
    assert [p.id for p in as_passages(jsonl)] == ["x0", "x1", "x2"]
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "quux_facts.md").write_text(" ".join(f"word{i}" for i in range(250)))
    (docs / "sub" / "ada.txt").write_text(PLANTED[2])
    (docs / "ignored.pdf").write_text("not read")
    passages = as_passages(docs)
    assert [p.id for p in passages] == [
        "quux_facts.md:0",
        "quux_facts.md:1",
        "quux_facts.md:2",
        "sub/ada.txt:0",
    ]
    assert passages[0].title == "quux facts" and len(passages[0].text.split()) == 100
    assert len(passages[2].text.split()) == 50
    assert as_passages([{"text": "a b", "title": "t"}])[0] == rag.Passage("0", "t", "a b")


def test_bad_input_fails_with_one_rag_error_before_any_work(smoke, tmp_path):
    cases = [
        (lambda: smoke.generate([]), "no questions"),
        (lambda: smoke.generate("who is aaron"), "not a single question"),
        (lambda: smoke.generate(["who", " "]), "non-empty"),
        (lambda: smoke.generate(SMOKE_QUESTIONS, n_docs=0), "positive integer"),
        (lambda: smoke.generate(SMOKE_QUESTIONS, n_docs=49), "at most"),
        (lambda: smoke.generate(SMOKE_QUESTIONS, decoder="beam"), "decoder must be"),
        (lambda: smoke.score(SMOKE_QUESTIONS, ["one"]), "one answer per question"),
        (lambda: smoke.index([]), "no passages"),
        (lambda: smoke.index(["fine", ""]), "empty text"),
        (lambda: smoke.index(tmp_path / "missing.jsonl"), "no file or folder"),
        (lambda: smoke.index([rag.Passage("a", "", "x"), rag.Passage("a", "", "y")]), "twice"),
        (lambda: smoke.encode_query([]), "no questions"),
        (lambda: smoke.encode(["x"], kind="passage"), "kind must be"),
        (lambda: PassageIndex.load(tmp_path), "not a passage index"),
        (lambda: RAG.from_pretrained("no-such-model"), "no model 'no-such-model'"),
        (lambda: RAG.from_pretrained(tmp_path), "not a model"),
        (lambda: RAG.from_pretrained("reference", head="tokn"), "head must be"),
        (lambda: RAG.from_pretrained("reference", index_kind="annoy"), "index_kind must be"),
        (lambda: RAG.from_pretrained("reference", passages=[]), "no passages"),
    ]
    for call, message in cases:
        with pytest.raises(rag.RagError, match=re.escape(message)):
            call()


def test_an_index_built_by_another_encoder_is_refused(smoke, reference, tmp_path):
    tiny_index = smoke.index(PLANTED, tmp_path / "tiny", use=False)
    assert tiny_index.encoder_name == "tiny-bert"
    with pytest.raises(ApiError, match="holds 32-d vectors"):
        reference.use_index(tmp_path / "tiny")
    other = RAG(smoke.model, config=smoke.config)
    other._doc_encoder = build.instantiate(smoke.config.doc_encoder, seed=1)  # same shape, other weights
    with pytest.raises(ApiError, match="was built by document encoder 'tiny-bert'"):
        other.use_index(tiny_index)


def test_a_folder_takes_other_passages_and_keeps_its_own_until_the_new_index_is_saved(
    smoke, tmp_path, monkeypatch
):
    folder = tmp_path / "mine"
    smoke.index(PLANTED, folder, use=False)
    other = ["Quux has three moons.", *PLANTED[1:]]
    assert [p.text for p in smoke.index(other, folder, use=False).passages] == other
    assert [p.text for p in PassageIndex.load(folder).passages] == other
    assert smoke.index(PLANTED, folder, use=False, rebuild=True).retriever.n_passages == 3

    def fails(*args, **kwargs):
        raise rag.RagError("the build failed")

    monkeypatch.setattr(build, "ensure_index", fails)
    with pytest.raises(rag.RagError, match="the build failed"):
        smoke.index(other, folder, use=False)
    assert [p.text for p in PassageIndex.load(folder).passages] == PLANTED  # not the passages of no index


def test_indexing_into_the_cache_takes_batch_size_and_rebuild(smoke, monkeypatch):
    calls = []
    real = build.ensure_index

    def spy(*args, **kwargs):
        calls.append((kwargs["embed"]["batch_size"], kwargs["rebuild"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "ensure_index", spy)
    smoke.index(PLANTED, use=False, batch_size=2, rebuild=True)
    assert calls == [(2, True)]


def test_the_default_k_is_capped_at_a_smaller_index(smoke, tmp_path):
    assert smoke.n_docs == 3
    smoke.index(PLANTED[:2], tmp_path / "two")
    try:
        assert smoke.n_docs == 2
        assert len(smoke.generate(SMOKE_QUESTIONS[:1])[0].passages) == 2
        assert smoke.retrieve(SMOKE_QUESTIONS).doc_ids.shape == (2, 2)
        with pytest.raises(ApiError, match="at most"):
            smoke.generate(SMOKE_QUESTIONS, n_docs=3)
    finally:
        smoke.use_index(None)
    assert smoke.n_docs == 3


def test_loading_with_own_passages_and_another_index_kind(cache):
    model = RAG.from_pretrained("reference", experiment="smoke", cache_dir=cache, passages=PLANTED, n_docs=2)
    assert model.retriever.n_passages == 3 and model.n_docs == 2
    hnsw = RAG.from_pretrained("reference", experiment="smoke", cache_dir=cache, index_kind="hnsw")
    assert hnsw.retriever.index.kind == "hnsw" and hnsw.retriever.n_passages == 48


def test_sources_and_options_that_cannot_load_fail_with_one_line_before_any_work(tmp_path, monkeypatch):
    passages = tmp_path / "passages.jsonl"
    passages.write_text(json.dumps({"id": "0", "title": "", "text": PLANTED[0]}) + "\n")
    foreign = tmp_path / "weights.bin"
    foreign.write_bytes(b"not a checkpoint")
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("a model or an index was built before the source was checked")

    monkeypatch.setattr(build, "build_retriever", no_work)
    monkeypatch.setattr(build, "build_model", no_work)
    monkeypatch.setattr(build, "instantiate", no_work)
    cases = [
        (lambda: rag.load(passages), "is a passage file, not a model"),
        (lambda: rag.load(foreign), "is not a checkpoint"),
        (lambda: rag.load("runs/last.ckpt"), "no such file or folder runs/last.ckpt"),
        (lambda: rag.load("outputs/smoke/last.ckpt"), "no such file or folder"),
        (lambda: rag.load(FIXTURES / "tiny_bert"), "not a transformers RAG one"),
        (lambda: rag.load("reference", device="cudaa"), "is not a torch device"),
        (lambda: rag.load("reference", doc_encoder="x/y"), "applies to transformers RAG sources"),
        (lambda: rag.load("reference", experiment="smok"), "experiment=smok is not a config"),
        (
            lambda: rag.load("reference", overrides={"model": {"max_targt_length": 6}}),
            "model.max_targt_length",
        ),
        (lambda: rag.load("reference", overrides="model.eval_n_docs=2"), "pass a list"),
        (lambda: rag.load(42), "source must be a name or a path"),
    ]
    for call, message in cases:
        with pytest.raises(rag.RagError, match=re.escape(message)):
            call()
    if not torch.cuda.is_available():
        with pytest.raises(ApiError, match="no CUDA GPU"):
            rag.load("reference", device="cuda")


def test_a_closed_book_model_retrieves_nothing_and_says_so(cache):
    closed = RAG.from_pretrained(
        "reference", experiment="smoke", cache_dir=cache, overrides=["retriever=none"]
    )
    assert closed.model.closed_book and closed.generate(SMOKE_QUESTIONS[:1])[0].answer is not None
    with pytest.raises(ApiError, match="closed-book"):
        closed.retrieve(SMOKE_QUESTIONS)


# ---------------------------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory, cache) -> Path:
    from rag.cli import train as train_cli

    root = tmp_path_factory.mktemp("run")
    cfg = build.compose(
        "train",
        [
            "experiment=smoke",
            f"cache_dir={cache}",
            f"runs_dir={root}",
            f"output_dir={root / 'out'}",
            "trainer.max_steps=1",
            "trainer.val_check_interval=1",
            "test=false",
            "threads=1",
        ],
    )
    train_cli.run(cfg)
    return root / "out" / "checkpoints" / "last.ckpt"


def test_a_rag_train_checkpoint_loads_with_its_weights_and_options(smoke_checkpoint, cache):
    model = rag.load(
        smoke_checkpoint, n_docs=2, decoder="token_greedy", overrides=["model.max_target_length=6"]
    )
    state = torch.load(smoke_checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    name = next(k for k in state if k.startswith("model.generator."))
    assert torch.equal(model.model.state_dict()[name.removeprefix("model.")], state[name])
    assert (model.n_docs, model.decoder, model.model.max_target_length) == (2, "token_greedy", 6)
    assert model.lit_module is not None and model.config.name == "smoke"
    answers = model.generate(SMOKE_QUESTIONS)
    assert [a.answer for a in answers] == [a.answer for a in model.model.generate(SMOKE_QUESTIONS, n_docs=2)]
    flat = rag.load(smoke_checkpoint, index_kind="hnsw", cache_dir=cache)
    assert flat.retriever.index.kind == "hnsw" and flat.retriever.n_passages == 48


def test_another_index_kind_of_a_checkpoint_reuses_its_embeddings(smoke_checkpoint, cache, monkeypatch):
    from rag.retrieval import indexer

    computed, real = [], indexer.embed_corpus

    def spy(*args, **kwargs):
        report = real(*args, **kwargs)
        computed.extend(report.computed)
        return report

    monkeypatch.setattr(indexer, "embed_corpus", spy)
    model = rag.load(
        smoke_checkpoint,
        index_kind="ivfpq",
        cache_dir=cache,
        overrides={"index": {"nlist": 2, "pq_m": 8, "pq_nbits": 4}},
    )
    assert model.retriever.index.kind == "ivfpq" and model.retriever.n_passages == 48
    assert model.passage_index is None and model.config.index._target_.endswith("IVFPQIndex")
    assert computed == []  # built from the embeddings the checkpoint's own index was built from
    with pytest.raises(ApiError, match="max_targt_length is not a key of the config stored in"):
        rag.load(smoke_checkpoint, overrides=["model.max_targt_length=6"])
    with pytest.raises(ApiError, match="index is a config node"):
        rag.load(smoke_checkpoint, overrides=["index=hnsw"])


def test_a_reference_style_folder_loads_its_own_weights(reference, tmp_path, cache):
    folder = tmp_path / "mine"
    generator = reference.model.generator
    name = next(n for n, _ in generator.named_parameters() if "encoder_attn.k_proj.weight" in n)
    original = dict(generator.named_parameters())[name].detach().clone()
    with torch.no_grad():
        dict(generator.named_parameters())[name].mul_(2)
    try:
        save_delta(generator, folder / "generator")
    finally:
        with torch.no_grad():
            dict(generator.named_parameters())[name].copy_(original)
    shutil.copytree(REFERENCE_DIR / "rag" / "query_encoder", folder / "query_encoder")
    loaded = rag.load(folder, overrides=FIRST48, cache_dir=cache)
    mine = dict(loaded.model.generator.named_parameters())[name]
    assert torch.equal(mine, (original * 2).half().float())
    q = reference.model.query_encoder.state_dict()
    assert all(torch.equal(v, q[k]) for k, v in loaded.model.query_encoder.state_dict().items())
    assert loaded.retriever.n_passages == 48


def released_style_folder(root: Path) -> tuple[Path, Path]:
    """A tiny transformers RAG-Token (DPR question encoder + BART) and a DPR context encoder, saved."""
    tiny_bert, tiny_bart = FIXTURES / "tiny_bert", FIXTURES / "tiny_bart"
    dpr = DPRConfig(
        vocab_size=BertConfig.from_pretrained(tiny_bert).vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
    )  # fmt: skip
    bart = BartConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(tiny_bart)), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=512, forced_bos_token_id=0, forced_eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    config = RagConfig.from_question_encoder_generator_configs(dpr, bart, n_docs=3, max_combined_length=512)
    model = RagTokenForGeneration(
        config=config, question_encoder=DPRQuestionEncoder(dpr), generator=BartForConditionalGeneration(bart)
    )
    folder, ctx = root / "rag-token", root / "ctx"
    model.save_pretrained(folder)
    RagTokenizer(
        question_encoder=AutoTokenizer.from_pretrained(tiny_bert),
        generator=AutoTokenizer.from_pretrained(tiny_bart),
    ).save_pretrained(folder)
    DPRContextEncoder(dpr).save_pretrained(ctx)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(ctx)
    return folder, ctx


def test_a_transformers_rag_folder_loads_with_an_index_over_own_passages(tmp_path, cache):
    from rag.interop import load_transformers_rag

    folder, ctx = released_style_folder(tmp_path)
    model = rag.load(folder, doc_encoder=str(ctx), passages=PLANTED, cache_dir=cache)
    assert model.head == "token" and model.retriever.n_passages == 3 and model.n_docs == 3
    ours = load_transformers_rag(folder)
    assert all(
        torch.equal(v, ours.generator.state_dict()[k]) for k, v in model.model.generator.state_dict().items()
    )
    answers = model.generate(["who is aaron"])
    assert answers[0].answer == model.model.generate(["who is aaron"])[0].answer
    assert model.encode_document(PLANTED).shape == (3, 32)
    # without passages: the experiment's corpus (here the first 48 mini-wiki passages)
    wiki = rag.load(folder, doc_encoder=str(ctx), overrides=FIRST48, cache_dir=cache)
    assert wiki.retriever.n_passages == 48


# ---------------------------------------------------------------------------------------------- overrides, CLI


def test_overrides_as_strings_or_mappings():
    mapping = {
        "model": {"eval_n_docs": 5, "generation": {"num_beams": 2}, "decoder": "token_beam"},
        "x": None,
    }
    strings = override_strings(mapping)
    assert strings == [
        "model.eval_n_docs=5",
        "++model.generation.num_beams=2",  # generation settings are open: new ones may be added
        "model.decoder='token_beam'",
        "x=null",
    ]
    assert override_mapping(strings) == mapping
    with pytest.raises(ApiError, match="not key=value"):
        override_mapping(["~model.freeze"])
    assert override_mapping(["optim.lr=1e-5", "a.b=[1,2]", "a.c='x y'", "a.d={k:1}"]) == {
        "optim": {"lr": 1e-5},
        "a": {"b": [1, 2], "c": "x y", "d": {"k": 1}},
    }
    assert override_mapping({"model.eval_n_docs": 5}) == {"model": {"eval_n_docs": 5}}


def test_rag_evaluate_takes_the_reference_and_reports_recall_at_1_5_10_and_k(tmp_path, cache):
    out = tmp_path / "eval"
    cfg = build.compose(
        "evaluate",
        [
            "pretrained=reference",
            "limit=2",
            "n_docs=5",
            f"+train.cache_dir={cache}",
            f"output_dir={out}",
            "threads=1",
        ],
    )
    report = _evaluate_first48(cfg)
    assert report["model"] == "reference" and report["n_docs"] == 5
    assert {"answer_recall@1", "answer_recall@5", "gold_recall@5", "em", "f1"} <= set(report["metrics"])
    assert report["metrics"]["n"] == 4  # two questions of each of the two sets
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(len(r["passages"]) == 5 for r in records)
    with pytest.raises(rag.RagError, match="no model to evaluate"):
        evaluate_cli.run(build.compose("evaluate", [f"output_dir={out}"]))
    with pytest.raises(rag.RagError, match="name two models"):
        evaluate_cli.run(
            build.compose("evaluate", ["pretrained=reference", "ckpt_path=x.ckpt", f"output_dir={out}"])
        )


def _evaluate_first48(cfg):
    """rag-evaluate with the reference over the first 48 passages (the experiment's corpus swapped)."""
    original = RAG.from_pretrained

    def first48(source, **kwargs):
        kwargs["overrides"] = [*override_strings(kwargs.get("overrides") or {}), *FIRST48]
        return original(source, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate_cli.RAG, "from_pretrained", staticmethod(first48))
        return evaluate_cli.run(cfg)


#: the modules that may import Hydra or OmegaConf: the composition root, the structured configs, the
#: commands and the studies (issue 15); every other module takes typed arguments
CONFIG_MODULES = ("rag/build.py", "rag/config_schema.py", "rag/cli/", "rag/replication/")


def _type_checking_only(tree: ast.Module) -> set[int]:
    """The ids of the import nodes inside ``if TYPE_CHECKING:`` blocks (type hints, never run)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(n) for child in node.body for n in ast.walk(child))
    return out


def test_only_the_composition_root_clis_and_studies_import_hydra_or_omegaconf():
    offenders = []
    for path in sorted((ROOT / "rag").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(CONFIG_MODULES):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        hints = _type_checking_only(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            if id(node) not in hints and any(n.split(".")[0] in ("hydra", "omegaconf") for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"import hydra / omegaconf outside {CONFIG_MODULES}: {offenders}"


# ---------------------------------------------------------------------------------------------- README


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section holds exactly one python code block"
    return blocks[0]


@pytest.mark.slow
def test_the_readme_python_api_block_runs_as_written(tmp_path, monkeypatch):
    """The block as a user pastes it, in a fresh folder (it embeds the mini-wiki in the cache on first use)."""
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_block(), "README.md", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "my_index" / "passages.jsonl").is_file()
