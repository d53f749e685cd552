"""
parallel.py: one model over many processes, in torchtitan's order made small. Read after train.py.

train.py calls processes (the device, and torchrun's group), check_layout (can the flags' layout run on
these ranks?) and parallelize, which applies one function per technique, each returning what it
builds (nothing here is global):
    apply_tp(model, mesh, sp)         1) tensor (and sequence) parallelism over the tp ranks of a replica
    apply_ep(model, ep, device_type)  2) expert parallelism: the routed experts over ep ranks
    apply_recompute(model)            3) activation checkpointing, per block
    apply_compile(model)              4) torch.compile, per block (parameter names unchanged)
    apply_fsdp / apply_ddp            5) FSDP2 shards what is left over the dp ranks, or DDP replicates it
and, for the loop and its checkpoints: grad_sync, sync_expert_grads, clip_grad_norm, layout_free_state
(what a checkpoint saves: the same whatever the layout), load_optimizer_state (this layout's part of
it), and shutdown.

The layout: W ranks = dp data-parallel replicas x tp tensor-parallel ranks, the tp ranks of a
replica consecutive (one node's fast links); EP groups are ep consecutive ranks inside data
parallelism. Papers: Megatron-LM (Shoeybi et al. 2019) for TP, Korthikanti et al. 2022 for SP,
GShard / DeepSeek-V3 for EP, Zhao et al. 2023 (PyTorch FSDP) for FSDP.
"""

import functools
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from attention import Attention
from hardware import pick_device
from mamba import Mamba2Mixer
from model import Block
from moe import MLP, MoE, shard_experts

# -----------------------------------------------------------------------------
# processes and the layout


def processes(device):
    """This process's place: (under torchrun, rank, local rank, world size, device), the device picked
    (hardware.pick_device: ValueError if it is not there) and torchrun's group joined when RANK is set."""
    device = pick_device(device)
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 0, 1, device
    return (True, *init_distributed(device))


def init_distributed(device):
    """Join torchrun's process group (gloo on CPUs, NCCL on GPUs). Returns (rank, local_rank,
    world_size, device): device becomes cuda:<local_rank> on a GPU."""
    rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    backend = 'nccl' if device.startswith('cuda') else 'gloo'
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT')
    if attempt is not None and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
        # torchrun --max-restarts: its store still holds the dead attempt's gloo/NCCL addresses, which
        # a restarted rank would read and dial ("Connection refused"): each attempt gets its own keys
        store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), world, is_master=False)
        store = dist.PrefixStore(f'attempt{attempt}', store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    else:
        dist.init_process_group(backend)
    return rank, local_rank, world, device


def check_layout(world, tp, ep, sp, fsdp, torchrun, block_size, accumulation, precision, half, teacher=False):
    """Why this layout cannot run (one line), or None. half: training in float16 (a grad scaler);
    teacher: distilling (train.py --teacher)."""
    for name, n in (('tp', tp), ('ep', ep)):
        if world % n != 0:
            return (f"{name}={n} must divide the number of ranks, {world} (launch with torchrun "
                    f"--nproc_per_node=<a multiple of {n}>)")
    dp = world // tp
    if fsdp and not torchrun:
        return "fsdp=True shards over ranks: launch with torchrun (--nproc_per_node=1 is fine)"
    if ep > 1 and tp > 1:  # EP groups lie inside data parallelism, which tp would split
        return f"ep={ep} runs without tensor parallelism: use --ep (with DDP or --fsdp) or --tp, not both"
    if sp and (tp == 1 or block_size % tp):
        return (f"sp=True splits each sequence over the tp ranks: it needs --tp > 1 dividing block_size={block_size} "
                f"(tp={tp})")
    if tp > 1 and dp > 1 and not fsdp:
        return (f"tp={tp} on {world} ranks leaves {dp} data-parallel replicas: add --fsdp=True (DDP does not take "
                f"DTensors)")
    if accumulation % dp != 0:
        return f"gradient_accumulation_steps={accumulation} is not divisible by the {dp} data-parallel ranks"
    if precision != 'bf16' and tp > 1:  # the low-precision GEMMs take whole weights, not DTensor shards
        return f"precision={precision} runs without tensor parallelism: drop --tp (DDP, --fsdp and --ep work)"
    if (ep > 1 or tp > 1 or fsdp) and half:  # each rank's scaler would judge its own shard's grads
        return "ep, tp or fsdp with dtype='float16' is not supported (its grad scaler is per rank): use bfloat16"
    if teacher and tp > 1:  # the teacher runs whole on every rank; tested under DDP and FSDP2 only
        return "--teacher runs with DDP or --fsdp, not with --tp (not wired yet)"
    return None


# -----------------------------------------------------------------------------
# 1) tensor parallelism. Plans: {module path inside a mixer: style}. ColwiseParallel splits a
# Linear's output features (whole heads per rank), RowwiseParallel its input features, and
# all-reduces the output. With use_local_output (the default) the mixers get plain tensors of their
# own heads, and their maths runs unchanged on H/tp heads (the head counts are divided below).
# Embedding, LM head and loss are replicated on the tp ranks (each computes the whole logits), and
# so are the MoE layers and the norms (unless sp, below).
ATTENTION_PLAN = {'q_proj': ColwiseParallel(), 'k_proj': ColwiseParallel(), 'v_proj': ColwiseParallel(),
                  'o_proj': RowwiseParallel()}
MLP_PLAN = {'up_proj': ColwiseParallel(), 'down_proj': RowwiseParallel()}
MAMBA_PLAN = {'in_proj': ColwiseParallel(), 'out_proj': RowwiseParallel()}  # in_proj's rows reordered first
# Sequence parallelism (sp; Korthikanti et al. 2022, as torchtitan applies it): between the
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
    '-': {'norm': SequenceParallel(),
          'mixer': PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate())},
    'E': {'norm': SequenceParallel(), 'mixer': PrepareModuleInputOutput(
        input_layouts=Shard(1), desired_input_layouts=Replicate(), use_local_input=True,
        output_layouts=Replicate(), desired_output_layouts=Shard(1))}}
SP_MODEL_PLAN = {  # the first block's input (x, cache, seq_idx) is cut, the final norm's gathered
    'backbone.layers.0': PrepareModuleInput(input_layouts=(Replicate(), None, None),
                                            desired_input_layouts=(Shard(1), None, None), use_local_output=True),
    'backbone.norm_f': PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate(),
                                          use_local_output=True)}


def mamba_tp_order(m, tp):
    """The row order of in_proj and the channel order of conv1d that make the packed [z, x, B, C, dt]
    splittable: rank r's 1/tp block holds its heads' z, x and dt and its groups' B and C (heads
    r*H/tp.. use groups r*G/tp..), which ColwiseParallel's even split then hands it."""
    HP, GN, H = m.d_inner, m.G * m.N, m.H
    z, x, B, C, dt = torch.arange(2 * HP + 2 * GN + H).split([HP, HP, GN, GN, H])
    rows = torch.cat([torch.cat([s.chunk(tp)[r] for s in (z, x, B, C, dt)]) for r in range(tp)])
    conv = torch.cat([torch.cat([s.chunk(tp)[r] - HP for s in (x, B, C)]) for r in range(tp)])  # xBC channels
    return rows, conv


def mamba_heads(m):
    """The per-channel and per-head parameters of a Mamba mixer, as (module, name)."""
    return [(m.conv1d, 'weight'), (m.conv1d, 'bias'), (m, 'A_log'), (m, 'D'), (m, 'dt_bias'), (m.norm, 'weight')]


def local_heads(m, args):
    """Forward pre-hook of a TP Mamba mixer: its per-head parameters are DTensors (so that FSDP,
    clipping and checkpoints see the whole tensor), its maths wants this rank's plain shard.
    to_local() is differentiable: the grads land on the DTensors. restore_heads undoes it."""
    m.dtensors = [(mod, name, mod._parameters[name]) for mod, name in mamba_heads(m)]
    for mod, name, p in m.dtensors:
        mod._parameters[name] = p.to_local()


def restore_heads(m, args, out):
    for mod, name, p in m.dtensors:
        mod._parameters[name] = p


def apply_tp(model, mesh, sp):
    """Split every block's mixer over the ranks of mesh (1-D, the tp ranks of a replica); sp: also
    the residual stream between blocks. Returns {state-dict name: row order} of the Mamba tensors
    whose rows it reordered (checkpoints put them back). Raises ValueError if a size does not split."""
    tp, tp_order = mesh.size(), {}
    names = {m: n for n, m in model.named_modules()}
    for block in (b for b in model.modules() if isinstance(b, Block)):  # the backbone's and the MTP depths'
        m, seq = block.mixer, sp and any(block is b for b in model.backbone.layers)  # MTP blocks: no sp
        if isinstance(m, Attention):
            if m.n_kv_head % tp:
                raise ValueError(f"tp={tp} must divide n_head={m.n_head} and n_kv_head={m.n_kv_head}")
            parallelize_module(m, mesh, SP_ATTENTION_PLAN if seq else ATTENTION_PLAN)
            m.n_head, m.n_kv_head = m.n_head // tp, m.n_kv_head // tp
        elif isinstance(m, MLP):
            if m.up_proj.out_features % tp:
                raise ValueError(f"tp={tp} must divide d_ff={m.up_proj.out_features}")
            parallelize_module(m, mesh, SP_MLP_PLAN if seq else MLP_PLAN)
        elif isinstance(m, Mamba2Mixer):
            if m.G % tp:
                raise ValueError(f"tp={tp} must divide mamba_groups={m.G} (and so mamba_heads={m.H})")
            rows, conv = mamba_tp_order(m, tp)
            with torch.no_grad():
                m.in_proj.weight.copy_(m.in_proj.weight[rows])  # (2*H*P + 2*G*N + H, d_model), reordered
                m.conv1d.weight.copy_(m.conv1d.weight[conv])  # (H*P + 2*G*N, 1, K), reordered
                m.conv1d.bias.copy_(m.conv1d.bias[conv])
            for key, order in (('in_proj.weight', rows), ('conv1d.weight', conv), ('conv1d.bias', conv)):
                tp_order[f'{names[m]}.{key}'] = order
            parallelize_module(m, mesh, SP_MAMBA_PLAN if seq else MAMBA_PLAN)
            for mod, name in mamba_heads(m):  # split by heads (channels): rank r gets block r
                p = getattr(mod, name)
                setattr(mod, name, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
            m.register_forward_pre_hook(local_heads)
            m.register_forward_hook(restore_heads)
            m.H, m.G, m.d_inner, m.conv_dim = m.H // tp, m.G // tp, m.d_inner // tp, m.conv_dim // tp
        if seq:
            parallelize_module(block, mesh, SP_BLOCK_PLANS[block.kind])
    if sp:
        parallelize_module(model, mesh, SP_MODEL_PLAN)
    return tp_order


# -----------------------------------------------------------------------------
# 2) expert parallelism


@dataclass
class ExpertParallel:
    """What apply_ep builds: the (replica, ep) mesh, its two process groups, and this rank's shards
    of the routed experts (whole on their rank, averaged by sync_expert_grads)."""
    mesh: object                   # DeviceMesh ('replica', 'ep')
    group: object                  # the ep ranks that share one MoE layer's experts
    replica_group: object          # the ranks that hold the same experts
    params: list                   # this rank's routed-expert parameters

    @property
    def rank(self):
        return self.mesh.get_local_rank('ep')


def apply_ep(model, ep, device_type):
    """Shard each MoE layer's routed experts over groups of ep consecutive ranks. Returns the
    ExpertParallel; raises ValueError when there are no MoE layers or ep does not divide them."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        raise ValueError(f"ep={ep} shards MoE layers, and the pattern {model.config.pattern} has none ('E')")
    if model.config.n_experts % ep != 0:
        raise ValueError(f"ep={ep} must divide n_experts={model.config.n_experts}")
    mesh = init_device_mesh(device_type, (dist.get_world_size() // ep, ep), mesh_dim_names=('replica', 'ep'))
    for m in moes:
        shard_experts(m, mesh.get_group('ep'))
    return ExpertParallel(mesh, mesh.get_group('ep'), mesh.get_group('replica'),
                          [p for m in moes for p in m.experts.parameters()])


# -----------------------------------------------------------------------------
# 3) - 5): recompute, compile, data parallelism


def apply_recompute(model):
    """Keep each block's input only; its forward runs again in the backward, to the end: stopped
    early, it would skip restore_heads (TP Mamba), whose DTensors clipping and checkpoints read."""
    for block in (b for b in model.modules() if isinstance(b, Block)):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, early_stop=False)


def apply_compile(model):
    """torch.compile each block in place: the parameter names stay those of the plain model."""
    for block in (b for b in model.modules() if isinstance(b, Block)):
        block.compile()


def apply_fsdp(model, mesh, ignored=()):
    """FSDP2 over mesh (the dp ranks): each block, then the rest (embedding, final norm, LM head).
    ignored: parameters left whole on their rank (the EP shards, which differ between ranks)."""
    for block in (b for b in model.modules() if isinstance(b, Block)):
        fully_shard(block, mesh=mesh, ignored_params=set(ignored))
    fully_shard(model, mesh=mesh, ignored_params=set(ignored))
    return model


def apply_ddp(model, mesh, device_type, local_rank, ignored=()):
    """DDP over mesh (the dp ranks), leaving the ignored parameters (the EP shards) alone."""
    ignored = set(ignored)
    DDP._set_params_and_buffers_to_ignore_for_model(model, [n for n, p in model.named_parameters() if p in ignored])
    return DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None, process_group=mesh.get_group())


def parallelize(model, mesh, device_type, local_rank, tp=1, sp=False, ep=1, recompute=False, compile=False,
                fsdp=False):
    """Steps 1) to 5) in torchtitan's order, each where its flag asks for it. mesh: the ('dp', 'tp')
    DeviceMesh (None in one process). Returns (model: DDP's wrapper, else the module itself, changed in
    place; apply_tp's row orders; the ExpertParallel or None). Raises ValueError for a size that does
    not split."""
    tp_order = apply_tp(model, mesh['tp'], sp) if tp > 1 else {}
    experts = apply_ep(model, ep, device_type) if ep > 1 else None
    if recompute:
        apply_recompute(model)
    if compile:
        apply_compile(model)
    # the EP shards of the routed experts differ from rank to rank: FSDP2 and DDP leave them alone, whole
    # on their ranks (not sharded further over the replicas), and sync_expert_grads averages their grads
    ignored = experts.params if experts else []
    if fsdp:
        apply_fsdp(model, mesh['dp'], ignored)
    elif mesh is not None and mesh['dp'].size() > 1:
        model = apply_ddp(model, mesh['dp'], device_type, local_rank, ignored)
    return model, tp_order, experts


def local_bytes(model):
    """Bytes of the parameters this rank holds (a DTensor's local shard, the EP shards)."""
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    return sum(local(p).numel() * local(p).element_size() for p in model.parameters())


# -----------------------------------------------------------------------------
# the loop's collectives


def grad_sync(model, on):
    """Whether this backward reduces the gradients over the replicas (DDP, FSDP2): on for the last
    micro-step of a step only (DDP's no_sync(), without nesting)."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = on
    elif hasattr(model, 'set_requires_gradient_sync'):  # an FSDP2 module
        model.set_requires_gradient_sync(on)


def sync_expert_grads(experts, world):
    """The all-to-all backward has summed into each expert shard the gradient of its EP group's
    losses; add its replicas' and divide by the world size: the mean over all ranks, as DDP's and
    FSDP2's averages of the other gradients."""
    for p in experts.params:
        if p.grad is None:  # no token of the EP group reached this shard
            p.grad = torch.zeros_like(p)
        if world > experts.mesh.size(1):
            dist.all_reduce(p.grad, group=experts.replica_group)
        p.grad /= world


def clip_grad_norm(model, max_norm, experts=None):
    """clip_grad_norm_ of the whole model, whatever holds which part of it: a DTensor gradient's
    (FSDP, TP) squares are summed over its mesh by full_tensor(); under EP each rank holds 1/ep of
    the experts' grads, so their squares are summed over the EP group; the others are whole here.
    Every rank then scales by the same factor."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if experts is None and not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    device = grads[0].device
    is_expert = {id(p) for p in experts.params} if experts else set()
    sq, sq_experts, by_mesh = torch.zeros((), device=device), torch.zeros((), device=device), {}
    for p in model.parameters():
        if p.grad is None:
            continue
        s = p.grad.float().square().sum()
        if isinstance(s, DTensor):  # a partial sum: added up per mesh, reduced once per mesh
            by_mesh[s.device_mesh] = by_mesh[s.device_mesh] + s if s.device_mesh in by_mesh else s
        elif id(p) in is_expert:
            sq_experts += s
        else:
            sq += s
    if experts:
        dist.all_reduce(sq_experts, group=experts.group)
    sq = sq + sq_experts + sum(s.full_tensor() for s in by_mesh.values())
    coef = min(1.0, max_norm / (sq.sqrt().item() + 1e-6))  # as clip_grad_norm_
    for g in grads:
        g.mul_(coef)


def shutdown(mesh, experts=None):
    """The end of a torchrun job: a barrier on every process group (the last work of each holds no
    tensor), all of them destroyed, then the process ends at once, skipping the interpreter's
    finalization. A gloo worker thread may still be dropping a finished collective's tensors; a
    thread that needs the GIL while the interpreter finalizes is killed, and the process aborts
    ("terminate called without an active exception", LOG.md): seen after the barriers too, once
    in a CI run under load. Everything is written by then (checkpoints, log.jsonl are closed)."""
    groups = [mesh.get_group(d) for d in mesh.mesh_dim_names] if mesh is not None else []
    groups += [experts.group, experts.replica_group] if experts else []
    for group in [*groups, None]:  # None: the default group, last (it also waits for rank 0's sample)
        dist.barrier(group=group)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -----------------------------------------------------------------------------
# checkpoints: any layout saves the same state, and reads its own part of it


def layout_free_state(model, optimizer, tp_order, experts=None):
    """This rank's part of the model's and optimizer's state dicts, in the form a checkpoint holds
    whatever the layout: names of the plain model, DTensors for what is sharded (DCP stitches any of
    them into any other layout), and TP's reordered Mamba rows back in their own order."""
    model_state, optim_state = get_state_dict(model, optimizer)  # by parameter name

    def canonical(name, t):
        if name in tp_order and t.dim() > 0:  # the whole tensor, replicated: small next to the rest
            return t.full_tensor()[torch.argsort(tp_order[name])]
        if experts and '.experts.' in name and t.dim() > 0:  # rank r of each EP group holds block r
            return DTensor.from_local(t, experts.mesh, [Replicate(), Shard(0)])
        return t
    model_state = {k: canonical(k, v) for k, v in model_state.items()}
    optim_state['state'] = {k: {n: canonical(k, v) for n, v in s.items()} for k, s in optim_state['state'].items()}
    return model_state, optim_state


def load_optimizer_state(model, optimizer, optim_state, tp_order, experts=None, torchrun=False):
    """The whole model's AdamW moments by parameter name, whatever layout saved them: this rank
    takes its part (TP's reordered Mamba rows as apply_tp reordered the weights, its experts)."""
    for name, s in optim_state['state'].items():
        for k, v in s.items():
            if v.dim() > 0 and name in tp_order:
                s[k] = v[tp_order[name]]
            if v.dim() > 0 and experts and '.experts.' in name:
                s[k] = v.chunk(experts.mesh.size(1))[experts.rank].clone()
    if optim_state['state'] and all(isinstance(k, int) for k in optim_state['state']) and not torchrun:
        optimizer.load_state_dict(optim_state)  # a ckpt.pt of before sharded checkpoints: by index
    else:
        set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
