"""RagLitModule: a training step learns, optimiser groups and schedules, checkpoints without frozen weights,
validation metrics equal to rag.metrics on the generated answers, and hand-checked scoring."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from test_model import make_model, parts  # noqa: F401  (the module-scoped fixture of tiny parts)

from rag.data.datamodule import RagDataModule
from rag.evaluation import Prediction, score_records
from rag.lit_module import LitModuleError, OptimConfig, RagLitModule, prediction_record
from rag.metrics import has_answer


def trainer(max_steps: int, **kwargs) -> pl.Trainer:
    kwargs = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **kwargs,
    }
    return pl.Trainer(max_steps=max_steps, **kwargs)


def eval_loss(model, questions) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(questions, [q.answers[0] for q in questions]).loss)


def test_training_steps_lower_the_loss_on_a_fixed_batch(parts):  # noqa: F811
    questions = parts["questions"][:4]
    model = make_model(parts, n_docs=2, max_target_length=8)
    query_before = [p.detach().clone() for p in model.query_encoder.parameters()]
    data = RagDataModule(train={"fixed": questions}, batch_size=4, shuffle=False)
    lit = RagLitModule(model, OptimConfig(lr=3e-3, warmup_steps=0, scheduler="constant", weight_decay=0.0))
    before = eval_loss(model, questions)
    trainer(15, limit_val_batches=0).fit(lit, train_dataloaders=data.train_dataloader())
    after = eval_loss(model, questions)
    assert after < 0.7 * before, (before, after)
    # learned retrieval: q(x) was trained too
    assert any(not torch.equal(a, b) for a, b in zip(query_before, model.query_encoder.parameters()))


def test_optimiser_groups_and_polynomial_schedule(parts, monkeypatch):  # noqa: F811
    monkeypatch.setattr(RagLitModule, "_total_steps", lambda self: 100)
    optim = OptimConfig(
        lr=1e-3, query_encoder_lr=1e-4, warmup_steps=10, lr_end=1e-5, power=2.0, weight_decay=0.01
    )
    lit = RagLitModule(make_model(parts), optim)
    config = lit.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"generator", "generator/no_decay", "query_encoder", "query_encoder/no_decay"}
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    assert n_params == sum(1 for p in lit.model.parameters() if p.requires_grad)
    assert (
        all(p.ndim >= 2 for p in groups["generator"]["params"])
        and groups["generator/no_decay"]["weight_decay"] == 0
    )
    assert groups["query_encoder"]["weight_decay"] == 0.01
    lrs = []
    for _ in range(101):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # linear warm-up to lr, then (lr - lr_end) * (1 - progress) ** power + lr_end (transformers' schedule)
    assert lrs[0] == 0 and math.isclose(lrs[5], 5e-4) and math.isclose(lrs[10], 1e-3)
    assert math.isclose(lrs[55], (1e-3 - 1e-5) * (1 - 45 / 90) ** 2 + 1e-5)
    assert math.isclose(lrs[100], 1e-5)
    # the query encoder's own learning rate follows the same schedule
    assert math.isclose(groups["query_encoder"]["lr"] / groups["generator"]["lr"], 0.1, rel_tol=1e-6)


def test_a_run_without_end_needs_a_constant_schedule(parts):  # noqa: F811
    lit = RagLitModule(make_model(parts))
    with pytest.raises(LitModuleError, match="set trainer.max_steps"):
        lit._total_steps()
    with pytest.raises(LitModuleError, match="scheduler must be one of"):
        OptimConfig(scheduler="cosine")


@pytest.mark.parametrize("mode", ["learned", "frozen"])
def test_checkpoints_hold_trained_weights_only_and_reload(parts, mode, tmp_path):  # noqa: F811
    questions = parts["questions"][:2]
    lit = RagLitModule(make_model(parts, mode=mode, n_docs=2), OptimConfig(lr=1e-3, warmup_steps=0))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    data = RagDataModule(train={"q": questions}, batch_size=2)
    trainer(1, enable_checkpointing=True, callbacks=[checkpoint], limit_val_batches=0).fit(
        lit, train_dataloaders=data.train_dataloader()
    )
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    has_query_encoder = any(k.startswith("model.query_encoder.") for k in state)
    assert has_query_encoder == (mode == "learned")
    assert not any("retriever" in k or "index" in k for k in state)

    fresh = make_model(parts, mode=mode, n_docs=2)
    reloaded = RagLitModule.load_from_checkpoint(tmp_path / "last.ckpt", model=fresh, weights_only=False)
    for key, value in lit.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
    assert reloaded.optim == lit.optim and reloaded.model.retriever is parts["retriever"]


def test_validation_logs_rag_metrics_of_the_generated_answers(parts):  # noqa: F811
    questions = parts["questions"]
    model = make_model(parts, n_docs=2, eval_n_docs=3, generation={"max_new_tokens": 4})
    data = RagDataModule(val={"squad_open": questions[:4], "nq_gold": questions[4:]}, eval_batch_size=3)
    lit = RagLitModule(model, recall_ks=[1, 2, 5])
    logged = trainer(1).validate(lit, dataloaders=data.val_dataloader(), verbose=False)[0]
    model.eval()
    records = [
        prediction_record(q, a, name)
        for name, qs in (("squad_open", questions[:4]), ("nq_gold", questions[4:]))
        for q, a in zip(qs, model.generate(qs))
    ]
    expected = score_records(records, [1, 2, 5])
    assert {k for k in logged if k != "val/loss"} == {
        f"val/{k}" for k in expected if k.rsplit("/", 1)[-1] != "n"
    }
    for key, value in expected.items():
        if key.rsplit("/", 1)[-1] != "n":
            assert logged[f"val/{key}"] == pytest.approx(value)
    assert "val/answer_recall@3" in logged and "val/answer_recall@5" not in logged  # 3 passages read
    assert logged["val/loss"] > 0


def test_prediction_scores_recall_beyond_the_passages_read_from_one_deeper_search(parts):  # noqa: F811
    """rag-evaluate's records: answers from K = 3 passages, recall@5 over the top 5 of the same search."""
    questions = parts["questions"]
    model = make_model(parts, n_docs=2, eval_n_docs=3, generation={"max_new_tokens": 4})
    data = RagDataModule(val={"squad_open": questions}, eval_batch_size=3)
    lit = RagLitModule(model, recall_ks=[1, 2, 5])
    records = [r for batch in trainer(1).predict(lit, dataloaders=data.val_dataloader()) for r in batch]
    model.eval()
    answers = model.generate(questions)  # K = 3, its own search
    top5 = model.retrieve(questions, 5)
    for record, answer, ranked in zip(records, answers, top5.passages):
        assert record.prediction == answer.answer and [p.id for p in record.passages] == [
            p.id for p in answer.passages
        ]
        assert [p.id for p in record.passages + record.ranked_after] == [p.id for p in ranked]
    scores = score_records(records, [1, 2, 5])
    assert "answer_recall@5" in scores and "answer_recall@3" in scores
    by_hand = sum(
        any(has_answer(p.text, q.answers) for p in ranked) for q, ranked in zip(questions, top5.passages)
    ) / len(questions)
    assert scores["answer_recall@5"] == pytest.approx(by_hand)
    # written and read back with the deeper passages
    again = [Prediction.from_dict(r.to_dict()) for r in records]
    assert score_records(again, [1, 2, 5]) == scores


def _record(prediction, answers, passages, gold=(), regex=False, dataset="a"):
    return {
        "dataset": dataset,
        "prediction": prediction,
        "answers": list(answers),
        "answers_are_regex": regex,
        "gold_passage_ids": list(gold),
        "passages": [{"id": pid, "text": text} for pid, text in passages],
    }


def test_score_records_hand_checked():
    records = [
        # EM 1 (normalised: case, article); answer in passage 2 (k>=2); gold passage p1 at rank 1
        _record(
            "The Eiffel Tower",
            ["eiffel tower"],
            [("p1", "a bridge"), ("p2", "the eiffel tower is tall")],
            ["p1"],
        ),
        # EM 0, F1 2*(1/2*1/1)/(1/2+1) = 2/3 ("paris france" vs "paris"); no gold ids; answer in passage 1
        _record("paris france", ["Paris", "Lyon"], [("p3", "Paris is big"), ("p4", "x")], dataset="b"),
        # regex answers: EM by regex match, no F1; gold p9 not retrieved
        _record(
            "1969 it was", ["19[0-9]{2}"], [("p5", "in 1969"), ("p6", "y")], ["p9"], regex=True, dataset="b"
        ),
    ]
    scores = score_records(records, [1, 2, 10])
    assert scores["em"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert scores["answer_recall@1"] == pytest.approx(2 / 3) and scores["answer_recall@2"] == 1
    assert scores["gold_recall@1"] == pytest.approx(1 / 2) and scores["gold_recall@2"] == pytest.approx(1 / 2)
    assert "answer_recall@10" not in scores  # only 2 passages were read
    assert scores["b/em"] == pytest.approx(1 / 2) and scores["a/n"] == 1 and scores["n"] == 3
    assert list(scores)[:6] == [
        "em",
        "f1",
        "answer_recall@1",
        "answer_recall@2",
        "gold_recall@1",
        "gold_recall@2",
    ]


def test_lr_scale_multiplies_the_rate_of_matching_parameters_and_typos_fail(parts, monkeypatch):  # noqa: F811
    monkeypatch.setattr(RagLitModule, "_total_steps", lambda self: 100)
    lit = RagLitModule(
        make_model(parts), OptimConfig(lr=1e-3, warmup_steps=0, lr_scale={"encoder_attn": 3.0})
    )
    optimizer = lit.configure_optimizers()["optimizer"]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert math.isclose(groups["generator/encoder_attn"]["lr"], 3e-3)
    assert math.isclose(groups["generator"]["lr"], 1e-3)
    scaled = {
        id(p) for g in optimizer.param_groups if g["name"].endswith("encoder_attn") for p in g["params"]
    }
    names = {id(p): n for n, p in lit.model.generator.named_parameters()}
    assert scaled and all("encoder_attn" in names[i] for i in scaled)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(
        1 for p in lit.model.parameters() if p.requires_grad
    )
    with pytest.raises(LitModuleError, match="matches no trainable parameter"):
        RagLitModule(make_model(parts), OptimConfig(lr_scale={"encoder_atn": 3.0})).configure_optimizers()
    with pytest.raises(LitModuleError, match="positive"):
        OptimConfig(lr_scale={"encoder_attn": 0})
