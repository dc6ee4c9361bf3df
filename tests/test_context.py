"""Generator inputs ``title / text // question`` and labels, against transformers' RagRetriever."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, RagRetriever

from rag.generation.context import (
    ContextError,
    EmptyAnswerError,
    EmptyQuestionError,
    QuestionTooLongError,
    build_context_inputs,
    build_labels,
    render_context,
)
from rag.generation.generator import build_tiny_bart, default_bert_path
from rag.types import Passage, Question

FIXTURES = Path(__file__).parent / "fixtures" / "tiny_bart"


def load_records():
    return [json.loads(line) for line in open(FIXTURES / "real_samples.jsonl", encoding="utf-8")]


RECORDS = load_records()
QA = [r for r in RECORDS if r["question"]]
DISTRACTORS = [Passage(**p) for p in RECORDS[-1]["passages"]]  # DPR titles with surrounding quotes
LONG = next(r for r in QA if r["passages"][0]["id"] == "European_Union_law#39")  # 629 words


@pytest.fixture(scope="module")
def bpe():
    return AutoTokenizer.from_pretrained(FIXTURES)


@pytest.fixture(scope="module")
def wordpiece():
    return AutoTokenizer.from_pretrained(default_bert_path())


@pytest.fixture(scope="module")
def bart():
    return build_tiny_bart(FIXTURES, d_model=16, layers=2)


def transformers_inputs(tokenizer, questions, passages, max_length):
    """transformers' own RagRetriever.postprocess_docs on the same passages (its code, our docs)."""
    retriever = SimpleNamespace(
        config=SimpleNamespace(title_sep=" / ", doc_sep=" // ", max_combined_length=max_length),
        generator_tokenizer=tokenizer,
    )
    docs = [{"title": [p.title for p in ps], "text": [p.text for p in ps]} for ps in passages]
    ids, mask = RagRetriever.postprocess_docs(retriever, docs, questions, None, len(passages[0]), "pt")
    return [x[m.bool()].tolist() for x, m in zip(ids, mask)]


def short_batch():
    questions, passages = [], []
    for r in QA:
        if len(r["passages"][0]["text"].split()) > 200:  # the two long SQuAD paragraphs
            continue
        questions.append(r["question"])
        passages.append([Passage(**r["passages"][0]), *DISTRACTORS])
    return questions, passages


@pytest.mark.parametrize("which", ["bpe", "wordpiece"])
def test_inputs_that_fit_are_token_for_token_transformers(which, request):
    tokenizer = request.getfixturevalue(which)
    questions, passages = short_batch()
    ci = build_context_inputs(questions, passages, tokenizer, max_context_length=512, return_strings=True)
    B, K = len(questions), 3
    assert ci.context_input_ids.shape[:2] == (B, K) and ci.n_truncated == 0
    assert ci.context_attention_mask.dtype == torch.bool
    ref = transformers_inputs(tokenizer, questions, passages, 512)
    ours = [
        x[m].tolist()
        for x, m in zip(ci.context_input_ids.view(B * K, -1), ci.context_attention_mask.view(B * K, -1))
    ]
    assert ours == ref
    # padded to the longest input in the batch, with the pad id
    assert ci.context_input_ids.shape[-1] == max(len(x) for x in ref)
    assert (ci.context_input_ids[~ci.context_attention_mask] == tokenizer.pad_token_id).all()
    # DPR's quoted titles lose their quotes, as in transformers
    title = DISTRACTORS[0].title
    assert title.startswith('"') and ci.strings[0][1].startswith(title.strip('"') + " / ")


def question_tail(tokenizer, s: str, question_start: int) -> list[int]:
    """The tokens of ``s`` from the doc separator on (question and closing special tokens)."""
    enc = tokenizer(s, return_offsets_mapping=True)
    first = next(i for i, (a, b) in enumerate(enc.offset_mapping) if b > question_start)
    return enc.input_ids[first:]


@pytest.mark.parametrize("which", ["bpe", "wordpiece"])
@pytest.mark.parametrize("max_length", [128, 300])
def test_long_passage_is_cut_never_the_question(which, max_length, request):
    tokenizer = request.getfixturevalue(which)
    q, p = LONG["question"], Passage(**LONG["passages"][0])
    full = render_context(p.title, p.text, q)
    assert len(tokenizer(full).input_ids) > max_length  # the real passage does not fit
    tail = question_tail(tokenizer, full, full.rindex(" // "))

    ci = build_context_inputs([q], [[p]], tokenizer, max_context_length=max_length, return_strings=True)
    ours = ci.context_input_ids[0, 0][ci.context_attention_mask[0, 0]].tolist()
    assert ci.n_truncated == 1 and len(ours) <= max_length
    assert ours[-len(tail) :] == tail  # the whole question, then eos
    s = ci.strings[0][0]
    assert s.endswith(" // " + q) and ours == tokenizer(s).input_ids
    kept = s[len(p.title) + 3 : -len(" // " + q)]
    assert p.text.startswith(kept) and p.text[len(kept)] == " "  # cut at a word boundary
    # as much text as fits: one more word would not
    longer = p.text[: p.text.index(" ", len(kept) + 1)]
    assert len(tokenizer(render_context(p.title, longer, q)).input_ids) > max_length

    # transformers truncates the whole string from the right: the question is gone
    ref = transformers_inputs(tokenizer, [q], [[p]], max_length)[0]
    assert len(ref) == max_length
    q_tokens = tail[:-1]
    assert not any(ref[i : i + len(q_tokens)] == q_tokens for i in range(len(ref)))


def test_question_reaches_the_generator_as_written(bpe, wordpiece):
    """transformers' RAG decodes the question from the BERT question encoder's ids: lowercased, re-spaced."""
    q = "Who got the first Nobel Prize in Physics?"
    p = Passage("1", "Nobel Prize", "The first Nobel Prize in Physics was awarded in 1901.")
    ci = build_context_inputs([q], [[p]], bpe, return_strings=True)
    assert ci.strings[0][0].endswith("// " + q)
    hf_question = wordpiece.batch_decode(wordpiece([q]).input_ids, skip_special_tokens=True)[0]
    assert hf_question == "who got the first nobel prize in physics?"
    ref = transformers_inputs(bpe, [hf_question], [[p]], 512)[0]
    assert ci.context_input_ids[0, 0].tolist() != ref
    assert ci.context_input_ids[0, 0].tolist() == transformers_inputs(bpe, [q], [[p]], 512)[0]


def test_question_records_and_n_docs_subset(bpe):
    questions, passages = short_batch()
    records = [Question(id=str(i), question=q, answers=("x",)) for i, q in enumerate(questions)]
    scores = torch.randn(len(questions), 3, requires_grad=True)
    ci = build_context_inputs(records, passages, bpe, n_docs=2, doc_scores=scores, return_strings=True)
    full = build_context_inputs(questions, passages, bpe, return_strings=True)
    assert ci.n_docs == 2 and torch.equal(ci.doc_scores, scores[:, :2])
    ci.doc_scores.sum().backward()  # the retriever's scores keep their gradient
    assert torch.equal(scores.grad, torch.tensor([[1.0, 1.0, 0.0]]).expand_as(scores))
    assert [row[:2] for row in full.strings] == ci.strings  # the first K in rank order
    Lc = ci.context_input_ids.shape[-1]
    assert torch.equal(ci.context_input_ids, full.context_input_ids[:, :2, :Lc])


def test_closed_book_is_the_question_alone(bpe):
    questions, passages = short_batch()
    ci = build_context_inputs(questions, None, bpe, return_strings=True)
    B = len(questions)
    assert ci.context_input_ids.shape[:2] == (B, 1)
    assert torch.equal(ci.doc_scores, torch.zeros(B, 1))
    for b, q in enumerate(questions):
        assert ci.context_input_ids[b, 0][ci.context_attention_mask[b, 0]].tolist() == bpe(q).input_ids
    same = build_context_inputs(questions, passages, bpe, n_docs=0)
    assert torch.equal(same.context_input_ids, ci.context_input_ids) and torch.equal(
        same.doc_scores, ci.doc_scores
    )
    with pytest.raises(ContextError, match="no doc_scores"):
        build_context_inputs(questions, None, bpe, doc_scores=torch.zeros(B, 1))


def test_closed_book_marginals_equal_plain_bart_nll(bart):
    """With K=1 and doc_scores zero, log p(z|x) = 0: RAG-Sequence and RAG-Token NLL are the BART NLL."""
    questions = [r["question"] for r in QA[:4]]
    answers = [r["answers"][0] for r in QA[:4]]
    ci = build_context_inputs(questions, None, bart)
    labels = build_labels(answers, bart)  # (B, T)
    with torch.no_grad():
        seq_logits = bart(ci.context_input_ids, ci.context_attention_mask, labels=labels)  # (B, 1, T, V)
    doc_logprobs = ci.doc_scores.log_softmax(-1)  # (B, 1)
    token_logprobs = seq_logits.log_softmax(-1).gather(-1, labels[:, None, :, None].expand(-1, 1, -1, 1))[
        ..., 0
    ]
    mask = labels.ne(bart.pad_token_id)[:, None, :]  # (B, 1, T)
    token_logprobs = token_logprobs.masked_fill(~mask, 0.0)  # (B, 1, T)
    rag_sequence = -(doc_logprobs + token_logprobs.sum(-1)).logsumexp(-1)  # (B,)
    rag_token = -(doc_logprobs[..., None] + token_logprobs).logsumexp(1).sum(-1)  # (B,)
    plain = []
    for b, q in enumerate(questions):
        enc = bart.tokenizer([q], return_tensors="pt")
        target = labels[b : b + 1].masked_fill(labels[b : b + 1] == bart.pad_token_id, -100)
        with torch.no_grad():
            loss = bart.model(**enc, labels=target).loss  # mean over the answer's tokens
        plain.append(loss * (target != -100).sum())
    plain = torch.stack(plain)
    torch.testing.assert_close(rag_sequence, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rag_token, plain, rtol=1e-5, atol=1e-5)


def test_huge_title_is_cut_after_the_text(bpe):
    q = "When did the 1973 oil crisis begin?"
    p = Passage("1", "Oil crisis " * 40, "The crisis began in October 1973.")
    ci = build_context_inputs([q], [[p]], bpe, max_context_length=30, return_strings=True)
    s = ci.strings[0][0]
    assert ci.context_attention_mask.sum() <= 30 and s.endswith(" // " + q)
    assert "October" not in s and s.startswith("Oil crisis")


def test_bad_inputs_raise_one_clear_error(bpe):
    p = [Passage("1", "T", "text")]
    with pytest.raises(EmptyQuestionError, match="question 1 is empty"):
        build_context_inputs(["ok?", "  "], [p, p], bpe)
    with pytest.raises(QuestionTooLongError, match="raise max_context_length"):
        build_context_inputs(["why " * 50], [p], bpe, max_context_length=20)
    with pytest.raises(QuestionTooLongError, match="never truncated"):
        build_context_inputs(["why " * 50], None, bpe, max_context_length=20)
    with pytest.raises(ContextError, match="2 questions but 1 passage lists"):
        build_context_inputs(["a?", "b?"], [p], bpe)
    with pytest.raises(ContextError, match="has 1 passages but n_docs=2"):
        build_context_inputs(["a?"], [p], bpe, n_docs=2)
    with pytest.raises(ContextError, match=r"doc_scores must have shape"):
        build_context_inputs(["a?"], [p], bpe, doc_scores=torch.zeros(2, 1))
    with pytest.raises(ContextError, match="not a single question"):
        build_context_inputs("a?", [p], bpe)


def test_labels_bart_form_padding_and_truncation(bart, bpe):
    labels = build_labels(
        ["October 1973", "1979", "nearly $12 globally, US prices significantly higher"], bart, 8
    )
    assert labels.shape == (3, 8) and labels.dtype == torch.long
    assert labels[0, 0] == bart.bos_token_id  # BART labels are <s> y </s>; the decoder starts with </s>
    n0 = len(bpe("October 1973").input_ids)
    assert labels[0, :n0].tolist() == bpe("October 1973").input_ids
    assert (labels[0, n0:] == bart.pad_token_id).all()  # padding is the pad id, not -100
    assert labels[2, -1] == bart.eos_token_id  # a cut answer keeps its eos
    assert labels[2, :-1].tolist() == bpe("nearly $12 globally, US prices significantly higher").input_ids[:7]


def test_labels_bert_form_drops_the_decoder_start(wordpiece):
    gen = build_tiny_bart()  # WordPiece: decoder start [CLS]
    labels = build_labels(["Wilhelm Röntgen", "1901"], gen)
    ids = wordpiece("Wilhelm Röntgen").input_ids  # [CLS] ... [SEP]
    assert labels[0, : len(ids) - 1].tolist() == ids[1:]
    assert torch.equal(
        labels, build_labels(["Wilhelm Röntgen", "1901"], wordpiece, decoder_start_token_id=101)
    )
    assert torch.equal(gen.shift_right(labels)[0, : len(ids) - 1], torch.tensor(ids[:-1]))


def test_labels_reject_bad_answers(bart):
    with pytest.raises(EmptyAnswerError, match="answer 1 is empty"):
        build_labels(["yes", ""], bart)
    with pytest.raises(ContextError, match="one answer string per question"):
        build_labels([("a", "b")], bart)
    with pytest.raises(ContextError, match="not a single string"):
        build_labels("yes", bart)
