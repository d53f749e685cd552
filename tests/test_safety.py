"""
What train.py, sample.py, eval.py and plan.py guarantee against bad input and faults, case by case:
no code runs from a file we read (crafted pickles in a ckpt.pt, a sharded checkpoint's .metadata
and its optimizer state); no checkpoint is replaced unasked (a fresh run into a used out_dir, a
diverging run, the newest checkpoint by step); damage is found on load (CRC32s) and named, with the
older good checkpoint offered; every numeric flag has a range, checked before any work (exit 2, one
line); model flags cannot change on resume; data files are checked on open. Each case: a non-zero
exit with one clear line on stderr and no traceback, and nothing lost (or the correct behaviour).

    python -m pytest -q tests/test_safety.py        (about 40 s on 2 cores)
"""
import json
import os
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from checkpoint import CheckpointError, list_checkpoints, newest_checkpoint, verify
from helpers import run_script
from model import Nemotron, NemotronConfig
from test_train import ROOT, TINY, failed_cleanly, ok, read_log, train


class Payload:
    """Unpickling this makes a folder: the proof that a loader ran code from a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def one_line_error(proc, *words, code=None):
    failed_cleanly(proc, *words, code=code)
    assert len([line for line in proc.stderr.splitlines() if line.startswith('error:')]) == 1, proc.stderr


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A 6-step run with evals at 3 and 6 (ckpt.pt and best.pt). Read-only: copy it to change it."""
    out = str(tmp_path_factory.mktemp('run') / 'out')
    ok(train(out, '--max_iters=6', '--eval_interval=3'))
    return out


def copy_of(run, tmp_path, name='out'):
    out = str(tmp_path / name)
    shutil.copytree(run, out)
    return out


def sharded_copy(run, folder, plant=None):
    """ckpt-6/ as torchrun would have written it, from the run's ckpt.pt (DCP without a process group):
    the model, the optimizer state, train_state.json; plant(state) may booby-trap it first."""
    ckpt = torch.load(os.path.join(run, 'ckpt.pt'), weights_only=True)  # its optimizer state is by name already
    state = {'model': ckpt['model'], 'optimizer': ckpt['optimizer']}
    if plant:
        plant(state)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter('ignore')
        dcp.save(state, checkpoint_id=folder, no_dist=True)
    keys = ('model_config', 'config', 'iter_num', 'best_val_loss', 'best_step', 'data_position')
    with open(os.path.join(folder, 'train_state.json'), 'w') as f:
        json.dump({k: ckpt[k] for k in keys}, f)

# -----------------------------------------------------------------------------
# 1) no code runs from a checkpoint


def test_crafted_ckpt_pt_runs_no_code(run, tmp_path):
    out, marker = copy_of(run, tmp_path), tmp_path / 'ran'
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    torch.save({**ckpt, 'config': Payload(marker)}, os.path.join(out, 'ckpt.pt'))
    os.remove(os.path.join(out, 'best.pt'))
    one_line_error(train(out, '--init_from=resume', '--max_iters=9'), 'ckpt.pt', 'not a readable')
    one_line_error(run_script('sample.py', f'--init_from={out}', '--max_new_tokens=2'), 'ckpt.pt')
    one_line_error(run_script('eval.py', f'--init_from={out}', '--lengths=64', '--dataset=none'), 'ckpt.pt')
    assert not marker.exists()


def test_crafted_sharded_metadata_runs_no_code(run, tmp_path):
    """DCP reads .metadata with pickle.load: ours goes through an unpickler that knows only DCP's
    metadata classes. A .metadata that makes a folder is refused by all three scripts."""
    out, marker = str(tmp_path / 'out'), tmp_path / 'ran'
    os.makedirs(out)
    sharded_copy(run, os.path.join(out, 'ckpt-6'))
    with open(os.path.join(out, 'ckpt-6', '.metadata'), 'wb') as f:
        pickle.dump(Payload(marker), f)
    shutil.copy(os.path.join(run, 'meta.json'), out)
    one_line_error(train(out, '--init_from=resume', '--max_iters=9'), 'ckpt-6', 'posix.mkdir')
    one_line_error(run_script('sample.py', f'--init_from={out}', '--max_new_tokens=2'), 'ckpt-6')
    one_line_error(run_script('eval.py', f'--init_from={out}', '--lengths=64', '--dataset=none'), 'ckpt-6')
    assert not marker.exists()


def test_crafted_optimizer_state_runs_no_code(run, tmp_path):
    """DCP reads non-tensor values (the optimizer's hyperparameters) with torch.load(weights_only=
    False): ours with weights_only=True. A learning rate that makes a folder is refused on resume."""
    out, marker = str(tmp_path / 'out'), tmp_path / 'ran'
    os.makedirs(out)
    sharded_copy(run, os.path.join(out, 'ckpt-6'),
                 plant=lambda state: state['optimizer']['param_groups'][0].update(lr=Payload(marker)))
    shutil.copy(os.path.join(run, 'meta.json'), out)
    one_line_error(train(out, '--init_from=resume', '--max_iters=9'), 'ckpt-6', 'weights_only')
    assert not marker.exists()


def test_sharded_copy_resumes(run, tmp_path):
    """The control for the two tests above: the same folder, not booby-trapped, resumes."""
    out = str(tmp_path / 'out')
    os.makedirs(out)
    sharded_copy(run, os.path.join(out, 'ckpt-6'))
    ok(train(out, '--init_from=resume', '--max_iters=7', '--eval_interval=3'))

# -----------------------------------------------------------------------------
# 2) nothing saved is replaced unasked


def test_fresh_run_refuses_an_out_dir_with_checkpoints(run, tmp_path):
    out = copy_of(run, tmp_path)
    before = {n: open(os.path.join(out, n), 'rb').read() for n in ('ckpt.pt', 'best.pt')}
    one_line_error(train(out, '--max_iters=3'), 'ckpt.pt', 'best.pt', '--init_from=resume', '--overwrite=True', code=2)
    one_line_error(train(out, f'--init_from={run}', '--max_iters=3'), '--overwrite=True', code=2)  # a fine-tune too
    assert all(open(os.path.join(out, n), 'rb').read() == b for n, b in before.items())
    ok(train(out, '--max_iters=3', '--eval_interval=3', '--overwrite=True'))
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['iter_num'] == 3


def test_best_checkpoint_survives_a_worse_run(run, tmp_path):
    """Resumed at a learning rate that makes the val loss worse (or diverges): ckpt.pt may hold the
    worse weights, but best.pt keeps the step-6 checkpoint and its val loss."""
    out = copy_of(run, tmp_path)
    best = torch.load(os.path.join(out, 'best.pt'), weights_only=True)
    assert best['iter_num'] == best['best_step'] == 6
    proc = train(out, '--init_from=resume', '--max_iters=12', '--eval_interval=3', '--learning_rate=3.0',
                 '--warmup_iters=0', '--lr_decay_iters=1000', '--grad_clip=0')
    vals = [r['val_loss'] for r in read_log(out) if 'val_loss' in r and r['step'] > 6]
    assert vals and all(v > best['best_val_loss'] for v in vals), (vals, best['best_val_loss'])
    kept = torch.load(os.path.join(out, 'best.pt'), weights_only=True)
    assert kept['iter_num'] == 6 and all(torch.equal(kept['model'][k], best['model'][k]) for k in best['model'])
    if proc.returncode:  # diverged to nan: the message names the best checkpoint
        failed_cleanly(proc, 'diverged', 'best.pt', 'step 6')


def test_newest_checkpoint_is_chosen_by_step(tmp_path):
    """After cp -r the file times say nothing: ckpt-20/ written after a ckpt.pt of step 30 still
    loses to it; best.pt (same step as a ckpt.pt) comes after it."""
    out = tmp_path / 'out'
    (out / 'ckpt-20').mkdir(parents=True)
    (out / 'ckpt-20' / 'train_state.json').write_text(json.dumps({'iter_num': 20}))
    torch.save({'iter_num': 30}, out / 'ckpt.pt')
    torch.save({'iter_num': 30}, out / 'best.pt')
    os.utime(out / 'ckpt.pt', (1, 1))
    assert [os.path.basename(p) for _, p in list_checkpoints(str(out))] == ['ckpt.pt', 'best.pt', 'ckpt-20']
    assert newest_checkpoint(str(out)) == str(out / 'ckpt.pt')

# -----------------------------------------------------------------------------
# 3) damage is found on load and named, with the older good checkpoint offered


def corrupt(path, at=0.5, n=256):
    data = bytearray(open(path, 'rb').read())
    i = int(len(data) * at)
    data[i:i + n] = bytes(255 - b for b in data[i:i + n])
    open(path, 'wb').write(data)


def test_damaged_ckpt_pt_is_named_and_best_offered(run, tmp_path):
    """256 bytes flipped inside a tensor of ckpt.pt (torch.load reads it without complaint): the
    zip's CRC32 catches it; best.pt, which verifies, is offered; after moving the damaged one aside,
    resume continues from best.pt."""
    out = copy_of(run, tmp_path)
    ckpt = os.path.join(out, 'ckpt.pt')
    os.remove(os.path.join(out, 'best.pt'))
    shutil.copy(os.path.join(run, 'ckpt.pt'), os.path.join(out, 'best.pt'))  # a real copy: not the same inode
    corrupt(ckpt)
    torch.load(ckpt, weights_only=True)  # what loaded silently before
    damaged = open(ckpt, 'rb').read()
    one_line_error(train(out, '--init_from=resume', '--max_iters=9'), 'ckpt.pt', 'damaged', 'best.pt')
    one_line_error(run_script('sample.py', f'--init_from={out}', '--max_new_tokens=2'), 'damaged', 'best.pt')
    assert open(ckpt, 'rb').read() == damaged  # left as it was
    os.replace(ckpt, ckpt + '.damaged')
    ok(train(out, '--init_from=resume', '--max_iters=7', '--eval_interval=3'))


@pytest.mark.parametrize('fault', ['shard', 'metadata', 'no-metadata', 'truncated-shard'])
def test_damaged_sharded_checkpoint(run, tmp_path, fault):
    """A ckpt-<step>/ whose files differ from the CRC32s saved in train_state.json, or that lacks one."""
    folder = str(tmp_path / 'out' / 'ckpt-6')
    sharded_copy(run, folder)
    files = [n for n in os.listdir(folder) if n != 'train_state.json']
    from checkpoint import crc32_file
    state = json.load(open(os.path.join(folder, 'train_state.json')))
    state['checksums'] = {n: crc32_file(os.path.join(folder, n)) for n in files}
    json.dump(state, open(os.path.join(folder, 'train_state.json'), 'w'))
    verify(folder)
    shard = next(n for n in files if n.endswith('.distcp'))
    if fault == 'shard':
        corrupt(os.path.join(folder, shard))
    elif fault == 'metadata':
        corrupt(os.path.join(folder, '.metadata'), n=16)
    elif fault == 'no-metadata':
        os.remove(os.path.join(folder, '.metadata'))
    else:
        os.truncate(os.path.join(folder, shard), os.path.getsize(os.path.join(folder, shard)) // 2)
    word = {'shard': shard, 'metadata': '.metadata', 'no-metadata': '.metadata is missing',
            'truncated-shard': shard}[fault]
    with pytest.raises(CheckpointError, match=word.replace('.', r'\.')):
        Nemotron.from_pretrained(str(tmp_path / 'out'))


def test_state_dict_mismatch_names_the_keys(run, tmp_path):
    out = copy_of(run, tmp_path)
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    ckpt['model'].pop('backbone.norm_f.weight')
    ckpt['model']['lm_head.weight'] = ckpt['model']['lm_head.weight'][:, :5]
    torch.save(ckpt, os.path.join(out, 'ckpt.pt'))
    with pytest.raises(CheckpointError) as e:
        Nemotron.from_pretrained(os.path.join(out, 'ckpt.pt'))
    assert 'missing: backbone.norm_f.weight' in str(e.value) and 'lm_head.weight (256, 5) vs (256, 32)' in str(e.value)


def test_truncated_safetensors(run, tmp_path):
    hf = tmp_path / 'hf'
    Nemotron.from_pretrained(run).save_pretrained(hf)
    os.truncate(hf / 'model.safetensors', os.path.getsize(hf / 'model.safetensors') // 2)
    one_line_error(run_script('sample.py', f'--init_from={hf}', '--max_new_tokens=2'), 'model.safetensors')

# -----------------------------------------------------------------------------
# 4) every numeric flag in range, before any work; model flags fixed by a checkpoint


@pytest.mark.parametrize('flag,named', [
    ('--grad_clip=-1', 'grad_clip'), ('--min_lr=-1.0', 'min_lr'), ('--warmup_iters=-5', 'warmup_iters'),
    ('--weight_decay=-1', 'weight_decay'), ('--lr_decay_iters=0', 'lr_decay_iters'), ('--decay_frac=5', 'decay_frac'),
    ('--max_iters=-1', 'max_iters'), ('--learning_rate=-1', 'learning_rate'), ('--beta1=2', 'beta1'),
    ('--seed=-1', 'seed'), ('--batch_size=0', 'batch_size'), ('--d_model=0', 'd_model must be a whole number'),
    ('--top_k=0', 'top_k must be'), ('--n_experts=0', 'n_experts must be'), ('--min_lr=0.5', 'above learning_rate'),
    ('--out_dir=/proc/nope', 'cannot write'), ('--device=cuda', 'no such device'), ('--device=mps', 'no such device'),
])
def test_train_refuses_bad_flags(tmp_path, flag, named):
    out = str(tmp_path / 'out')
    one_line_error(train(out, flag), named, code=2)
    assert not os.path.exists(os.path.join(out, 'log.jsonl'))  # before any work


@pytest.mark.parametrize('flag,named', [
    ('--temperature=-1', 'temperature'), ('--top_p=2', 'top_p'), ('--top_p=-0.5', 'top_p'), ('--top_k=0', 'top_k'),
    ('--top_k=-3', 'top_k'), ('--num_samples=0', 'num_samples'), ('--max_new_tokens=-5', 'max_new_tokens'),
    ('--speculative=9', 'speculative'), ('--seed=-1', 'seed'),
])
def test_sample_refuses_bad_flags(run, flag, named):
    one_line_error(run_script('sample.py', f'--init_from={run}', flag), named, code=2)


@pytest.mark.parametrize('script', ['sample.py', 'eval.py'])
@pytest.mark.parametrize('device', ['cuda', 'mps'])
def test_missing_device(run, script, device):
    if device == 'cuda' and torch.cuda.is_available() or device == 'mps' and torch.backends.mps.is_available():
        pytest.skip(f"this machine has {device}")
    one_line_error(run_script(script, f'--init_from={run}', f'--device={device}'), 'no such device')


def test_eval_refuses_bad_flags_before_work(run, tmp_path):
    for flag in ('--n=0', '--loss_tokens=0'):
        one_line_error(run_script('eval.py', f'--init_from={run}', flag), flag.split('=')[0][2:], code=2)
    proc = run_script('eval.py', f'--init_from={run}', '--lengths=64', '--dataset=none', '--tasks=niah_single_1',
                      f'--json_out={tmp_path}/missing/dir/out.json')
    one_line_error(proc, 'json_out', 'cannot write')
    assert 'RULER' not in proc.stdout  # refused before the work, not after it


@pytest.mark.parametrize('flags,named', [
    (['--model=llama3-70b', '--peak_tflops=-100'], 'peak_tflops'), (['--layers=abc'], 'layers'),
    (['--layers=0'], 'layers'), (['--hidden=0'], 'hidden'),
    (['--layers=2', '--hidden=1000', '--heads=7', '--ffn=64', '--vocab=100'], 'multiple of --heads=7'),
])
def test_plan_refuses_bad_flags(flags, named):
    one_line_error(run_script('plan.py', '--gbs=64', *flags), named, code=2)


def test_model_flags_cannot_change_on_resume(run, tmp_path):
    """--pattern and --d_model given with other values than the checkpoint's model: refused, naming
    both; the same values as the checkpoint's, and the loss weights, are accepted."""
    out = copy_of(run, tmp_path)
    one_line_error(train(out, '--init_from=resume', '--max_iters=9', '--pattern=M*', '--d_model=256'),
                   "--pattern='M*'", "'M*-E'", '--d_model=256', code=2)
    ok(train(out, '--init_from=resume', '--max_iters=7', '--eval_interval=3', '--pattern=M*-E',
             '--moe_seq_aux_coef=0.01'))
    assert [r['step'] for r in read_log(out) if 'aux_loss' in r] == [6]  # the new loss weight applies
    one_line_error(train(out, '--init_from=resume', '--max_iters=7'), 'at step 7', '--max_iters', code=2)

# -----------------------------------------------------------------------------
# 5) data files checked on open


@pytest.fixture
def dataset():
    """A throwaway byte-level data set (folder name, folder)."""
    from data.tokenizer import write_dataset
    name = f'_test_safety_{os.getpid()}'
    folder = os.path.join(ROOT, 'data', name)
    tokens = np.random.default_rng(0).integers(97, 123, size=20_000)
    write_dataset(folder, tokens[:18_000], tokens[18_000:], {'tokenizer': 'bytes', 'vocab_size': 256})
    yield name, folder
    shutil.rmtree(folder)


@pytest.mark.parametrize('fault,named', [
    ('odd-size', 'not a whole'), ('empty-val', 'not a whole'), ('no-val', 'not found'),
    ('id-too-large', 'token id 300'), ('truncated', 'meta.json records 18,000'),
])
def test_bad_data_files(dataset, tmp_path, fault, named):
    name, folder = dataset
    train_bin, val_bin = os.path.join(folder, 'train.bin'), os.path.join(folder, 'val.bin')
    if fault == 'odd-size':
        with open(train_bin, 'ab') as f:
            f.write(b'\0\0')
    elif fault == 'empty-val':
        open(val_bin, 'wb').close()
    elif fault == 'no-val':
        os.remove(val_bin)
    elif fault == 'id-too-large':
        tokens = np.fromfile(train_bin, dtype=np.uint32)
        tokens[1234] = 300
        tokens.tofile(train_bin)
    else:
        np.fromfile(train_bin, dtype=np.uint32)[:1800].tofile(train_bin)
    bad = val_bin if fault in ('empty-val', 'no-val') else train_bin
    one_line_error(train(str(tmp_path / 'out'), f'--dataset={name}'), named, bad)
