"""
Tests for knowledge distillation (distill.py, train.py --teacher): the KL term against a hand
computation and its gradient against the closed form; train.py with a teacher end to end (a student
that starts as its teacher has a KL of 0; distillation pulls a student toward its teacher); under
torchrun with DDP and FSDP2; bad teachers refused before training.

Run: python -m pytest -q tests/test_distill.py     (about a minute on 2 cores)
"""
import math
import os

import numpy as np
import pytest
import torch

from distill import kd_loss
from parallel import check_layout
from test_train import ROOT, TORCHRUN, failed_cleanly, ok, pycode, read_log, train  # noqa: F401 (pycode: autouse)


def test_kd_loss_by_hand():
    """Two positions of three logits at T = 2, a third position masked out (target -1)."""
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [9.0, 9.0, 9.0]]])
    t = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 9.0]]])
    targets = torch.tensor([[1, 2, -1]])
    T = 2.0
    total = 0.0
    for b in range(2):
        ps = [math.exp(v / T) for v in s[0, b].tolist()]
        pt = [math.exp(v / T) for v in t[0, b].tolist()]
        ps, pt = [x / sum(ps) for x in ps], [x / sum(pt) for x in pt]
        total += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    assert math.isclose(kd_loss(s, t, targets, T).item(), T * T * total / 2, rel_tol=1e-5)
    assert kd_loss(t, t, targets, T).item() == pytest.approx(0.0, abs=1e-7)  # the teacher itself: 0


def test_kd_gradient_is_the_closed_form():
    """d/ds of T^2 KL(p_t || softmax(s / T)), averaged over n positions: T (softmax(s/T) - p_t) / n."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g, requires_grad=True), torch.randn(2, 5, 7, generator=g)
    T = 1.5
    kd_loss(s, t, torch.zeros(2, 5, dtype=torch.long), T).backward()
    expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1)) / 10
    torch.testing.assert_close(s.grad, expected, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('teacher'))
    ok(train(out, '--max_iters=30', '--eval_interval=30'))
    return out


def test_a_student_that_is_its_teacher_starts_at_kl_zero(teacher, tmp_path):
    """--init_from=teacher --teacher=teacher --distill_alpha=1: the loss is the KL alone, 0 at the
    first step; the teacher's files are left as they were."""
    out = str(tmp_path / 'student')
    ok(train(out, f'--init_from={teacher}', f'--teacher={teacher}', '--distill_alpha=1', '--distill_temp=2',
             '--max_iters=3', '--eval_interval=3'))
    first = [r for r in read_log(out) if 'loss' in r][0]
    assert first['step'] == 0 and first['loss'] < 1e-5, first


def test_distillation_pulls_a_fresh_student_toward_its_teacher(teacher, tmp_path):
    """A fresh student (another seed) distilled with alpha = 1 ends closer to the teacher's logits on
    pycode's val text than the same student trained on the data alone for the same steps (measured:
    KL 0.086 against 0.293)."""
    from model import Nemotron
    data = np.memmap(os.path.join(ROOT, 'data', 'pycode', 'val.bin'), dtype=np.uint32, mode='r')
    x = torch.from_numpy(np.stack([data[i:i + 32] for i in range(0, 32 * 64, 32)]).astype(np.int64))  # (64, 32)
    kl = {}
    for name, flags in (('data', []), ('distilled', [f'--teacher={teacher}', '--distill_alpha=1'])):
        out = str(tmp_path / name)
        ok(train(out, '--seed=7', '--max_iters=30', '--eval_interval=30', *flags))
        student, ref = Nemotron.from_pretrained(out).eval(), Nemotron.from_pretrained(teacher).eval()
        with torch.no_grad():
            kl[name] = kd_loss(student(x)[0], ref(x)[0], torch.zeros_like(x), 1.0).item()
    assert kl['distilled'] < 0.5 * kl['data'], kl


def test_distillation_keeps_the_mtp_and_moe_terms(teacher, tmp_path):
    """A student with an MTP depth and the sequence-wise MoE balance loss, distilled: both terms are
    still logged (the MTP loss inside the LM part, the balance loss added apart)."""
    out = str(tmp_path / 'mtp')
    ok(train(out, f'--teacher={teacher}', '--mtp_depth=1', '--moe_seq_aux_coef=1e-3', '--max_iters=3',
             '--eval_interval=3'))
    logged = [r for r in read_log(out) if 'loss' in r]
    assert all(len(r['mtp_losses']) == 1 and math.isfinite(r['mtp_losses'][0]) for r in logged), logged[0]
    assert all(r.get('aux_loss', 0) > 0 for r in logged), logged[0]


@pytest.mark.parametrize('fsdp', [False, True])
def test_distillation_under_torchrun(teacher, fsdp, tmp_path):
    """2 ranks (gloo), DDP or FSDP2, each with the whole teacher: the run ends, its losses finite."""
    out = str(tmp_path / 'two')
    ok(train(out, f'--teacher={teacher}', '--max_iters=4', '--eval_interval=4', '--gradient_accumulation_steps=2',
             f'--fsdp={fsdp}', launcher=(*TORCHRUN, '--nproc_per_node=2')))
    losses = [r['loss'] for r in read_log(out) if 'loss' in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


def test_bad_teachers_are_refused_before_training(teacher, tmp_path):
    failed_cleanly(train(str(tmp_path / 'a'), f'--teacher={tmp_path / "nowhere"}'), 'no such checkpoint', code=2)
    failed_cleanly(train(str(tmp_path / 'b'), f'--teacher={teacher}', '--vocab_size=300'), 'vocabulary of 256',
                   code=2)
    assert 'not with --tp' in check_layout(2, 2, 1, False, True, True, 32, 2, 'bf16', False, teacher=True)
