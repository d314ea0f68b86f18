"""Text tasks on tokenizer LMs and the cross-pass logit lens on both HF looped models."""

from __future__ import annotations

import pytest
import torch

import loopscope as ls
from loopscope import tasks
from loopscope.core.errors import UnknownOptionError
from loopscope.models import build_tiny_hrm_text, from_hf
from loopscope.models.hf import local_tokenizer
from loopscope.models.inkling2 import build_tiny_inkling2

TEXT = ["text_addition", "text_multiplication", "text_state_tracking", "text_kv_recall"]


@pytest.fixture(scope="module")
def tok():
    return local_tokenizer(64)


@pytest.mark.parametrize("name", TEXT)
def test_text_task_targets_are_the_answer_tokens_and_splits_are_disjoint(name, tok):
    t = tasks.get(name, tokenizer=tok)
    b = t.sample(16, split="id", seed=0)
    for i, (prompt, answer) in enumerate(zip(b.meta["prompts"], b.meta["answers"], strict=True)):
        ids = tok(answer, add_special_tokens=False)["input_ids"]
        got = b.targets[i][b.targets[i] != -100].tolist()
        assert got == ids  # exactly the answer span, predicted from the position before each
        assert tok.decode(b.tokens[i][-len(ids) :]) == answer
        assert prompt.endswith("=")
    assert (b.tokens != tok.unk_token_id).all()
    train = set(t.sample(64, split="train", seed=0).meta["prompts"])
    assert not train & set(t.sample(64, split="id", seed=0).meta["prompts"])
    assert t.sample(4, split="ood", seed=0).meta["size"] > b.meta["size"]
    assert t.sample(4, split="id", seed=0).meta == t.sample(4, split="id", seed=0).meta


def test_text_answers_are_correct_arithmetic(tok):
    b = tasks.get("text_addition", tokenizer=tok).sample(8, split="id", seed=1)
    for prompt, answer in zip(b.meta["prompts"], b.meta["answers"], strict=True):
        a, rest = prompt.split(" + ")
        assert int(a.replace(" ", "")) + int(rest[:-2].replace(" ", "")) == int(
            answer.replace(" ", "")
        )


def test_text_task_without_a_tokenizer_is_a_one_line_error():
    with pytest.raises(ls.LoopscopeError, match="needs a tokenizer"):
        tasks.get("text_addition").sample(2, split="id")


def test_teacher_forced_seq_accuracy_equals_greedy_decoding(tok):
    loop = from_hf(build_tiny_inkling2(seed=0))
    b = tasks.get("text_kv_recall", tokenizer=tok).sample(6, split="id", seed=0)
    tr = ls.unroll(loop, b.tokens, 3, decode=True)
    acc = tasks.get("text_kv_recall", tokenizer=tok).accuracy(tr.logits[-1], b)
    # greedy: one answer token, predicted at the last prompt position
    greedy = tr.logits[-1][:, -2].argmax(-1) == b.tokens[:, -1]
    assert acc["seq_acc"] == pytest.approx(greedy.double().mean().item())


def test_logit_lens_last_pass_equals_hf_logits_on_inkling2(tok):
    hf = build_tiny_inkling2(seed=0)
    loop = from_hf(hf)
    b = tasks.get("text_addition", tokenizer=tok).sample(3, split="id", seed=0)
    with torch.no_grad():
        ref = hf(b.tokens).logits
    res = ls.analysis.logit_lens(loop, b.tokens, n_iter=3, targets=b.targets, layers=True)
    m = b.targets != -100
    lp = torch.log_softmax(ref.double(), -1).gather(-1, b.targets.clamp_min(0)[..., None])[..., 0]
    assert torch.equal(res.log_prob[-1][m], lp[m])
    rank = (ref > ref.gather(-1, b.targets.clamp_min(0)[..., None])).sum(-1)
    assert torch.equal(res.rank[-1][m], rank[m])
    assert res.layer_rank.shape == (3, 2, 3, b.tokens.shape[1])
    frame = res.to_frame()
    assert set(frame["site"]) == {"state", "layer0", "layer1"}
    assert len(frame) == int(m.sum()) * (4 + 3 * 2)  # 4 states, then 3 passes x 2 layers
    assert 0.0 <= res.summary()["top1_last"] <= 1.0


def test_logit_lens_last_cycle_equals_hf_logits_on_hrm_text():
    model, _ = build_tiny_hrm_text(seed=0)
    loop = from_hf(model)
    ids = torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    res = ls.analysis.logit_lens(loop, ids, n_iter=3)  # target: the final argmax, last position
    assert (res.rank[-1][:, -1] == 0).all()
    lp = torch.log_softmax(ref[:, -1].double(), -1).max(-1).values
    assert torch.equal(res.log_prob[-1][:, -1], lp)
    with pytest.raises(ls.LoopscopeError, match="per-layer lens"):
        ls.analysis.logit_lens(loop, ids, n_iter=3, layers=True)
    with pytest.raises(UnknownOptionError, match="n_iter"):
        ls.analysis.logit_lens(loop, ids, n_iters=3)
