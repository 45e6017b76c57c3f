"""Segmentation metrics from a confusion matrix, with the conventions of the class-incremental papers.

Conventions (those of MiB's, PLOP's and WILSON's metrics/stream_metrics.py):
- Indices are in LEARNING ORDER (model output channel k = task.seen_classes(step)[k]); target 255 and any target
  >= num_classes (e.g. future classes left in the label) are ignored, as in StreamSegMetrics (`0 <= gt < n`).
- matrix[t, p] counts pixels of ground-truth class t predicted as p (rows = ground truth).
- IoU_c = TP / (TP + FP + FN), computed exactly (no 1e-6 epsilon). A class with no ground-truth pixel
  (gt_sum == 0) has IoU None and is left out of every mean: "mIoU = mean over classes present in the GT" (MiB,
  PLOP, WILSON). SSUL, and CIL for a class it predicts, count such classes as 0; we do not.
- miou_old / miou_new: indices [0, num_old) / [num_old, n). "Old" INCLUDES background (PLOP/RCIL/SSUL tables,
  e.g. VOC 15-1 "0-15"). miou_old_fg excludes background, indices [1, num_old) (MiB paper, "1-15"); for a
  dataset without background it equals miou_old. A mean over no present class is None (e.g. miou_new at step 0).
- miou_h (hIoU, DKD's and STAR's tables) = 2 old new / (old + new), the harmonic mean of miou_old and miou_new: high
  only when both are; 0 when either is 0, None while there is no new class.
- pixel_acc = trace / total; mean_acc = mean over present classes of TP / gt_sum.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


class ConfusionMatrix:
    """num_classes x num_classes int64 counts kept on `device`, so per-batch updates never leave the GPU."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: pred and target of the same shape (any), integer class indices in learning order."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        n = self.num_classes
        target = target.reshape(-1).to(device=self.matrix.device, dtype=torch.int64)
        pred = pred.reshape(-1).to(device=self.matrix.device, dtype=torch.int64)
        valid = (target >= 0) & (target < n)
        target, pred = target[valid], pred[valid]
        if pred.numel() == 0:
            return
        lo, hi = torch.aminmax(pred)
        # A prediction outside [0, n) would silently land in another cell of the flattened matrix.
        if bool((lo < 0) | (hi >= n)):  # one device sync
            raise ValueError(f"predictions must be in [0, {n}), got range [{lo.item()}, {hi.item()}]")
        self.matrix += torch.bincount(n * target + pred, minlength=n * n).view(n, n)

    def all_reduce(self) -> None:
        """Sum over ranks (every rank gets the totals); a no-op without an initialised process group."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def compute(self, class_names: list[str] | tuple[str, ...], num_old: int, *,
                has_background: bool = True) -> dict[str, Any]:
        """Metrics dict; class_names[k] names learning-order index k, num_old = how many leading indices are "old"."""
        n = self.num_classes
        if len(class_names) != n:
            raise ValueError(f"{len(class_names)} class names for a {n}-class confusion matrix")
        if not 0 <= num_old <= n:
            raise ValueError(f"num_old must be in [0, {n}], got {num_old}")
        cm = self.matrix.detach().cpu().numpy().astype(np.int64)
        tp = np.diag(cm).astype(np.float64)
        gt = cm.sum(axis=1).astype(np.float64)
        predicted = cm.sum(axis=0).astype(np.float64)
        present = gt > 0
        iou = np.full(n, np.nan)
        acc = np.full(n, np.nan)
        iou[present] = tp[present] / (gt[present] + predicted[present] - tp[present])
        acc[present] = tp[present] / gt[present]
        total = cm.sum()
        old_fg_start = 1 if has_background else 0
        return {
            "miou_all": _mean(iou, 0, n),
            "miou_old": _mean(iou, 0, num_old),
            "miou_new": _mean(iou, num_old, n),
            "miou_h": harmonic_iou(_mean(iou, 0, num_old), _mean(iou, num_old, n)),
            "miou_old_fg": _mean(iou, old_fg_start, num_old),
            "pixel_acc": float(tp.sum() / total) if total else None,
            "mean_acc": _mean(acc, 0, n),
            "class_iou": {name: _opt(v) for name, v in zip(class_names, iou)},
            "class_acc": {name: _opt(v) for name, v in zip(class_names, acc)},
            "num_old": num_old,
            "has_background": has_background,
            "num_pixels": int(total),
            "confusion_matrix": cm.tolist(),
        }


def named_groups(parts: list[tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """CIL's evaluation groups from learning-order index parts (Task.group_parts: each step's classes, tasks counted
    from 1 as in CIL): "k" -> part k-1 alone ("Task k"), "1-k" -> the union of parts 0..k-1 ("Task 1u...uk", k >= 2),
    in CIL's order of columns."""
    groups: dict[str, tuple[int, ...]] = {}
    union: tuple[int, ...] = ()
    for k, part in enumerate(parts):
        groups[str(k + 1)] = tuple(part)
        union = union + tuple(part)
        if k > 0:
            groups[f"1-{k + 1}"] = union
    return groups


def group_argmax(logits: torch.Tensor, indices: tuple[int, ...]) -> torch.Tensor:
    """CIL's "Task k" prediction: the argmax among the group's channels only, as a learning-order index."""
    channels = torch.as_tensor(indices, device=logits.device)
    return channels[logits.index_select(1, channels).argmax(dim=1)]


def group_target(label: torch.Tensor, indices: tuple[int, ...]) -> torch.Tensor:
    """The label with every class outside the group ignored (255)."""
    inside = torch.isin(label, torch.as_tensor(indices, device=label.device))
    return torch.where(inside, label, torch.full_like(label, 255))


def group_miou(matrix: "ConfusionMatrix", indices: tuple[int, ...]) -> float | None:
    """mIoU over the group's classes present in the ground truth of a group's confusion matrix."""
    idx = list(indices)
    cm = matrix.matrix.detach().cpu().numpy().astype(np.float64)[np.ix_(idx, idx)]
    tp, gt, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    present = gt > 0
    return float((tp[present] / (gt[present] + predicted[present] - tp[present])).mean()) if present.any() else None


def resize_prediction(pred: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x h x w class indices at `size` (nearest): CIL scores its 512x1024 predictions against full-size labels."""
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    return F.interpolate(pred[:, None].float(), size=size, mode="nearest")[:, 0].to(pred.dtype)


def predictions_at_label_size(pred: torch.Tensor, label: torch.Tensor, label_size: torch.Tensor | None = None
                              ) -> torch.Tensor:
    """The prediction resized to the label's own size. `label_size` (N x 2): labels of different sizes padded
    with 255 to one batch (transforms.collate_eval); each prediction is resized to its own label's size."""
    if label_size is None:
        return resize_prediction(pred, tuple(label.shape[-2:]))
    out = torch.zeros_like(label, dtype=pred.dtype)  # the padding is label 255: ignored whatever it holds
    for i, (h, w) in enumerate(label_size.tolist()):
        out[i, :h, :w] = resize_prediction(pred[i:i + 1], (h, w))[0]
    return out


def group_title(name: str) -> str:
    """"2" -> "Task 2", "1-3" -> "Task 1∪2∪3" (CIL's table headers)."""
    if "-" not in name:
        return f"Task {name}"
    return "Task " + "∪".join(str(k) for k in range(1, int(name.split("-")[1]) + 1))


def format_group_line(task_miou: dict[str, float | None]) -> str:
    return " | ".join(f"{group_title(name)} {_pct(value).strip()}" for name, value in task_miou.items())


def _opt(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def harmonic_iou(old: float | None, new: float | None) -> float | None:
    """hIoU = 2 old new / (old + new); None when either mean is missing, 0 when both are 0."""
    if old is None or new is None:
        return None
    return 2 * old * new / (old + new) if old + new > 0 else 0.0


def _mean(values: np.ndarray, start: int, stop: int) -> float | None:
    part = values[start:stop]
    part = part[~np.isnan(part)]
    return float(part.mean()) if part.size else None


def _pct(value: float | None) -> str:
    return "     -" if value is None else f"{100 * value:6.2f}"


def format_table(results: dict[str, Any]) -> str:
    """Per-class IoU/accuracy table (old/new marked) and a summary line; '-' = class absent from the ground truth."""
    num_old = results.get("num_old", 0)
    names = list(results["class_iou"])
    accs = results.get("class_acc", {})
    width = max([len("class")] + [len(n) for n in names])
    lines = [f"{'idx':>3}  {'class':<{width}}  {'IoU':>6}  {'Acc':>6}  set"]
    for k, name in enumerate(names):
        mark = "old" if k < num_old else "new"
        lines.append(f"{k:>3}  {name:<{width}}  {_pct(results['class_iou'][name])}  {_pct(accs.get(name))}  {mark}")
    n = len(names)
    background = results.get("has_background", True)
    old_span = f"0-{num_old - 1}" if num_old else "none"
    old_span += ", bg incl." if background and num_old else ""
    new_span = f"{num_old}-{n - 1}" if num_old < n else "none"
    old_fg = f" | old fg {_pct(results.get('miou_old_fg')).strip()}" if background else ""  # else it repeats "old"
    hiou = f" | hIoU {_pct(results['miou_h']).strip()}" if results.get("miou_h") is not None else ""
    lines.append(
        f"mIoU all {_pct(results['miou_all']).strip()} | old ({old_span}) {_pct(results['miou_old']).strip()}"
        f"{old_fg} | new ({new_span}) {_pct(results['miou_new']).strip()}{hiou}"
        f" | pixel acc {_pct(results['pixel_acc']).strip()} | mean acc {_pct(results['mean_acc']).strip()}")
    return "\n".join(lines)
