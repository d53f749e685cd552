"""
distill.py: knowledge distillation, the student trained on its teacher's output distribution as well as
on the data (Hinton et al. 2015). Minitron and Minitron-SSM (arXiv:2504.11409) recover a pruned model
this way with up to 40x fewer tokens than training it from scratch; MiniPuzzle scores its candidate
architectures by their KL to the teacher. train.py --teacher=DIR adds the term to its loss.

    loss = (1 - alpha) * LM loss + alpha * T^2 * KL(p_teacher^T || p_student^T)

p^T = softmax(logits / T); the T^2 keeps the term's gradients at the LM loss's scale as T changes.
The KL is "forward" (teacher first): the student must cover what the teacher gives mass to. It is
averaged over the positions that have a target (a loss mask's -1 positions take no part).
"""
import os

import torch
import torch.nn.functional as F

from checkpoint import CheckpointError, load_model


def load_teacher(path, student_config, device):
    """The teacher at path (a train.py out_dir, a ckpt.pt or a Hugging Face folder) in eval mode, with
    no gradients, on device. CheckpointError when it is missing or its vocabulary is not the student's."""
    if not path or not os.path.exists(path):
        raise CheckpointError(f"--teacher={path}: no such checkpoint (a train.py out_dir, a ckpt.pt or an HF folder)")
    try:
        teacher = load_model(path, torch.float32, device).eval().requires_grad_(False)
    except CheckpointError as e:
        raise CheckpointError(f"--teacher={path}: {e}") from None
    if teacher.config.vocab_size != student_config.vocab_size:
        raise CheckpointError(f"--teacher={path} has a vocabulary of {teacher.config.vocab_size} tokens, the student "
                              f"{student_config.vocab_size}: distillation compares their distributions token by token")
    return teacher


def kd_loss(student_logits, teacher_logits, targets, temperature):
    """T^2 KL(p_teacher^T || p_student^T), the mean over the positions whose target is >= 0.
    Logits (B, T, vocab), targets (B, T)."""
    keep = targets >= 0  # (B, T)
    s = F.log_softmax(student_logits[keep].float() / temperature, dim=-1)  # (n, vocab)
    t = F.log_softmax(teacher_logits[keep].float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (n,)
    return kl.mean() * temperature ** 2 if kl.numel() else student_logits.sum() * 0


def distilled(loss, logits, teacher, idx, targets, seq_idx, alpha, temperature):
    """train.py's loss with the teacher's: (1 - alpha) loss + alpha kd_loss, the teacher run without
    gradients on the same tokens (idx, seq_idx) as the student."""
    with torch.no_grad():
        teacher_logits, _ = teacher(idx, seq_idx=seq_idx)
    return (1 - alpha) * loss + alpha * kd_loss(logits, teacher_logits, targets, temperature)
