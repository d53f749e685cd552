"""
prune.py: compress a trained model to a parameter budget (Minitron-SSM's pruning, MiniPuzzle's search),
then distil it with train.py. Read minitron.py first.

    python prune.py --init_from=out --out_dir=out-pruned --target_params=0.5
    python train.py --init_from=out-pruned --teacher=out --out_dir=out-distilled --max_iters=300
    python prune.py --axes=depth ...              # depth alone; --axes=emb,ffn,mamba,attn: width alone
    python prune.py --mamba_pruning=naive ...     # Mamba heads pruned ignoring their groups (the ablation)

1) importance of every channel, neuron, head and layer from calib_batches batches of the run's
   training data (minitron.importance);
2) the candidates: every combination of a keep ratio per width axis in `axes` (1, 3/4, 1/2, 3/8, 1/4
   of the embedding channels, MLP neurons, Mamba heads, attention KV groups, routed experts; and,
   when named, Mamba head channels and routed experts' neurons) and of the number of least
   important layers dropped (depth), whose parameters fall in [0.9, 1] x the budget;
3) the `candidates` largest of them pruned (minitron.prune) and scored by their KL to the teacher on
   eval_batches batches of the val split, after search_steps steps of distillation each (0: as pruned);
4) the best written as an ordinary checkpoint (out_dir/ckpt.pt) that train.py, sample.py, bench.py and
   save_pretrained take as they are. The candidate table is printed.
"""
import itertools, json, os, shutil, time
from dataclasses import replace

import numpy as np
import torch

from checkpoint import CheckpointError, check_out_dir, load_model, save_checkpoint
from data.tokenizer import DataError, check_dataset, saved_config
from distill import kd_loss
from hardware import pick_device
from minitron import Plan, full_plan, importance, num_params, plan_config, prune

# -----------------------------------------------------------------------------
init_from = 'out'               # the teacher: a train.py out_dir or ckpt.pt (a Hugging Face folder needs --dataset)
out_dir = 'out-pruned'          # where the pruned model's ckpt.pt goes
target_params = 0.5             # the budget: a fraction (<= 1) of the teacher's parameters, or a count (> 1)
axes = 'emb,ffn,mamba,attn,experts,depth'  # what may shrink: emb(edding channels), ffn, mamba (heads), attn (KV
                                # groups), experts (routed), depth; also mamba_dim (head channels), expert_ffn
mamba_pruning = 'group'         # 'group': the same number of heads in every group (Minitron-SSM); 'naive'
candidates = 12                 # candidates scored (the largest within the budget)
search_steps = 0                # distillation steps per candidate before it is scored
learning_rate = 1e-3            # of that distillation (AdamW)
calib_batches = 8               # batches of training data for the importance scores
eval_batches = 8                # batches of val data for the KL score
batch_size = 8
block_size = 0                  # tokens per sequence (0: the teacher's training block_size)
dataset = ''                    # data/<dataset> ('': the teacher's)
seed = 1337
device = 'auto'
overwrite = False               # replace the checkpoints already in out_dir
config_ranges = {k: '[1, inf)' for k in ('candidates', 'calib_batches', 'eval_batches', 'batch_size')}
config_ranges.update({k: '[0, inf)' for k in ('search_steps', 'block_size', 'seed')}, target_params='(0, inf)',
                     learning_rate='(0, inf)', mamba_pruning=('group', 'naive'))
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, type(None)))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())  # and die()
config = {k: globals()[k] for k in config_keys}

AXES = ('emb', 'ffn', 'mamba', 'attn', 'experts', 'mamba_dim', 'expert_ffn', 'depth')
RATIOS = (1.0, 0.75, 0.5, 0.375, 0.25)
axis_list = [a for a in axes.split(',') if a]
if not axis_list or set(axis_list) - set(AXES):
    die(f"--axes={axes!r}: comma-separated, of {', '.join(AXES)}", 2)
try:
    device = pick_device(device)
    check_out_dir(out_dir, overwrite)
    teacher = load_model(init_from, torch.float32, device).eval()
except (ValueError, CheckpointError) as e:
    die(str(e), 2)
cfg = teacher.config
if cfg.mtp_depth:
    die(f"{init_from} has MTP depths: prune.py does not prune them yet", 2)
saved = saved_config(init_from)
dataset = dataset or saved.get('dataset') or ''
block_size = block_size or saved.get('block_size') or 256
data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
try:  # both splits there, whole tokens inside the vocabulary, longer than block_size (as train.py checks)
    check_dataset(data_dir, block_size)
except DataError as e:
    die(f"{e} (pass --dataset=NAME for the calibration data)", 2)


def batches(split, n, start):
    """n batches (x, y) of random sequences of the split, drawn from (seed, start)."""
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint32, mode='r')
    rng = np.random.default_rng([seed, start])
    out = []
    for _ in range(n):
        ix = rng.integers(0, len(data) - block_size - 1, size=batch_size)
        xy = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64)).to(device)
        out.append((xy[:, :-1], xy[:, 1:]))
    return out


# -----------------------------------------------------------------------------
# 1) importance
t0 = time.time()
calib, held = batches('train', calib_batches, 0), batches('val', eval_batches, 1)
scores = importance(teacher, calib)
teacher_params = teacher.num_params()
budget = int(target_params * teacher_params) if target_params <= 1 else int(target_params)
print(f"teacher {init_from}: {teacher_params:,} parameters, pattern {cfg.pattern}; budget {budget:,} "
      f"({budget / teacher_params:.0%}); importance from {calib_batches} x {batch_size} x {block_size} tokens "
      f"in {time.time() - t0:.1f} s")

# 2) the candidates within the budget
full = full_plan(cfg)
order = scores['depth'].argsort().tolist()  # the layers, least important first


def shrink(n, r, unit=1):
    return max(unit, round(n * r / unit) * unit)


plans = {}
for r_emb, r_ffn, r_mamba, r_attn, r_experts, r_dim, r_eff, drop in itertools.product(
        *[RATIOS if a in axis_list else (1.0,) for a in AXES[:-1]], range(cfg.n_layer if 'depth' in axis_list else 1)):
    plan = Plan(shrink(cfg.d_model, r_emb, 8 if cfg.d_model >= 16 else 1), shrink(cfg.d_ff, r_ffn),
                shrink(cfg.shared_d_ff, r_ffn) if cfg.shared_d_ff else 0,
                shrink(cfg.mamba_heads, r_mamba, cfg.mamba_groups), shrink(cfg.n_kv_head, r_attn),
                tuple(sorted(set(range(cfg.n_layer)) - set(order[:drop]))),
                shrink(cfg.n_experts, r_experts, max(cfg.n_group, cfg.top_k)), shrink(cfg.mamba_head_dim, r_dim),
                shrink(cfg.moe_d_ff, r_eff))
    layer_kinds = {cfg.pattern[i] for i in plan.layers}  # a width of a kind no kept layer has is the teacher's
    plan = replace(plan, d_ff=plan.d_ff if '-' in layer_kinds else cfg.d_ff,
                   shared_d_ff=plan.shared_d_ff if 'E' in layer_kinds else cfg.shared_d_ff,
                   mamba_heads=plan.mamba_heads if 'M' in layer_kinds else cfg.mamba_heads,
                   n_kv_head=plan.n_kv_head if layer_kinds & set('*W') else cfg.n_kv_head,
                   n_experts=plan.n_experts if 'E' in layer_kinds else cfg.n_experts,
                   mamba_head_dim=plan.mamba_head_dim if 'M' in layer_kinds else cfg.mamba_head_dim,
                   moe_d_ff=plan.moe_d_ff if 'E' in layer_kinds else cfg.moe_d_ff)
    plans.setdefault(plan, None)
sizes = {plan: num_params(plan_config(cfg, plan)) for plan in plans}
smallest, largest = min(sizes.values()), max(s for p, s in sizes.items() if p != full) if len(sizes) > 1 else None
if largest is None or not smallest <= budget < teacher_params:
    die(f"--target_params={target_params}: a budget of {budget:,} parameters is outside what --axes={axes} can reach, "
        f"{smallest:,} to {largest or smallest:,} (the teacher has {teacher_params:,})", 2)
fits = [p for p, s in sizes.items() if 0.9 * budget <= s <= budget] or [p for p, s in sizes.items() if s <= budget]
chosen = sorted(fits, key=sizes.get, reverse=True)[:candidates]  # the largest first
print(f"{len(plans)} candidates, {len(fits)} within the budget; scoring the {len(chosen)} largest")


# 3) each pruned, distilled for search_steps, scored by its KL to the teacher; the same batches for every
# candidate, so the teacher's logits on them are computed once
with torch.no_grad():
    search = [(x, y, teacher(x)[0]) for x, y in batches('train', search_steps, 2)]
    held = [(x, y, teacher(x)[0]) for x, y in held]


def distil(student):
    opt = torch.optim.AdamW(student.parameters(), lr=learning_rate, betas=(0.9, 0.95))
    student.train()
    for x, y, target in search:
        kd_loss(student(x)[0], target, y, 1.0).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return student.eval()


@torch.no_grad()
def kl_to_teacher(student):
    """The mean KL(teacher || student) per target token of the held-out batches."""
    n = [int((y >= 0).sum()) for _, y, _ in held]
    return sum(kd_loss(student(x)[0], t, y, 1.0).item() * k for (x, y, t), k in zip(held, n)) / max(sum(n), 1)


results = []
for plan in chosen:
    student = distil(prune(teacher, plan, scores, mamba_pruning == 'group'))
    results.append((kl_to_teacher(student), plan, student))
results.sort(key=lambda r: r[0])
print(f"\n{'KL':>8} {'params':>10}  d_model  d_ff shared mamba_heads x dim kv_heads experts x ffn  pattern")
for kl, plan, student in results:
    c = student.config
    print(f"{kl:8.4f} {student.num_params():>10,}  {c.d_model:>7} {c.d_ff:>5} {c.shared_d_ff:>6} "
          f"{c.mamba_heads:>7} x {c.mamba_head_dim:<3} {c.n_kv_head:>8} {c.n_experts:>7} x {c.moe_d_ff:<3}  "
          f"{c.pattern}")

# 4) the best, as a checkpoint
kl, plan, best = results[0]
state = {'model_config': best.config.to_dict(), 'iter_num': 0, 'best_val_loss': float('inf'), 'best_step': 0,
         'config': {**saved, 'dataset': dataset, 'block_size': block_size, 'pruned_from': init_from, 'prune': config,
                    'kl_to_teacher': kl}}
save_checkpoint(out_dir, state, best.state_dict(), {}, best=False)
shutil.copyfile(os.path.join(data_dir, 'meta.json'), os.path.join(out_dir, 'meta.json'))  # the tokenizer, with it
with open(os.path.join(out_dir, 'prune.json'), 'w') as f:
    json.dump({'teacher': init_from, 'teacher_params': teacher_params, 'budget': budget,
               'candidates': [{'kl': k, 'params': m.num_params(), 'config': m.config.to_dict()}
                              for k, _, m in results]},
              f, indent=1)
print(f"\nwrote {out_dir}/ckpt.pt: {best.num_params():,} parameters ({best.num_params() / teacher_params:.0%} of the "
      f"teacher), KL {kl:.4f}, in {time.time() - t0:.0f} s. Next: python train.py --init_from={out_dir} "
      f"--teacher={init_from} --dataset={dataset} --out_dir={out_dir}-distilled")
