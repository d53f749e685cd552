"""
Tests for pruning (minitron.py, prune.py): the full plan is the identity; pruning MLP neurons and
attention KV groups equals zeroing them in the teacher (exact: those widths meet no norm); group-aware
Mamba pruning keeps every group's heads equal in number and its B and C whole, the naive variant
does not; a pruned model loads in transformers' NemotronH with the same logits; prune.py end to end
and on bad targets.

Run: python -m pytest -q tests/test_prune.py     (about a minute on 2 cores)
"""
import json

import torch

import minitron
from minitron import Plan, full_plan, importance, num_params, plan_config, prune
from model import Nemotron
from test_hf import IDX, TOL, hf_load, logits_of, our_model
from test_distill import teacher  # noqa: F401 (a fixture: a tiny trained model)
from test_train import failed_cleanly, ok, pycode  # noqa: F401 (pycode: autouse)
from helpers import assert_close, run_script

BATCHES = [(IDX, IDX.roll(-1, 1)), (IDX.flip(1), IDX.flip(1).roll(-1, 1))]


def model_and_scores(**kw):
    model = our_model(**kw)
    return model, importance(model, BATCHES)


def test_the_full_plan_is_the_identity():
    model, scores = model_and_scores(pattern="M*-EM*", mamba_groups=2)
    pruned = prune(model, full_plan(model.config), scores)
    assert torch.equal(logits_of(pruned, IDX), logits_of(model, IDX))


@torch.no_grad()
def test_mlp_neurons_and_kv_groups_pruned_equal_them_zeroed():
    """d_ff 48 -> 20 and 2 KV groups -> 1 (with its 2 query heads): the pruned model's logits are the
    teacher's with the dropped neurons' up_proj rows and the dropped heads' o_proj columns zeroed."""
    model, scores = model_and_scores(pattern="M*-M*-")
    cfg = model.config
    plan = Plan(cfg.d_model, 20, cfg.shared_d_ff, cfg.mamba_heads, 1, tuple(range(cfg.n_layer)))
    pruned = prune(model, plan, scores)
    assert pruned.config.d_ff == 20 and pruned.config.n_kv_head == 1 and pruned.config.n_head == 2
    masked = our_model(pattern="M*-M*-")
    for i, block in enumerate(masked.backbone.layers):
        if block.kind == "-":
            dropped = torch.ones(cfg.d_ff, dtype=torch.bool)
            dropped[minitron.top(scores["ffn"][i], 20)] = False
            block.mixer.up_proj.weight[dropped] = 0
        elif block.kind == "*":
            kept = int(minitron.top(scores["attn"][i], 1))
            cols = torch.ones(cfg.n_head * cfg.head_dim, dtype=torch.bool)
            cols[kept * 2 * cfg.head_dim:(kept + 1) * 2 * cfg.head_dim] = False  # the kept group's 2 query heads
            block.mixer.o_proj.weight[:, cols] = 0
    assert_close(logits_of(pruned, IDX), logits_of(masked, IDX), "pruned vs zeroed", **TOL)
    assert sum(p.numel() for p in pruned.parameters()) - pruned.backbone.embeddings.weight.numel() == \
        num_params(pruned.config)


def test_group_aware_mamba_pruning_keeps_groups_whole():
    """8 heads in 2 groups -> 4: group-aware keeps 2 of each group, and every kept head's B and C (in_proj
    rows and conv channels) are its own group's; naive keeps the 4 best anywhere."""
    score = torch.tensor([9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 4.0])  # group 0's heads all beat group 1's
    assert minitron.mamba_heads_kept(score, 8, 2, 4).tolist() == [0, 1, 6, 7]
    assert minitron.mamba_heads_kept(score, 8, 2, 4, group_aware=False).tolist() == [0, 1, 2, 3]
    model, scores = model_and_scores(pattern="M*", mamba_heads=8, mamba_groups=2)
    scores["mamba"][0] = score
    cfg = model.config
    plan = Plan(cfg.d_model, cfg.d_ff, cfg.shared_d_ff, 4, cfg.n_kv_head, (0, 1))
    small = prune(model, plan, scores)
    d_in, gn = 8 * cfg.mamba_head_dim, 2 * cfg.d_state
    bc = slice(2 * d_in, 2 * d_in + 2 * gn)  # B and C rows of in_proj: both groups, kept whole
    new_d_in = 4 * cfg.mamba_head_dim
    assert torch.equal(small.backbone.layers[0].mixer.in_proj.weight[2 * new_d_in:2 * new_d_in + 2 * gn],
                       model.backbone.layers[0].mixer.in_proj.weight[bc])
    assert torch.equal(small.backbone.layers[0].mixer.A_log, model.backbone.layers[0].mixer.A_log[[0, 1, 6, 7]])
    naive = prune(model, plan, scores, group_aware=False)
    assert torch.equal(naive.backbone.layers[0].mixer.A_log, model.backbone.layers[0].mixer.A_log[:4])


def test_a_pruned_model_loads_in_transformers(tmp_path):
    """Every width (Mamba head channels and the experts' neurons too), half the routed experts and the
    depth cut (an attention and an MLP layer dropped): save_pretrained, then transformers' NemotronH
    gives the same logits."""
    model, scores = model_and_scores(pattern="M*-EM*", mamba_groups=2)
    cfg = model.config
    plan = Plan(24, 20, 12, 2, 1, (0, 1, 3, 4), n_experts=4, mamba_head_dim=4, moe_d_ff=8)
    small = prune(model, plan, scores)
    assert small.config.pattern == "M*EM" and small.num_params() == num_params(plan_config(cfg, plan))
    kept = minitron.top(scores["experts"][3], 4)  # the most used experts, with their router rows
    assert torch.equal(small.backbone.layers[2].mixer.gate.e_score_correction_bias,
                       model.backbone.layers[3].mixer.gate.e_score_correction_bias[kept])
    e = int(kept[0])  # the first kept expert keeps its own 8 most active neurons (their rows of up_proj)
    neurons = minitron.top(scores["expert_ffn"][3][e], 8)
    emb = minitron.top(scores["emb"], 24)
    assert torch.equal(small.backbone.layers[2].mixer.experts.up_proj[0],
                       model.backbone.layers[3].mixer.experts.up_proj[e][neurons][:, emb])
    dims = minitron.top(scores["mamba_dim"][0], 4)  # the same 4 channels of every kept head: D is per head
    assert small.backbone.layers[0].mixer.norm.weight.shape == (2 * 4,)
    heads = minitron.mamba_heads_kept(scores["mamba"][0], 4, 2, 2)
    assert torch.equal(small.backbone.layers[0].mixer.norm.weight,
                       model.backbone.layers[0].mixer.norm.weight[(heads[:, None] * 8 + dims).flatten()])
    fresh = Nemotron(plan_config(cfg, plan)).eval()  # no hidden masks: its weights alone make the model
    fresh.load_state_dict(small.state_dict())
    assert type(small) is Nemotron and torch.equal(logits_of(fresh, IDX), logits_of(small, IDX))
    small.save_pretrained(tmp_path)
    assert_close(logits_of(hf_load(tmp_path), IDX), logits_of(small, IDX), "transformers vs pruned", **TOL)


def test_prune_py_writes_a_checkpoint_within_the_budget(teacher, tmp_path):
    out = tmp_path / "pruned"
    p = run_script("prune.py", f"--init_from={teacher}", f"--out_dir={out}", "--target_params=0.5", "--candidates=3",
                   "--calib_batches=2", "--eval_batches=2", "--batch_size=2", "--search_steps=2", "--device=cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.load(open(out / "prune.json"))
    model = Nemotron.from_pretrained(str(out))
    assert model.num_params() <= report["budget"] and len(report["candidates"]) == 3
    assert [c["kl"] for c in report["candidates"]] == sorted(c["kl"] for c in report["candidates"])
    ok(run_script("train.py", f"--out_dir={tmp_path / 'distilled'}", f"--init_from={out}", f"--teacher={teacher}",
                  "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--block_size=32", "--batch_size=4",
                  "--sample_new_tokens=0", "--device=cpu", "--dtype=float32"))  # train.py takes it, and distils it
    p = run_script("sample.py", f"--init_from={out}", "--max_new_tokens=5", "--device=cpu", "--start=def ")
    assert p.returncode == 0 and "def " in p.stdout, p.stderr[-2000:]  # and sample.py


def test_prune_py_bad_targets(teacher, tmp_path):
    for target in ("1.0", "5"):  # the whole teacher; fewer parameters than any candidate has
        p = run_script("prune.py", f"--init_from={teacher}", f"--out_dir={tmp_path / target}",
                       f"--target_params={target}", "--calib_batches=1", "--eval_batches=1", "--batch_size=2",
                       "--device=cpu")
        failed_cleanly(p, "outside what --axes", "to", code=2)
    failed_cleanly(run_script("prune.py", f"--init_from={teacher}", "--axes=width"), "--axes", code=2)
    failed_cleanly(run_script("prune.py", f"--init_from={tmp_path / 'nowhere'}"), "nowhere", code=2)
