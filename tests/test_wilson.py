"""WILSON's pieces against direct, loop-level implementations of their formulas (random tensors, exact up to float
rounding), and PAMR on a constructed image whose refinement is known."""
from __future__ import annotations

import math

import pytest

import torch

from segmentation.methods.wilson import (PAMR, balanced_self_training_loss, cam_class_scores, cam_loss,
                                         image_agreement, localization_prior_loss, pseudo_mask, segmentation_targets,
                                         soft_targets, weighted_segmentation_loss)


def bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_cam_scores_and_loss_follow_the_formula():
    torch.manual_seed(0)
    z = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    labels = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.float64)  # 4 fg classes, the last 2 new
    scores = cam_class_scores(z)
    losses = []
    for n in range(2):
        m = torch.softmax(z[n], 0).flatten(1)
        for c in range(5):
            zc = z[n, c].flatten()
            expected = (m[c] * zc).sum() / (1 + m[c].sum()) + (1 - m[c].mean()) ** 3 * math.log(0.01 + m[c].mean())
            assert math.isclose(scores[n, c].item(), expected.item(), rel_tol=1e-9, abs_tol=1e-12)
        losses += [bce(scores[n, c].item(), labels[n, c - 1].item()) for c in (3, 4)]
    assert math.isclose(cam_loss(z, labels, 2).item(), sum(losses) / len(losses), rel_tol=1e-9)


def test_localization_prior_is_bce_against_the_old_sigmoids():
    torch.manual_seed(1)
    z, old = torch.randn(2, 6, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    values = [bce(z[n, c, i, j].item(), torch.sigmoid(old[n, c, i, j]).item())
              for n in range(2) for c in range(4) for i in range(3) for j in range(3)]
    assert math.isclose(localization_prior_loss(z, old).item(), sum(values) / len(values), rel_tol=1e-9)


def test_pseudo_mask_cutoffs_and_ambiguous_pixels():
    scores = torch.zeros(1, 3, 1, 5)
    scores[0, 0] = torch.tensor([1.0, 0.75, 0.6, 0.1, 0.9])   # bg: cut 0.7 * 1.0 -> pixels 0, 1, 4
    scores[0, 1] = torch.tensor([0.0, 0.5, 0.31, 0.3, 0.0])   # cut 0.6 * 0.5 = 0.3 (> 0.2) -> pixels 1, 2
    scores[0, 2] = torch.tensor([0.1, 0.0, 0.0, 0.15, 0.25])  # cut max(0.6 * 0.25, 0.2) = 0.2 -> pixel 4
    mask = pseudo_mask(scores)
    # pixel 1 (bg and class 1) and pixel 4 (bg and class 2) are ambiguous: dropped; pixel 3 has no class
    assert mask[0, :, 0].T.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]]


def test_balanced_self_training_loss_follows_the_formula():
    torch.manual_seed(2)
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    pseudo = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    pseudo[0, 0, :2] = 1   # image 0: bg (8 px) + class 1 (3 px), 5 px without class
    pseudo[0, 1, 2, :3] = 1
    pseudo[1, 0, :, :2] = 1  # image 1: bg only, but labelled with class 2: weight 0
    labels = torch.tensor([[1, 0], [0, 1]], dtype=torch.float64)
    got = balanced_self_training_loss(z, pseudo, labels)
    logp = torch.log_softmax(z[0], 0)
    total, count = 11.0, {0: 8.0, 1: 3.0}
    expected = 0.0
    for i in range(4):
        for j in range(4):
            c = [k for k in range(3) if pseudo[0, k, i, j] > 0]
            if c:
                expected += (total - count[c[0]]) / (1 + total) * -logp[c[0], i, j].item()
    assert math.isclose(got[0].item(), expected / 16, rel_tol=1e-9) and got[1].item() == 0.0


def test_soft_targets_segmentation_targets_and_weighted_bce():
    torch.manual_seed(3)
    probs = torch.softmax(torch.randn(2, 5, 3, 3, dtype=torch.float64), 1)
    q = soft_targets(probs, alpha=0.5)
    top = probs.argmax(1)
    for n, i, j in [(0, 0, 0), (1, 2, 1)]:
        expected = 0.5 * probs[n, :, i, j]
        expected[top[n, i, j]] += 0.5
        assert torch.allclose(q[n, :, i, j], expected)
    old = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    target = segmentation_targets(q, old)
    assert torch.equal(target[:, 1:3], torch.sigmoid(old[:, 1:3])) and torch.equal(target[:, 3:], q[:, 3:])
    assert torch.equal(target[:, 0], torch.minimum(torch.sigmoid(old[:, 0]), q[:, 0]))
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    weight = torch.tensor([1.0, 0.0], dtype=torch.float64)
    per_pixel = [sum(bce(x[0, c, i, j].item(), target[0, c, i, j].item()) for c in range(5))
                 for i in range(3) for j in range(3)]
    expected = (sum(per_pixel) / 9) / (1 + 1e-5)
    assert math.isclose(weighted_segmentation_loss(x, target, weight).item(), expected, rel_tol=1e-9)


def test_image_weight_tests_the_mass_of_q_per_new_class_as_wilsons_batch_weight():
    """3 old channels (bg + 2), new classes 3 and 4. M: the localizer's probabilities, foreground masked by the image
    labels. Image 0 is labelled {3}, image 1 {3, 4}; at every pixel background ties with or beats class 3, so class 3
    is the argmax nowhere, and class 4 only at pixel (1, 1) of image 1."""
    labels = torch.tensor([[0, 0, 1, 0], [0, 0, 1, 1]])
    keep = torch.tensor([[1, 0, 0, 1, 0], [1, 0, 0, 1, 1]], dtype=torch.float32)[:, :, None, None]
    m = torch.full((2, 5, 2, 2), 0.2)
    m[1, 4, 1, 1] = 0.6
    m = m * keep
    # alpha = 0.5 (VOC): q = 0.5 onehot + 0.5 M has mass on exactly the labelled classes: both images weigh 1,
    # although class 3 is never the argmax (the rule "every labelled class is the argmax somewhere" gave 0, 0)
    assert image_agreement(soft_targets(m, 0.5), labels, num_old=3).tolist() == [1.0, 1.0]
    assert image_agreement(soft_targets(m, 0.9), labels, num_old=3).tolist() == [1.0, 1.0]
    # alpha = 1: q is the one-hot argmax, and then class 3's absence from the argmax drops both images
    assert image_agreement(soft_targets(m, 1.0), labels, num_old=3).tolist() == [0.0, 0.0]
    # mass on a class the image is not labelled with (an unmasked M) disagrees
    assert image_agreement(soft_targets(torch.full((2, 5, 2, 2), 0.2), 0.5), labels, num_old=3).tolist() == [0.0, 1.0]


def test_pseudo_labels_come_from_the_localizer_before_its_train_mode_pass():
    """WILSON's train.py runs the localizer in eval mode (pseudo-labels, soft targets) before its train-mode pass of
    the same iteration, so the pseudo-labels use the norm statistics from before this batch."""
    from segmentation.config import parse_config
    from segmentation.methods.base import StepInfo
    from segmentation.methods.wilson import WILSON
    from segmentation.models import build_segmenter
    from segmentation.tasks import load_task

    torch.manual_seed(0)
    options = parse_config(["--method", "WILSON", "--pseudo_ep", "0", "--norm_act", "bn"]).method_options
    model = build_segmenter("resnet18", 16, "bn", [7, 4]).eval()
    method = WILSON(StepInfo(load_task("shapes", "6-4"), 1, 7, 11, 2, norm_act="bn"), model, model, options)
    method.forward_modules = {"localizer": method.localizer}
    norm = next(m for m in method.localizer.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    before = norm.running_mean.clone()
    seen = []
    eval_pass = method.localizer_eval

    def spy(body):
        seen.append(norm.running_mean.clone())
        return eval_pass(body)

    method.localizer_eval = spy
    batch = {"image": torch.randn(2, 3, 64, 64), "image_labels": torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0]])}
    with torch.no_grad():
        outputs = model(batch["image"])
    method.losses(batch, outputs, outputs, epoch=0)
    assert len(seen) == 1 and torch.equal(seen[0], before)
    assert not torch.equal(norm.running_mean, before)  # the train-mode pass did update them, afterwards


def direct_pamr(image: torch.Tensor, mask: torch.Tensor, num_iter: int, dilations: tuple[int, ...]) -> torch.Tensor:
    """Pixel-by-pixel PAMR (one image, mask already at the image's size), replicate padding by clamping."""
    _, h, w = image.shape

    def at(t: torch.Tensor, i: int, j: int) -> torch.Tensor:
        return t[:, min(max(i, 0), h - 1), min(max(j, 0), w - 1)]

    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # with the centres
    neighbours = [o for o in offsets if o != (0, 0)]
    affinity = torch.zeros(len(neighbours), h, w, dtype=image.dtype)
    for i in range(h):
        for j in range(w):
            window = torch.stack([at(image, i + oy, j + ox) for oy, ox in offsets], 1)  # 3 x 9D
            std = window.std(1)
            logits = [(-(image[:, i, j] - at(image, i + oy, j + ox)).abs() / (1e-8 + 0.1 * std)).mean()
                      for oy, ox in neighbours]
            affinity[:, i, j] = torch.softmax(torch.stack(logits), 0)
    for _ in range(num_iter):
        new = torch.zeros_like(mask)
        for i in range(h):
            for j in range(w):
                new[:, i, j] = sum(affinity[k, i, j] * at(mask, i + oy, j + ox)
                                   for k, (oy, ox) in enumerate(neighbours))
        mask = new
    return mask


def test_pamr_equals_the_pixel_by_pixel_definition():
    torch.manual_seed(4)
    image = torch.rand(1, 3, 5, 6, dtype=torch.float64)
    mask = torch.softmax(torch.randn(1, 2, 5, 6, dtype=torch.float64), 1)
    got = PAMR(num_iter=3, dilations=(1, 2))(image, mask)
    assert torch.allclose(got[0].double(), direct_pamr(image[0], mask[0], 3, (1, 2)).float().double(), atol=1e-5)


def test_pamr_spreads_a_mask_within_a_region_and_not_across_its_edge():
    """Left half dark, right half bright. Inside a flat region every neighbour is equally similar (uniform
    affinity); across the edge the colour distance over 0.1 * the window's std is huge (affinity 0). A seed of
    class 1 inside the left region therefore spreads over the left region and never crosses into the right one."""
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 1.0
    mask = torch.zeros(1, 2, 16, 16)
    mask[:, 0] = 1.0
    mask[:, 0, 6:10, 2:6] = 0.0
    mask[:, 1, 6:10, 2:6] = 1.0  # a seed of class 1 inside the left region
    refined = PAMR(num_iter=30, dilations=(1, 2, 4))(image, mask)
    assert torch.allclose(refined.sum(1), torch.ones(1, 16, 16), atol=1e-5)  # still a distribution
    left, right = refined[0, 1, :, :8], refined[0, 1, :, 8:]
    assert left.min() > 0.01 and right.max() < 1e-6   # spread over the whole region, stopped at the edge
    assert left.max() - left.min() < 0.5 * (mask[0, 1, :, :8].max() - mask[0, 1, :, :8].min())
    assert torch.allclose(PAMR(num_iter=5)(image, refined.new_ones(1, 1, 4, 4)), torch.ones(1, 1, 16, 16))


def test_the_wilson_preset_fills_only_the_flags_not_given():
    from segmentation.config import parse_config

    wilson = parse_config(["--method", "WILSON", "--step", "1"])
    w = wilson.method_options
    assert (w.alpha, w.bce, w.affinity, w.pseudo_ep, w.lr_head, w.lr_pseudo, w.loss_de, wilson.lr_policy,
            wilson.warmup_epochs) == (0.5, True, True, 5, 10.0, 0.01, 1.0, "warmup", 5)
    assert parse_config(["--method", "WILSON", "--step", "0"]).lr_policy == "poly"  # as WILSON's run.sh step 0
    mixed = parse_config(["--method", "WILSON", "--alpha", "0.9", "--no-affinity", "--pseudo_ep", "3"])
    assert (mixed.method_options.alpha, mixed.method_options.affinity, mixed.warmup_epochs) == (0.9, False, 3)
    mib = parse_config(["--method", "MiB"])
    assert (mib.method_options.alpha, mib.lr_policy, mib.warmup_epochs) == (1.0, "poly", 1.0)


def test_warmup_policy_holds_the_lr_then_follows_poly():
    from segmentation.engine.trainer import lr_factor_fn

    hold = lr_factor_fn("warmup", total_iters=10, power=0.9, warmup_iters=4, decay_step=1, decay_factor=1)
    assert [hold(i) for i in range(4)] == [1.0] * 4
    assert hold(4) == pytest.approx((1 - 4 / 10) ** 0.9) and hold(9) == pytest.approx(0.1 ** 0.9)
    ramp = lr_factor_fn("warm_poly", total_iters=10, power=0.9, warmup_iters=4, decay_step=1, decay_factor=1)
    assert [ramp(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_an_empty_first_pseudo_supervised_epoch_is_reported(caplog):
    """The silent IoU-0 failure: no pseudo-label pixel of a new class during epoch --pseudo_ep."""
    import logging

    from segmentation.config import parse_config
    from segmentation.methods.base import StepInfo
    from segmentation.methods.wilson import WILSON
    from segmentation.models import build_segmenter
    from segmentation.tasks import load_task

    options = parse_config(["--method", "WILSON", "--pseudo_ep", "1", "--norm_act", "bn"]).method_options
    model = build_segmenter("resnet18", 16, "bn", [7, 4])
    method = WILSON(StepInfo(load_task("shapes", "6-4"), 1, 7, 11, 2, norm_act="bn"), model, model, options)
    method.pseudo_new_pixels = torch.tensor(0.0)
    with caplog.at_level(logging.WARNING, logger="segmentation"):
        method.end_epoch(0)  # not the first pseudo-supervised epoch: nothing to say
        assert not caplog.records
        method.end_epoch(1)
    assert "marked no pixel of a new class" in caplog.text and method.pseudo_new_pixels is None
    method.pseudo_new_pixels = torch.tensor(5.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="segmentation"):
        method.end_epoch(1)
    assert not caplog.records
