"""
checkpoint.py: reading and writing models. Read after model.py.

Two formats: our own checkpoints, as train.py writes them (out_dir/ckpt.pt from one process, or a
sharded ckpt-<step>/ folder of torch.distributed.checkpoint (DCP) under torchrun, either holding
the model, the optimizer and the training state), and Hugging Face NemotronH folders (config.json
and safetensors), which transformers' NemotronHForCausalLM loads. Nemotron.from_pretrained and
save_pretrained (model.py) are the public entry points and call load_model and save_hf here.
"""

import json
import os
import pickle
import random
import re
import shutil
import subprocess
import tempfile
import zipfile
import zlib

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint._traverse import set_element

from data.tokenizer import find_tokenizer
from model import Nemotron, NemotronConfig

# -----------------------------------------------------------------------------
# our checkpoints


class CheckpointError(Exception):
    """A checkpoint or Hugging Face folder this code cannot read; the message says why."""


# A train.py out_dir holds its latest checkpoint and, kept beside it, its best by val loss:
#   one process:  ckpt.pt (latest) and best.pt, each a torch.save zip (temp file, then os.replace)
#   torchrun:     ckpt-<step>/ folders (DCP shards, .metadata, train_state.json): the latest and
#                 the best (train_state.json's best_step), older ones removed
# Each appears under its final name only once complete (*.tmp until then). Reading one never runs
# code from it (torch.load with weights_only; DCP's pickles through a restricted unpickler) and
# first checks it against the CRC32s written with it (the zip's own, or train_state.json's).


def checkpoint_step(path):
    """The training step a checkpoint was saved at; None if it cannot be read."""
    try:
        if os.path.isdir(path):
            with open(os.path.join(path, "train_state.json")) as f:
                return int(json.load(f)["iter_num"])
        # mmap: only the pickle is read, not the tensors
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["iter_num"])
    except Exception:
        return None


def list_checkpoints(out_dir):
    """The complete checkpoints of a train.py out_dir as [(step, path)], newest first: by the step
    each was saved at, not by file time (a copied out_dir keeps no order of times); the latest
    before the best at the same step; one whose step cannot be read first (it is checked, and its
    damage reported, before anything older is used)."""
    names = [n for n in os.listdir(out_dir) if n in ("ckpt.pt", "best.pt") or re.fullmatch(r"ckpt-\d+", n)]
    found = [(checkpoint_step(os.path.join(out_dir, n)), n != "best.pt", os.path.join(out_dir, n)) for n in names]
    found.sort(key=lambda f: (f[0] is None, f[0] or 0, f[1]), reverse=True)
    return [(step, path) for step, _, path in found]


def newest_checkpoint(out_dir):
    """The path of the newest complete checkpoint of a train.py out_dir (list_checkpoints), or None."""
    return next((path for _, path in list_checkpoints(out_dir)), None)


def crc32_file(path):
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify(path):
    """Raise CheckpointError if the checkpoint at path is damaged: a ckpt.pt whose zip entries do
    not match their CRC32s (torch.save writes them), a ckpt-<step>/ folder with a missing file or a
    file whose CRC32 differs from the one recorded in train_state.json."""
    if os.path.isdir(path):
        try:
            with open(os.path.join(path, "train_state.json")) as f:
                checksums = json.load(f).get("checksums", {})  # none in checkpoints of older versions
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}/train_state.json: unreadable ({e})") from None
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise CheckpointError(f"{path}: .metadata is missing")
        for name, crc in checksums.items():
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise CheckpointError(f"{path}: {name} is missing")
            if crc32_file(file) != crc:
                raise CheckpointError(f"{path}: {name} is damaged (its CRC32 differs from the one saved with it)")
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a complete checkpoint file ({e})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: damaged ({bad} does not match its CRC32)")


def check_readable(path):
    """verify(path), and where it fails, name the newest other checkpoint of the same out_dir that
    verifies, and how to resume from it: nothing is removed or renamed without the user."""
    try:
        verify(path)
    except CheckpointError as e:
        folder = os.path.dirname(os.path.abspath(path))
        for step, other in list_checkpoints(folder):
            if os.path.abspath(other) == os.path.abspath(path):
                continue
            try:
                verify(other)
            except CheckpointError:
                continue
            raise CheckpointError(f"{e}. The newest good checkpoint is {other} (step {step}): move the damaged "
                                  f"one aside (mv {path} {path}.damaged) and run again to continue from it") from None
        raise


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle, which pickle.load would let call anything it names: this one
    knows only the classes DCP writes there, and refuses the rest."""
    ALLOWED = {("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")} | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
        ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath")}

    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in self.ALLOWED or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not something a checkpoint's metadata holds")


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        with open(os.path.join(self.path, ".metadata"), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(_EmptyStateDictLoadPlanner):
    def load_bytes(self, read_item, value):
        # the non-tensor values (the optimizer's hyperparameters and parameter names): DCP's planner
        # reads them with torch.load(weights_only=False), which runs code; plain values need no more
        # than weights_only=True. Stored as DCP's planner does, into the nested dict it rebuilds
        value = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], value)
        else:
            self.state_dict[read_item.dest_index.fqn] = value


def read_sharded_checkpoint(folder, key=None):
    """A ckpt-<step> folder as the plain dict a ckpt.pt holds (only its `key` part's tensors if
    given), in one process whatever layout wrote it: DCP stitches the shards together, no process
    group. Raises CheckpointError, not DCP's CheckpointException (a BaseException)."""
    with open(os.path.join(folder, "train_state.json")) as f:
        state = json.load(f)  # model_config, config, iter_num, best_val_loss, checksums, ...
    tensors = {}  # the empty planner fills it from the checkpoint's metadata, as dcp_to_torch_save does
    try:
        _load_state_dict(tensors, storage_reader=_SafeReader(folder), planner=_SafePlanner(keys=key and {key}),
                         no_dist=True)
    except CheckpointException as e:  # DCP wraps what failed, per rank: report the first cause
        cause = next(iter(e.failures.values()))[0]
        raise CheckpointError(f"{folder}: {type(cause).__name__}: {first_line(cause)}") from None
    return {**state, **tensors}


def first_line(e):
    return (str(e).strip().splitlines() or [""])[0][:300]


def read_checkpoint(path, key=None, device="cpu"):
    """A checkpoint of ours (ckpt.pt, best.pt or ckpt-<step>/) as a plain dict (only its `key` part's
    tensors from a sharded one, if given), verified first; CheckpointError names what is wrong."""
    check_readable(path)
    try:
        if os.path.isdir(path):
            return read_sharded_checkpoint(path, key)
        # mmap: what is not used (the optimizer state, when sampling) is never read into memory
        return torch.load(path, map_location=device, weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except Exception as e:  # a foreign or crafted pickle (weights_only refuses to run it), a truncated file
        raise CheckpointError(f"{path}: not a readable nanoNemotron checkpoint "
                              f"({type(e).__name__}: {first_line(e)})") from None


def load_state(model, state, where):
    """model.load_state_dict(state) with a message that lists what does not fit (torch's own runs
    over many lines, and its first line says nothing)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f"{what}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}" for what, items in
                (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs config)", shapes)) if items]
    if problems:
        raise CheckpointError(f"{where}: the weights do not fit the model its config describes; " + "; ".join(problems))
    model.load_state_dict(state, assign=True)


def load_model(path, dtype=None, device="cpu"):
    """A Hugging Face NemotronH folder, a train.py out_dir (its newest checkpoint), or a checkpoint
    of ours (ckpt.pt, best.pt, ckpt-<step>/). Never touches the network. dtype=None keeps the
    checkpoint's dtype."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        return load_hf(path, dtype, device)
    is_sharded = os.path.isfile(os.path.join(path, "train_state.json"))
    ckpt_path = path if not os.path.isdir(path) or is_sharded else newest_checkpoint(path)
    if ckpt_path is None or not os.path.exists(ckpt_path):
        raise CheckpointError(f"{path}: neither a Hugging Face folder (config.json) nor a "
                              f"ckpt.pt / out_dir with one")
    return build_model(read_checkpoint(ckpt_path, "model", device), ckpt_path).to(device=device, dtype=dtype)


def load_for_inference(path, dtype, device):
    """(the model in eval mode, its tokenizer) for sample.py and serve.py: load_model, then the
    tokenizer the run's data set or the folder names. CheckpointError or DataError says what is wrong."""
    if not os.path.exists(path):
        raise CheckpointError(f"--init_from={path}: no such file or folder "
                              f"(a train.py out_dir, a ckpt.pt or an HF folder)")
    model = load_model(path, dtype, device).eval()
    return model, find_tokenizer(path, model.config.vocab_size)


def build_model(ckpt, where):
    """The Nemotron a checkpoint dict of ours describes, holding its weights (no second copy)."""
    try:
        config = NemotronConfig.from_dict(ckpt["model_config"])
    except (KeyError, TypeError, AssertionError) as e:
        raise CheckpointError(f"{where}: its model_config does not describe a model ({type(e).__name__}: "
                              f"{first_line(e)})") from None
    state = {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in ckpt["model"].items()}
    with torch.device("meta"):
        model = Nemotron(config)
    load_state(model, state, where)
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    return model


# -----------------------------------------------------------------------------
# writing our checkpoints (train.py)


def start_from(init_from, out_dir):
    """What train.py's --init_from names, as (ckpt_path, ckpt, model): out_dir's newest checkpoint
    to resume ('resume', or 'auto' when there is one: the model and the whole checkpoint dict, with
    the optimizer and training state), a model to fine-tune (any other path: ckpt None; its master
    weights in float32), or nothing to load ('scratch', 'auto' without a checkpoint: all None).
    CheckpointError says what is wrong, naming the flag."""
    if init_from == 'scratch':
        return None, None, None
    if init_from not in ('resume', 'auto'):
        if not os.path.exists(init_from):
            raise CheckpointError(f"init_from={init_from!r}: not 'scratch', 'resume', 'auto', nor an existing path "
                                  f"(a checkpoint to fine-tune: train one first, e.g. `python train.py` writes out/)")
        try:
            return None, None, Nemotron.from_pretrained(init_from, dtype=torch.float32)
        except CheckpointError as e:
            raise CheckpointError(f"cannot fine-tune from --init_from={init_from}: {e}") from None
    # ckpt.pt from one process, ckpt-<step>/ (sharded, DCP) from torchrun: the newest
    ckpt_path = newest_checkpoint(out_dir)
    if ckpt_path is None:
        if init_from == 'auto':
            return None, None, None
        raise CheckpointError(f"--init_from=resume but {out_dir} holds no checkpoint (ckpt.pt or ckpt-<step>/; "
                              f"train with --init_from=scratch first)")
    try:  # checked against the CRC32s saved with it; a damaged or foreign file is named and left as it is
        ckpt = read_checkpoint(ckpt_path)
        missing = [k for k in ('iter_num', 'best_val_loss', 'optimizer') if k not in ckpt]
        if missing:
            raise CheckpointError(f"{ckpt_path}: no {', '.join(missing)} in it (not a train.py checkpoint?)")
        ckpt.setdefault('best_step', ckpt['iter_num'])
        return ckpt_path, ckpt, build_model(ckpt, ckpt_path)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume: {e}") from None


def check_out_dir(out_dir, may_replace):
    """Make out_dir if need be; CheckpointError if it is not writable, or if it holds checkpoints
    and may_replace is false: a fresh run never replaces checkpoints it did not make."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise CheckpointError(f"--out_dir={out_dir}: cannot write there ({e.strerror or e})") from None
    found = [os.path.basename(p) for _, p in list_checkpoints(out_dir)]
    if found and not may_replace:
        raise CheckpointError(f"{out_dir} holds checkpoints of an earlier run ({', '.join(found)}): --init_from=resume "
                              f"continues it, --overwrite=True replaces them, or choose another --out_dir")


def rng_state():
    """Every RNG's state as plain lists and tensors, which torch.load(weights_only=True) reads back."""
    np_state, py_state = np.random.get_state(), random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {'torch': torch.get_rng_state(), 'cuda': cuda,
            'numpy': [np_state[0], np_state[1].tolist(), *np_state[2:]],
            'python': [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(rng):
    torch.set_rng_state(rng['torch'])
    if rng['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng['cuda'])
    np.random.set_state((rng['numpy'][0], np.array(rng['numpy'][1], dtype=np.uint32), *rng['numpy'][2:]))
    random.setstate((rng['python'][0], tuple(rng['python'][1]), rng['python'][2]))


def save_checkpoint(out_dir, state, model_state, optim_state, best, amax=None, sharded=False):
    """Atomic: a crash mid-write leaves the previous checkpoint intact. One process writes
    out_dir/ckpt.pt (temp file, then os.replace), with the RNG states; under torchrun (sharded) every
    rank calls this with its shards, which DCP writes into out_dir/ckpt-<step>.tmp/, and rank 0 then
    renames the folder to ckpt-<step>/. state: the training state (iter_num, best_step, config, ...).
    best: this step's val loss is the best so far, and the checkpoint is also kept as the best one
    (best.pt, a second name of ckpt.pt; under torchrun its folder stays when newer ones replace the
    rest), so a run that diverges never leaves only bad checkpoints. amax: this rank's fp8
    delayed-scaling histories (each rank its own)."""
    if not sharded:
        path = os.path.join(out_dir, 'ckpt.pt')
        torch.save({'model': model_state, 'optimizer': optim_state, **state, 'rng': rng_state(), 'amax': amax},
                   path + '.tmp')
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
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    final = os.path.join(out_dir, f"ckpt-{state['iter_num']}")
    tmp = final + '.tmp'
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed attempt's leftovers
    dist.barrier()
    if amax:  # before dcp.save, which returns on rank 0 only once every rank is through
        os.makedirs(tmp, exist_ok=True)
        torch.save(amax, os.path.join(tmp, f'amax-rank{rank}.pt'))
    dcp.save({'model': model_state, 'optimizer': optim_state}, checkpoint_id=tmp)
    # the CRC32 of every file, each rank its own: verify checks them before a read
    mine = {n: crc32_file(os.path.join(tmp, n)) for n in os.listdir(tmp)
            if n.startswith((f'__{rank}_', f'amax-rank{rank}.'))}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:  # dcp.save returns on rank 0 once every rank's shards and the metadata are written
        checksums = {n: c for crcs in everyone for n, c in crcs.items()}
        checksums['.metadata'] = crc32_file(os.path.join(tmp, '.metadata'))
        with open(os.path.join(tmp, 'train_state.json'), 'w') as f:
            json.dump({**state, 'checksums': checksums}, f)
        keep = {final, os.path.join(out_dir, f"ckpt-{state['best_step']}")}
        old = [os.path.join(out_dir, n) for n in os.listdir(out_dir) if re.fullmatch(r'ckpt-\d+', n)]
        if final in old:  # this step saved before: a directory cannot be replaced in one step
            os.replace(final, final + '.old.tmp')
            old[old.index(final)] = final + '.old.tmp'
        os.replace(tmp, final)  # complete before any older checkpoint goes: a crash here loses none
        for path in old:
            if path not in keep:
                shutil.rmtree(path)
    dist.barrier()


def append_log(out_dir, record, fresh=False):
    """One JSON line more in out_dir/log.jsonl, the metrics log of train.py, rl.py and train_asr.py. fresh: the first
    line of a run that does not resume, which starts the log anew (a run allowed to replace the folder's
    checkpoints replaces their log too, so that no plot mixes two runs' steps)."""
    with open(os.path.join(out_dir, 'log.jsonl'), 'w' if fresh else 'a') as f:
        f.write(json.dumps(record) + '\n')


def git_commit():
    """This code's git commit (short), for a run's log; None outside a git checkout."""
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


def kept_message(out_dir, best_step, best_val_loss, sharded):
    """What a failing run says of the checkpoints it leaves, the best named."""
    if best_step is None:
        return "it saved no checkpoint"
    best = os.path.join(out_dir, f'ckpt-{best_step}' if sharded else 'best.pt')
    return f"the checkpoints in {out_dir} are kept, the best at {best} (step {best_step}, val loss {best_val_loss:.4f})"


def read_amax(ckpt_path, ckpt, rank, world, ep):
    """This rank's fp8 delayed-scaling amax histories saved in the checkpoint, or None if there are
    none or another layout saved them (each rank keeps its own; EP numbers experts per rank)."""
    if ckpt.get('world_size', 1) != world or ckpt.get('config', {}).get('ep', 1) != ep:
        return None
    if not os.path.isdir(ckpt_path):
        return ckpt.get('amax')
    path = os.path.join(ckpt_path, f'amax-rank{rank}.pt')
    return torch.load(path, map_location='cpu', weights_only=True) if os.path.exists(path) else None


# -----------------------------------------------------------------------------
# Hugging Face NemotronH interop
#
# NVIDIA's checkpoints name parameters as our modules do (backbone.layers.{i}.mixer.in_proj.weight,
# ...), except that each routed expert is its own module there (mixer.experts.{e}.up_proj.weight)
# while we stack them (mixer.experts.up_proj, (E, F, l)), and that transformers' own
# save_pretrained may write model.* instead of backbone.*.

HF_LAYER_KINDS = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*",
                  "mlp": "-", "moe": "E"}
# our config field: (HF key, legacy HF key, transformers' default when config.json has neither)
HF_CONFIG_KEYS = {
    "vocab_size": ("vocab_size", None, 131072), "d_model": ("hidden_size", None, 4096),
    "norm_eps": ("layer_norm_epsilon", "rms_norm_eps", 1e-5),
    "tie_embeddings": ("tie_word_embeddings", None, False), "init_std": ("initializer_range", None, 0.02),
    "n_head": ("num_attention_heads", None, 32), "n_kv_head": ("num_key_value_heads", None, 8),
    "head_dim": ("head_dim", "attention_head_dim", 128), "d_ff": ("intermediate_size", None, 21504),
    "mamba_heads": ("mamba_num_heads", None, 128), "mamba_head_dim": ("mamba_head_dim", None, 64),
    "d_state": ("ssm_state_size", None, 128), "mamba_groups": ("n_groups", "mamba_n_groups", 8),
    "d_conv": ("conv_kernel", "mamba_d_conv", 4), "chunk_size": ("chunk_size", "mamba_chunk_size", 128),
    "dt_min": ("time_step_min", "mamba_dt_min", 0.001), "dt_max": ("time_step_max", "mamba_dt_max", 0.1),
    "dt_init_floor": ("time_step_floor", "mamba_dt_init_floor", 1e-4),
    "n_experts": ("n_routed_experts", None, 8), "top_k": ("num_experts_per_tok", None, 2),
    "moe_d_ff": ("moe_intermediate_size", None, 7688),
    "shared_d_ff": ("moe_shared_expert_intermediate_size", None, 7688),
    "moe_latent_size": ("moe_latent_size", None, None), "n_group": ("n_group", None, 1),
    "topk_group": ("topk_group", None, 1), "routed_scaling_factor": ("routed_scaling_factor", None, 1.0),
    "norm_topk_prob": ("norm_topk_prob", None, True),
}
# HF keys whose value this code does not implement otherwise: key -> (the layer kinds that read it,
# the values it supports); a key no layer of the pattern reads is not checked, as transformers does not
HF_SUPPORTED = {"attention_bias": ("*", (False,)), "sliding_window": ("*", (None,)),
                "use_bias": ("M", (False,)), "mamba_proj_bias": ("M", (False,)), "use_conv_bias": ("M", (True,)),
                "mamba_hidden_act": ("M", ("silu",)), "mlp_bias": ("-E", (False,)),
                "mlp_hidden_act": ("-E", ("relu2",)), "n_shared_experts": ("E", (1,))}


def config_from_hf(hf):
    """A NemotronConfig from the dict of an HF config.json; unsupported settings raise, where a
    layer of the pattern (or of the MTP layers) reads them."""
    bad = []
    if "layers_block_type" in hf:
        kinds = hf["layers_block_type"]
        bad += [f"layers_block_type has {t!r}" for t in kinds if t not in HF_LAYER_KINDS]
        pattern = "".join(HF_LAYER_KINDS.get(t, "?") for t in kinds)
    elif "hybrid_override_pattern" in hf:
        pattern = hf["hybrid_override_pattern"]
        bad += [f"hybrid_override_pattern has {c!r}" for c in set(pattern) - set("M*-E")]
    else:
        bad.append("no layers_block_type or hybrid_override_pattern")
        pattern = ""
    n_mtp = hf.get("num_nextn_predict_layers") or 0
    mtp = ""
    if n_mtp:
        kinds = hf.get("mtp_layers_block_type")
        mtp = "".join(HF_LAYER_KINDS.get(t, "?") for t in kinds) if kinds else \
            hf.get("mtp_hybrid_override_pattern", "*E")
    used = set(pattern + mtp)
    bad += [f"{k}={hf[k]!r} (supported: {v})" for k, (readers, v) in HF_SUPPORTED.items()
            if k in hf and hf[k] not in v and used & set(readers)]
    if bad:
        raise CheckpointError("unsupported NemotronH config: " + "; ".join(bad))
    args = {"pattern": pattern}
    for ours, (key, legacy, default) in HF_CONFIG_KEYS.items():
        args[ours] = hf[key] if hf.get(key) is not None else hf.get(legacy, default)
    # transformers' NemotronH clamps dt to [time_step_min, time_step_limit[1]] (its
    # time_step_limit's lower end is not used); we match it so logits agree
    hi = (hf.get("time_step_limit") or hf.get("mamba_dt_limit") or (0.0, float("inf")))[1]
    if isinstance(hi, dict):  # transformers 5 writes infinity as {"__float__": "Infinity"}
        hi = hi.get("__float__")
    args["dt_limit"] = (args["dt_min"], float(hi))
    if n_mtp:  # one weight set (Nemotron 3 Super) is shared by every draft step
        args.update(mtp_depth=n_mtp, mtp_pattern=mtp, mtp_share=n_mtp == 1)
    try:
        return NemotronConfig(**args)
    except (AssertionError, TypeError) as e:
        raise CheckpointError(f"unsupported NemotronH config: {e}") from None


def config_to_hf(cfg):
    if cfg.rope or "W" in cfg.pattern:
        raise CheckpointError("Hugging Face NemotronH has no RoPE or sliding-window layers: a rope=True "
                              "or W-layer model cannot be exported")
    hf = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
          "layers_block_type": [{"M": "linear_attention", "*": "full_attention", "-": "mlp",
                                 "E": "moe"}[c] for c in cfg.pattern],
          "hybrid_override_pattern": cfg.pattern,  # what loaders older than transformers 5 read
          "mamba_hidden_act": "silu", "mlp_hidden_act": "relu2",
          "use_conv_bias": True, "use_bias": False, "mlp_bias": False, "attention_bias": False,
          "n_shared_experts": 1, "num_nextn_predict_layers": 0, "bos_token_id": None,
          "eos_token_id": None, "pad_token_id": None}
    hf.update({key: getattr(cfg, ours) for ours, (key, _, _) in HF_CONFIG_KEYS.items()})
    hf["time_step_min"] = cfg.dt_limit[0]  # transformers clamps dt at time_step_min
    hf["time_step_limit"] = [cfg.dt_limit[0], cfg.dt_limit[1]]
    if cfg.mtp_depth:
        hf["num_nextn_predict_layers"] = 1 if cfg.mtp_share else cfg.mtp_depth
        hf["mtp_layers_block_type"] = [{"*": "full_attention", "-": "mlp", "E": "moe"}[c] for c in cfg.mtp_pattern]
        hf["mtp_hybrid_override_pattern"] = cfg.mtp_pattern  # the older key
    return hf


# MTP weights. NVIDIA's checkpoints (as vLLM's and SGLang's NemotronH-MTP loaders read them) number
# the blocks of all MTP weight sets in one flat list, L = len(mtp_pattern) per set:
#     mtp.layers.{s*L}.enorm / hnorm / eh_proj        the fusion at the start of set s
#     mtp.layers.{s*L+j}.norm / mixer.*                block j of set s (experts one by one)
#     mtp.layers.{s*L+L-1}.final_layernorm            its final norm
# eh_proj reads [enorm(embedding); hnorm(hidden)], embedding first. Ours: mtp.{s}.enorm, ...,
# mtp.{s}.layers.{j}.*, mtp.{s}.final_layernorm.

def mtp_to_hf(name, L):
    m = re.match(r"mtp\.(\d+)\.(layers\.(\d+)\.)?(.*)", name)
    s, j, rest = int(m[1]), m[3], m[4]
    if j is not None:
        return f"mtp.layers.{s * L + int(j)}.{rest}"
    return f"mtp.layers.{s * L + (L - 1 if rest.startswith('final_layernorm') else 0)}.{rest}"


def mtp_from_hf(key, L):
    m = re.match(r"mtp\.layers\.(\d+)\.(.*)", key)
    s, j = divmod(int(m[1]), L)
    rest = m[2]
    if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj", "final_layernorm"):
        return f"mtp.{s}.{rest}"
    return f"mtp.{s}.layers.{j}.{rest}"


def hf_to_ours(key, L=1):
    """HF parameter name -> (our name, expert index or None); L: blocks per MTP weight set."""
    key = re.sub(r"^model\.", "backbone.", key)
    if key.startswith("mtp.layers."):
        key = mtp_from_hf(key, L)
    m = re.match(r"(.*\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$", key)
    if m:
        return f"{m[1]}.{m[3]}", int(m[2])
    return key, None


def load_hf(folder, dtype=None, device="cpu"):
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError("reading Hugging Face checkpoints needs safetensors: pip install safetensors") from None
    try:
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json: {e}") from None
    config = config_from_hf(hf)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {first_line(e)})") from None
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    # build on the meta device (no memory), then give each parameter the tensor read from disk,
    # so the weights exist once: an 8B bf16 checkpoint loads in about 16 GB
    with torch.device("meta"):
        model = Nemotron(config)
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    filled = set()
    for fname in files:
        try:
            with safe_open(os.path.join(folder, fname), framework="pt", device=str(device)) as f:
                fill_from(f, model, config, f"{folder}/{fname}", params, filled, dtype, device)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' own errors: a truncated or foreign file
            raise CheckpointError(f"{folder}/{fname}: unreadable ({type(e).__name__}: {first_line(e)})") from None
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
        filled.add("lm_head.weight")
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    missing += [n for n, t in params.items() if t.dim() == 3 and "experts" in n
                and any(f"{n}.{e}" not in filled for e in range(t.size(0)))]
    if missing:
        raise CheckpointError(f"{folder}: checkpoint lacks {sorted(set(missing))[:8]}")
    return model


def fill_from(f, model, config, where, params, filled, dtype, device):
    """Give model's parameters (params: name -> tensor, meta until filled) the tensors of the open
    safetensors file f, recording each name (and expert slot) in filled."""
    for key in f.keys():
        name, expert = hf_to_ours(key, len(config.mtp_pattern))
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # the head is the embedding table
        if name not in params:
            raise CheckpointError(f"{where}: unexpected tensor {key}")
        t = f.get_tensor(key)
        t = t if dtype is None else t.to(dtype)
        target = params[name]
        if expert is not None:  # copy expert e into its slot of the stacked weight
            if expert >= target.size(0) or tuple(t.shape) != tuple(target.shape[1:]):
                raise CheckpointError(f"{key}: shape {tuple(t.shape)}, config implies "
                                      f"{target.size(0)} experts of {tuple(target.shape[1:])}")
            if target.is_meta:
                target = torch.empty(target.shape, dtype=t.dtype, device=device)
                _set_tensor(model, name, target)
                params[name] = target
            target[expert].copy_(t)
            filled.add(f"{name}.{expert}")
        else:
            if tuple(t.shape) != tuple(target.shape):
                raise CheckpointError(f"{key}: shape {tuple(t.shape)}, config implies {tuple(target.shape)}")
            _set_tensor(model, name, t)
            filled.add(name)


def _set_tensor(model, name, t):
    mod_name, leaf = name.rsplit(".", 1)
    mod = model.get_submodule(mod_name)
    if leaf in mod._buffers:
        mod._buffers[leaf] = t
    else:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=mod._parameters[leaf].requires_grad)


def save_hf(model, folder, max_shard_bytes=5 * 2**30):
    """Writes config.json and model.safetensors (sharded with an index past max_shard_bytes) in
    NVIDIA's layout, which transformers' NemotronHForCausalLM loads."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise CheckpointError("writing Hugging Face checkpoints needs safetensors: pip install safetensors") from None
    cfg = model.config
    hf = config_to_hf(cfg)
    hf["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            t = t.clone()  # transformers' NemotronH never ties: it reads lm_head.weight itself
        if name.startswith("mtp."):
            name = mtp_to_hf(name, len(cfg.mtp_pattern))
        if re.search(r"\.experts\.(up_proj|down_proj)$", name):
            base, leaf = name.rsplit(".", 1)
            tensors.update({f"{base}.{e}.{leaf}.weight": t[e].contiguous() for e in range(t.size(0))})
        else:
            tensors[name] = t.contiguous()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
