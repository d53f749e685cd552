"""
tests/test_train.py: train.py end to end, as a user runs it: subprocesses on the CPU, tiny models.
Run: python -m pytest -q tests/test_train.py        (about 1.5 minutes on an idle 2-core CPU)

Covers: the loss falls; resume is bit-identical to a straight run; 2 DDP processes (torchrun, gloo)
match 1 process after 10 steps, and so do expert-parallel runs (--ep=2 on 2 and on 4 ranks), with the sequence-wise
balance loss on; bad input exits non-zero with one clear message and loses nothing; fine-tuning
from another run's out_dir.
"""
import json, math, os, shutil, subprocess, sys

import numpy as np
import pytest
import torch

from helpers import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a hybrid with all four layer kinds, small enough for a few seconds per run
TINY = ['--d_model=32', '--pattern=M*-E', '--n_head=2', '--n_kv_head=1', '--head_dim=16', '--d_ff=64',
        '--mamba_heads=2', '--mamba_head_dim=32', '--d_state=16', '--chunk_size=16', '--n_experts=4', '--top_k=2',
        '--moe_d_ff=32', '--shared_d_ff=32', '--block_size=32', '--batch_size=4', '--eval_iters=2',
        '--log_interval=1', '--learning_rate=1e-2', '--min_lr=1e-3', '--warmup_iters=2', '--lr_decay_iters=60',
        '--sample_new_tokens=0', '--device=cpu', '--dtype=float32', '--compile=False']


# one thread per process: tiny models gain nothing from more, and two DDP ranks share the cores
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def train(out_dir, *flags, launcher=(sys.executable,), env=ENV):
    """train.py with TINY and flags: in this process (helpers.run_script) unless a launcher (torchrun)
    or an environment of its own asks for a subprocess."""
    if launcher == (sys.executable,) and env is ENV:
        return run_script('train.py', f'--out_dir={out_dir}', *TINY, *flags)
    cmd = [*launcher, 'train.py', f'--out_dir={out_dir}', *TINY, *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def failed_cleanly(proc, *words, code=None):
    """Non-zero exit (or exactly `code`), no traceback, and a message on stderr naming each word."""
    assert proc.returncode != 0 and (code is None or proc.returncode == code), (proc.returncode, proc.stderr[-2000:])
    assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    for w in words:
        assert w in proc.stderr, f"{w!r} not in stderr:\n{proc.stderr[-2000:]}"


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def step_losses(out_dir):
    """step -> training loss, the last logged value of each step (a resumed run appends to the log)."""
    return {r['step']: r['loss'] for r in read_log(out_dir) if 'loss' in r}


def load_checkpoint(out_dir):
    """The run's newest checkpoint as a plain dict, whichever layout wrote it (ckpt.pt or ckpt-<step>/)."""
    from checkpoint import newest_checkpoint, read_sharded_checkpoint
    path = newest_checkpoint(out_dir)
    return (read_sharded_checkpoint(path) if os.path.isdir(path)
            else torch.load(path, map_location='cpu', weights_only=True))


def load_model_state(out_dir):
    return load_checkpoint(out_dir)['model']


TORCHRUN = (sys.executable, '-m', 'torch.distributed.run', '--standalone')
# 10 steps of 4 micro-batches, with the balance loss on: one process, or split among 2 or 4 ranks
STEPS = 10
PARALLEL = [f'--max_iters={STEPS}', f'--eval_interval={STEPS}', '--gradient_accumulation_steps=4',
            '--moe_seq_aux_coef=0.01']


def assert_same_run(one, other, moments=1e-4, weights=1e-5):
    """Same weights, AdamW moments and logged losses: the same global batches, only the order of
    float sums differs (all-reduce vs accumulate, all-to-all vs one matmul), fp32. The AdamW moments
    drift most (measured up to 4e-5 of a tensor's largest value after 10 steps, 1e-4 with TP), the
    weights least; `moments` is their tolerance, as a fraction of each tensor's largest value,
    `weights` the weights' absolute one (beside 1e-4 relative)."""
    c1, c2 = load_checkpoint(one), load_checkpoint(other)
    assert c1['model'].keys() == c2['model'].keys()
    for k in c1['model']:  # the whole model, however many ranks held its experts
        torch.testing.assert_close(c2['model'][k], c1['model'][k], atol=weights, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    for i, s in c1['optimizer']['state'].items():  # AdamW's moments show the gradients' scale (clipping), which its
        for k, v in s.items():                       # updates mostly hide: to `moments` of each tensor's largest value
            torch.testing.assert_close(c2['optimizer']['state'][i][k], v, atol=moments * v.abs().max().item(), rtol=0,
                                       msg=lambda m: f"{i}.{k}: {m}")
    l1, l2 = step_losses(one), step_losses(other)
    assert sorted(l1) == sorted(l2) == list(range(STEPS))
    assert all(abs(l1[s] - l2[s]) < 1e-4 for s in l1), (l1, l2)
    # a restart logs some twice
    a1, a2 = ({r['step']: r['aux_loss'] for r in read_log(d) if 'loss' in r} for d in (one, other))
    assert sorted(a1) == sorted(a2) == list(range(STEPS)) and all(abs(a1[s] - a2[s]) < 1e-6 for s in a1), (a1, a2)


@pytest.fixture(scope='session', autouse=True)
def pycode():
    # train.py prepares pycode on first use; doing it once here keeps the runs below evenly timed
    if not os.path.exists(os.path.join(ROOT, 'data', 'pycode', 'meta.json')):
        ok(subprocess.run([sys.executable, '-c', 'from data.pycode.prepare import prepare; prepare()'],
                          cwd=ROOT, env=ENV, capture_output=True, text=True))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One 60-step run, shared by the tests that need a good checkpoint. Treat it as read-only."""
    out = str(tmp_path_factory.mktemp('trained'))
    proc = ok(train(out, '--max_iters=60', '--eval_interval=30', '--sample_new_tokens=20'))
    return out, proc

# -----------------------------------------------------------------------------


def test_loss_falls_and_log(trained):
    out, proc = trained
    log = read_log(out)
    head = log[0]
    assert head['config']['max_iters'] == 60 and 'git' in head and head['torch'] == torch.__version__
    assert head['device'] == 'cpu'
    losses = step_losses(out)
    assert sorted(losses) == list(range(60))
    assert losses[0] > 5.0  # ~ln(256) = 5.55 at init
    assert losses[59] < 3.5, losses  # byte-level: the model has learned at least the frequent characters
    evals = [r for r in log if 'val_loss' in r]
    assert [r['step'] for r in evals] == [0, 30, 60] and evals[-1]['val_loss'] < evals[0]['val_loss'] - 1.5
    assert set(log[2]) == {'step', 'loss', 'lr', 'dt_ms', 'tok/s', 'mfu', 'load_max_over_mean', 'busiest_share',
                           'router_entropy'} and log[2]['mfu'] is None  # n/a on CPU
    assert len(log[2]['load_max_over_mean']) == 1  # one MoE layer in M*-E, one value each
    assert 'sample:' in proc.stdout and f"final val loss {evals[-1]['val_loss']:.4f}" in proc.stdout


def test_resume_is_bit_identical(tmp_path):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    flags = ['--eval_interval=4', '--lr_decay_iters=12']  # the same schedule for both runs
    ok(train(a, *flags, '--max_iters=12'))
    ok(train(b, *flags, '--max_iters=6'))  # saves at its last step, 6, though 6 % eval_interval != 0
    ok(train(b, *flags, '--max_iters=12', '--init_from=resume'))
    sa, sb = load_model_state(a), load_model_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs after resume"
    la, lb = step_losses(a), step_losses(b)
    assert sorted(la) == sorted(lb) == list(range(12))
    assert [la[s] for s in range(6, 12)] == [lb[s] for s in range(6, 12)]
    assert [r['step'] for r in read_log(b) if 'val_loss' in r] == [0, 4, 6, 8, 12]  # no eval twice at 6
    assert sum('config' in r for r in read_log(b)) == 2  # the resumed run appended to the log
    ok(train(a, *flags, '--max_iters=2', '--overwrite=True'))  # a fresh run replacing a's: a's log goes too
    assert sum('config' in r for r in read_log(a)) == 1 and sorted(step_losses(a)) == [0, 1]


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
    """The single-process run that the DDP and EP runs must reproduce. Treat it as read-only."""
    out = str(tmp_path_factory.mktemp('one'))
    ok(train(out, *PARALLEL))
    return out


def test_ddp_two_processes_match_one(one_process, tmp_path):
    two = str(tmp_path / 'two')
    ok(train(two, *PARALLEL, launcher=(*TORCHRUN, '--nproc_per_node=2')))
    assert_same_run(one_process, two)
    assert read_log(two)[0]['world_size'] == 2


@pytest.mark.parametrize('nproc', [2, 4])
def test_expert_parallel_matches_one(one_process, nproc, tmp_path):
    """--ep=2 under torchrun (gloo): on 2 ranks the experts are split in two; on 4, two EP groups
    of 2 ranks each train on their own batches and the replicas of each half average its grads.
    Either way: the weights, optimizer state and losses of one process, a checkpoint of the whole
    model, and a sample at the end (rank 0 alone, from the gathered experts)."""
    out = str(tmp_path / 'ep')
    proc = ok(train(out, *PARALLEL, '--ep=2', '--sample_new_tokens=8',
                    launcher=(*TORCHRUN, f'--nproc_per_node={nproc}')))
    assert_same_run(one_process, out)
    assert load_model_state(out)['backbone.layers.3.mixer.experts.up_proj'].shape[0] == 4  # n_experts
    assert 'sample:' in proc.stdout


def test_finetune_from_another_run(trained, tmp_path):
    """A fine-tune starts from the other run's weights and leaves its files as they were; a model
    flag that differs from the checkpoint's model is refused (it would be ignored), and the model
    fields the new run records are the checkpoint's, not train.py's defaults."""
    src, _ = trained
    before = open(os.path.join(src, 'ckpt.pt'), 'rb').read()
    out = str(tmp_path / 'ft')
    failed_cleanly(train(out, f'--init_from={src}', '--max_iters=4', '--d_model=64', '--n_experts=8'),
                   '--d_model=64', "checkpoint's: 32", '--n_experts=8', code=2)
    ok(run_script('train.py', f'--out_dir={out}', f'--init_from={src}', '--max_iters=4', '--eval_interval=2',
                  '--eval_iters=2', '--batch_size=4', '--block_size=32', '--device=cpu', '--sample_new_tokens=0'))
    src_val = [r['val_loss'] for r in read_log(src) if 'val_loss' in r][-1]
    first = [r for r in read_log(out) if 'val_loss' in r][0]
    assert first['step'] == 0 and abs(first['val_loss'] - src_val) < 1e-4  # starts from the trained weights
    saved = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert saved['model_config']['d_model'] == saved['config']['d_model'] == read_log(out)[0]['config']['d_model'] == 32
    assert open(os.path.join(src, 'ckpt.pt'), 'rb').read() == before


def test_finetune_from_hf_folder(trained, tmp_path):
    """--init_from=<Hugging Face NemotronH folder>: the run starts from the folder's weights."""
    from model import Nemotron
    src, _ = trained
    hf = str(tmp_path / 'hf')
    Nemotron.from_pretrained(src).save_pretrained(hf)
    out = str(tmp_path / 'ft')
    ok(train(out, f'--init_from={hf}', '--max_iters=2', '--eval_interval=2'))
    src_val = [r['val_loss'] for r in read_log(src) if 'val_loss' in r][-1]
    first = [r for r in read_log(out) if 'val_loss' in r][0]
    assert first['step'] == 0 and abs(first['val_loss'] - src_val) < 1e-4

# -----------------------------------------------------------------------------
# bad input: one clear message, non-zero exit, nothing lost


def test_unknown_key_and_wrong_type(tmp_path):
    failed_cleanly(train(str(tmp_path), '--learnig_rate=1e-3'), 'learnig_rate', code=2)
    failed_cleanly(train(str(tmp_path), '--batch_size=big'), 'batch_size', code=2)


def test_missing_dataset(tmp_path):
    failed_cleanly(train(str(tmp_path), '--dataset=no_such_data'), 'no_such_data')


def test_block_size_larger_than_data(tmp_path):
    failed_cleanly(train(str(tmp_path), '--block_size=10000000'), 'block_size')


def test_expert_parallel_bad_flags(tmp_path):
    failed_cleanly(train(str(tmp_path), '--ep=2'), 'ep=2', 'torchrun')  # one process cannot hold half the experts
    # under torchrun the launcher adds a traceback of its own: none may come from train.py
    proc = train(str(tmp_path), '--ep=2', '--n_experts=3', '--gradient_accumulation_steps=2',
                 launcher=(*TORCHRUN, '--nproc_per_node=2'))
    assert proc.returncode != 0 and 'ep=2 must divide n_experts=3' in proc.stderr, proc.stderr[-2000:]
    assert 'train.py", line' not in proc.stderr, proc.stderr[-2000:]


def test_resume_without_checkpoint(tmp_path):
    failed_cleanly(train(str(tmp_path), '--init_from=resume'), 'no checkpoint')


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path):
    path = tmp_path / 'ckpt.pt'
    garbage = b'not a checkpoint\x00' * 100
    path.write_bytes(garbage)
    failed_cleanly(train(str(tmp_path), '--init_from=resume', '--max_iters=10'), 'ckpt.pt')
    assert path.read_bytes() == garbage


def test_nan_stops_without_overwriting_checkpoint(trained, tmp_path):
    out = str(tmp_path / 'diverge')
    shutil.copytree(trained[0], out)
    ckpt = os.path.join(out, 'ckpt.pt')
    before, mtime = open(ckpt, 'rb').read(), os.stat(ckpt).st_mtime_ns
    # lr 1e30: the first update sends the weights to ~1e30 and the next forward overflows to inf/nan
    proc = train(out, '--init_from=resume', '--max_iters=70', '--eval_interval=5', '--learning_rate=1e30',
                 '--lr_decay_iters=1000')  # past the trained run's schedule: the stable phase, at 1e30
    failed_cleanly(proc, 'diverged')
    assert open(ckpt, 'rb').read() == before and os.stat(ckpt).st_mtime_ns == mtime
    assert not os.path.exists(ckpt + '.tmp')


@pytest.mark.parametrize('config', [None, 'config/tiny_cpu.py', 'config/pycode_attention_only.py'])
def test_shipped_configs_run(config, tmp_path):
    """The README's `python train.py` (default model) and the shipped CPU configs build and take
    a few steps, ending with a sample: a later change of defaults cannot silently break them."""
    proc = ok(run_script('train.py', *([config] if config else []), f'--out_dir={tmp_path}', '--max_iters=2',
                         '--eval_interval=2', '--eval_iters=1', '--sample_new_tokens=8'))
    assert 'final val loss' in proc.stdout and 'sample:' in proc.stdout


def test_latent_moe_configs_are_the_same_size(tmp_path):
    """The LatentMoE experiment (docs/moe.md): config/moe_latent.py has exactly the total and active
    parameters of config/moe_standard.py, and both train and sample."""
    heads = []
    for config in ('config/moe_standard.py', 'config/moe_latent.py'):
        out = str(tmp_path / os.path.basename(config))
        proc = ok(run_script('train.py', config, f'--out_dir={out}', '--max_iters=2', '--eval_interval=2',
                             '--eval_iters=1', '--sample_new_tokens=8'))
        assert 'sample:' in proc.stdout and 'MoE layers: 35% of training FLOPs/token' in proc.stdout
        heads.append(read_log(out)[0])
    assert heads[0]['config']['n_experts'] * 4 == heads[1]['config']['n_experts']
    for key in ('params', 'active_params', 'moe_flops_share', 'moe_param_share'):
        assert heads[0][key] == heads[1][key], key


@pytest.fixture
def docs_dataset():
    """A throwaway data set of short byte documents, each started by an end-of-text id 256."""
    from data.tokenizer import write_dataset
    name = f'_test_docs_{os.getpid()}'
    folder = os.path.join(ROOT, 'data', name)
    g = np.random.default_rng(0)
    docs = [np.concatenate([[256], g.integers(97, 123, size=g.integers(5, 60))]) for _ in range(400)]
    tokens = np.concatenate(docs)
    cut = len(tokens) * 9 // 10
    write_dataset(folder, tokens[:cut], tokens[cut:], {'tokenizer': 'bytes', 'vocab_size': 257, 'eot': 256})
    yield name
    shutil.rmtree(folder)


# the weights never move (learning rate 0, no MoE bias steps): the checkpoint at the end holds the
# weights every logged loss was computed with, so the test can compute them again by hand
FROZEN = ['--learning_rate=0', '--min_lr=0', '--moe_bias_rate=0']


def drawn_batch(dataset, split, key, seed=1337, batch_size=4, block_size=32):
    """The batch train.py's get_batch(split, key, 0, 1) draws: np.random.default_rng([seed, *key])
    offsets into data/<dataset>/<split>.bin (train.py's defaults and TINY's sizes)."""
    data = np.memmap(os.path.join(ROOT, 'data', dataset, f'{split}.bin'), dtype=np.uint32, mode='r')
    ix = np.random.default_rng([seed, *key]).integers(0, len(data) - block_size, size=batch_size)
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    return x, y


def test_doc_masking(docs_dataset, tmp_path):
    """--doc_masking: the val loss train.py logs is the model's loss with each end-of-text token
    starting a document (seq_idx = cumsum of eot, so Mamba state, conv and attention restart there;
    test_model.py checks that the model then matches separate forwards), to 1e-5 (fp32, the same
    batches); without the flag, the loss of the unmasked forward. The two differ by far more than
    that, so the check has teeth. Data without 'eot' is refused."""
    from model import Nemotron
    vals = {}
    for flag in (True, False):
        out = str(tmp_path / str(flag))
        ok(train(out, f'--dataset={docs_dataset}', f'--doc_masking={flag}', '--max_iters=2', '--eval_interval=2',
                 '--init_std=0.3', *FROZEN))  # large weights: what a token sees moves the loss
        vals[flag] = [r['val_loss'] for r in read_log(out) if 'val_loss' in r][-1]
        model = Nemotron.from_pretrained(out).eval()
        by_hand = {}
        with torch.no_grad():
            for masked in (True, False):
                total = 0.0
                for k in range(2):  # eval_iters=2 val batches, keys (2, k)
                    x, y = drawn_batch(docs_dataset, 'val', (2, k))
                    total += model(x, y, seq_idx=(x == 256).cumsum(1) if masked else None)[1].item()
                by_hand[masked] = total / 2
        assert abs(vals[flag] - by_hand[flag]) < 1e-5, (flag, vals[flag], by_hand)
        assert abs(by_hand[True] - by_hand[False]) > 5e-3, by_hand  # measured 0.019
    failed_cleanly(train(str(tmp_path / 'p'), '--doc_masking=True'), 'eot')


@pytest.fixture
def masked_dataset():
    """A throwaway loss-masked data set: random letters in which each '!' is followed by 'z'; the
    loss mask (train.mask, val.mask) marks those 'z's alone as targets."""
    from data.tokenizer import write_dataset
    name = f'_test_mask_{os.getpid()}'
    folder = os.path.join(ROOT, 'data', name)
    g = np.random.default_rng(0)
    tokens = g.integers(97, 123, size=40_000)
    bang = np.arange(5, len(tokens) - 1, 7)
    tokens[bang], tokens[bang + 1] = ord('!'), ord('z')
    mask = np.zeros(len(tokens), dtype=np.uint8)
    mask[bang + 1] = 1
    cut = len(tokens) * 9 // 10
    write_dataset(folder, tokens[:cut], tokens[cut:], {'tokenizer': 'bytes', 'vocab_size': 256},
                  masks=(mask[:cut], mask[cut:]))
    yield name, folder
    shutil.rmtree(folder)


def test_loss_mask(masked_dataset, tmp_path):
    """A data set with loss masks trains on the marked tokens only: the '!' -> 'z' rule is learnt
    to a small loss, which the random letters (ln 26 = 3.26 nats) would never allow if they counted.
    A window without any target gives loss 0, not nan. meta.json's loss_mask without the mask files
    is refused with a message."""
    from model import cross_entropy
    assert cross_entropy(torch.randn(2, 3, 5), torch.full((2, 3), -1)).item() == 0.0
    name, folder = masked_dataset
    out = str(tmp_path / 'm')
    ok(train(out, f'--dataset={name}', '--max_iters=40', '--eval_interval=40'))
    val = [r['val_loss'] for r in read_log(out) if 'val_loss' in r]
    assert val[-1] < 1.0, val
    os.remove(os.path.join(folder, 'val.mask'))
    failed_cleanly(train(str(tmp_path / 'x'), f'--dataset={name}'), 'loss_mask', 'val.mask')


def test_mtp_depths_train_and_log(tmp_path):
    """--mtp_depth: the log carries each depth's loss and the logged training loss is the main loss
    plus lambda times their mean, each equal (1e-5, fp32, the same batch) to what the checkpoint's
    weights give on the step's batch by hand; the checkpoint holds the MTP weights of both depths
    (sample.py drafts with them). A second run shows that the MTP weights do train."""
    from model import Nemotron
    out = str(tmp_path / 'mtp')
    ok(train(out, '--mtp_depth=2', '--mtp_loss_weight=0.5', '--max_iters=3', '--eval_interval=3', *FROZEN))
    rows = {r['step']: r for r in read_log(out) if 'mtp_losses' in r}
    assert sorted(rows) == [0, 1, 2] and all(len(r['mtp_losses']) == 2 for r in rows.values())
    model = Nemotron.from_pretrained(out).eval()
    x, y = drawn_batch('pycode', 'train', (0, 0))  # step 0's one micro-batch
    with torch.no_grad():
        main = model(x, y)[1].item()  # eval mode: the main model's loss alone
        mtp = [l.item() for l in model.mtp_loss(model.hidden(x), x, y)]
    assert all(abs(a - b) < 1e-5 for a, b in zip(rows[0]['mtp_losses'], mtp)), (rows[0], mtp)
    assert abs(rows[0]['loss'] - (main + 0.5 * sum(mtp) / 2)) < 1e-5, (rows[0]['loss'], main, mtp)
    assert {k.split('.')[1] for k in load_model_state(out) if k.startswith('mtp.')} == {'0', '1'}
    trained = str(tmp_path / 'trained')
    ok(train(trained, '--mtp_depth=2', '--max_iters=3', '--eval_interval=3'))
    before, after = load_model_state(out), load_model_state(trained)
    fusions = [k for k in before if k.startswith('mtp.') and k.endswith('eh_proj.weight')]
    assert len(fusions) == 2 and all(not torch.equal(before[k], after[k]) for k in fusions)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    """--dtype=bfloat16, the GPU default, runs the same autocast on a CPU: the losses are bf16's
    (not bit-equal to an fp32 run's, so autocast is on) and close to them (within 0.01 nats over
    4 steps; measured 2e-4 to 9e-4), the master weights and the checkpoint stay fp32, and no
    "applies on CUDA only" note appears."""
    losses = {}
    for dtype in ('float32', 'bfloat16'):
        out = str(tmp_path / dtype)
        proc = ok(train(out, f'--dtype={dtype}', '--max_iters=4', '--eval_interval=4'))
        assert 'note: dtype' not in proc.stdout
        losses[dtype] = step_losses(out)
    assert sorted(losses['bfloat16']) == list(range(4))
    assert losses['bfloat16'] != losses['float32']
    assert all(abs(losses['bfloat16'][s] - losses['float32'][s]) < 0.01 for s in range(4)), losses
    assert all(v.dtype == torch.float32 for v in load_model_state(str(tmp_path / 'bfloat16')).values()
               if v.is_floating_point())


def test_resume_keeps_the_best_val_loss(tmp_path):
    """always_save_checkpoint=False saves only when val loss improves, and a resumed run must know the
    best val loss so far: resumed with frozen weights, its next eval gives exactly the saved val loss,
    which is no improvement, so the step-4 checkpoint stays (a run that forgot its best would
    overwrite it at step 6)."""
    out = str(tmp_path / 'best')
    flags = ['--eval_interval=2', '--always_save_checkpoint=False']
    ok(train(out, *flags, '--max_iters=4'))
    saved = load_checkpoint(out)
    assert saved['iter_num'] == 4 and saved['best_val_loss'] == [r['val_loss'] for r in read_log(out)
                                                                  if 'val_loss' in r][-1]
    ok(train(out, *flags, '--max_iters=6', '--init_from=resume', *FROZEN))
    evals = [r for r in read_log(out) if 'val_loss' in r]
    assert evals[-1]['step'] == 6 and evals[-1]['val_loss'] == saved['best_val_loss']
    assert load_checkpoint(out)['iter_num'] == 4
