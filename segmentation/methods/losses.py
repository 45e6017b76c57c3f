"""Per-pixel losses of the MiB family, written from the formulas in the MiB paper and code.

Every function returns a per-pixel loss map (N x H x W) so the caller decides how to average it. Averaging goes through
`global_mean`, which divides by the number of valid pixels of the GLOBAL batch: a 2-rank run then computes the same
gradient as a 1-rank run of the same samples, even when the ranks hold different numbers of ignored pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from segmentation.utils import dist

IGNORE_INDEX = 255


def global_mean(loss_map: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `loss_map` over the valid pixels of all ranks (DDP then averages gradients over ranks)."""
    if valid is None:
        valid = torch.ones_like(loss_map, dtype=torch.bool)
    local_sum = (loss_map * valid).sum()
    count = valid.sum().to(torch.float64).detach()
    dist.all_reduce_sum(count)
    return local_sum * dist.get_world_size() / count.clamp(min=1.0).to(loss_map.dtype)


def cross_entropy_map(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")


def log_partition(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, logsumexp over classes N x H x W): computed once when UNCE and UNKD both need them."""
    logits = logits.float()
    return logits, torch.logsumexp(logits, dim=1)


def unbiased_cross_entropy_map(logits: torch.Tensor, labels: torch.Tensor, num_old: int,
                               log_den: torch.Tensor | None = None) -> torch.Tensor:
    """MiB's UNCE: background absorbs every old class, log p(bg) = logsumexp over old channels - logsumexp over all.

    Labels of old classes (which read as background in the new data anyway) are folded into background too.
    `log_den`: the logsumexp over all channels, when the caller has it (see log_partition).
    """
    if num_old == 0:
        return cross_entropy_map(logits, labels)
    if log_den is None:
        logits, log_den = log_partition(logits)
    log_den = log_den.unsqueeze(1)
    log_bg = torch.logsumexp(logits[:, :num_old], dim=1, keepdim=True) - log_den
    log_new = logits[:, num_old:] - log_den
    log_probs = torch.cat([log_bg, torch.zeros_like(logits[:, 1:num_old]), log_new], dim=1)
    labels = torch.where(labels < num_old, torch.zeros_like(labels), labels)
    return F.nll_loss(log_probs, labels, ignore_index=IGNORE_INDEX, reduction="none")


def knowledge_distillation_map(logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """LwF/ILT KD as MiB implements it: the MEAN (not sum) over old channels of -q_c log p_c."""
    num_old = teacher_logits.shape[1]
    log_p = torch.log_softmax(logits[:, :num_old].float(), dim=1)
    q = torch.softmax(teacher_logits.float() * alpha, dim=1)
    return -(q * log_p).mean(dim=1)


def unbiased_knowledge_distillation_map(
    logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 1.0, log_den: torch.Tensor | None = None
) -> torch.Tensor:
    """MiB's UNKD: new classes fold into the student's background before matching the teacher.

    p~_bg = logsumexp over {bg} u new - logsumexp over all; p~_c = x_c - logsumexp over all for old c >= 1;
    loss = -(q_0 p~_bg + sum_{c>=1} q_c p~_c) / C_old, with q = softmax(alpha * teacher logits).
    """
    num_old = teacher_logits.shape[1]
    if log_den is None:
        logits, log_den = log_partition(logits)
    bg_and_new = torch.cat([logits[:, :1], logits[:, num_old:]], dim=1)
    log_bg = torch.logsumexp(bg_and_new, dim=1) - log_den
    log_old = logits[:, 1:num_old] - log_den.unsqueeze(1)
    q = torch.softmax(teacher_logits.float() * alpha, dim=1)
    weighted = q[:, 0] * log_bg + (q[:, 1:] * log_old).sum(dim=1)
    return -weighted / num_old


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 (autocast outputs) -> float32 for a loss; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def bce_map(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-pixel sum over classes of BCE(x_c, onehot(y)_c) (MiB's BCEWithLogitsLossWithIgnoreIndex before its
    reduction; WILSON's --bce, LwF-MC); 0 on ignored pixels."""
    valid = labels != IGNORE_INDEX
    onehot = F.one_hot(torch.where(valid, labels, 0), logits.shape[1]).permute(0, 3, 1, 2).to(torch.float32)
    return F.binary_cross_entropy_with_logits(upcast(logits), onehot, reduction="none").sum(1) * valid


def bce_with_ignore(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bce_map averaged over the valid pixels of the global batch."""
    return global_mean(bce_map(logits, labels), labels != IGNORE_INDEX)


def feature_distillation(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """MSE between the new and the old model's features (ILT's and WILSON's --loss_de term)."""
    return F.mse_loss(upcast(features), upcast(old_features))
