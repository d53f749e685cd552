"""
train.py: train a Nemotron hybrid (Mamba-2 / attention / MLP / MoE) language model. Read after model.py.

One process on a CPU, a Mac or a GPU (checkpoints: out_dir/ckpt.pt, the latest, and best.pt):
    python train.py                                  # the default: a small hybrid on pycode, CPU, minutes
    python train.py config/tiny_cpu.py --max_iters=100
Many processes with torchrun (checkpoints: sharded out_dir/ckpt-<step>/ folders, the latest and the best):
    torchrun --standalone --nproc_per_node=8 train.py config/nano_h100.py                 # DDP
    torchrun --standalone --nproc_per_node=8 train.py config/nano_h100.py --fsdp=True     # FSDP2
    torchrun --standalone --nproc_per_node=8 train.py config/nano_h100.py --tp=2 --fsdp=True  # 4 replicas x TP 2 (+ --sp=True)
    torchrun --standalone --nproc_per_node=8 train.py config/nano_h100.py --ep=4          # experts over 4 ranks (+ --fsdp=True)
Several nodes: the same command on each, with --nnodes=N --node_rank=i --rdzv_backend=c10d
--rdzv_endpoint=<node 0>:29500 in place of --standalone (docs/distributed.md).
Resume (any layout reads any other's checkpoint), restart on failure, or fine-tune:
    python train.py --init_from=resume --out_dir=out
    torchrun --max-restarts=3 --nproc_per_node=8 train.py --init_from=auto   # resume if out_dir holds a checkpoint
    python train.py --init_from=path/to/out_dir_or_hf_folder --learning_rate=1e-4

The training loop follows nanoGPT's train.py; the learning-rate schedule adds warmup-stable-decay
(WSD), which Nemotron-H (arXiv:2504.03624) trains with. Batches are a pure function of
(seed, step): a resumed run sees exactly the batches a straight run would, and N ranks split the
same global batch that one process would see, so both give the same weights.
"""
import dataclasses, functools, json, math, os, random, re, shutil, subprocess, sys, tempfile, time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from lowprec import amax_state, apply_precision, load_amax_state
from attention import Attention
from mamba import Mamba2Mixer
from checkpoint import CheckpointError, build_model, crc32_file, list_checkpoints, newest_checkpoint, read_checkpoint
from model import Block, Nemotron, NemotronConfig
from moe import MLP, MoE, Router, balance_experts, balance_metrics, moe_costs, shard_experts, unshard_experts
from plan import flops_per_token
from data.tokenizer import DataError, load_tokenizer, open_tokens, read_meta

# -----------------------------------------------------------------------------
# default config: a 0.9M-parameter hybrid with all four layer kinds on pycode, ~5 minutes on a 2-core CPU
# (nanoGPT's defaults are GPT-2 124M; ours are the CPU run that `python train.py` promises)
# I/O
out_dir = 'out'                 # checkpoints (ckpt.pt) and the metrics log (log.jsonl)
eval_interval = 250             # estimate train/val loss (and maybe checkpoint) every this many steps
eval_iters = 10                 # batches per loss estimate
log_interval = 10               # steps between log lines (each costs a device sync)
always_save_checkpoint = True   # save at every eval, not only when val loss improves
init_from = 'scratch'           # 'scratch', 'resume' (out_dir's newest checkpoint), 'auto' (resume if there is one, else scratch), or a run's out_dir / ckpt.pt / HF folder to fine-tune
sample_new_tokens = 300         # tokens of sample printed at the end (0: none)
# data
dataset = 'pycode'              # data/<dataset>/{train,val}.bin (uint32) and meta.json
batch_size = 16                 # sequences per micro-step, per rank
block_size = 128                # tokens per sequence
gradient_accumulation_steps = 1 # micro-steps per step, over all ranks (divided among them)
doc_masking = False             # packed documents: Mamba state, conv and attention restart at each end-of-text token (meta.json "eot")
# model: one global per NemotronConfig field, same name and order (model.py documents each)
vocab_size = None               # None: the dataset's (meta.json); a larger value pads the embedding
d_model = 128                   # residual width
pattern = 'M*M-ME'              # per layer: M mamba2, * attention, - mlp, E moe, W sliding-window attention
norm_eps = 1e-5                 # RMSNorm epsilon
tie_embeddings = False          # share the input embedding with the output head
init_std = 0.02                 # std of the normal init of linear and embedding weights
n_head = 4                      # attention query heads
n_kv_head = 2                   # attention key/value heads (GQA)
head_dim = 32                   # attention head width
rope = False                    # RoPE in attention (Nemotron-H is NoPE: the Mamba layers carry order)
rope_theta = 10000.0            # RoPE base
sliding_window = 512            # W layers (sliding-window RoPE attention, SWAN-GPT) see this many positions
swan_train_len = None           # NoPE attention: query scale max(1, log(p+1)/log(this)) beyond it (None: off)
d_ff = 512                      # MLP hidden width
mamba_heads = 4                 # Mamba-2 heads H (H * P = 2 * d_model, Mamba-2's expansion)
headdim = 64                    # Mamba-2 head dim P
d_state = 32                    # Mamba-2 state size N
n_groups = 2                    # Mamba-2 groups G sharing B and C (2: every size that --tp=2 splits divides by 2)
d_conv = 4                      # Mamba-2 causal conv width K
chunk_size = 32                 # SSD chunk length Q
dt_min = 0.001                  # Mamba-2 dt init range, low end
dt_max = 0.1                    # Mamba-2 dt init range, high end
dt_init_floor = 1e-4            # Mamba-2 dt init floor
dt_limit = (0.001, float('inf'))  # clamp of dt in the forward pass
n_experts = 8                   # routed experts per MoE layer
top_k = 2                       # experts per token
moe_d_ff = 128                  # routed expert hidden width
shared_d_ff = 256               # shared expert hidden width
moe_latent_size = None          # LatentMoE width l (None: experts work at d_model)
n_group = 1                     # expert groups for group-limited routing
topk_group = 1                  # groups a token may route into
routed_scaling_factor = 1.0     # scale of the normalised routing weights
norm_topk_prob = True           # normalise the chosen experts' weights to sum to 1
moe_seq_aux_coef = 0.0          # alpha of DeepSeek-V3's sequence-wise balance loss, added to the trained loss, logged apart (0: off)
mtp_depth = 0                   # multi-token prediction: D extra depths, depth k predicts token i+k+1 (0: none)
mtp_pattern = '*E'              # each MTP depth's blocks (attention, MLP, MoE; Nemotron 3 Super: '*E')
mtp_share = False               # one set of MTP weights for every depth (Nemotron 3 Super)
mtp_loss_weight = 0.3           # lambda: loss = main + lambda * mean of the MTP depths' losses
moe_bias_rate = 1e-2            # aux-loss-free balancing: bias step per optimizer step (0: off); DeepSeek-V3 uses 1e-3 over far longer runs
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
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'  # bf16 needs no grad scaler; fp32 elsewhere
compile = False                 # torch.compile the model (worth it on a GPU, slow to start on a CPU)
precision = 'bf16'              # GEMMs: 'bf16' (dtype above), 'fp8' (Nemotron-H), 'mxfp8' or 'nvfp4' (Nemotron 3 Super); lowprec.precision_plan
bf16_ends = True                # fp8/mxfp8: the first and last blocks stay in high precision (Nemotron-H)
fp8_recipe = 'tensorwise'       # fp8 scaling: 'tensorwise' (Nemotron-H), 'delayed' (amax history, 1024 steps, TE) or 'blockwise' (DeepSeek-V3)
nvfp4_rht = True                # nvfp4: random Hadamard transform of the weight-gradient GEMM's inputs (False: ablation)
nvfp4_sr = True                 # nvfp4: stochastic rounding of the gradients (False: ablation)
nvfp4_2d = True                 # nvfp4: 16x16 weight tiles (False: ablation, 1x16 as activations)
tp = 1                          # tensor parallelism: split attention heads, Mamba heads and MLP widths over this many ranks (torchrun)
sp = False                      # sequence parallelism (with --tp): between blocks, each tp rank holds block_size/tp positions
ep = 1                          # expert parallelism: shard each MoE layer's routed experts over this many ranks (torchrun)
fsdp = False                    # FSDP2: shard parameters, gradients and AdamW moments over the data-parallel ranks (else DDP)
recompute = False               # activation checkpointing: keep only each block's input, recompute the rest in the backward
seed = 1337                     # model init and the batch sequence
peak_flops = 0.0                # FLOP/s per device that MFU is measured against (0: look the GPU up)
overwrite = False               # a fresh run may replace the checkpoints already in out_dir (else it refuses)
# the valid range of each numeric flag, checked by configurator.py before any work (NemotronConfig checks the model's)
config_ranges = {k: '[1, inf)' for k in ('eval_interval', 'eval_iters', 'log_interval', 'batch_size', 'block_size',
                                         'gradient_accumulation_steps', 'max_iters', 'lr_decay_iters', 'tp', 'ep')}
config_ranges.update({k: '[0, inf)' for k in ('sample_new_tokens', 'moe_bias_rate', 'learning_rate', 'weight_decay',
                                              'grad_clip', 'warmup_iters', 'min_lr', 'seed', 'peak_flops')})
config_ranges.update(beta1='[0, 1)', beta2='[0, 1)', decay_frac='[0, 1]')
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, type(None)))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}  # the resolved config, logged and checkpointed
# -----------------------------------------------------------------------------

# bf16 dense tensor-core peaks (FLOP/s) from the vendors' data sheets; first substring match wins
PEAK_FLOPS = [('H100', 989e12), ('H200', 989e12), ('B200', 2250e12), ('A100', 312e12),
              ('L40S', 362e12), ('L4', 121e12), ('A10', 125e12), ('4090', 165e12)]

def print0(*args, **kwargs):
    if master_process:
        print(*args, **kwargs)

def die(message, code=1):
    """Bad input (code 2 for flags) or a diverged run: one line on stderr, nothing saved is touched."""
    print0(f"error: {message}", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)

# -----------------------------------------------------------------------------
# processes and devices: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE, as in nanoGPT
ddp = int(os.environ.get('RANK', -1)) != -1
ddp_rank, ddp_local_rank, ddp_world_size = int(os.environ.get('RANK', 0)), 0, 1
master_process = ddp_rank == 0
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
has_mps = torch.backends.mps.is_available()
if device.startswith('cuda') and not torch.cuda.is_available() or device == 'mps' and not has_mps:
    die(f"device={device!r}, but torch finds no such device on this machine (device='auto' takes what there is)", 2)
if ddp:
    ddp_rank, ddp_local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
    ddp_world_size = int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    backend = 'nccl' if device.startswith('cuda') else 'gloo'
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT')
    if attempt is not None and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
        # torchrun --max-restarts: its store still holds the dead attempt's gloo/NCCL addresses, which
        # a restarted rank would read and dial ("Connection refused"): each attempt gets its own keys
        store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), ddp_world_size, is_master=False)
        dist.init_process_group(backend, store=dist.PrefixStore(f'attempt{attempt}', store),
                                rank=ddp_rank, world_size=ddp_world_size)
    else:
        dist.init_process_group(backend)
device_type = device.split(':')[0]
if min_lr > learning_rate:
    die(f"min_lr={min_lr} is above learning_rate={learning_rate}: the schedule would raise the rate as it decays", 2)
if init_from in ('scratch', 'auto'):  # the model the flags describe (on resume and fine-tune it is the checkpoint's)
    try:
        NemotronConfig(**{f.name: globals()[f.name] for f in dataclasses.fields(NemotronConfig)}
                       | {'vocab_size': vocab_size or 1})  # None: the data set's, read below
    except AssertionError as e:  # __post_init__ checks every field's range and the divisibility rules
        die(f"bad model config: {e}", 2)
# out_dir: writable, and a fresh run never replaces checkpoints it did not make
try:  # every rank: all of them exit together
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir):
        pass
except OSError as e:
    die(f"--out_dir={out_dir}: cannot write there ({e.strerror or e})", 2)
found = [os.path.basename(p) for _, p in list_checkpoints(out_dir)]
if found and init_from not in ('resume', 'auto') and not overwrite:
    die(f"{out_dir} holds checkpoints of an earlier run ({', '.join(found)}): --init_from=resume continues it, "
        f"--overwrite=True replaces them, or choose another --out_dir", 2)
# the layout: W ranks = dp data-parallel replicas x tp tensor-parallel ranks, the tp ranks of a replica
# consecutive (one node's fast links); EP groups are ep consecutive ranks inside data parallelism
for k, n in (('tp', tp), ('ep', ep)):
    if n < 1 or ddp_world_size % n != 0:
        die(f"{k}={n} must divide the number of ranks, {ddp_world_size} (launch with torchrun --nproc_per_node=<a multiple of {max(n, 1)}>)")
if fsdp and not ddp:
    die("fsdp=True shards over ranks: launch with torchrun (--nproc_per_node=1 is fine)")
if ep > 1 and tp > 1:  # EP groups lie inside data parallelism, which tp would split
    die(f"ep={ep} runs without tensor parallelism: use --ep (with DDP or --fsdp) or --tp, not both")
if sp and (tp == 1 or block_size % tp):
    die(f"sp=True splits each sequence over the tp ranks: it needs --tp > 1 dividing block_size={block_size} (tp={tp})")
dp_size, dp_rank = ddp_world_size // tp, ddp_rank // tp
if tp > 1 and dp_size > 1 and not fsdp:
    die(f"tp={tp} on {ddp_world_size} ranks leaves {dp_size} data-parallel replicas: add --fsdp=True (DDP does not take DTensors)")
if gradient_accumulation_steps % dp_size != 0:
    die(f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by the {dp_size} data-parallel ranks")
accum_steps = gradient_accumulation_steps // dp_size  # micro-steps of this rank
mesh = init_device_mesh(device_type, (dp_size, tp), mesh_dim_names=('dp', 'tp')) if ddp else None
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
print0(f"tokens per iteration: {tokens_per_iter:,} ({gradient_accumulation_steps} x {batch_size} x {block_size})")
if dtype not in ('float32', 'bfloat16', 'float16'):
    die(f"dtype must be 'float32', 'bfloat16' or 'float16', not '{dtype}'")
if precision not in ('bf16', 'fp8', 'mxfp8', 'nvfp4'):
    die(f"precision must be 'bf16', 'fp8', 'mxfp8' or 'nvfp4', not '{precision}'")
if fp8_recipe not in ('tensorwise', 'delayed', 'blockwise'):
    die(f"fp8_recipe must be 'tensorwise', 'delayed' or 'blockwise', not '{fp8_recipe}'")
if precision != 'bf16' and tp > 1:  # the low-precision GEMMs take whole weights, not DTensor shards
    die(f"precision={precision} runs without tensor parallelism: drop --tp (DDP, --fsdp and --ep work)")
if lr_schedule not in ('wsd', 'cosine'):
    die(f"lr_schedule must be 'wsd' or 'cosine', not '{lr_schedule}'")
torch.manual_seed(seed)  # the same on every rank: DDP also broadcasts rank 0's weights at wrap time
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
# autocast in the dtype asked for: bf16 is the GPU default; on a CPU fp32 is (its bf16 matmuls are slower),
# but --dtype=bfloat16 runs the GPU's mixed precision there too (the tests do). float16 also needs a grad scaler
amp = device_type in ('cuda', 'cpu') and dtype != 'float32'
ctx = torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)) if amp else nullcontext()
if (ep > 1 or tp > 1 or fsdp) and amp and dtype == 'float16':  # each rank's scaler would judge its own shard's grads: steps could differ
    die("ep, tp or fsdp with dtype='float16' is not supported (its grad scaler is per rank): use bfloat16")
if dtype != 'float32' and not amp:
    print0(f"note: dtype={dtype} applies on CUDA and CPUs only; training in float32 on {device}")

# -----------------------------------------------------------------------------
# data: token ids as raw uint32 (np.memmap), sampled at random offsets
data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
if not os.path.exists(os.path.join(data_dir, 'meta.json')):  # meta.json is written last: no meta, no data
    if dataset != 'pycode':
        die(f"data/{dataset} is not prepared: run `python data/{dataset}/prepare.py` first"
            if os.path.exists(os.path.join(data_dir, 'prepare.py')) else f"no data set '{dataset}' (no data/{dataset}/prepare.py)")
    if master_process:  # the default data set needs no network: it is this Python's own stdlib
        print0("preparing data/pycode (first use)...")
        from data.pycode.prepare import prepare
        prepare()
    if ddp:
        dist.barrier()
try:
    meta = read_meta(data_dir)
except DataError as e:
    die(str(e))
if doc_masking and meta.get('eot') is None:
    die(f"doc_masking needs documents separated by an end-of-text token, and data/{dataset}/meta.json names none ('eot')")
for split in ('train', 'val'):
    try:  # exists, a whole number of tokens, as many as meta.json says, ids inside the vocabulary
        n = len(open_tokens(data_dir, split, meta))
    except DataError as e:
        die(str(e))
    if n <= block_size:
        die(f"block_size={block_size} does not fit data/{dataset}/{split}.bin ({n:,} tokens)")
    mask_path = os.path.join(data_dir, f'{split}.mask')
    if meta.get('loss_mask') and (not os.path.exists(mask_path) or os.path.getsize(mask_path) != n):
        die(f"data/{dataset}/meta.json says loss_mask, but {split}.mask is missing or not one byte per token: "
            f"prepare the data set again")

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
    if device_type == 'cuda':  # pinned memory lets the copy overlap with compute
        move = lambda t: None if t is None else t.pin_memory().to(device, non_blocking=True)
    else:
        move = lambda t: None if t is None else t.to(device)
    return move(x), move(y), move(seq_idx)

def get_train_batch(it, micro_step):
    # step `it` has gradient_accumulation_steps micro-batches; each data-parallel replica owns a
    # contiguous run of them, which its tp ranks all read
    return get_batch('train', (0, it), dp_rank * accum_steps + micro_step, gradient_accumulation_steps)

# -----------------------------------------------------------------------------
# model: from scratch, resumed from out_dir's newest checkpoint, or loaded to fine-tune
iter_num, best_val_loss, best_step, ckpt, resumed = 0, float('inf'), None, None, False
if init_from not in ('scratch', 'resume', 'auto') and not os.path.exists(init_from):
    die(f"init_from={init_from!r}: not 'scratch', 'resume', 'auto', nor an existing path")
# ckpt.pt from one process, ckpt-<step>/ (sharded, DCP) from torchrun: the one written last
ckpt_path = newest_checkpoint(out_dir) if init_from in ('resume', 'auto') and os.path.isdir(out_dir) else None
if init_from == 'resume' and ckpt_path is None:
    die(f"--init_from=resume but {out_dir} holds no checkpoint (ckpt.pt or ckpt-<step>/; train with --init_from=scratch first)")
if init_from == 'scratch' or (init_from == 'auto' and ckpt_path is None):
    if vocab_size is None:
        vocab_size = meta['vocab_size']
    model_args = {f.name: globals()[f.name] for f in dataclasses.fields(NemotronConfig)}
    try:
        model_config = NemotronConfig(**model_args)
    except AssertionError as e:  # __post_init__ checks the pattern and the divisibility rules
        die(f"bad model config: {e}")
    model = Nemotron(model_config)
elif ckpt_path is not None:  # resume: the weights now, the optimizer state once it exists
    print0(f"resuming from {ckpt_path}")
    resumed = True
    try:  # checked against the CRC32s saved with it; a damaged or foreign file is named and left as it is
        ckpt = read_checkpoint(ckpt_path)
        model = build_model(ckpt, ckpt_path)
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        best_step = ckpt.get('best_step', iter_num)
    except (CheckpointError, KeyError) as e:
        die(f"cannot resume: {e}")
    if iter_num >= max_iters:
        die(f"{ckpt_path} is at step {iter_num}: give --max_iters above it to train further", 2)
else:  # a fine-tune starts at step 0 with a fresh optimizer
    try:  # master weights in float32 whatever the checkpoint holds: autocast does the low precision
        model = Nemotron.from_pretrained(init_from, dtype=torch.float32)
    except CheckpointError as e:
        die(f"cannot fine-tune from --init_from={init_from}: {e}")
if resumed or init_from not in ('scratch', 'auto'):
    # the model is the checkpoint's: a model flag given with another value would be ignored, so refuse it
    # (the loss weights alone apply: they are how the model trains, not what it is)
    for k in ('moe_seq_aux_coef', 'mtp_loss_weight'):
        if k in config_given:
            setattr(model.config, k, globals()[k])
    clash = [f"--{f.name}={globals()[f.name]!r} (the checkpoint's: {getattr(model.config, f.name)!r})"
             for f in dataclasses.fields(NemotronConfig) if f.name in config_given
             and globals()[f.name] != getattr(model.config, f.name)]
    if clash:
        die(f"model flags cannot change when the model comes from a checkpoint: {', '.join(clash)}; drop them", 2)
    config.update(model.config.to_dict())  # the config saved and logged is the model that trains
if model.config.vocab_size < meta['vocab_size']:
    die(f"the model's vocab_size {model.config.vocab_size} is smaller than data/{dataset}'s {meta['vocab_size']}")
model.to(device)
if precision != 'bf16':  # chosen Linear layers and experts run their GEMMs on quantized operands; parameters and state_dict unchanged
    lowp = apply_precision(model, precision, bf16_ends, nvfp4_rht, nvfp4_sr, nvfp4_2d, seed, fp8_recipe)
    print0(f"precision {precision}: " + ", ".join(f"{n.removeprefix('backbone.')} {f}" for n, f in lowp.items()))
# of the whole model, before any sharding
n_params, n_active = model.num_params(), model.num_params(active=True)
costs = moe_costs(model, block_size) if 'E' in model.config.pattern else {}
print0(f"model: {n_params / 1e6:.2f}M parameters ({n_active / 1e6:.2f}M active), pattern {model.config.pattern}"
       + (f"; MoE layers: {costs['moe_flops_share']:.0%} of training FLOPs/token, {costs['moe_param_share']:.0%} of parameter memory" if costs else ""))

# -----------------------------------------------------------------------------
# parallelize: torchtitan's order, made small. 1) tensor parallelism splits heads and MLP widths over
# the tp ranks of a replica; 2) expert parallelism splits the routed experts over ep ranks; 3)
# activation checkpointing; 4) torch.compile, one block at a time (names unchanged); 5) FSDP2 shards
# what is left over the dp ranks, or DDP replicates it. Data parallelism is whatever tp leaves.
#
# TP plans: {module path inside a mixer: style}. ColwiseParallel splits a Linear's output features
# (whole heads per rank), RowwiseParallel its input features, and all-reduces the output. With
# use_local_output (the default) the mixers get plain tensors of their own heads, and their maths
# runs unchanged on H/tp heads (the head counts are divided below). Embedding, LM head and loss are
# replicated on the tp ranks (each computes the whole logits), and so are the MoE layers and the
# norms (unless --sp, below).
ATTENTION_PLAN = {'q_proj': ColwiseParallel(), 'k_proj': ColwiseParallel(), 'v_proj': ColwiseParallel(),
                  'o_proj': RowwiseParallel()}
MLP_PLAN = {'up_proj': ColwiseParallel(), 'down_proj': RowwiseParallel()}
MAMBA_PLAN = {'in_proj': ColwiseParallel(), 'out_proj': RowwiseParallel()}  # in_proj's rows reordered first
# sequence parallelism (--sp; Korthikanti et al. 2022, as torchtitan applies it): between the
# backbone's blocks each tp rank holds T/tp positions of the residual stream, (B, T/tp, d). A block's
# pre-norm runs on them (SequenceParallel), then its mixer's input is all-gathered: every mixer needs
# the whole sequence (attention its keys; Mamba's conv and scan run along it), and its row-wise output
# projection reduce-scatters back to the shards in place of the all-reduce. The MoE is replicated
# under TP: gathered alike, each rank keeps its positions of its output (no communication; the
# backward all-gathers the gradient). The first block cuts its input (the replicated embedding's
# output); the final norm, LM head, loss and MTP depths run replicated on the gathered sequence.
SP_OUT = RowwiseParallel(output_layouts=Shard(1))
SP_ATTENTION_PLAN, SP_MLP_PLAN = {**ATTENTION_PLAN, 'o_proj': SP_OUT}, {**MLP_PLAN, 'down_proj': SP_OUT}
SP_MAMBA_PLAN = {**MAMBA_PLAN, 'out_proj': SP_OUT}
SP_BLOCK_PLANS = {  # {block kind: {module path inside the block: style}}; mixers 'M*W' take (h, cache, seq_idx)
    **dict.fromkeys('M*W', {'norm': SequenceParallel(), 'mixer': PrepareModuleInput(
        input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None))}),
    '-': {'norm': SequenceParallel(), 'mixer': PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate())},
    'E': {'norm': SequenceParallel(), 'mixer': PrepareModuleInputOutput(
        input_layouts=Shard(1), desired_input_layouts=Replicate(), use_local_input=True,
        output_layouts=Replicate(), desired_output_layouts=Shard(1))}}
SP_MODEL_PLAN = {'backbone.layers.0': PrepareModuleInput(input_layouts=(Replicate(), None, None),  # (x, cache, seq_idx)
                                                         desired_input_layouts=(Shard(1), None, None), use_local_output=True),
                 'backbone.norm_f': PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate(),
                                                       use_local_output=True)}

def mamba_tp_order(m):
    """The row order of in_proj and the channel order of conv1d that make the packed [z, x, B, C, dt]
    splittable: rank r's 1/tp block holds its heads' z, x and dt and its groups' B and C (heads
    r*H/tp.. use groups r*G/tp..), which ColwiseParallel's even split then hands it."""
    HP, GN, H = m.d_inner, m.G * m.N, m.H
    z, x, B, C, dt = torch.arange(2 * HP + 2 * GN + H).split([HP, HP, GN, GN, H])
    rows = torch.cat([torch.cat([s.chunk(tp)[r] for s in (z, x, B, C, dt)]) for r in range(tp)])
    conv = torch.cat([torch.cat([s.chunk(tp)[r] - HP for s in (x, B, C)]) for r in range(tp)])  # xBC channels
    return rows, conv

def mamba_heads(m):  # the per-channel and per-head parameters of a Mamba mixer
    return [(m.conv1d, 'weight'), (m.conv1d, 'bias'), (m, 'A_log'), (m, 'D'), (m, 'dt_bias'), (m.norm, 'weight')]

def local_heads(m, args):
    """Forward pre-hook of a TP Mamba mixer: its per-head parameters are DTensors (so that
    FSDP, clipping and checkpoints see the whole tensor), its maths wants this rank's plain
    shard. to_local() is differentiable: the grads land on the DTensors. restore_heads undoes it."""
    m.dtensors = [(mod, name, mod._parameters[name]) for mod, name in mamba_heads(m)]
    for mod, name, p in m.dtensors:
        mod._parameters[name] = p.to_local()

def restore_heads(m, args, out):
    for mod, name, p in m.dtensors:
        mod._parameters[name] = p

tp_order = {}  # state-dict name -> row order of a TP-reordered Mamba tensor (checkpoints undo it)
ep_mesh = ep_group = replica_group = None

def parallelize(model):
    global ep_mesh, ep_group, replica_group
    blocks = [b for b in model.modules() if isinstance(b, Block)]  # the backbone's layers and the MTP depths' blocks
    names = {m: n for n, m in model.named_modules()}
    if tp > 1:  # 1) tensor parallelism over mesh['tp']
        for block in blocks:
            m, seq = block.mixer, sp and any(block is b for b in model.backbone.layers)  # MTP blocks: no sp
            if isinstance(m, Attention):
                if m.n_kv_head % tp:
                    die(f"tp={tp} must divide n_head={m.n_head} and n_kv_head={m.n_kv_head}")
                parallelize_module(m, mesh['tp'], SP_ATTENTION_PLAN if seq else ATTENTION_PLAN)
                m.n_head, m.n_kv_head = m.n_head // tp, m.n_kv_head // tp
            elif isinstance(m, MLP):
                if m.up_proj.out_features % tp:
                    die(f"tp={tp} must divide d_ff={m.up_proj.out_features}")
                parallelize_module(m, mesh['tp'], SP_MLP_PLAN if seq else MLP_PLAN)
            elif isinstance(m, Mamba2Mixer):
                if m.G % tp:
                    die(f"tp={tp} must divide n_groups={m.G} (and so mamba_heads={m.H})")
                rows, conv = mamba_tp_order(m)
                with torch.no_grad():
                    m.in_proj.weight.copy_(m.in_proj.weight[rows])  # (2*H*P + 2*G*N + H, d_model), reordered
                    m.conv1d.weight.copy_(m.conv1d.weight[conv])  # (H*P + 2*G*N, 1, K), reordered
                    m.conv1d.bias.copy_(m.conv1d.bias[conv])
                for key, order in (('in_proj.weight', rows), ('conv1d.weight', conv), ('conv1d.bias', conv)):
                    tp_order[f'{names[m]}.{key}'] = order
                parallelize_module(m, mesh['tp'], SP_MAMBA_PLAN if seq else MAMBA_PLAN)
                for mod, name in mamba_heads(m):  # split by heads (channels): rank r gets block r
                    p = getattr(mod, name)
                    setattr(mod, name, torch.nn.Parameter(distribute_tensor(p.detach(), mesh['tp'], [Shard(0)])))
                m.register_forward_pre_hook(local_heads)
                m.register_forward_hook(restore_heads)
                m.H, m.G, m.d_inner, m.conv_dim = m.H // tp, m.G // tp, m.d_inner // tp, m.conv_dim // tp
            if seq:
                parallelize_module(block, mesh['tp'], SP_BLOCK_PLANS[block.kind])
        if sp:
            parallelize_module(model, mesh['tp'], SP_MODEL_PLAN)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if ep > 1:  # 2) expert parallelism: (replica, ep) mesh, ep consecutive ranks per group
        if not moes:
            die(f"ep={ep} shards MoE layers, and the pattern {model.config.pattern} has none ('E')")
        if model.config.n_experts % ep != 0:
            die(f"ep={ep} must divide n_experts={model.config.n_experts}")
        ep_mesh = init_device_mesh(device_type, (ddp_world_size // ep, ep), mesh_dim_names=('replica', 'ep'))
        ep_group, replica_group = ep_mesh.get_group('ep'), ep_mesh.get_group('replica')
        for m in moes:
            shard_experts(m, ep_group)
    if recompute:  # 3) keep each block's input only; its forward runs again in the backward, to the end:
        for block in blocks:  # stopped early, it would skip restore_heads (TP Mamba), whose DTensors clipping and checkpoints read
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, early_stop=False)
    if compile:  # 4) in place, per block: the parameter names stay those of the plain model
        print0("compiling the model... (takes a minute)")
        for block in blocks:
            block.compile()
    # the EP shards of the routed experts differ from rank to rank: FSDP2 and DDP leave them alone, whole
    # on their ranks (not sharded further over the replicas), and sync_expert_grads averages their grads
    experts = {p for m in moes for p in m.experts.parameters()} if ep > 1 else set()
    if fsdp:  # 5) FSDP2 per block, then the rest (embedding, final norm, LM head)
        for block in blocks:
            fully_shard(block, mesh=mesh['dp'], ignored_params=experts)
        fully_shard(model, mesh=mesh['dp'], ignored_params=experts)
    elif ddp and dp_size > 1:  # 5) DDP
        DDP._set_params_and_buffers_to_ignore_for_model(model, [n for n, p in model.named_parameters() if p in experts])
        model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None, process_group=mesh['dp'].get_group())
    return model

raw_model = model  # the plain module (FSDP and TP change it in place; DDP wraps it)
model = parallelize(model)
moes = [m for m in raw_model.modules() if isinstance(m, MoE)]
expert_params = [p for m in moes for p in m.experts.parameters()] if ep > 1 else []
is_expert = {id(p) for p in expert_params}
routers = [m for m in raw_model.modules() if isinstance(m, Router)]  # the MoE layers' routers
local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # this rank's shard
param_bytes = sum(local(p).numel() * local(p).element_size() for p in raw_model.parameters())
print0(f"params+optimizer per rank: {3 * param_bytes / 2**20:.3f} MB (parameters {param_bytes / 2**20:.3f} MB "
       f"and AdamW's two moments, local shards of rank 0; dp={dp_size} tp={tp} ep={ep} fsdp={fsdp})")

def load_amax(ckpt_path, ckpt):
    """This rank's fp8 delayed-scaling amax histories saved in the checkpoint (save_checkpoint), or None
    if there are none or another layout saved them (each rank keeps its own; EP numbers experts per rank)."""
    if ckpt.get('world_size', 1) != ddp_world_size or ckpt['config'].get('ep', 1) != ep:
        return None
    if not os.path.isdir(ckpt_path):
        return ckpt.get('amax')
    path = os.path.join(ckpt_path, f'amax-rank{ddp_rank}.pt')
    return torch.load(path, map_location='cpu', weights_only=True) if os.path.exists(path) else None

# AdamW: decay matrices and embeddings, not norms, biases, A_log, D or dt_bias (all 1-D)
params = [p for p in raw_model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                               {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')
scaler = torch.amp.GradScaler(device_type, enabled=amp and dtype == 'float16')
if ckpt is not None:
    try:  # the whole model's AdamW moments by parameter name, whatever layout saved them: take this rank's part
        optim_state = ckpt['optimizer']
        for name, s in optim_state['state'].items():
            for k, v in s.items():
                if v.dim() > 0 and name in tp_order:  # TP's reordered Mamba rows, as parallelize did to the weights
                    s[k] = v[tp_order[name]]
                if v.dim() > 0 and ep > 1 and '.experts.' in name:  # this rank's experts
                    s[k] = v.chunk(ep)[ep_mesh.get_local_rank('ep')].clone()
        if optim_state['state'] and all(isinstance(k, int) for k in optim_state['state']) and not ddp:
            optimizer.load_state_dict(optim_state)  # a ckpt.pt of before sharded checkpoints: by index
        else:
            set_optimizer_state_dict(raw_model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
        if precision == 'fp8' and fp8_recipe == 'delayed':  # this rank's amax histories, if the layout is the same
            amax = load_amax(ckpt_path, ckpt)
            if amax is None:
                print0("note: the checkpoint holds no amax histories for this layout: delayed scaling starts afresh")
            else:
                load_amax_state(raw_model, {k: v.to(device) for k, v in amax.items()})
        rng = ckpt.get('rng')  # one process only: restored last, after everything that draws from it (model init)
        if rng is not None:
            torch.set_rng_state(rng['torch'])
            if rng['cuda'] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng['cuda'])
            np.random.set_state((rng['numpy'][0], np.array(rng['numpy'][1], dtype=np.uint32), *rng['numpy'][2:]))
            random.setstate((rng['python'][0], tuple(rng['python'][1]), rng['python'][2]))
    except Exception as e:
        die(f"cannot resume from {ckpt_path}: not a valid checkpoint ({type(e).__name__}: {str(e)[:100]})")
    ckpt = None  # free the memory

# -----------------------------------------------------------------------------
# helpers of the loop

@torch.no_grad()
def estimate_loss():
    """Mean loss over the same eval_iters batches of each split every time, shared among the replicas."""
    out = {}
    eval_model = model.module if isinstance(model, DDP) else model  # not through DDP: ranks may run unequal counts of batches
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

def sync_expert_grads():
    """The all-to-all backward has summed into each expert shard the gradient of its EP group's
    losses; add its replicas' and divide by the world size: the mean over all ranks, as DDP's
    and FSDP2's averages of the other gradients."""
    for p in expert_params:
        if p.grad is None:  # no token of the EP group reached this shard
            p.grad = torch.zeros_like(p)
        if ddp_world_size > ep:
            dist.all_reduce(p.grad, group=replica_group)
        p.grad /= ddp_world_size

def clip_grad_norm(max_norm):
    """clip_grad_norm_ of the whole model, whatever holds which part of it: a DTensor gradient's
    (FSDP, TP) squares are summed over its mesh by full_tensor(); under EP each rank holds 1/ep of
    the experts' grads, so their squares are summed over the EP group; the others are whole here.
    Every rank then scales by the same factor."""
    grads = [p.grad for p in raw_model.parameters() if p.grad is not None]
    if ep == 1 and not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
    sq, sq_experts, by_mesh = torch.zeros((), device=device), torch.zeros((), device=device), {}
    for p in raw_model.parameters():
        if p.grad is None:
            continue
        s = p.grad.float().square().sum()
        if isinstance(s, DTensor):  # a partial sum: added up per mesh, reduced once per mesh
            by_mesh[s.device_mesh] = by_mesh[s.device_mesh] + s if s.device_mesh in by_mesh else s
        elif id(p) in is_expert:
            sq_experts += s
        else:
            sq += s
    if ep > 1:
        dist.all_reduce(sq_experts, group=ep_group)
    sq = sq + sq_experts + sum(s.full_tensor() for s in by_mesh.values())
    coef = min(1.0, max_norm / (sq.sqrt().item() + 1e-6))  # as clip_grad_norm_
    for g in grads:
        g.mul_(coef)

def checkpoint_state():
    """This rank's part of the model's and optimizer's state dicts, in the layout-free form a
    checkpoint holds: names of the plain model, DTensors for what is sharded (DCP stitches any
    of them into any other layout), and TP's reordered Mamba rows back in their own order."""
    model_state, optim_state = get_state_dict(raw_model, optimizer)  # by parameter name
    def canonical(name, t):
        if name in tp_order and t.dim() > 0:  # the whole tensor, replicated: small next to the rest
            return t.full_tensor()[torch.argsort(tp_order[name])]
        if ep > 1 and '.experts.' in name and t.dim() > 0:  # rank r of each EP group holds block r
            return DTensor.from_local(t, ep_mesh, [Replicate(), Shard(0)])
        return t
    model_state = {k: canonical(k, v) for k, v in model_state.items()}
    optim_state['state'] = {k: {n: canonical(k, v) for n, v in s.items()} for k, s in optim_state['state'].items()}
    return model_state, optim_state

def save_checkpoint(best):
    """Atomic: a crash mid-write leaves the previous checkpoint intact. One process writes
    out_dir/ckpt.pt (temp file, then os.replace); under torchrun every rank writes its shards
    with DCP into out_dir/ckpt-<step>.tmp/, which rank 0 then renames to ckpt-<step>/. best: this
    step's val loss is the best so far, and the checkpoint is also kept as the best one (best.pt, a
    second name of ckpt.pt; under torchrun its folder stays when newer ones replace the rest), so
    a run that diverges never leaves only bad checkpoints. checkpoint.list_checkpoints orders them."""
    model_state, optim_state = checkpoint_state()
    state = {'model_config': raw_model.config.to_dict(), 'config': config, 'iter_num': iter_num,
             'best_val_loss': best_val_loss, 'best_step': best_step,
             'data_position': iter_num,  # batches are a function of (seed, step)
             'world_size': ddp_world_size}
    amax = amax_state(raw_model)  # fp8 delayed scaling's histories: each rank's own
    if ddp:
        final = os.path.join(out_dir, f'ckpt-{iter_num}')
        tmp = final + '.tmp'
        if master_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed attempt's leftovers
        dist.barrier()
        if amax:  # before dcp.save, which returns on rank 0 only once every rank is through
            os.makedirs(tmp, exist_ok=True)
            torch.save(amax, os.path.join(tmp, f'amax-rank{ddp_rank}.pt'))
        dcp.save({'model': model_state, 'optimizer': optim_state}, checkpoint_id=tmp)
        # the CRC32 of every file, each rank its own: checkpoint.verify checks them before a read
        mine = {n: crc32_file(os.path.join(tmp, n)) for n in os.listdir(tmp)
                if n.startswith((f'__{ddp_rank}_', f'amax-rank{ddp_rank}.'))}
        everyone = [None] * ddp_world_size
        dist.all_gather_object(everyone, mine)
        if master_process:  # dcp.save returns on rank 0 once every rank's shards and the metadata are written
            checksums = {n: c for crcs in everyone for n, c in crcs.items()}
            checksums['.metadata'] = crc32_file(os.path.join(tmp, '.metadata'))
            with open(os.path.join(tmp, 'train_state.json'), 'w') as f:
                json.dump({**state, 'checksums': checksums}, f)
            keep = {final, os.path.join(out_dir, f'ckpt-{best_step}')}
            old = [os.path.join(out_dir, n) for n in os.listdir(out_dir) if re.fullmatch(r'ckpt-\d+', n)]
            if final in old:  # this step saved before: a directory cannot be replaced in one step
                os.replace(final, final + '.old.tmp')
                old[old.index(final)] = final + '.old.tmp'
            os.replace(tmp, final)  # complete before any older checkpoint goes: a crash here loses none
            for path in old:
                if path not in keep:
                    shutil.rmtree(path)
        dist.barrier()
        return
    np_state = np.random.get_state()
    # plain lists and tensors only, so that torch.load(weights_only=True) reads it back
    rng = {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
           'numpy': [np_state[0], np_state[1].tolist(), *np_state[2:]],
           'python': [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    path = os.path.join(out_dir, 'ckpt.pt')
    torch.save({'model': model_state, 'optimizer': optim_state, **state, 'rng': rng, 'amax': amax}, path + '.tmp')
    os.replace(path + '.tmp', path)
    if best:  # the same file under a second name: a hard link costs nothing (a copy where links fail)
        tmp = os.path.join(out_dir, 'best.pt.tmp')
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, os.path.join(out_dir, 'best.pt'))

def kept_checkpoints():
    if best_step is None:
        return "it saved no checkpoint"
    best = os.path.join(out_dir, 'best.pt' if not ddp else f'ckpt-{best_step}')
    return f"the checkpoints in {out_dir} are kept, the best at {best} (step {best_step}, val loss {best_val_loss:.4f})"

def log(record):
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')

def git_hash():
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None

# -----------------------------------------------------------------------------
# training loop
flops_per_iter = flops_per_token(raw_model.config, block_size) * tokens_per_iter  # the planner's count, per layer type
seq_aux = raw_model.config.moe_seq_aux_coef > 0 and bool(routers)  # the sequence-wise balance loss is on
if peak_flops == 0.0 and device_type == 'cuda':
    name = torch.cuda.get_device_name(device)
    peak_flops = next((f for key, f in PEAK_FLOPS if key in name), 0.0)
start_iter = iter_num
if master_process:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'meta.json'), 'w') as f:  # the tokenizer travels with the run
        json.dump(meta, f)
    log({'config': config, 'git': git_hash(), 'torch': torch.__version__, 'device': device,
         'world_size': ddp_world_size, 'init_from': init_from, 'start_iter': start_iter,
         'params': n_params, 'active_params': n_active, **costs, 'time': time.strftime('%Y-%m-%d %H:%M:%S'),
         'layout': {'dp': dp_size, 'tp': tp, 'ep': ep, 'fsdp': fsdp}, 'param_bytes_per_rank': param_bytes})
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
            log({'step': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val']})
        if not (math.isfinite(losses['train']) and math.isfinite(losses['val'])):
            pbar.close()
            die(f"loss is not finite at step {iter_num} (train {losses['train']}, val {losses['val']}): "
                f"the run diverged; {kept_checkpoints()}")
        if iter_num > 0:
            improved = losses['val'] < best_val_loss
            if improved:
                best_val_loss, best_step = losses['val'], iter_num
            if improved or always_save_checkpoint:
                save_checkpoint(improved)
    if iter_num == max_iters:
        break

    # one optimizer step over accum_steps micro-steps
    if os.environ.get('TEST_CRASH_AT_STEP') == str(iter_num) and ddp_rank == 1 \
            and os.environ.get('TORCHELASTIC_RESTART_COUNT') == '0':  # tests only: a rank dies, torchrun restarts all
        os._exit(1)
    t0 = time.time()
    loss_sum, aux_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    for micro_step in range(accum_steps):
        # reduce gradients over the replicas on the last micro-step only (model.no_sync() without nesting)
        if isinstance(model, DDP):
            model.require_backward_grad_sync = micro_step == accum_steps - 1
        elif fsdp:
            model.set_requires_gradient_sync(micro_step == accum_steps - 1)
        with ctx:
            _, loss = model(X, Y, seq_idx=S)
            loss = loss / accum_steps  # the mean over micro-steps; DDP then averages over ranks
            aux = sum(r.aux_loss for r in routers) / accum_steps if seq_aux else None
        loss_sum += loss.detach().float()
        if aux is not None:  # the balance loss is trained on, but logged apart from the LM loss
            aux_sum += aux.detach().float()
            loss = loss + aux
        nxt = (iter_num, micro_step + 1) if micro_step + 1 < accum_steps else (iter_num + 1, 0)
        X, Y, S = get_train_batch(*nxt)  # fetch the next micro-batch while this one computes (async on a GPU)
        scaler.scale(loss).backward()
    sync_expert_grads()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        clip_grad_norm(grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # MoE routing statistics of this step, summed over ranks: every rank moves its biases alike
    stats = torch.stack([r.take_stats() for r in routers]) if routers else None
    if stats is not None and ddp:
        dist.all_reduce(stats)
    if stats is not None and moe_bias_rate > 0:
        balance_experts(routers, stats, moe_bias_rate)

    # log: reading the loss syncs the device, so only every log_interval steps
    if iter_num % log_interval == 0 or iter_num == max_iters - 1:
        if ddp:
            dist.all_reduce(loss_sum)
            dist.all_reduce(aux_sum)
        lossf, auxf = loss_sum.item() / ddp_world_size, aux_sum.item() / ddp_world_size
        if not math.isfinite(lossf):
            pbar.close()
            die(f"loss is {lossf} at step {iter_num}: the run diverged (try a lower learning_rate); "
                f"{kept_checkpoints()}")
        dt = time.time() - t0
        tok_s = tokens_per_iter / dt
        mfu = flops_per_iter / dt / (peak_flops * ddp_world_size) if peak_flops > 0 else None
        moe = balance_metrics(stats) if stats is not None else {}
        # the MTP depths' losses of the last micro-step (the loss above includes lambda times their mean)
        mtp = {'mtp_losses': [l.item() for l in raw_model.mtp_losses]} if mtp_depth else {}
        pbar.set_postfix_str(f"loss {lossf:.4f} | lr {lr:.1e} | {dt * 1000:.0f} ms | {tok_s:,.0f} tok/s"
                             f" | mfu {'n/a' if mfu is None else f'{mfu * 100:.1f}%'}"
                             + (f" | moe load max/mean {max(moe['load_max_over_mean']):.2f}" if moe else "")
                             + (f" | mtp {' '.join(f'{l:.3f}' for l in mtp['mtp_losses'])}" if mtp else "")
                             + (f" | aux {auxf:.4f}" if seq_aux else ""))
        if master_process:
            log({'step': iter_num, 'loss': lossf, 'lr': lr, 'dt_ms': dt * 1000, 'tok/s': tok_s, 'mfu': mfu, **moe,
                 **mtp, **({'aux_loss': auxf} if seq_aux else {})})
    pbar.update(1)
pbar.close()

# -----------------------------------------------------------------------------
# the end: a sample from the trained model, and the final val loss
if ep > 1 and not fsdp and sample_new_tokens > 0:  # rank 0 samples alone: every rank gathers the experts back first
    for m in moes:
        unshard_experts(m)
if (tp > 1 or fsdp) and sample_new_tokens > 0:  # the weights are sharded: sample from the checkpoint instead
    print0(f"no sample with tp/fsdp: run python sample.py --init_from={out_dir}")
elif master_process and sample_new_tokens > 0:
    try:
        tokenizer = load_tokenizer(data_dir)
    except DataError as e:  # e.g. tiktoken offline without its cached vocabulary: skip the sample only
        tokenizer = None
        print(f"no sample: {e}")
    if tokenizer is not None:
        raw_model.eval()
        idx = torch.tensor([tokenizer.encode('\n')], dtype=torch.long, device=device)
        with ctx:
            out = raw_model.generate(idx, sample_new_tokens, temperature=0.8, top_k=50)
        print(f"sample:\n{tokenizer.decode(out[0].tolist())}\n---------------")
if losses is not None:
    print0(f"final val loss {losses['val']:.4f} (step {iter_num})")
if ddp:  # wait for rank 0's sample: a rank that tears gloo down while a peer still works can abort
    dist.barrier()
    dist.destroy_process_group()
