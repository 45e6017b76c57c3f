"""STAR (Chen et al., NeurIPS 2023): old-class features replayed from stored statistics, with sigmoid outputs.

Written from the authors' code, github.com/jinpeng0528/STAR (a fork of DKD), which we follow where it and the paper
differ: trainer/trainer_voc.py (the training loop, l.362-465), base/base_trainer.py (the statistics, l.117-278) and
models/loss.py (the losses, l.58-135). The network, the sigmoid outputs, the prediction rule and the frozen norm
layers are DKD's (sigmoid.py). Channel 0 is unused (STAR has no auxiliary classifier): class c sits at channel c.

Notation: f = the head's output (256 channels, stride 16); the "grid" = the labels sampled at the centres of f's
cells (pixels 8+16m, 8+16n at stride 16, `label[:, 8::16, 8::16]`); y = the label; BCE_p(z, t) =
-[p t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))], p = --pos_weight (4 on VOC, 30 on ADE; other datasets, the
built-in shapes among them, take VOC's).

Step 0: L = L_mbce = sum over the step's classes c of the mean over all pixels of BCE_p(z_c, [y = c]) (class_bce:
no ignore mask, void pixels are negatives, as in the reference).

Statistics (finish_step, after the last epoch, model in eval mode): for each class c of the step, over the grid
positions j labelled c in one pass over the whole training set with the last epoch's augmentation,
  p_c = normalize(sum_j normalize(f_j))                    the prototype, a unit vector
  s_c = sqrt(mean_j (normalize(f_j) - p_c)^2)              the spread, per dimension
  mu_c, tau_c = mean and unbiased standard deviation of ||f_j||
  N_c = the number of positions, N_bg = the positions labelled 0 (step 0 only: later steps carry the formula below).
They are carried to the next step in the artifact, concatenated over the steps.

At a step t > 0, before the first epoch (before_training), the teacher pseudo-labels the training set: y^ = the old
class of the largest logit where that LOGIT is above 0.5, else 0 (the reference thresholds the raw logit, i.e.
sigmoid 0.62, not the probability: kept). On the grid, N^pl_k = positions with y = 0 and y^ = k, N^pl_bg = y = 0 and
y^ = 0. With I = iterations per epoch, C_t = the step's classes and N_k, N_bg the carried counts:
  overlap:  n_k = max(int((N_k - N^pl_k) / I), 0); N'_bg = N_bg (1 - 0.01 |C_t|); rho = max(N'_bg / N^pl_bg - 0.5, 0)
            carried on: bg 0.5 N^pl_bg + N'_bg, old classes N_k
  disjoint: n_k = max(int(N_k / I), 0); rho = max(N_bg / N^pl_bg, 0)
            carried on: bg N^pl_bg + N_bg, old classes N_k + N^pl_k
(trainer_voc.py:362-388; "0.5": about half of today's background is assumed to be old background).

Every iteration at t > 0 (trainer_voc.py:406-465), L = L_mbce + 5 L_ocfm + 0.05 L_sad (--loss_ocfm, --loss_sad):
  replay: n_k synthetic features per old class k, h = (p_k + eps * s_k) * r with eps ~ N(0, I) and
      r ~ N(mu_k, tau_k^2) drawn per element (as the reference), all with target 0 for every new class;
  L_mbce = sum over new c of (A_c + w_f F_c + w_b G_c) / (1 + w_f + w_b), where
      A_c = mean over all pixels of BCE_p(z_c, [y = c]);
      F_c = mean over the synthetic features of BCE(W_c h + b_c, 0);
      G_c = mean over G of BCE(W_c f_j + b_c, 0), G = the grid positions with y = 0 and y^ = 0 (live f);
      w_f = sum_k n_k / (B h w), w_b = rho |G| / (B h w), B h w = the grid positions of the batch;
  L_ocfm = sum_j M_j ||f_j - f^old_j||^2 / (256 sum_j M_j), M = [y = 0 and y^ > 0] resized bilinearly to f's size
      (the reference's `pkd`);
  L_sad = mean over new c of 1 / min over old k of ||q_c - p_k||, q_c = normalize(sum of normalize(f) weighted by
      [y = c] resized bilinearly to f's size, over the batch); a class absent from the batch has q_c = 0, so 1
      (the reference's `cont`).
Only the new classes' channels enter a loss. Optimiser groups at t > 0 (train_voc.py:123-141): backbone at lr,
head and old classifiers at 10 lr, the new classifier at 100 lr, all with --weight_decay; norm layers frozen.

Where this differs from the reference, on purpose:
  - the statistics come from every rank's share of the whole training set, summed over the ranks in float64 (the
    reference: rank 0's DistributedSampler shard only), so 1 and 2 ranks store the same statistics;
  - each class's spread is taken around its own prototype (at t > 0 the reference centres every new class on the
    prototype of the first stored class, class 1: an indexing slip);
  - a class with no grid position stores zeros (the reference: NaN), and one with one position tau = 0;
  - the counts N_c come from the statistics pass (last epoch's augmentation), not from a separate pass at the start
    of the step (the first epoch's);
  - the replay draws, per global iteration, sum_k n_k features from a generator seeded from the global torch RNG
    (the same on every rank and restored on resume), rank r keeping rows r, r + W, ...: the union over the ranks is
    a 1-rank run's draw, and the weights w_f, w_b and every mean use the global batch's counts;
  - L_sad's q_c sums over the global batch (all ranks), L_ocfm's weighted mean over the global batch's mask;
  - no NaN: L_ocfm is 0 when the batch has no pseudo-labelled pixel (the reference's 0/0, which AMP skips), F_c is
    0 without synthetic features and rho is 0 when no grid position is pseudo-labelled background.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from segmentation.methods.base import Batch, Outputs, StepInfo, TrainingSetPasses
from segmentation.methods.losses import upcast
from segmentation.methods.options import option
from segmentation.methods.sigmoid import SigmoidMethod, class_bce, reference_lr, reference_warmup_epochs
from segmentation.utils import dist

log = logging.getLogger("segmentation")

PSEUDO_LOGIT_THRESHOLD = 0.5   # trainer_voc.py:411-415, on the raw logit
OVERLAP_BG_SHRINK = 0.01       # N'_bg = N_bg (1 - 0.01 |C_t|), trainer_ade.py:388-395
REPEATED_BG_SHARE = 0.5        # the share of today's background assumed to repeat old background
CLASS_CHUNK = 8                # new classes resized together in L_sad: bounds the full-resolution masks in memory


# --- presets -----------------------------------------------------------------------------------------------------

def default_pos_weight(flags: dict[str, Any]) -> float:
    """STAR's pos_weight: 30 on ADE, 4 on VOC (config_*.json "pos_weight"); other datasets take VOC's."""
    return 30.0 if flags.get("dataset") == "ade" else 4.0


default_pos_weight.preset_text = "ADE 30; VOC and others 4"  # type: ignore[attr-defined]


@dataclass(frozen=True)
class STAROptions:
    """STAR
    Old-class feature replay from stored statistics (config_*.json "hyperparameter"): L_mbce + --loss_ocfm L_ocfm +
    --loss_sad L_sad."""
    pos_weight: float = option(4.0, "weight of the positive term of the new classes' BCE (STAR: VOC 4, ADE 30)")
    loss_ocfm: float = option(5.0, "weight of L_ocfm, the distillation of the features at old-class pseudo-labels")
    loss_sad: float = option(0.05, "weight of L_sad, 1 / the distance of each new class's batch prototype to the "
                             "nearest old prototype")

    def __post_init__(self) -> None:
        if not self.pos_weight > 0:
            raise ValueError(f"--pos_weight {self.pos_weight}: must be positive")
        if self.loss_ocfm < 0 or self.loss_sad < 0:
            raise ValueError("--loss_ocfm and --loss_sad must be >= 0")


# --- the grid and the teacher's pseudo-labels ---------------------------------------------------------------------

def grid_sample(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """N x H x W values at the centres of an h x w feature map's cells: rows o + s m, columns o + s n with
    s = H // h, o = s // 2 (at stride 16: label[:, 8::16, 8::16]), clamped inside the image."""
    h, w = size
    rows = grid_index(labels.shape[-2], h, labels.device)
    cols = grid_index(labels.shape[-1], w, labels.device)
    return labels.index_select(-2, rows).index_select(-1, cols)


def grid_index(full: int, small: int, device: torch.device) -> torch.Tensor:
    stride = max(full // small, 1)
    return (torch.arange(small, device=device) * stride + stride // 2).clamp(max=full - 1)


def teacher_pseudo_labels(teacher_logits: torch.Tensor, num_old: int) -> torch.Tensor:
    """y^ per pixel: the old class (1..num_old-1) of the largest logit where that raw logit is above 0.5, else 0."""
    best, index = upcast(teacher_logits[:, 1:num_old]).max(dim=1)
    return torch.where(best > PSEUDO_LOGIT_THRESHOLD, index + 1, torch.zeros_like(index))


# --- class statistics ---------------------------------------------------------------------------------------------

@dataclass
class ClassSums:
    """Float64 sums over grid positions, per class: what every statistic derives from, summed over ranks exactly
    (up to float64 rounding) whatever the shards. u = normalize(f_j), r = ||f_j||."""
    count: torch.Tensor     # C
    sum_u: torch.Tensor     # C x D
    sum_u2: torch.Tensor    # C x D
    sum_r: torch.Tensor     # C
    sum_r2: torch.Tensor    # C
    background: torch.Tensor  # scalar: positions labelled 0

    @classmethod
    def zeros(cls, num_classes: int, dim: int, device: torch.device) -> "ClassSums":
        z = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(num_classes, **z), torch.zeros(num_classes, dim, **z),
                   torch.zeros(num_classes, dim, **z), torch.zeros(num_classes, **z), torch.zeros(num_classes, **z),
                   torch.zeros((), **z))

    def add(self, features: torch.Tensor, grid_labels: torch.Tensor, classes: range) -> None:
        """features N x D x h x w, grid_labels N x h x w (label values); `classes` the label values counted."""
        f = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).to(torch.float64)
        y = grid_labels.reshape(-1)
        self.background += (y == 0).sum()
        chosen = (y >= classes.start) & (y < classes.stop)
        f, index = f[chosen], y[chosen] - classes.start
        norms = f.norm(dim=1)
        u = F.normalize(f, dim=1)
        self.count.index_add_(0, index, torch.ones_like(norms))
        self.sum_u.index_add_(0, index, u)
        self.sum_u2.index_add_(0, index, u * u)
        self.sum_r.index_add_(0, index, norms)
        self.sum_r2.index_add_(0, index, norms * norms)

    def all_reduce(self) -> None:
        for tensor in (self.count, self.sum_u, self.sum_u2, self.sum_r, self.sum_r2, self.background):
            dist.all_reduce_sum(tensor)


@dataclass
class ClassStatistics:
    """Per class, in learning order: prototype p (C x D), spread s (C x D), norm mean mu and std tau (C), grid count
    (C, float64: the overlap formula halves counts)."""
    prototypes: torch.Tensor
    spreads: torch.Tensor
    norm_mean: torch.Tensor
    norm_std: torch.Tensor
    counts: torch.Tensor

    KEYS = ("prototypes", "spreads", "norm_mean", "norm_std", "counts")

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.KEYS}

    @classmethod
    def concat(cls, first: "ClassStatistics", second: "ClassStatistics") -> "ClassStatistics":
        return cls(*(torch.cat([getattr(first, k), getattr(second, k).to(getattr(first, k).device)])
                     for k in cls.KEYS))

    def __len__(self) -> int:
        return int(self.counts.shape[0])


def derive_statistics(sums: ClassSums) -> ClassStatistics:
    """p = normalize(sum u); s^2 = E[u^2] - 2 p E[u] + p^2 = mean (u - p)^2 per dimension; mu = E[r];
    tau^2 = (sum r^2 - n mu^2) / (n - 1). A class with no position stores zeros; with one, tau = 0."""
    n = sums.count
    present = n > 0
    safe_n = n.clamp(min=1.0)
    prototypes = F.normalize(sums.sum_u, dim=1)
    mean_u, mean_u2 = sums.sum_u / safe_n[:, None], sums.sum_u2 / safe_n[:, None]
    variance = (mean_u2 - 2 * prototypes * mean_u + prototypes * prototypes).clamp(min=0.0)
    spreads = torch.where(present[:, None], variance.sqrt(), torch.zeros_like(variance))
    norm_mean = sums.sum_r / safe_n
    norm_var = ((sums.sum_r2 - n * norm_mean * norm_mean) / (n - 1).clamp(min=1.0)).clamp(min=0.0)
    norm_std = torch.where(n > 1, norm_var.sqrt(), torch.zeros_like(norm_var))
    return ClassStatistics(prototypes.float(), spreads.float(), norm_mean.float(), norm_std.float(), n.clone())


# --- counts at the start of a step t > 0 ----------------------------------------------------------------------------

@dataclass
class ReplayPlan:
    """What before_training derives from the teacher's pseudo-label counts: synthetic features per global iteration
    per old class, the extra background's ratio rho, and the counts this step carries on."""
    per_iteration: torch.Tensor   # num_old - 1, int64
    bg_ratio: torch.Tensor        # scalar, float64
    old_counts: torch.Tensor      # num_old - 1, float64
    bg_count: torch.Tensor        # scalar, float64


def replay_plan(old_counts: torch.Tensor, bg_count: torch.Tensor, pseudo_counts: torch.Tensor, iterations: int,
                num_new: int, overlap: bool) -> ReplayPlan:
    """old_counts N_k and bg_count N_bg: carried from step t-1; pseudo_counts: [N^pl_bg, N^pl_1, ...] on this step's
    grid (trainer_voc.py:362-388). int() truncates toward 0 before the clamp, as the reference's .to(torch.int)."""
    old_counts, bg_count = old_counts.to(torch.float64), bg_count.to(torch.float64)
    pseudo = pseudo_counts.to(torch.float64).to(old_counts.device)
    pseudo_bg, pseudo_old = pseudo[0], pseudo[1:]
    iterations = max(int(iterations), 1)
    if overlap:
        per_iteration = torch.trunc((old_counts - pseudo_old) / iterations)
        shrunk_bg = bg_count * (1 - OVERLAP_BG_SHRINK * num_new)
        ratio = shrunk_bg / pseudo_bg - REPEATED_BG_SHARE
        carried_bg, carried_old = REPEATED_BG_SHARE * pseudo_bg + shrunk_bg, old_counts.clone()
    else:
        per_iteration = torch.trunc(old_counts / iterations)
        ratio = bg_count / pseudo_bg
        carried_bg, carried_old = pseudo_bg + bg_count, old_counts + pseudo_old
    # No pseudo-labelled background: no extra background to weight (the reference divides by 0).
    ratio = torch.where(pseudo_bg > 0, ratio, torch.zeros_like(ratio)).clamp(min=0.0)
    return ReplayPlan(per_iteration.clamp(min=0).to(torch.int64), ratio, carried_old, carried_bg)


# --- replay -------------------------------------------------------------------------------------------------------

def synthetic_features(stats: ClassStatistics, per_class: Sequence[int], seed: int, device: torch.device,
                       rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's rows (r, r + W, ...) of the global draw: per class k with n_k > 0, in order, n_k x D normal
    noise eps, then n_k x D norms r ~ N(mu_k, tau_k^2) (per element, as trainer_voc.py:406-423), h = (p_k + eps s_k) r.
    Every rank draws the whole set from a generator seeded with `seed`, so the union over ranks is a 1-rank draw."""
    dim = stats.prototypes.shape[1]
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for k, n in enumerate(per_class):
        if n <= 0:
            continue  # the reference's generator does not advance for an empty class either
        eps = torch.randn(n, dim, generator=generator, device=device)
        norms = (torch.randn(n, dim, generator=generator, device=device) * stats.norm_std[k].to(device)
                 + stats.norm_mean[k].to(device))
        rows.append((stats.prototypes[k].to(device) + eps * stats.spreads[k].to(device)) * norms)
    if not rows:
        return torch.zeros(0, dim, device=device)
    return torch.cat(rows)[rank::world]


# --- losses -------------------------------------------------------------------------------------------------------

def negative_bce_sum(logits: torch.Tensor) -> torch.Tensor:
    """Sum over rows and channels of BCE(z, 0) for logits M x C (the rows' mean comes from the caller's count)."""
    z = upcast(logits)
    return F.binary_cross_entropy_with_logits(z, torch.zeros_like(z), reduction="sum")


def over_ranks(local_sum: torch.Tensor, global_count: torch.Tensor) -> torch.Tensor:
    """A mean over the global batch of which this rank holds `local_sum`: scaled by W so that DDP's gradient average
    gives the 1-rank gradient; 0 with the graph kept when nothing was counted anywhere (local_sum is 0 then)."""
    count = global_count.to(local_sum.dtype)
    safe = torch.where(count > 0, count, torch.ones_like(count))
    return local_sum * dist.get_world_size() / safe


def mbce_loss(class_term: torch.Tensor, synthetic_logits: torch.Tensor, background_logits: torch.Tensor,
              counts: torch.Tensor, bg_ratio: torch.Tensor) -> torch.Tensor:
    """(sum_c A_c + w_f sum_c F_c + w_b sum_c G_c) / (1 + w_f + w_b): the denominator does not depend on c, so the
    class sums can be taken first. class_term = sum_c A_c; synthetic_logits, background_logits: this rank's rows x
    new classes; counts (global, float64) = [synthetic rows, |G|, grid positions B h w]."""
    synthetic_rows, background_rows, grid = counts[0], counts[1], counts[2].clamp(min=1.0)
    fake = over_ranks(negative_bce_sum(synthetic_logits), synthetic_rows)
    extra_bg = over_ranks(negative_bce_sum(background_logits), background_rows)
    w_f = (synthetic_rows / grid).to(fake.dtype)
    w_b = (bg_ratio.to(counts.dtype) * background_rows / grid).to(fake.dtype)
    return (class_term + w_f * fake + w_b * extra_bg) / (1 + w_f + w_b)


def ocfm_loss(features: torch.Tensor, old_features: torch.Tensor, pseudo_mask: torch.Tensor) -> torch.Tensor:
    """sum_j M_j ||f_j - f_old_j||^2 / (D sum_j M_j) over the global batch; M = the full-resolution pseudo-label mask
    resized bilinearly to f's size (loss.py:94-107). 0 (graph kept) without any pseudo-labelled pixel."""
    f, old = upcast(features), upcast(old_features)
    mask = F.interpolate(pseudo_mask[:, None].to(f.dtype), size=f.shape[-2:], mode="bilinear",
                         align_corners=False)[:, 0]
    per_position = (f - old).pow(2).mean(dim=1)
    weight = mask.sum().detach().to(torch.float64)
    dist.all_reduce_sum(weight)
    return over_ranks((per_position * mask).sum(), weight)


def new_class_sums(features: torch.Tensor, labels: torch.Tensor, classes: range) -> torch.Tensor:
    """C_new x D: sum over the batch's positions of normalize(f) weighted by [y = c] resized bilinearly to f's size
    (loss.py:110-135), the classes resized CLASS_CHUNK at a time to bound the full-resolution masks."""
    u = F.normalize(upcast(features), dim=1)
    parts = []
    for start in range(classes.start, classes.stop, CLASS_CHUNK):
        chunk = torch.arange(start, min(start + CLASS_CHUNK, classes.stop), device=labels.device)
        masks = (labels[:, None] == chunk[None, :, None, None]).to(u.dtype)
        small = F.interpolate(masks, size=u.shape[-2:], mode="bilinear", align_corners=False)
        parts.append(torch.einsum("nchw,ndhw->cd", small, u))
    return torch.cat(parts)


def sad_loss(local_sums: torch.Tensor, old_prototypes: torch.Tensor) -> torch.Tensor:
    """mean over new c of 1 / min over old k of ||q_c - p_k||, q_c = normalize(the class sums over ALL ranks).
    all_gather_with_grad's backward sums every rank's gradient of its part (W times the 1-rank gradient, as every
    rank computes the same loss); DDP's average over ranks then gives the 1-rank gradient."""
    total = torch.stack(dist.all_gather_with_grad(local_sums)).sum(dim=0)
    q = F.normalize(total, dim=1)
    distances = torch.cdist(q, old_prototypes.to(q.dtype))
    return (1.0 / distances.min(dim=1).values).mean()


# --- the method ---------------------------------------------------------------------------------------------------

STATE_PREFIX = "star_"


class STAR(SigmoidMethod):
    name = "star"
    Options = STAROptions
    options: STAROptions
    teacher_features = frozenset({"pre_logits"})
    flag_defaults = {"pos_weight": default_pos_weight, "lr": reference_lr, "warmup_epochs": reference_warmup_epochs}

    def __init__(self, info: StepInfo, model, teacher, options: STAROptions) -> None:
        super().__init__(info, model, teacher, options)
        self.old: ClassStatistics | None = None       # carried from step t-1 (classes 1..num_old-1)
        self.old_bg_count: torch.Tensor | None = None
        self.plan: ReplayPlan | None = None           # before_training at t > 0
        self.replay_list: list[int] = []              # plan.per_iteration as ints (no device sync per iteration)
        self.new: ClassStatistics | None = None       # finish_step
        self.new_bg_count: torch.Tensor | None = None

    @classmethod
    def step0_key(cls, options: STAROptions) -> tuple:
        """STAR's own step 0: the class-wise BCE with its pos_weight (DKD's adds the auxiliary classifier)."""
        return ("star", "pos_weight", options.pos_weight)

    # --- optimiser ---

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        if self.info.step == 0:
            return self.step0_groups(base_lr)
        old_classifiers = [p for cls in self.model.cls[:-1] for p in self.trainable(cls)]
        return [{"params": self.trainable(self.model.body), "lr": base_lr, "name": "backbone"},
                {"params": self.trainable(self.model.head) + old_classifiers, "lr": 10 * base_lr,
                 "name": "head_old_classifiers"},
                {"params": self.trainable(self.model.cls[-1]), "lr": 100 * base_lr, "name": "new_classifier"}]

    # --- carried statistics ---

    def carry_over(self, state: dict[str, Any]) -> None:
        keys = [STATE_PREFIX + k for k in ClassStatistics.KEYS] + [STATE_PREFIX + "bg_count"]
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"--method STAR needs the previous step's class statistics ({', '.join(missing)} "
                             f"missing): train step {self.info.step - 1} with --method STAR")
        self.old = ClassStatistics(*(state[STATE_PREFIX + k] for k in ClassStatistics.KEYS))
        self.old_bg_count = state[STATE_PREFIX + "bg_count"]
        if len(self.old) != self.info.num_old - 1:
            raise ValueError(f"the previous step's STAR statistics hold {len(self.old)} classes, this step has "
                             f"{self.info.num_old - 1} old ones")

    def carry_state(self) -> dict[str, Any]:
        if self.new is None or self.new_bg_count is None:
            raise RuntimeError("STAR's class statistics are missing: finish_step must run first")
        stats, bg = self.new, self.new_bg_count
        if self.info.step > 0:
            assert self.old is not None and self.plan is not None
            carried_old = ClassStatistics(self.old.prototypes, self.old.spreads, self.old.norm_mean,
                                          self.old.norm_std, self.plan.old_counts)
            stats, bg = ClassStatistics.concat(carried_old, self.new), self.plan.bg_count
        state = {STATE_PREFIX + k: v.detach().cpu() for k, v in stats.as_dict().items()}
        state[STATE_PREFIX + "bg_count"] = bg.detach().to(torch.float64).cpu()
        return state

    # --- running state of a step t > 0 (run states) ---

    def state_dict(self) -> dict[str, Any]:
        if self.plan is None:
            return {}
        return {STATE_PREFIX + "replay_per_iteration": self.plan.per_iteration,
                STATE_PREFIX + "bg_ratio": self.plan.bg_ratio,
                STATE_PREFIX + "carried_old_counts": self.plan.old_counts,
                STATE_PREFIX + "carried_bg_count": self.plan.bg_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if STATE_PREFIX + "replay_per_iteration" not in state:
            return
        self.set_plan(ReplayPlan(state[STATE_PREFIX + "replay_per_iteration"], state[STATE_PREFIX + "bg_ratio"],
                                 state[STATE_PREFIX + "carried_old_counts"], state[STATE_PREFIX + "carried_bg_count"]))

    def set_plan(self, plan: ReplayPlan) -> None:
        self.plan = plan
        self.replay_list = [int(n) for n in plan.per_iteration.tolist()]

    # --- passes over the training set ---

    @torch.no_grad()
    def before_training(self, loader: Iterable[Batch], device: torch.device) -> None:
        super().before_training(loader, device)
        if self.info.step == 0:
            return
        if self.old is None or self.old_bg_count is None:
            raise RuntimeError("STAR's previous statistics are missing: carry_over must run before before_training")
        assert self.teacher is not None
        pseudo_counts, labelled_bg = self.teacher_pseudo_counts(loader, device)
        iterations = len(loader)  # type: ignore[arg-type]
        plan = replay_plan(self.old.counts.to(device), self.old_bg_count.to(device), pseudo_counts, iterations,
                           self.info.num_classes - self.info.num_old, self.info.overlap)
        self.set_plan(plan)
        if dist.is_main_process():
            log.info("STAR: grid positions labelled background %d, pseudo-labelled background N^pl_bg %d, old "
                     "classes N^pl %s; %d iterations per epoch -> replayed features per iteration %s, extra "
                     "background ratio %.6g", int(labelled_bg), int(pseudo_counts[0]),
                     pseudo_counts[1:].tolist(), iterations, self.replay_list, float(plan.bg_ratio))

    def teacher_pseudo_counts(self, loader: Iterable[Batch], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """([N^pl_bg, N^pl_1, ..., N^pl_{num_old-1}], N_bg) on the grid of this step's training set, summed over
        the ranks: one teacher pass (float32, eval) over each rank's shard, pseudo-labels at full resolution."""
        from segmentation.engine.trainer import prepare_batch  # the engine imports the methods: import here
        from segmentation.methods.plop import teacher_memory_format

        teacher, num_old = self.teacher, self.info.num_old
        assert teacher is not None
        memory_format = teacher_memory_format(teacher)
        was_training = teacher.training
        teacher.eval()
        # Allocated up front: a rank with an empty shard still joins the all-reduce with the same shape.
        counts = torch.zeros(num_old + 1, dtype=torch.int64, device=device)
        for raw in loader:
            batch = prepare_batch(raw, device, memory_format)
            logits, features = teacher(batch["image"], features=("logits_small",))
            size = features["logits_small"].shape[-2:]
            pseudo = grid_sample(teacher_pseudo_labels(logits, num_old), size)
            unlabelled = grid_sample(batch["label"], size) == 0
            counts[:num_old] += torch.bincount(pseudo[unlabelled].reshape(-1), minlength=num_old)[:num_old]
            counts[num_old] += unlabelled.sum()
        teacher.train(was_training)
        dist.all_reduce_sum(counts)
        return counts[:num_old], counts[num_old]

    @torch.no_grad()
    def finish_step(self, passes: TrainingSetPasses) -> None:
        """The step's classes' statistics over the whole training set (every rank its share, sums all-reduced)."""
        from segmentation.engine.trainer import prepare_batch
        from segmentation.methods.plop import teacher_memory_format

        memory_format = teacher_memory_format(self.model)
        classes = self.new_channels()
        sums: ClassSums | None = None
        for raw in passes.augmented():
            batch = prepare_batch(raw, passes.device, memory_format)
            _, features = self.model(batch["image"], features=("pre_logits",))
            f = upcast(features["pre_logits"])
            if sums is None:
                sums = ClassSums.zeros(len(classes), f.shape[1], passes.device)
            sums.add(f, grid_sample(batch["label"], f.shape[-2:]), classes)
        if sums is None:  # a rank without images (more ranks than images) still joins the all-reduce
            sums = ClassSums.zeros(len(classes), self.feature_channels(), passes.device)
        sums.all_reduce()
        self.new, self.new_bg_count = derive_statistics(sums), sums.background
        if dist.is_main_process():
            log.info("STAR statistics of classes %d-%d: grid positions %s, norm mean %s, norm std %s",
                     classes.start, classes.stop - 1, [int(n) for n in self.new.counts.tolist()],
                     [round(v, 4) for v in self.new.norm_mean.tolist()],
                     [round(v, 4) for v in self.new.norm_std.tolist()])

    def feature_channels(self) -> int:
        return int(self.model.cls[0].in_channels)

    # --- losses ---

    def losses(self, batch: Batch, outputs: Outputs, teacher_outputs: Outputs | None, epoch: int
               ) -> dict[str, torch.Tensor]:
        logits, features = outputs
        labels, o = batch["label"], self.options
        class_term = class_bce(logits, labels, self.new_channels(), o.pos_weight)
        if self.info.step == 0:
            return {"mbce": class_term}
        if teacher_outputs is None or self.plan is None or self.old is None:
            raise RuntimeError("STAR at a step t > 0 needs the teacher's outputs and before_training's replay plan")
        teacher_logits, teacher_features = teacher_outputs
        f = features["pre_logits"]
        pseudo = teacher_pseudo_labels(teacher_logits, self.info.num_old)
        unlabelled = labels == 0
        return {"mbce": self.mbce(class_term, features["logits_small"], grid_sample(unlabelled & (pseudo == 0),
                                                                                    f.shape[-2:])),
                "ocfm": o.loss_ocfm * ocfm_loss(f, teacher_features["pre_logits"], unlabelled & (pseudo > 0)),
                "sad": o.loss_sad * sad_loss(new_class_sums(f, labels, self.new_channels()),
                                             self.old.prototypes.to(f.device))}

    def mbce(self, class_term: torch.Tensor, logits_small: torch.Tensor, extra_background: torch.Tensor
             ) -> torch.Tensor:
        """L_mbce with the replayed features and the extra background G (the grid positions of `extra_background`,
        whose logits are the model's own at stride 16: the classifier on the live f there)."""
        assert self.plan is not None and self.old is not None
        device, new = logits_small.device, list(self.new_channels())
        synthetic = synthetic_features(self.old, self.replay_list, self.replay_seed(), device,
                                       dist.get_rank(), dist.get_world_size())
        synthetic_logits = self.model.classify(synthetic[:, :, None, None].to(logits_small.dtype))[:, new, 0, 0]
        background_logits = logits_small[:, new].permute(0, 2, 3, 1)[extra_background]
        grid = extra_background.numel()
        counts = torch.zeros(3, dtype=torch.float64, device=device)  # filled on the device: no host copy per iteration
        counts[0], counts[1], counts[2] = synthetic.shape[0], extra_background.sum(), grid
        dist.all_reduce_sum(counts)
        return mbce_loss(class_term, synthetic_logits, background_logits, counts, self.plan.bg_ratio.to(device))

    @staticmethod
    def replay_seed() -> int:
        """From the global torch RNG: identical on every rank (seeded alike, never drawn per rank at t > 0) and
        restored on resume with the run state."""
        return int(torch.randint(0, 2 ** 62, (1,)).item())
