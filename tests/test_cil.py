"""CIL's losses against a direct implementation of the formulas (Klingner et al.; ifnspaml/CIL_Segmentation,
train_erfnet_incremental.py and models/train/losses.py), its preset and per-stage evaluation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segmentation.methods.cil import (entropy_bits, entropy_weighted_distillation_map,
                                      new_class_cross_entropy_map)

IGNORE = 255


def direct_cil_losses(x: np.ndarray, x_old: np.ndarray, y: np.ndarray, temp: float, lambda_gs: float
                      ) -> tuple[float, float]:
    """Pixel by pixel, in float64: CE on new-class pixels with the softmax over all classes; KD on every other pixel,
    weighted by 1 + lambda * entropy in bits of the teacher, times T^2, averaged over those pixels."""
    n, c, h, w = x.shape
    c_old = x_old.shape[1]
    ce_sum = kd_sum = 0.0
    new_count = other_count = 0
    for i in range(n):
        for r in range(h):
            for s in range(w):
                logits, teacher, label = x[i, :, r, s], x_old[i, :, r, s], y[i, r, s]
                if label != IGNORE and label >= c_old:
                    log_p = logits - np.log(np.exp(logits).sum())
                    ce_sum -= log_p[label]
                    new_count += 1
                    continue
                q = np.exp(teacher / temp) / np.exp(teacher / temp).sum()
                log_pt = logits / temp - np.log(np.exp(logits / temp).sum())
                entropy = -(q * np.log2(q)).sum()
                kd_sum += temp ** 2 * (1 + lambda_gs * entropy) * -(q * log_pt[:c_old]).sum()
                other_count += 1
    return ce_sum / new_count, kd_sum / other_count


@pytest.mark.parametrize("temp, lambda_gs", [(1.0, 1.0), (2.0, 0.5)])
def test_cil_losses_follow_the_formula(temp, lambda_gs):
    from segmentation.methods import build_method
    from segmentation.methods.base import StepInfo
    from segmentation.tasks import load_task

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 3, 4, generator=g, dtype=torch.float64) * 2
    x_old = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 11, (2, 3, 4), generator=g)
    y[0, 0, :2] = IGNORE            # void pixels get distilled, as CIL's unlabelled ones
    y[1, 2, 3] = 7                  # a new-class pixel: CE only, no distillation
    task = load_task("cityscapes", "cil")
    info = StepInfo(task=task, step=1, num_old=5, num_classes=11, epochs=1)
    method = build_method("CIL", info, model=None, teacher=None, options={"temp": temp, "lambda_GS": lambda_gs})
    terms = method.losses({"label": y}, (x, {}), (x_old, {}), epoch=0)
    ce, kd = direct_cil_losses(x.numpy(), x_old.numpy(), y.numpy(), temp, lambda_gs)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6) and terms["kd"].item() == pytest.approx(kd, rel=1e-6)


def test_a_new_class_pixel_carries_no_distillation_and_old_pixels_no_cross_entropy():
    x = torch.randn(1, 6, 1, 3, dtype=torch.float64)
    x_old = torch.randn(1, 4, 1, 3, dtype=torch.float64)
    y = torch.tensor([[[5, 2, IGNORE]]])  # new, old (ignored by the CE, as CIL's labels hold only new classes), void
    ce = new_class_cross_entropy_map(x, y, num_old=4)
    assert ce[0, 0, 0] > 0 and ce[0, 0, 1] == 0 and ce[0, 0, 2] == 0
    x_changed = x.clone()
    x_changed[0, :, 0, 0] += torch.randn(6, dtype=torch.float64)  # move only the new-class pixel's logits
    from segmentation.methods.base import StepInfo
    from segmentation.methods.cil import CIL
    from segmentation.tasks import load_task

    method = CIL(StepInfo(load_task("cityscapes", "cil"), 1, 4, 6, 1), None, None, CIL.Options(temp=1.0, lambda_GS=1.0))
    a = method.losses({"label": y}, (x, {}), (x_old, {}), 0)["kd"]
    b = method.losses({"label": y}, (x_changed, {}), (x_old, {}), 0)["kd"]
    assert a.item() == b.item()
    # the normaliser counts the old channels: raising an old logit raises the CE of a new-class pixel
    x_old_up = x.clone()
    x_old_up[0, 0, 0, 0] += 3
    assert new_class_cross_entropy_map(x_old_up, y, 4)[0, 0, 0] > ce[0, 0, 0]


def test_entropy_is_in_bits_and_weights_uncertain_pixels_more():
    uniform = torch.full((1, 4, 1, 1), 0.25, dtype=torch.float64)
    assert entropy_bits(uniform).item() == pytest.approx(2.0)
    certain = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64).view(1, 4, 1, 1)
    assert entropy_bits(certain).item() == 0.0
    student = torch.zeros(1, 4, 1, 1, dtype=torch.float64)
    sure = entropy_weighted_distillation_map(student, torch.tensor([9.0, 0, 0, 0]).view(1, 4, 1, 1), 1.0, 1.0)
    unsure = entropy_weighted_distillation_map(student, torch.zeros(1, 4, 1, 1), 1.0, 1.0)
    # uniform teacher: weight 1 + 2 bits = 3, cross-entropy of the uniform student log 4
    assert unsure.item() == pytest.approx(3 * math.log(4)) and sure.item() < unsure.item()


def test_cil_preset_and_the_cityscapes_setup():
    from segmentation.config import ConfigError, parse_config

    cil = parse_config(["--method", "CIL", "--dataset", "cityscapes", "--task", "cil"])
    assert (cil.student_init, cil.method_options.temp, cil.method_options.lambda_GS, cil.backbone, cil.optimizer, cil.lr, cil.weight_decay,
            cil.lr_policy, cil.crop_size, cil.eval_size, cil.train_base_size, cil.train_scale, cil.train_scale_divide,
            cil.color_jitter, cil.train_images, cil.test_images) == (
        "imagenet", 1.0, 1.0, "erfnet", "adam", 5e-4, 3e-4, "poly_epoch", (192, 640), (512, 1024), (512, 1024),
        (1.0, 1.5), True, (0.2, 0.2, 0.2, 0.1), "all", "seen")
    assert cil.step_lr() == 5e-4 and parse_config(["--method", "CIL", "--dataset", "cityscapes", "--step", "2",
                                                   "--task", "cil"]).step_lr() == 5e-4
    mine = parse_config(["--method", "CIL", "--dataset", "cityscapes", "--crop_size", "256x512", "--backbone",
                         "resnet101", "--student_init", "previous", "--temp", "2"])
    assert (mine.crop_size, mine.backbone, mine.student_init, mine.method_options.temp) == ((256, 512), "resnet101", "previous", 2.0)
    voc = parse_config(["--method", "CIL", "--dataset", "voc"])  # CIL on VOC: DeepLabV3 and the VOC schedule
    assert (voc.backbone, voc.optimizer, voc.crop_size, voc.student_init) == ("resnet101", "sgd", (512, 512), "imagenet")
    assert parse_config(["--crop_size", "192", "640"]).crop_size == (192, 640)
    with pytest.raises(ConfigError, match="multiple of the output stride 8"):
        parse_config(["--backbone", "erfnet", "--crop_size", "100"])


def test_poly_epoch_is_cils_lambda_lr_stepped_per_epoch():
    """CIL: LambdaLR(lambda epoch: (1 - (epoch - 1) / E) ** 0.9), stepped at each epoch's end. With E = 3 epochs of
    4 iterations: epoch 0 trains at (1 + 1/3) ** 0.9, epoch 1 at 1, epoch 2 at (2/3) ** 0.9."""
    from segmentation.engine.trainer import lr_factor_fn

    f = lr_factor_fn("poly_epoch", total_iters=12, power=0.9, warmup_iters=0, decay_step=1, decay_factor=1,
                     iters_per_epoch=4)
    assert [f(i) for i in range(4)] == [pytest.approx((4 / 3) ** 0.9)] * 4
    assert [f(i) for i in range(4, 8)] == [1.0] * 4
    assert [f(i) for i in range(8, 12)] == [pytest.approx((2 / 3) ** 0.9)] * 4


def direct_group_miou(x: np.ndarray, y: np.ndarray, indices: tuple[int, ...]) -> float:
    """argmax within the group's channels, ground truth outside the group ignored, IoU per present class."""
    pred = np.asarray(indices)[x[:, list(indices)].argmax(1)]
    keep = np.isin(y, indices)
    ious = []
    for c in indices:
        gt, pr = (y == c) & keep, (pred == c) & keep
        if gt.any():
            ious.append((gt & pr).sum() / (gt | pr).sum())
    return float(np.mean(ious))


def test_task_k_metrics_match_a_direct_numpy_computation():
    from segmentation.engine.metrics import (ConfusionMatrix, group_argmax, group_miou, group_target, group_title,
                                             named_groups)
    from segmentation.tasks import load_task

    groups = named_groups(load_task("cityscapes", "cil").group_parts(2))  # stages of 5, 6 and 8 classes
    assert groups == {"1": tuple(range(5)), "2": tuple(range(5, 11)), "1-2": tuple(range(11)),
                      "3": tuple(range(11, 19)), "1-3": tuple(range(19))}
    assert [group_title(k) for k in groups] == ["Task 1", "Task 2", "Task 1∪2", "Task 3", "Task 1∪2∪3"]
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 19, 8, 8, generator=g)
    label = torch.randint(0, 19, (3, 8, 8), generator=g)
    label[0, :2] = IGNORE
    for name, indices in groups.items():
        matrix = ConfusionMatrix(19)
        matrix.update(group_argmax(logits, indices), group_target(label, indices))
        assert group_miou(matrix, indices) == pytest.approx(direct_group_miou(logits.numpy(), label.numpy(),
                                                                               indices)), name


def test_the_offline_model_gets_cils_task_columns():
    """CIL evaluates its all-classes model with the stages' groups too; on Cityscapes the stage-1 classes (trainIds
    0, 1, 8, 9, 10) are not contiguous in the offline model's channels (trainId order)."""
    from segmentation.engine.metrics import ConfusionMatrix, group_argmax, group_miou, group_target, named_groups
    from segmentation.tasks import load_task

    for dataset in ("cityscapes", "city-shapes"):
        groups = named_groups(load_task(dataset, "offline").group_parts(0))
        assert list(groups) == ["1", "2", "1-2", "3", "1-3"]
        assert groups["1"] == (0, 1, 8, 9, 10) and groups["2"] == (2, 3, 4, 5, 6, 7)
        assert groups["1-2"] == (0, 1, 8, 9, 10, 2, 3, 4, 5, 6, 7) and sorted(groups["1-3"]) == list(range(19))
    # the incremental task's own groups are its steps, in learning order
    assert named_groups(load_task("cityscapes", "cil").group_parts(1)) == {
        "1": (0, 1, 2, 3, 4), "2": (5, 6, 7, 8, 9, 10), "1-2": tuple(range(11))}
    g = torch.Generator().manual_seed(2)
    logits, label = torch.randn(2, 19, 6, 6, generator=g), torch.randint(0, 19, (2, 6, 6), generator=g)
    for indices in groups.values():
        matrix = ConfusionMatrix(19)
        matrix.update(group_argmax(logits, indices), group_target(label, indices))
        assert group_miou(matrix, indices) == pytest.approx(direct_group_miou(logits.numpy(), label.numpy(), indices))
