"""WILSON (Cermelli et al., CVPR 2022): new classes from image-level labels, through a localizer trained online.

This file owns the method's pieces, written from the paper and its code (github.com/fcdl94/WILSON: train.py's
Trainer.train, utils/wss_loss.py, wss/modules.py). Shapes: localizer scores z and segmentation logits x are
N x C x h x w at feature resolution (OS16); C counts every class seen so far, background first; `num_old` channels
come from the old model. Image labels are N x (C - 1) multi-hot over the foreground classes.

Step 0 (`--bce`): per-class sigmoid BCE on the pixel labels, so that the old model's sigmoids are probabilities.
Step t>0 (`WILSON`): the loader gives images and image labels only. A localizer on the student's body features is
trained online with the CAM loss on the new classes, the old model's sigmoids as a prior on the old classes, and
(from `--pseudo_ep` on) self-training on its own PAMR-refined pseudo-masks; from then on its soft masks supervise the
segmentation model at feature resolution, with the old model's sigmoids on the old channels. A feature distillation
term keeps the body close to the old one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segmentation.methods.base import Batch, EvalView, Method, Outputs, supervised_ce
from segmentation.methods.losses import bce_with_ignore, feature_distillation
from segmentation.methods.options import option, switch
from segmentation.models.norm import make_norm_act, package_preferred

log = logging.getLogger("segmentation")

IGNORE_INDEX = 255


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 (autocast outputs) -> float32 for the losses; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ---------------------------------------------------------------- the localizer's losses

def cam_class_scores(z: torch.Tensor) -> torch.Tensor:
    """Image-level class scores from localizer scores (N x C): normalised global weighted pooling plus the focal
    mask penalty, y = sum_i m_i z_i / (1 + sum_i m_i) + (1 - mean_i m)^3 log(0.01 + mean_i m), m = softmax_c(z)."""
    z = _upcast(z).flatten(2)
    m = torch.softmax(z, dim=1)
    ngwp = (m * z).sum(-1) / (1.0 + m.sum(-1))
    mean_m = m.mean(-1)
    return ngwp + (1.0 - mean_m).pow(3) * torch.log(0.01 + mean_m)


def cam_loss(z: torch.Tensor, image_labels: torch.Tensor, num_new: int) -> torch.Tensor:
    """Multi-label BCE of the new classes' image scores against the image labels (mean over images and classes)."""
    scores = cam_class_scores(z)[:, -num_new:]
    return F.binary_cross_entropy_with_logits(scores, image_labels[:, -num_new:].to(scores.dtype))


def localization_prior_loss(z: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """The old model as a prior for the localizer's old channels: BCE(z_old, sigmoid(old logits)), mean over pixels
    and channels (paper Eq. 4). The old model was trained with --bce, so its sigmoids are probabilities."""
    num_old = old_logits.shape[1]
    return F.binary_cross_entropy_with_logits(_upcast(z[:, :num_old]), torch.sigmoid(_upcast(old_logits)))


# ---------------------------------------------------------------- pseudo-supervision

def pseudo_mask(scores: torch.Tensor, cutoff_top: float = 0.6, cutoff_bkg: float = 0.7, cutoff_low: float = 0.2
                ) -> torch.Tensor:
    """Binary per-class masks from localizer probabilities (N x C x h x w): a pixel belongs to class c when its
    score is above max(cutoff * the class's highest score in the image, cutoff_low), with cutoff_bkg for background
    and cutoff_top for the others. Pixels claimed by more than one class are ambiguous and dropped (all zeros)."""
    c = scores.shape[1]
    flat = scores.flatten(2)
    cutoff = torch.full((1, c, 1), cutoff_top, dtype=flat.dtype, device=flat.device)
    cutoff[:, 0] = cutoff_bkg
    threshold = (flat.amax(-1, keepdim=True) * cutoff).clamp(min=cutoff_low)
    mask = (flat > threshold).to(flat.dtype)
    unambiguous = (mask.sum(1, keepdim=True) <= 1).to(flat.dtype)
    return (mask * unambiguous).view_as(scores)


def balanced_self_training_loss(z: torch.Tensor, pseudo: torch.Tensor, image_labels: torch.Tensor) -> torch.Tensor:
    """The localizer's self-training on its own pseudo-masks (one value per image).

    CE to each pixel's pseudo class (pixels with none are ignored), each class weighted by (N - N_c) / (1 + N) with
    N_c its pseudo pixels and N all pseudo pixels of the image, so that small objects count as much as large ones;
    an image counts only if its pseudo-mask holds exactly its labelled classes plus background (else weight 0).
    The mean over pixels includes the ignored ones, as the reference does."""
    target = pseudo.argmax(1)
    target = torch.where(pseudo.sum(1) > 0, target, torch.full_like(target, IGNORE_INDEX))
    per_class = pseudo.flatten(2).sum(-1)                        # N x C
    total = per_class.sum(-1, keepdim=True)
    class_weight = (total - per_class) / (1.0 + total)           # N x C
    pixel_weight = (pseudo * class_weight[:, :, None, None]).sum(1).flatten(1)
    ce = F.cross_entropy(_upcast(z), target, ignore_index=IGNORE_INDEX, reduction="none").flatten(1)
    labelled = image_labels.to(ce.dtype).sum(-1) + 1.0                # + background
    found = (per_class > 0).to(ce.dtype).sum(-1)
    image_weight = (labelled == found).to(ce.dtype)
    return image_weight * (pixel_weight * ce).mean(-1)


def soft_targets(probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """q = alpha * onehot(argmax M) + (1 - alpha) * M: the localizer's probabilities sharpened towards their argmax."""
    onehot = F.one_hot(probs.argmax(1), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    return alpha * onehot + (1.0 - alpha) * probs


def segmentation_targets(q: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """Per-channel targets of the segmentation model's multi-label BCE: the old model's sigmoid on the old channels,
    q on the new ones, and background = min(old model's background, q's background)."""
    num_old = old_logits.shape[1]
    old = torch.sigmoid(_upcast(old_logits))
    target = torch.cat([old, _upcast(q[:, num_old:])], dim=1)
    target[:, 0] = torch.minimum(old[:, 0], _upcast(q[:, 0]))
    return target


def image_agreement(q: torch.Tensor, image_labels: torch.Tensor, num_old: int) -> torch.Tensor:
    """WILSON's `batch_weight`: 1 for an image where, for every new class, "q has some mass on it" (the pixel sum
    of q > 0) agrees with its image label, else 0.

    q's foreground channels are the localizer's softmax masked by the image labels, so with alpha < 1 every labelled
    class has q > 0 everywhere and every other class q = 0: every image weighs 1. Only at alpha = 1 (q one-hot)
    does this become "every labelled new class is the argmax somewhere"."""
    present = q.flatten(2).sum(-1)[:, num_old:] > 0       # N x C_new
    labelled = image_labels[:, num_old - 1:] > 0
    return (present == labelled).all(-1).to(q.dtype)


def weighted_segmentation_loss(x: torch.Tensor, target: torch.Tensor, image_weight: torch.Tensor) -> torch.Tensor:
    """Sum over channels of BCE(x, target), mean over pixels, weighted per image and normalised by the weights."""
    bce = F.binary_cross_entropy_with_logits(_upcast(x), target, reduction="none").sum(1).flatten(1).mean(-1)
    return (image_weight * bce).sum() / (image_weight.sum() + 1e-5)


# ---------------------------------------------------------------- PAMR (Araslanov & Roth, CVPR 2020)

def _neighbours(x: torch.Tensor, dilations: tuple[int, ...], centre: bool) -> torch.Tensor:
    """N x K x H x W -> N x K x P x H x W: the values at the 8 (or, with the centre, 9) positions of a 3x3 window
    dilated by each d, with replicate padding. Slices of one padded tensor instead of a conv per offset."""
    h, w = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy == 0 and dx == 0 and not centre:
                    continue
                out.append(padded[..., d + dy:d + dy + h, d + dx:d + dx + w])
    return torch.stack(out, dim=2)


class PAMR(nn.Module):
    """Pixel-adaptive mask refinement: masks diffuse to neighbours of similar colour.

    Affinity of a pixel to each neighbour j (8 per dilation): softmax_j of -mean_channels(|x - x_j| / (1e-8 +
    0.1 std)), std the (unbiased) standard deviation of the 3x3 window with the centre, per channel. Then `num_iter`
    times, mask <- sum_j affinity_j * mask_j. WILSON uses 10 iterations with dilations 1, 2, 4, 8, 12.
    """

    def __init__(self, num_iter: int = 10, dilations: tuple[int, ...] = (1, 2, 4, 8, 12)) -> None:
        super().__init__()
        self.num_iter, self.dilations = num_iter, tuple(dilations)

    @torch.no_grad()
    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """image N x 3 x H x W (any scale), mask N x C x h x w -> refined mask at the image's size."""
        image = _upcast(image)
        mask = F.interpolate(_upcast(mask), size=image.shape[-2:], mode="bilinear", align_corners=True)
        std = _neighbours(image, self.dilations, centre=True).std(2, keepdim=True)
        distance = (image.unsqueeze(2) - _neighbours(image, self.dilations, centre=False)).abs()
        affinity = torch.softmax((-distance / (1e-8 + 0.1 * std)).mean(1, keepdim=True), dim=2)
        for _ in range(self.num_iter):
            mask = (_neighbours(mask, self.dilations, centre=False) * affinity).sum(2)
        return mask


# ---------------------------------------------------------------- the method

class Localizer(nn.Module):
    """WILSON's pseudo-labeler: conv3x3 (no bias) -> norm -> conv3x3 (no bias) -> norm -> conv1x1 to all classes,
    on the body features; its norm layers are --norm_act's (InPlace-ABN sync in the paper)."""

    def __init__(self, in_channels: int, num_classes: int, norm_act: Any, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), norm_act(hidden),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), norm_act(hidden),
            nn.Conv2d(hidden, num_classes, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


@dataclass(frozen=True)
class WILSONOptions:
    """WILSON
    Cermelli et al., CVPR 2022; see the README."""
    alpha: float = option(0.5, "weight of the one-hot in the soft pseudo-labels q = alpha*onehot + (1-alpha)*M "
                          "(the paper uses 0.9 on COCO)")
    bce: bool = switch(True, "step 0 with per-class sigmoid BCE instead of softmax CE, so that the old model's "
                       "sigmoids are probabilities for the weak steps")
    pseudo_ep: int = option(5, "epoch from which the localizer's pseudo-labels supervise the segmentation model")
    lr_pseudo: float = option(0.01, "learning rate of the localizer")
    lr_head: float = option(10.0, "the head's and classifiers' lr is --lr times this at steps t>0")
    affinity: bool = switch(True, "refine the localizer's masks with PAMR before cutting pseudo-labels")
    loss_de: float = option(1.0, "weight of the feature distillation MSE(body, old body)")
    l_seg: float = option(1.0, "weight of the pseudo-supervised segmentation loss")
    cam: str = option("ngwp", "the localizer's image-level pooling: normalised global weighted pooling + focal "
                      "penalty", choices=("ngwp",))

    def __post_init__(self) -> None:
        if self.pseudo_ep < 0:
            raise ValueError(f"--pseudo_ep {self.pseudo_ep}: must be >= 0")


class WILSON(Method):
    name = "wilson"
    Options = WILSONOptions
    learns_from_image_labels = True
    teacher_features = frozenset({"body", "logits_small"})
    flag_defaults = {
                     # WILSON's run.sh: step 0 (--bce) on the default poly schedule, the weak steps on "warmup"
                     "lr_policy": lambda flags: "warmup" if flags["step"] > 0 else "poly",
                     # WILSON tests every step on all val images (MiB's code keeps those with a seen class)
                     "test_images": "all",
                     # the options are filled in before the general flags' presets
                     "warmup_epochs": lambda flags: flags["pseudo_ep"]}

    options: WILSONOptions

    @classmethod
    def step0_key(cls, options: WILSONOptions) -> tuple:
        return ("bce",) if options.bce else ("ce",)

    def __init__(self, info, model, teacher, options: WILSONOptions) -> None:
        super().__init__(info, model, teacher, options)
        self.localizer: Localizer | None = None
        self.pamr = PAMR() if options.affinity else None
        self.pseudo_new_pixels: torch.Tensor | None = None  # new-class pixels in the pseudo-labels of epoch pseudo_ep
        if info.step > 0:
            norm = make_norm_act(info.norm_act, info.device_type, prefer_package=package_preferred(info.norm_impl))
            self.localizer = Localizer(model.body.out_channels, info.num_classes, norm)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"localizer": self.localizer} if self.localizer is not None else {}

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Body at --lr; head and classifiers at --lr x --lr_head (steps t>0); the localizer at --lr_pseudo."""
        if self.info.step == 0:
            return super().param_groups(base_lr)
        body = [p for p in self.model.body.parameters() if p.requires_grad]
        rest = [p for name, p in self.model.named_parameters() if p.requires_grad and not name.startswith("body.")]
        return [{"params": body, "lr": base_lr, "name": "body"},
                {"params": rest, "lr": base_lr * self.options.lr_head, "name": "head"},
                {"params": list(self.localizer.parameters()), "lr": self.options.lr_pseudo, "name": "localizer"}]

    def losses(self, batch: Batch, outputs: Outputs, teacher_outputs: Outputs | None, epoch: int
               ) -> dict[str, torch.Tensor]:
        if teacher_outputs is None:  # step 0: fully supervised
            if self.options.bce:
                return {"bce": bce_with_ignore(outputs[0], batch["label"])}
            return {"ce": supervised_ce(outputs[0], batch["label"])}
        x, body = outputs[1]["logits_small"], outputs[1]["body"]
        old_logits, old_body = teacher_outputs[1]["logits_small"], teacher_outputs[1]["body"]
        num_old, num_classes = self.info.num_old, self.info.num_classes
        labels = self.all_image_labels(batch["image_labels"])
        pseudo_supervised = epoch >= self.options.pseudo_ep
        if pseudo_supervised:
            # The eval-mode pass that makes the pseudo-labels comes first, as in WILSON's train.py: its norm layers
            # then use the running statistics from before this batch, which the train-mode pass below updates.
            probs, refined = self.localizer_masks(body, batch["image"], labels)
        z = self.forward_modules["localizer"](body)
        terms = {"cam": cam_loss(z, labels, num_classes - num_old), "loc": localization_prior_loss(z, old_logits)}
        if self.options.loss_de:
            terms["lde"] = self.options.loss_de * feature_distillation(body, old_body)
        if not pseudo_supervised:
            # The segmentation head is not trained yet; a zero term keeps it in the graph, as DDP requires.
            terms["seg"] = 0.0 * _upcast(x).sum()
            return terms
        pseudo = pseudo_mask(refined)
        q = soft_targets(probs, self.options.alpha)
        agree = image_agreement(q, labels, num_old)
        terms["cls"] = balanced_self_training_loss(z, pseudo, labels).mean()
        terms["seg"] = self.options.l_seg * weighted_segmentation_loss(
            x, segmentation_targets(q, old_logits), agree)
        if epoch == self.options.pseudo_ep:  # counted on the device; read once, at the end of the epoch
            count = pseudo[:, num_old:].sum()
            self.pseudo_new_pixels = count if self.pseudo_new_pixels is None else self.pseudo_new_pixels + count
        return terms

    @torch.no_grad()
    def localizer_eval(self, body: torch.Tensor) -> torch.Tensor:
        """The localizer's scores in eval mode (running statistics, no gradient)."""
        was_training = self.localizer.training
        self.localizer.eval()
        z = _upcast(self.localizer(body.detach()))
        self.localizer.train(was_training)
        return z

    @torch.no_grad()
    def localizer_masks(self, body: torch.Tensor, image: torch.Tensor, labels: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The localizer's probabilities (eval mode), foreground channels restricted to the image's labels; and the
        same refined by PAMR on the image at feature resolution."""
        probs = torch.softmax(self.localizer_eval(body), dim=1)
        keep = torch.cat([labels.new_ones(len(labels), 1), labels], dim=1).to(probs.dtype)[:, :, None, None]
        probs = probs * keep
        if self.pamr is None:
            return probs, probs
        small = F.interpolate(_upcast(image), size=probs.shape[-2:], mode="bilinear", align_corners=True)
        return probs, self.pamr(small, probs) * keep

    def all_image_labels(self, new_labels: torch.Tensor) -> torch.Tensor:
        """Multi-hot over every foreground class (old ones 0) from the loader's labels over the new classes."""
        return torch.cat([new_labels.new_zeros(len(new_labels), self.info.num_old - 1), new_labels], dim=1)

    @property
    def eval_features(self) -> frozenset[str]:
        return frozenset({"body"}) if self.localizer is not None else frozenset()

    @torch.no_grad()
    def eval_views(self, batch: Batch, outputs: Outputs) -> dict[str, EvalView]:
        """WILSON's `Val_CAM`: the localizer's argmax at image size against the label with the old classes read as
        background (it only has to find the new ones); and the pseudo-label it would give this image (from the
        image's labels; 255 where it marks nothing), drawn but not scored."""
        if self.localizer is None:
            return {}
        body, label = outputs[1]["body"], batch["label"]
        size = label.shape[-2:]
        cam = F.interpolate(self.localizer_eval(body), size=size, mode="bilinear", align_corners=False).argmax(1)
        target = torch.where(label < self.info.num_old, torch.zeros_like(label), label)  # 255 stays 255
        _, refined = self.localizer_masks(body, batch["image"], self.all_image_labels(batch["image_labels"]))
        pseudo = pseudo_mask(refined)
        ids = torch.where(pseudo.sum(1) > 0, pseudo.argmax(1), torch.full_like(pseudo[:, 0], IGNORE_INDEX,
                                                                                 dtype=torch.long))
        ids = F.interpolate(ids[:, None].float(), size=size, mode="nearest")[:, 0].long()
        return {"cam": EvalView(cam, target), "pseudo": EvalView(ids, None)}

    def end_epoch(self, epoch: int) -> None:
        """WILSON's silent failure: a localizer with no confident pixel gives all-zero pseudo-labels and the new
        classes end at IoU 0. At the end of the first pseudo-supervised epoch, zero new-class pixels on this rank
        are reported with the likely causes."""
        if epoch != self.options.pseudo_ep or self.pseudo_new_pixels is None:
            return
        if self.pseudo_new_pixels.item() == 0:
            log.warning("WILSON: in epoch %d (the first with pseudo-labels, --pseudo_ep) the localizer marked no "
                        "pixel of a new class on this rank: the new classes get no pixel supervision and will end "
                        "at IoU 0. Likely causes: --lr_pseudo too low or too few epochs before --pseudo_ep, image "
                        "labels that do not match the images, or a step-0 model trained without --bce.", epoch + 1)
        self.pseudo_new_pixels = None
