"""
tests/test_dist.py: train.py's parallel layouts on the CPU (torchrun, gloo, 2 processes), against one process.
Run: python -m pytest -q tests/test_dist.py        (a few minutes on a 2-core CPU: every run starts torch twice)

Covers (issue 7): FSDP2 (with --recompute), TP=2 + sequence parallelism (with --recompute) and TP=2 + FSDP2 each end
10 steps with the weights, AdamW moments and losses of one process on the same global batches (DDP and EP=2 with DDP
are test_train.py's); a sharded checkpoint saved by EP=2 + FSDP2 on 2 ranks (5 steps that match one process)
resumes in one process and with TP=2, and from_pretrained / sample.py read it; a rank killed mid-run under
torchrun --max-restarts=1 resumes (into EP=2 + FSDP2) from the newest checkpoint and ends like the straight
run; two "nodes" of one process each (c10d rendezvous on localhost); layouts that cannot work exit with one
clear message.
"""
import os, shutil, socket, subprocess, sys

import pytest

from test_train import (ENV, PARALLEL, ROOT, STEPS, TINY, TORCHRUN, assert_same_run, failed_cleanly, load_checkpoint,
                        ok, read_log, step_losses, train)

# every size TP splits divides by 2: heads, KV heads, Mamba heads and groups, MLP width
DIST = [*PARALLEL, '--n_kv_head=2', '--mamba_groups=2']
TWO = (*TORCHRUN, '--nproc_per_node=2')


@pytest.fixture(scope='module')
def one(tmp_path_factory):
    """The single-process run that every layout must reproduce. Treat it as read-only."""
    out = str(tmp_path_factory.mktemp('one'))
    ok(train(out, *DIST))
    return out


@pytest.mark.parametrize('flags', [['--fsdp=True', '--recompute=True'], ['--tp=2', '--sp=True', '--recompute=True'],
                                   ['--tp=2', '--fsdp=True']], ids=['fsdp+recompute', 'tp+sp+recompute', 'tp+fsdp'])
def test_layout_matches_one(one, flags, tmp_path):
    """fp32, only the order of float sums differs: weights to 1e-5 abs + 1e-4 rel, losses to 1e-4,
    AdamW moments to 1e-4 of each tensor's largest value (assert_same_run; TP below). tp=2 on 2 ranks leaves
    one data-parallel replica: TP+FSDP runs FSDP2 over a dp dimension of size 1 (the 2-D mesh and
    DTensor placements are exercised; the memory saving is not).
    Sequence parallelism sums the attention input's gradient in another order (q, k and v's parts
    added on each rank, then one reduce-scatter, where TP all-reduces each): the first step's
    gradients agree to 7e-7 of each tensor's largest, but AdamW carries the difference on, and the
    small attention q/k moments end 1.7e-4 apart after 10 steps (plain TP: 1e-4). How far depends on
    the CPU's float kernels: on an AMD EPYC VM, 1.0e-4 (TP) and 1.7e-4 (SP) for the moments and weights
    within 1e-5 + 1e-4 rel; on an Intel Xeon VM, 1.7e-4 and 2.9e-4, and one embedding weight 1.4e-5
    past 1e-4 rel. TP layouts get 3e-4 (SP 5e-4) and 3e-5 abs: a wrong gradient scale or a shard
    summed twice moves them by orders of magnitude more.
    --recompute with --tp is a regression check: a recompute stopped early skipped the Mamba hook
    that swaps the DTensor parameters back (AttributeError: 'Tensor' object has no attribute 'to_local')."""
    out = str(tmp_path / 'run')
    proc = ok(train(out, *DIST, *flags, launcher=TWO))
    tp = '--tp=2' in flags
    assert_same_run(one, out, moments=(5e-4 if '--sp=True' in flags else 3e-4) if tp else 1e-4,
                    weights=3e-5 if tp else 1e-5)
    assert os.path.isdir(os.path.join(out, f'ckpt-{STEPS}')) and not os.path.exists(os.path.join(out, 'ckpt.pt'))
    assert 'params+optimizer per rank' in proc.stdout


def test_checkpoint_resumes_in_another_layout(one, tmp_path):
    """Saved by EP=2 + FSDP2 on 2 ranks at step 5 (sharded, DCP; FSDP2 shards all but the routed
    experts, which EP splits), whose 5 steps match one process; resumed to step 10 by one process and
    by TP=2: both end as the straight run. from_pretrained and sample.py read the sharded checkpoint."""
    fsdp = str(tmp_path / 'fsdp')
    ok(train(fsdp, *DIST, '--fsdp=True', '--ep=2', '--max_iters=5', launcher=TWO))
    assert sorted(os.listdir(fsdp)) == ['ckpt-5', 'log.jsonl', 'meta.json']  # no *.tmp left behind
    l1, l2 = step_losses(one), step_losses(fsdp)
    assert sorted(l2) == list(range(5)) and all(abs(l1[s] - l2[s]) < 1e-4 for s in l2), (l1, l2)
    from model import Nemotron
    model = Nemotron.from_pretrained(fsdp)
    assert set(model.state_dict()) == set(load_checkpoint(fsdp)['model'])
    assert model.state_dict()['backbone.layers.3.mixer.experts.up_proj'].shape[0] == 4  # every expert
    sample = subprocess.run([sys.executable, 'sample.py', f'--init_from={fsdp}', '--max_new_tokens=5', '--device=cpu'],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    ok(sample)
    for name, launcher in (('single', (sys.executable,)), ('tp', TWO)):
        out = str(tmp_path / name)
        shutil.copytree(fsdp, out)
        extra = ['--tp=2'] if name == 'tp' else []
        ok(train(out, *DIST, *extra, '--init_from=resume', launcher=launcher))
        assert_same_run(one, out)


def test_restart_after_killed_rank(one, tmp_path):
    """Rank 1 dies (os._exit) before step 7 on the first attempt; torchrun --max-restarts=1 starts
    both ranks again, --init_from=auto resumes from the newest complete checkpoint (step 5), and the
    run ends with the weights and losses of the straight run. EP=2 + FSDP2: the resume reads the
    whole state and keeps this rank's experts and FSDP shards."""
    out = str(tmp_path / 'restart')
    proc = train(out, *DIST, '--fsdp=True', '--ep=2', '--eval_interval=5', '--init_from=auto',
                 launcher=(*TWO, '--max-restarts=1'), env={**ENV, 'TEST_CRASH_AT_STEP': '7'})
    ok(proc)
    heads = [r for r in read_log(out) if 'config' in r]
    assert [h['start_iter'] for h in heads] == [0, 5]  # the second attempt resumed at step 5
    assert_same_run(one, out)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_nodes(one, tmp_path):
    """Two torchrun invocations, --nnodes=2 of one process each, meet at a c10d rendezvous on
    localhost (what two machines do with --rdzv_endpoint=<node 0's address>): DDP over both."""
    out, port = str(tmp_path / 'nodes'), free_port()
    cmd = lambda rank: [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1',
                        f'--node_rank={rank}', '--rdzv_backend=c10d', f'--rdzv_endpoint=127.0.0.1:{port}',
                        '--rdzv_id=test', 'train.py', f'--out_dir={out}', *TINY, *DIST]
    nodes = [subprocess.Popen(cmd(r), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    for node in nodes:
        stdout, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    assert read_log(out)[0]['world_size'] == 2
    assert_same_run(one, out)


def test_bad_layouts(tmp_path):
    """Layouts that cannot work: one message, non-zero exit, no traceback from train.py."""
    failed_cleanly(train(str(tmp_path), '--tp=2'), 'tp=2', 'torchrun')
    failed_cleanly(train(str(tmp_path), '--fsdp=True'), 'fsdp', 'torchrun')
    failed_cleanly(train(str(tmp_path), '--sp=True'), 'sp=True', '--tp')
    proc = train(str(tmp_path), *DIST, '--tp=2', '--n_kv_head=1', launcher=TWO)  # one KV head cannot be split
    assert proc.returncode != 0 and 'tp=2 must divide n_head=2 and n_kv_head=1' in proc.stderr, proc.stderr[-2000:]
    assert 'train.py", line' not in proc.stderr, proc.stderr[-2000:]
