"""TransformerFAM: the block loop against a hand-written forward, patching, errors, tasks."""

import math

import pytest
import torch

import loopscope as ls
from loopscope import tasks
from loopscope.core.errors import LoopscopeError
from loopscope.core.interventions import Patch, Transplant
from loopscope.models import FAMConfig, FAMTransformer, load_model, preset, save_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(norm="post", causal=True, **kw):
    torch.manual_seed(1)
    cfg = FAMConfig(
        vocab_size=12, n_classes=5, block_size=4, n_memory=3, norm=norm, causal=causal, **kw
    )
    return FAMTransformer(cfg).double().eval()


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _layer_by_hand(blk, z, F, causal, norm, eps):
    """One layer on z = [memory; block] ([n, d], ONE sample), written out without the model."""
    n, d = z.shape
    H = blk.attn.n_heads
    dh = d // H
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        for i in range(F, n):
            for j in range(F, n):
                allowed[i, j] = j <= i

    def attn(u):
        out = torch.zeros(n, d, dtype=u.dtype)
        q, k, v = u @ blk.attn.W_Q.weight.T, u @ blk.attn.W_K.weight.T, u @ blk.attn.W_V.weight.T
        for h in range(H):
            s = slice(h * dh, (h + 1) * dh)
            for i in range(n):
                sc = torch.stack([q[i, s] @ k[j, s] / math.sqrt(dh) for j in range(n)])
                sc = torch.where(allowed[i], sc, torch.tensor(-math.inf, dtype=u.dtype))
                out[i, s] = torch.softmax(sc, 0) @ v[:, s]
        return out @ blk.attn.W_O.weight.T

    def mlp(u):
        pre = u @ blk.mlp.W_in.weight.T + blk.mlp.W_in.bias
        return torch.nn.functional.gelu(pre) @ blk.mlp.W_out.weight.T + blk.mlp.W_out.bias

    if norm == "post":
        z = _rms(z + attn(z), blk.ln1.weight, eps)
        return _rms(z + mlp(z), blk.ln2.weight, eps)
    z = z + attn(_rms(z, blk.ln1.weight, eps))
    return z + mlp(_rms(z, blk.ln2.weight, eps))


def _fam_by_hand(m, tokens):
    """Block-by-block FAM forward of one sample: the memory after every block and the logits."""
    cfg = m.cfg
    b, F = cfg.block_size, cfg.n_memory
    x_all = m.embed.weight[tokens] + m.pos_embed[torch.arange(len(tokens)) % b]
    blocks = x_all.view(-1, b, cfg.d_model)
    M = m.memory_init.detach().clone()
    mems = [M]
    for t in range(len(blocks)):
        x = blocks[t]
        new = []
        for layer, blk in enumerate(m.blocks):
            out = _layer_by_hand(
                blk, torch.cat([M[layer], x]), F, cfg.causal, cfg.norm, cfg.norm_eps
            )
            new.append(out[:F])
            x = out[F:]
        if t < len(blocks) - 1:
            M = torch.stack(new)
            mems.append(M)
        else:  # the query block is read, not written
            logits = _rms(x, m.ln_final.weight, cfg.norm_eps) @ m.unembed.weight.T
            logits = logits + m.unembed.bias
    return torch.stack(mems), logits


@pytest.mark.parametrize("norm,causal", [("post", True), ("pre", False)])
def test_unrolled_memory_equals_hand_written_block_forward_float64(norm, causal):
    m = _model(norm, causal)
    tokens = torch.randint(0, 12, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tr = ls.unroll(m, tokens, 3, decode=True)
        for i in range(2):
            mems, logits = _fam_by_hand(m, tokens[i])
            assert (tr.states[:, i] - mems).abs().max().item() < 1e-12
            assert (tr.logits[-1, i] - logits).abs().max().item() < 1e-12
            assert (m(tokens)[i] - logits).abs().max().item() < 1e-12


def test_memory_hooks_fire_once_per_block_with_the_state_slices():
    m = _model()
    tokens = torch.randint(0, 12, (3, 20))
    tr = ls.unroll(m, tokens, 4, capture=["blocks.*.hook_memory", "blocks.*.hook_memory_out"])
    for layer in range(2):
        assert torch.equal(tr[f"blocks.{layer}.hook_memory"], tr.states[:-1, :, layer])
        assert torch.equal(tr[f"blocks.{layer}.hook_memory_out"], tr.states[1:, :, layer])


def test_patching_memory_at_block_t_leaves_earlier_blocks_bit_identical():
    m = _model()
    tokens = torch.randint(0, 12, (2, 24))
    clean = ls.unroll(m, tokens, 5, capture="blocks.*.hook_memory")
    t = 3
    noise = torch.randn(2, 3, m.cfg.d_model, dtype=torch.float64)
    iv = Patch(hook="blocks.1.hook_memory", iteration=t, value=lambda x, lab: x + noise)
    pat = ls.unroll(m, tokens, 5, interventions=[iv], capture="blocks.*.hook_memory")
    assert torch.equal(pat.states[: t + 1], clean.states[: t + 1])
    assert torch.equal(pat["blocks.1.hook_memory"][:t], clean["blocks.1.hook_memory"][:t])
    assert not torch.allclose(pat.states[t + 1], clean.states[t + 1])


def test_transplanting_the_memory_makes_the_rest_of_the_run_the_donors():
    m = _model()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 12, (2, 24), generator=g), torch.randint(0, 12, (2, 24), generator=g)
    b[:, 8:] = a[:, 8:]  # same blocks from block 2 on: only the memory differs
    ta, tb = ls.unroll(m, a, 5), ls.unroll(m, b, 5)
    tx = ls.unroll(m, b, 5, interventions=[Transplant(iteration=2, source=ta)])
    assert torch.equal(tx.states[:2], tb.states[:2])
    assert (tx.states[2:] - ta.states[2:]).abs().max().item() < 1e-12


def test_non_autonomous_step_reads_the_block_it_is_given():
    m = _model()
    tokens = torch.randint(0, 12, (2, 16))
    ctx = m.encode(tokens)
    h = m.init_state(ctx)
    assert not torch.allclose(m.step(h, ctx, 0), m.step(h, ctx, 1))
    assert torch.equal(m.step(h, ctx, None), m.step(h, ctx, 2))  # None = last context block
    assert m.n_context(ctx) == 3


def test_bad_inputs_give_one_line_errors():
    m = _model()
    with pytest.raises(LoopscopeError, match="not a multiple of block_size=4"):
        m(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(LoopscopeError, match="n_memory must be a positive integer"):
        FAMConfig(n_memory=0)
    with pytest.raises(LoopscopeError, match="block_size must be a positive integer"):
        FAMConfig(block_size=0)
    with pytest.raises(LoopscopeError, match="input has 4 blocks"):
        ls.unroll(m, torch.zeros(1, 16, dtype=torch.long), 5)
    with pytest.raises(LoopscopeError, match="FAM memory must be"):
        m.step(torch.zeros(1, 2, 3, 7), m.encode(torch.zeros(1, 8, dtype=torch.long)), 0)
    with pytest.raises(LoopscopeError, match="out of vocabulary"):
        m(torch.full((1, 8), 12))
    for msg in (str(e) for e in [LoopscopeError("x")]):
        assert "\n" not in msg


def test_fam_checkpoint_round_trips(tmp_path):
    m = _model().float()
    save_model(m, tmp_path / "fam")
    m2 = load_model(tmp_path / "fam")
    x = torch.randint(0, 12, (2, 12))
    assert isinstance(m2, FAMTransformer) and torch.equal(m(x), m2(x))


def test_fam_preset_builds_from_task():
    from loopscope.train import TrainConfig, build_model

    t = tasks.get("passkey")
    m = build_model(TrainConfig(task="passkey", preset="fam", iters=(1.0, 1.0)), t)
    assert isinstance(m, FAMTransformer) and m.cfg.vocab_size == t.vocab_size
    assert preset("fam").n_memory == 4


# -- tasks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("split,n_ctx", [("id", 3), ("ood_2x", 6), ("ood_4x", 12), ("ood_16x", 48)])
def test_passkey_answer_is_the_token_after_the_mark(split, n_ctx):
    t = tasks.get("passkey")
    b = t.sample(64, split, seed=0)
    assert b.tokens.shape == (64, (n_ctx + 1) * 8) and b.length == n_ctx
    for i in range(64):
        row = b.tokens[i]
        (pos,) = (row == t.mark).nonzero()[0]
        assert (
            int(row[pos + 1]) - t.n_filler
            == int(b.targets[i, -1])
            == int(b.intermediates["key"][i])
        )
        assert int(pos) // 8 == int(b.intermediates["key_block"][i])
        assert int(row[-1]) == t.query and (row == t.query).sum() == 1
    assert (b.targets[:, :-1] == -100).all()
    assert b.intermediates["updates_since"].min() >= 1
    assert b.intermediates["updates_since"].max() <= n_ctx


def test_assoc_recall_answer_is_the_value_stored_with_the_queried_key():
    t = tasks.get("assoc_recall", n_pairs=2)
    b = t.sample(64, "ood_2x", seed=1)
    for i in range(64):
        row = b.tokens[i].tolist()
        q = row[-1]
        keys_at = [j for j, v in enumerate(row[:-8]) if v == q]
        assert len(keys_at) == 1  # keys are distinct
        assert row[keys_at[0] + 1] - t.n_filler - t.n_keys == int(b.targets[i, -1])


def test_block_task_splits_are_deterministic_and_disjoint():
    t = tasks.get("passkey")
    a, a2, c = (
        t.sample(16, "train", seed=5),
        t.sample(16, "train", seed=5),
        t.sample(16, "id", seed=5),
    )
    assert torch.equal(a.tokens, a2.tokens) and not torch.equal(a.tokens, c.tokens)
    with pytest.raises(LoopscopeError, match="n_pairs"):
        tasks.get("assoc_recall", n_pairs=9)
    with pytest.raises(LoopscopeError, match="no split"):
        t.sample(2, "ood")


# -- the zoo model and the experiments on it --------------------------------------------------
def test_zoo_passkey_fam_matches_its_card_and_solves_the_trained_length():
    from loopscope import zoo
    from loopscope.train import evaluate

    m, card = zoo.load("passkey_fam"), zoo.card("passkey_fam")
    t = zoo.task_of("passkey_fam")
    acc = evaluate(m, t, split="id", n=128, iter_factor=1.0)
    assert acc["seq_acc"] == 1.0 == card["accuracy"]["id"]["seq_acc"]
    assert card["accuracy"]["ood_16x"]["seq_acc"] < card["accuracy"]["id"]["seq_acc"]


def test_stability_and_patching_run_one_step_per_context_block_on_fam(tmp_path):
    from loopscope import zoo
    from loopscope.experiments.patching import patch_study
    from loopscope.experiments.stability import stability

    m, t = zoo.load("passkey_fam_post"), zoo.task_of("passkey_fam_post")
    f = stability(m, t, splits=("id", "ood_2x"), n=16, dynamics=False).to_frame()
    assert f["n_iter"].tolist() == [3, 6] and f.loc[0, "seq_acc"] == 1.0
    p = patch_study(m, t, position=3, n=2, seed=0, checkpoint_dir=tmp_path).to_frame()
    assert set(p["iteration"]) == {0, 1, 2}


def test_memory_study_contrasts_the_drifting_and_the_contracting_zoo_memory():
    from loopscope import zoo
    from loopscope.experiments.memory import memory_study

    s = {}
    for name in ("passkey_fam", "passkey_fam_post"):
        r = memory_study(
            zoo.load(name), zoo.task_of(name), splits=("id", "ood_4x"), n=32, n_long=96, n_spec=2
        )
        s[name] = r.summary()
        assert set(r.to_frame()["panel"]) >= {"accuracy", "decodability", "long", "repeat"}
    pre, post = s["passkey_fam"], s["passkey_fam_post"]
    assert pre["id/accuracy"] == post["id/accuracy"] == 1.0
    assert pre["drift_growth_end"] > 10 and pre["fixed_point_converged_fraction"] == 0.0
    assert post["drift_bounded_fraction"] == 1.0 and post["separation_end"] < 1e-3
    assert pre["separation_end"] > 0.05  # the pre-norm memory still tells the two keys apart
    # removing the drift common to all sequences restores the pre-norm answers: it held the key
    assert pre["ood_4x/accuracy_recentred"] == 1.0 > pre["ood_4x/accuracy"]
    assert post["fixed_point_converged_fraction"] == 1.0 and post["rho_median"] < 1


def test_memory_study_rejects_a_task_the_model_does_not_read():
    from loopscope import zoo
    from loopscope.experiments.memory import memory_study

    m = zoo.load("passkey_fam_post")
    with pytest.raises(LoopscopeError, match="not a block memory task"):
        memory_study(m, tasks.get("s3"))
    with pytest.raises(LoopscopeError, match="block_size 8 does not match"):
        memory_study(m, tasks.get("passkey", block_size=4))
    with pytest.raises(LoopscopeError, match="n_classes 10 does not match"):
        memory_study(m, tasks.get("passkey", n_keys=6, n_filler=12))


def test_probe_study_reads_the_stored_key_from_every_memory_slot():
    from loopscope import zoo
    from loopscope.experiments.probing import probe_study

    m, t = zoo.load("passkey_fam"), zoo.task_of("passkey_fam")
    f = probe_study(m, t, target="key", splits=("id",), n=128).to_frame()
    assert set(f["site"]) == {"state[0]", "state[1]"} and set(f["position"]) == {0, 1, 2, 3}
    # before any block the memory is the learned init (nothing stored); after all 3, the key
    last = f[f["iteration"] == 3]
    assert last["test_acc"].max() > 0.9 and f[f["iteration"] == 1]["test_acc"].max() < 0.7


def _cli(argv, capsys):
    from loopscope.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_stability_probe_and_patch_run_on_the_fam_zoo_model(capsys, tmp_path):
    code, out, err = _cli(
        ["stability", "passkey_fam_post", "--split", "id", "--n", "8", "--no-dynamics",
         "--out", str(tmp_path / "s")], capsys,
    )  # fmt: skip
    assert code == 0 and "passkey_fam_post" in out, err
    code, out, err = _cli(
        ["probe", "passkey_fam_post", "--target", "key", "--split", "id", "--n", "64",
         "--out", str(tmp_path / "p")], capsys,
    )  # fmt: skip
    assert code == 0 and (tmp_path / "p" / "probes.csv").exists(), err
    code, out, err = _cli(
        ["patch", "passkey_fam_post", "--position", "3", "--n", "2", "--out", str(tmp_path / "q")],
        capsys,
    )
    assert code == 0 and '"rows"' in out, err
    code, _, err = _cli(["stability", "passkey_fam_post", "--task", "s3"], capsys)
    assert code == 2 and "does not match" in err and len(err.strip().splitlines()) == 1


def test_transplanted_zoo_memory_carries_the_key_only_after_the_key_block():
    from loopscope import zoo
    from loopscope.analysis.memory import memory_transplant

    m, t = zoo.load("passkey_fam"), zoo.task_of("passkey_fam")
    b = t.sample(64, "id", seed=3)
    n = 64
    blocks = b.tokens.view(n, -1, 8)
    key_block = blocks[torch.arange(n), b.intermediates["key_block"]]
    fill = torch.randint(0, t.n_filler, (n, 2, 8), generator=torch.Generator().manual_seed(0))
    other = torch.roll(torch.arange(n), 1)
    donor = torch.cat([key_block[:, None], fill, blocks[:, -1:]], 1).reshape(n, -1)
    recip = torch.cat([key_block[other][:, None], fill, blocks[:, -1:]], 1).reshape(n, -1)
    da, ra = b.intermediates["key"], b.intermediates["key"][other]
    keep = da != ra
    res = memory_transplant(
        m, donor[keep], recip[keep], donor_answer=da[keep], recipient_answer=ra[keep], n_iter=3
    )
    follows = res.to_frame().groupby("iteration")["follows_donor"].mean()
    assert follows[0] == 0.0 and follows[1] == 1.0 and follows[2] == 1.0
