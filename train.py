"""
train.py: train a Nemotron hybrid (Mamba-2 / attention / MLP / MoE) language model. Read after model.py.

One process on a CPU, a Mac or a GPU (checkpoints: out_dir/ckpt.pt, the latest, and best.pt):
    python train.py                                  # the default: a small hybrid on pycode, CPU, minutes
    python train.py config/tiny_cpu.py --max_iters=100
Many processes with torchrun (checkpoints: sharded out_dir/ckpt-<step>/ folders, the latest and the best):
    torchrun --standalone --nproc_per_node=8 train.py config/nano_h100.py                 # DDP
    torchrun --standalone --nproc_per_node=8 train.py config/nano_h100.py --fsdp=True     # FSDP2
    torchrun --standalone --nproc_per_node=8 train.py config/nano_h100.py --tp=2 --fsdp=True  # 4 x TP 2 (+ --sp)
    torchrun --standalone --nproc_per_node=8 train.py config/nano_h100.py --ep=4          # experts over 4 ranks
Several nodes: the same command on each, with --nnodes and a rendezvous endpoint (docs/distributed.md).
Resume (any layout reads any other's checkpoint), restart on failure, or fine-tune:
    python train.py --init_from=resume --out_dir=out
    torchrun --max-restarts=3 --nproc_per_node=8 train.py --init_from=auto   # resume if out_dir holds a checkpoint
    python train.py --init_from=path/to/out_dir_or_hf_folder --learning_rate=1e-4

The training loop follows nanoGPT's train.py; the learning-rate schedule adds warmup-stable-decay
(WSD), which Nemotron-H (arXiv:2504.03624) trains with. Batches are a pure function of
(seed, step): a resumed run sees exactly the batches a straight run would, and N ranks split the
same global batch that one process would see, so both give the same weights. parallel.py spreads
the model over the ranks, checkpoint.py writes and reads the checkpoints.
"""
import dataclasses, json, math, os, sys, time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (CheckpointError, append_log, check_out_dir, git_commit, kept_message, read_amax,
                        save_checkpoint, set_rng_state, start_from)
from data.tokenizer import DataError, check_dataset, load_tokenizer
from distill import distilled, load_teacher
from hardware import peaks
from lowprec import amax_state, apply_precision, load_amax_state
from model import RENAMED, Nemotron, NemotronConfig, flops_per_token
from moe import MoE, Router, balance_metrics, moe_costs, routing_step, unshard_experts
from parallel import (check_layout, clip_grad_norm, grad_sync, layout_free_state, local_bytes, processes,
                      load_optimizer_state, parallelize, shutdown, sync_expert_grads)

# -----------------------------------------------------------------------------
# default config: a 0.9M-parameter hybrid with all four layer kinds on pycode, ~5 minutes on a 2-core CPU
# (nanoGPT's defaults are GPT-2 124M; ours are the CPU run that `python train.py` promises)
# I/O
out_dir = 'out'                 # checkpoints (ckpt.pt) and the metrics log (log.jsonl)
eval_interval = 250             # estimate train/val loss (and maybe checkpoint) every this many steps
eval_iters = 10                 # batches per loss estimate
log_interval = 10               # steps between log lines (each costs a device sync)
always_save_checkpoint = True   # save at every eval, not only when val loss improves
init_from = 'scratch'           # 'scratch', 'resume' (newest checkpoint), 'auto' (resume, else scratch), or a path
sample_new_tokens = 300         # tokens of sample printed at the end (0: none)
# data
dataset = 'pycode'              # data/<dataset>/{train,val}.bin (uint32) and meta.json
batch_size = 16                 # sequences per micro-step, per rank
block_size = 128                # tokens per sequence
gradient_accumulation_steps = 1 # micro-steps per step, over all ranks (divided among them)
doc_masking = False             # packed documents: Mamba state, conv and attention restart at each end-of-text token
# model: every NemotronConfig field is a flag of the same name, with NemotronConfig's default (model.py
# documents each); vocab_size, unless given, is the data set's (meta.json; a larger value pads the embedding)
globals().update(NemotronConfig().to_dict())
moe_bias_rate = 1e-2            # aux-loss-free balancing: bias step per optimizer step (0: off; DeepSeek-V3: 1e-3)
# distillation (distill.py): learn from a teacher's logits as well as from the data
teacher = ''                    # the teacher: an out_dir, a ckpt.pt or an HF folder, same vocabulary ('': none)
distill_alpha = 0.5             # loss = (1 - alpha) LM + alpha T^2 KL(teacher || student)
distill_temp = 1.0              # T: the softmax temperature of both distributions
# optimizer: AdamW, weight decay on matrices only
learning_rate = 4e-3            # peak learning rate
max_iters = 1000                # total optimizer steps
weight_decay = 0.1              # applied to >= 2-D parameters (matrices, embeddings)
beta1 = 0.9                     # AdamW beta1
beta2 = 0.95                    # AdamW beta2
grad_clip = 1.0                 # clip the global grad norm to this (0: off)
# learning-rate schedule
lr_schedule = 'wsd'             # 'wsd' (warmup-stable-decay, Nemotron-H) or 'cosine' (nanoGPT)
warmup_iters = 50               # linear warmup steps
lr_decay_iters = 1000           # the schedule reaches min_lr here (usually = max_iters)
decay_frac = 0.2                # wsd: the last decay_frac of lr_decay_iters decays linearly to min_lr
min_lr = 4e-4                   # floor of the schedule (~learning_rate / 10, as Chinchilla)
# system
device = 'auto'                 # 'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'  # autocast
compile = False                 # torch.compile the model (worth it on a GPU, slow to start on a CPU)
precision = 'bf16'              # GEMMs: 'bf16' (dtype above), 'fp8' (Nemotron-H), 'mxfp8', 'nvfp4'; lowprec.py
bf16_ends = True                # fp8/mxfp8: the first and last blocks stay in high precision (Nemotron-H)
fp8_recipe = 'tensorwise'       # fp8 scaling: 'tensorwise' (Nemotron-H), 'delayed' (amax history, TE) or 'blockwise'
nvfp4_rht = True                # nvfp4: random Hadamard transform of the weight-gradient GEMM's inputs (False: off)
nvfp4_sr = True                 # nvfp4: stochastic rounding of the gradients (False: ablation)
nvfp4_2d = True                 # nvfp4: 16x16 weight tiles (False: ablation, 1x16 as activations)
tp = 1                          # tensor parallelism: heads and MLP widths over this many ranks (torchrun)
sp = False                      # sequence parallelism (with --tp): between blocks, each tp rank holds block_size/tp
ep = 1                          # expert parallelism: each MoE layer's routed experts over this many ranks (torchrun)
fsdp = False                    # FSDP2: shard parameters, gradients and AdamW moments over the dp ranks (else DDP)
recompute = False               # activation checkpointing: keep each block's input, recompute the rest in the backward
seed = 1337                     # model init and the batch sequence
peak_flops = 0.0                # FLOP/s per device that MFU is measured against (0: look the GPU up)
overwrite = False               # a fresh run may replace the checkpoints already in out_dir (else it refuses)
# the valid range of each numeric flag, checked by configurator.py before any work (NemotronConfig checks the model's)
config_ranges = {k: '[1, inf)' for k in ('eval_interval', 'eval_iters', 'log_interval', 'batch_size', 'block_size',
                                         'gradient_accumulation_steps', 'max_iters', 'lr_decay_iters', 'tp', 'ep')}
config_ranges.update({k: '[0, inf)' for k in ('sample_new_tokens', 'moe_bias_rate', 'learning_rate', 'weight_decay',
                                              'grad_clip', 'warmup_iters', 'min_lr', 'seed', 'peak_flops')})
config_ranges.update(beta1='[0, 1)', beta2='[0, 1)', decay_frac='[0, 1]', dtype=('float32', 'bfloat16', 'float16'),
                     distill_alpha='[0, 1]', distill_temp='(0, inf)',
                     precision=('bf16', 'fp8', 'mxfp8', 'nvfp4'), fp8_recipe=('tensorwise', 'delayed', 'blockwise'),
                     lr_schedule=('wsd', 'cosine'))
config_renamed = RENAMED  # flags renamed since: configurator.py reads the old name as the new one, with a note
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, type(None)))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())  # and die()
config = {k: globals()[k] for k in config_keys}  # the resolved config, logged and checkpointed
model_fields = [f.name for f in dataclasses.fields(NemotronConfig)]

# -----------------------------------------------------------------------------
# processes and devices: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE, as in nanoGPT
try:
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = processes(device)
except ValueError as e:
    die(str(e), 2)
master_process = ddp_rank == 0
print0 = print if master_process else lambda *args, **kwargs: None  # rank 0 speaks for all
device_type = device.split(':')[0]
if min_lr > learning_rate:
    die(f"min_lr={min_lr} is above learning_rate={learning_rate}: the schedule would raise the rate as it decays", 2)
if init_from in ('scratch', 'auto'):  # the model the flags describe (on resume and fine-tune it is the checkpoint's)
    try:
        NemotronConfig(**{k: globals()[k] for k in model_fields})
    except AssertionError as e:  # __post_init__ checks every field's range and the divisibility rules
        die(f"bad model config: {e}", 2)
try:  # out_dir: writable, and a fresh run never replaces checkpoints it did not make (every rank: all exit together)
    check_out_dir(out_dir, init_from in ('resume', 'auto') or overwrite)
except CheckpointError as e:
    die(str(e), 2)
# the layout (parallel.py): W ranks = dp data-parallel replicas x tp tensor-parallel ranks
amp = device_type in ('cuda', 'cpu') and dtype != 'float32'
refused = check_layout(ddp_world_size, tp, ep, sp, fsdp, ddp, block_size, gradient_accumulation_steps, precision,
                       amp and dtype == 'float16', bool(teacher))
if refused:
    die(refused)
dp_size, dp_rank = ddp_world_size // tp, ddp_rank // tp
accum_steps = gradient_accumulation_steps // dp_size  # micro-steps of this rank
mesh = init_device_mesh(device_type, (dp_size, tp), mesh_dim_names=('dp', 'tp')) if ddp else None
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
print0(f"tokens per iteration: {tokens_per_iter:,} ({gradient_accumulation_steps} x {batch_size} x {block_size})")
torch.manual_seed(seed)  # the same on every rank: DDP also broadcasts rank 0's weights at wrap time
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
# autocast in the dtype asked for: bf16 is the GPU default; on a CPU fp32 is (its bf16 matmuls are slower),
# but --dtype=bfloat16 runs the GPU's mixed precision there too (the tests do). float16 also needs a grad scaler
ctx = torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)) if amp else nullcontext()
if dtype != 'float32' and not amp:
    print0(f"note: dtype={dtype} applies on CUDA and CPUs only; training in float32 on {device}")

# -----------------------------------------------------------------------------
# data: token ids as raw uint32 (np.memmap), sampled at random offsets
data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
if not os.path.exists(os.path.join(data_dir, 'meta.json')):  # meta.json is written last: no meta, no data
    if dataset != 'pycode':
        die(f"data/{dataset} is not prepared: run `python data/{dataset}/prepare.py` first"
            if os.path.exists(os.path.join(data_dir, 'prepare.py')) else
            f"no data set '{dataset}': data/{dataset} has neither a prepare.py nor a prepared set (one that another "
            f"script writes, e.g. python data/sft/prepare.py --out_dir=data/{dataset}, must be made first)")
    if master_process:  # the default data set needs no network: it is this Python's own stdlib
        print0("preparing data/pycode (first use)...")
        from data.pycode.prepare import prepare
        prepare()
    if ddp:
        dist.barrier()
try:  # both splits exist, hold whole tokens inside the vocabulary, longer than block_size; masks match
    meta = check_dataset(data_dir, block_size, doc_masking)
except DataError as e:
    die(str(e))

def get_batch(split, key, part, n_parts):
    """Part `part` of the n_parts micro-batches that np.random.default_rng([seed, *key]) draws.
    Each rank draws the same offsets and keeps its own parts, so the batch ignores the world size.
    Returns x, y (-1 where the data set's loss mask says 0) and, with doc_masking, seq_idx (B, T):
    each end-of-text token starts a document."""
    # recreate the memmap each call to avoid a memory leak, as nanoGPT does
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint32, mode='r')
    ix = np.random.default_rng([seed, *key]).integers(0, len(data) - block_size, size=n_parts * batch_size)
    ix = ix[part * batch_size:(part + 1) * batch_size]
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    if meta.get('loss_mask'):  # tokens that are only read (e.g. a prompt) are no targets: -1, ignored by the loss
        mask = np.memmap(os.path.join(data_dir, f'{split}.mask'), dtype=np.uint8, mode='r')
        y[torch.from_numpy(np.stack([mask[i + 1:i + 1 + block_size] for i in ix])) == 0] = -1
    seq_idx = (x == meta['eot']).cumsum(1) if doc_masking else None
    pin = device_type == 'cuda'  # pinned memory lets the copy overlap with compute
    move = lambda t: None if t is None else (t.pin_memory() if pin else t).to(device, non_blocking=pin)
    return move(x), move(y), move(seq_idx)

def get_train_batch(it, micro_step):
    # step `it` has gradient_accumulation_steps micro-batches; each data-parallel replica owns a
    # contiguous run of them, which its tp ranks all read
    return get_batch('train', (0, it), dp_rank * accum_steps + micro_step, gradient_accumulation_steps)

# -----------------------------------------------------------------------------
# model: from scratch, resumed from out_dir's newest checkpoint, or loaded to fine-tune
iter_num, best_val_loss, best_step = 0, float('inf'), None
try:  # resumed: ckpt holds the optimizer and training state too; fine-tuned: the model alone, at step 0
    ckpt_path, ckpt, model = start_from(init_from, out_dir)
except CheckpointError as e:
    die(str(e))
resumed = ckpt is not None
if resumed:
    print0(f"resuming from {ckpt_path}")
    iter_num, best_val_loss, best_step = ckpt['iter_num'], ckpt['best_val_loss'], ckpt['best_step']
    if iter_num >= max_iters:
        die(f"{ckpt_path} is at step {iter_num}: give --max_iters above it to train further", 2)
if model is None:  # from scratch: the model the flags describe, with the data set's vocabulary unless given
    if 'vocab_size' not in config_given:
        vocab_size = meta['vocab_size']
    model = Nemotron(NemotronConfig(**{k: globals()[k] for k in model_fields}))
else:
    # the model is the checkpoint's: a model flag given with another value would be ignored, so refuse it
    # (the loss weights alone apply: they are how the model trains, not what it is)
    for k in ('moe_seq_aux_coef', 'mtp_loss_weight'):
        if k in config_given:
            setattr(model.config, k, globals()[k])
    clash = [f"--{k}={globals()[k]!r} (the checkpoint's: {getattr(model.config, k)!r})"
             for k in model_fields if k in config_given and globals()[k] != getattr(model.config, k)]
    if clash:
        die(f"model flags cannot change when the model comes from a checkpoint: {', '.join(clash)}; drop them", 2)
config.update(model.config.to_dict())  # the config saved and logged is the model that trains
if model.config.vocab_size < meta['vocab_size']:
    die(f"the model's vocab_size {model.config.vocab_size} is smaller than data/{dataset}'s {meta['vocab_size']}")
model.to(device)
try:  # a teacher: in eval mode, no gradients, the student's vocabulary, whole on every rank
    teacher_model = load_teacher(teacher, model.config, device) if teacher else None
except CheckpointError as e:
    die(str(e), 2)
if precision != 'bf16':  # chosen Linear layers and experts run their GEMMs on quantized operands; parameters unchanged
    lowp = apply_precision(model, precision, bf16_ends, nvfp4_rht, nvfp4_sr, nvfp4_2d, seed, fp8_recipe)
    print0(f"precision {precision}: " + ", ".join(f"{n.removeprefix('backbone.')} {f}" for n, f in lowp.items()))
# of the whole model, before any sharding
n_params, n_active = model.num_params(), model.num_params(active=True)
costs = moe_costs(model, block_size) if 'E' in model.config.pattern else {}
print0(f"model: {n_params / 1e6:.2f}M parameters ({n_active / 1e6:.2f}M active), pattern {model.config.pattern}"
       + (f"; MoE layers: {costs['moe_flops_share']:.0%} of training FLOPs/token, "
          f"{costs['moe_param_share']:.0%} of parameter memory" if costs else ""))

# -----------------------------------------------------------------------------
# parallelize (parallel.py), torchtitan's order: 1) TP (+ SP) over the tp ranks of a replica; 2) EP;
# 3) activation checkpointing; 4) torch.compile per block; 5) FSDP2 over the dp ranks, or DDP
raw_model = model  # the plain module (FSDP and TP change it in place; DDP wraps it)
if compile:
    print0("compiling the model... (takes a minute)")
try:  # tp_order: TP's reordered Mamba rows by name (checkpoints undo them); experts: EP's groups and shards
    model, tp_order, experts = parallelize(model, mesh, device_type, ddp_local_rank, tp, sp, ep, recompute, compile,
                                           fsdp)
except ValueError as e:
    die(str(e))
routers = [m for m in raw_model.modules() if isinstance(m, Router)]  # the MoE layers' routers
param_bytes = local_bytes(raw_model)  # this rank's shards
print0(f"params+optimizer per rank: {3 * param_bytes / 2**20:.3f} MB (parameters {param_bytes / 2**20:.3f} MB "
       f"and AdamW's two moments, local shards of rank 0; dp={dp_size} tp={tp} ep={ep} fsdp={fsdp})")

# AdamW: decay matrices and embeddings, not norms, biases, A_log, D or dt_bias (all 1-D)
params = [p for p in raw_model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                               {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')
scaler = torch.amp.GradScaler(device_type, enabled=amp and dtype == 'float16')
if ckpt is not None:
    try:  # the whole model's AdamW moments by parameter name, whatever layout saved them: this rank's part
        load_optimizer_state(raw_model, optimizer, ckpt['optimizer'], tp_order, experts, ddp)
        delayed = precision == 'fp8' and fp8_recipe == 'delayed'
        amax = read_amax(ckpt_path, ckpt, ddp_rank, ddp_world_size, ep) if delayed else {}
        if amax is None:  # fp8 delayed scaling: this rank's histories, when the same layout saved them
            print0("note: the checkpoint holds no amax histories for this layout: delayed scaling starts afresh")
        load_amax_state(raw_model, {k: v.to(device) for k, v in (amax or {}).items()})
        if ckpt.get('rng') is not None:  # one process only: restored last, after everything that draws from it
            set_rng_state(ckpt['rng'])
    except Exception as e:
        die(f"cannot resume from {ckpt_path}: not a valid checkpoint ({type(e).__name__}: {str(e)[:100]})")
    ckpt = None  # free the memory

# -----------------------------------------------------------------------------
# helpers of the loop

@torch.no_grad()
def estimate_loss():
    """Mean loss over the same eval_iters batches of each split every time, shared among the replicas."""
    out = {}
    eval_model = model.module if isinstance(model, DDP) else model  # not through DDP: ranks may run unequal counts
    eval_model.eval()
    # with collectives in the forward (EP's all-to-alls, TP, FSDP) all ranks must run as many
    # forwards: round up, count the first eval_iters. The tp ranks of a replica read the same batches
    n = math.ceil(eval_iters / dp_size) * dp_size if ep > 1 or tp > 1 or fsdp else eval_iters
    for i, split in enumerate(('train', 'val')):
        total = torch.zeros((), device=device)
        for k in range(dp_rank, n, dp_size):
            X, Y, S = get_batch(split, (1 + i, k), 0, 1)
            with ctx:
                _, loss = eval_model(X, Y, seq_idx=S)
            total += loss.float() * (k < eval_iters)
        if ddp:
            dist.all_reduce(total)  # the tp ranks of a replica hold the same sum: count it once
        out[split] = total.item() / tp / eval_iters
    eval_model.train()
    return out

def get_lr(it):
    if it < warmup_iters:  # 1) linear warmup
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:  # 3) past the schedule: stay at the floor
        return min_lr
    if lr_schedule == 'cosine':  # 2) cosine from learning_rate down to min_lr
        ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)
    decay_start = max(warmup_iters, lr_decay_iters - round(decay_frac * lr_decay_iters))
    if it < decay_start:  # 2) wsd: stable at the peak, then linear decay over the last decay_frac
        return learning_rate
    return learning_rate + (min_lr - learning_rate) * (it - decay_start) / (lr_decay_iters - decay_start)

def save(best):
    """This step's checkpoint (checkpoint.save_checkpoint: atomic; the best kept), in the state any layout reads."""
    model_state, optim_state = layout_free_state(raw_model, optimizer, tp_order, experts)
    state = {'model_config': raw_model.config.to_dict(), 'config': config, 'iter_num': iter_num,
             'best_val_loss': best_val_loss, 'best_step': best_step,
             'data_position': iter_num,  # batches are a function of (seed, step)
             'world_size': ddp_world_size}
    save_checkpoint(out_dir, state, model_state, optim_state, best, amax_state(raw_model), sharded=ddp)

# -----------------------------------------------------------------------------
# training loop
flops_per_iter = flops_per_token(raw_model.config, block_size) * tokens_per_iter
seq_aux = raw_model.config.moe_seq_aux_coef > 0 and bool(routers)  # the sequence-wise balance loss is on
if peak_flops == 0.0 and device_type == 'cuda':
    peak_flops = peaks(torch.cuda.get_device_name(device))[0] or 0.0  # hardware.py's dense bf16 peak
start_iter = iter_num
if master_process:
    with open(os.path.join(out_dir, 'meta.json'), 'w') as f:  # the tokenizer travels with the run
        json.dump(meta, f)
    append_log(out_dir, {'config': config, 'git': git_commit(), 'torch': torch.__version__, 'device': device,
                         'world_size': ddp_world_size, 'init_from': init_from, 'start_iter': start_iter,
                         'params': n_params, 'active_params': n_active, **costs,
                         'time': time.strftime('%Y-%m-%d %H:%M:%S'), 'param_bytes_per_rank': param_bytes,
                         'layout': {'dp': dp_size, 'tp': tp, 'ep': ep, 'fsdp': fsdp}}, fresh=not resumed)
pbar = tqdm(total=max_iters, initial=start_iter, disable=not master_process, dynamic_ncols=True)
X, Y, S = get_train_batch(iter_num, 0)  # fetch the very first batch
losses = None
for iter_num in range(start_iter, max_iters + 1):
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr

    # evaluate and checkpoint; a resumed run skips its first step's eval, done before that checkpoint was saved
    if (iter_num % eval_interval == 0 or iter_num == max_iters) and not (resumed and iter_num == start_iter):
        losses = estimate_loss()
        if master_process:
            pbar.write(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            append_log(out_dir, {'step': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val']})
        if not (math.isfinite(losses['train']) and math.isfinite(losses['val'])):
            pbar.close()
            die(f"loss is not finite at step {iter_num} (train {losses['train']}, val {losses['val']}): "
                f"the run diverged; {kept_message(out_dir, best_step, best_val_loss, ddp)}")
        if iter_num > 0:
            improved = losses['val'] < best_val_loss
            if improved:
                best_val_loss, best_step = losses['val'], iter_num
            if improved or always_save_checkpoint:
                save(improved)
    if iter_num == max_iters:
        break

    # one optimizer step over accum_steps micro-steps
    if os.environ.get('TEST_CRASH_AT_STEP') == str(iter_num) and ddp_rank == 1 \
            and os.environ.get('TORCHELASTIC_RESTART_COUNT') == '0':  # tests only: a rank dies, torchrun restarts all
        os._exit(1)
    t0 = time.time()
    loss_sum, aux_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    for micro_step in range(accum_steps):
        grad_sync(model, micro_step == accum_steps - 1)  # reduce over the replicas on the last micro-step only
        with ctx:
            logits, loss = model(X, Y, seq_idx=S)
            if teacher_model is not None:  # with the KL to the teacher's logits on the same tokens
                loss = distilled(loss, logits, teacher_model, X, Y, S, distill_alpha, distill_temp)
            loss = loss / accum_steps  # the mean over micro-steps; DDP then averages over ranks
            aux = sum(r.aux_loss for r in routers) / accum_steps if seq_aux else None
        loss_sum += loss.detach().float()
        if aux is not None:  # the balance loss is trained on, but logged apart from the LM loss
            aux_sum += aux.detach().float()
            loss = loss + aux
        nxt = (iter_num, micro_step + 1) if micro_step + 1 < accum_steps else (iter_num + 1, 0)
        X, Y, S = get_train_batch(*nxt)  # fetch the next micro-batch while this one computes (async on a GPU)
        scaler.scale(loss).backward()
    if experts:
        sync_expert_grads(experts, ddp_world_size)
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        clip_grad_norm(raw_model, grad_clip, experts)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    stats = routing_step(routers, moe_bias_rate)  # summed over ranks: every rank moves its biases alike

    # log: reading the loss syncs the device, so only every log_interval steps
    if iter_num % log_interval == 0 or iter_num == max_iters - 1:
        sums = torch.stack([loss_sum, aux_sum])
        if ddp:
            dist.all_reduce(sums)
        lossf, auxf = (v / ddp_world_size for v in sums.tolist())
        if not math.isfinite(lossf):
            pbar.close()
            die(f"loss is {lossf} at step {iter_num}: the run diverged (try a lower learning_rate); "
                f"{kept_message(out_dir, best_step, best_val_loss, ddp)}")
        dt = time.time() - t0
        tok_s = tokens_per_iter / dt
        mfu = flops_per_iter / dt / (peak_flops * ddp_world_size) if peak_flops > 0 else None
        moe = balance_metrics(stats) if stats is not None else {}
        # the MTP depths' losses of the last micro-step (the loss above includes lambda times their mean)
        mtp = {'mtp_losses': [l.item() for l in raw_model.mtp_losses]} if raw_model.config.mtp_depth else {}
        pbar.set_postfix_str(f"loss {lossf:.4f} | lr {lr:.1e} | {dt * 1000:.0f} ms | {tok_s:,.0f} tok/s"
                             f" | mfu {'n/a' if mfu is None else f'{mfu * 100:.1f}%'}"
                             + (f" | moe load max/mean {max(moe['load_max_over_mean']):.2f}" if moe else "")
                             + (f" | mtp {' '.join(f'{l:.3f}' for l in mtp['mtp_losses'])}" if mtp else "")
                             + (f" | aux {auxf:.4f}" if seq_aux else ""))
        if master_process:
            append_log(out_dir, {'step': iter_num, 'loss': lossf, 'lr': lr, 'dt_ms': dt * 1000, 'tok/s': tok_s,
                                 'mfu': mfu, **moe, **mtp, **({'aux_loss': auxf} if seq_aux else {})})
    pbar.update(1)
pbar.close()

# -----------------------------------------------------------------------------
# the end: a sample from the trained model, and the final val loss
if ep > 1 and not fsdp and sample_new_tokens > 0:  # rank 0 samples alone: every rank gathers the experts back first
    for m in (m for m in raw_model.modules() if isinstance(m, MoE)):
        unshard_experts(m)
if (tp > 1 or fsdp) and sample_new_tokens > 0:  # the weights are sharded: sample from the checkpoint instead
    print0(f"no sample with tp/fsdp: run python sample.py --init_from={out_dir}")
elif master_process and sample_new_tokens > 0:
    try:
        tokenizer = load_tokenizer(data_dir)
        idx = torch.tensor([tokenizer.encode('\n')], dtype=torch.long, device=device)
        with ctx:
            out = raw_model.eval().generate(idx, sample_new_tokens, temperature=0.8, top_k=50)
        print(f"sample:\n{tokenizer.decode(out[0].tolist())}\n---------------")
    except DataError as e:  # e.g. tiktoken offline without its cached vocabulary: skip the sample only
        print(f"no sample: {e}")
if losses is not None:
    print0(f"final val loss {losses['val']:.4f} (step {iter_num})")
if ddp:  # wait for rank 0's sample: a rank that tears gloo down while a peer still works can abort
    shutdown(mesh, experts)
