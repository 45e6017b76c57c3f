"""The method interface: everything method-specific lives behind it, so the trainer never branches on a name.

A method is built once per step with the new model and the frozen teacher (None at step 0). Its hooks, in call order:
  init_new_classifier()          after the previous step's weights are loaded (MiB's balanced init)
  extra_modules()                trainable parts besides the model (WILSON's localizer), built once in __init__;
                                 the step moves them to the device, wraps each in its own DDP and hands the wrapped
                                 modules back through `self.forward_modules`, which `losses` must call (a direct
                                 call of the unwrapped module would skip DDP's gradient all-reduce)
  param_groups(base_lr)          optimiser groups; the default gives every trainable parameter base_lr
  before_training(loader)        a pass over the training set before the first epoch (PLOP's entropy thresholds,
                                 STAR's pixel counts)
  train_mode()                   at the start of every epoch, after model.train(): layers the method keeps in eval
                                 mode while training (DKD and STAR freeze norm layers and dropout at t>0)
  losses(batch, out, t_out, e)   a dict of named loss terms for one batch at epoch e; the trainer sums and logs them
  after_backward()               on every rank after backward, with the all-reduced, unscaled gradients, before
                                 an update that will be applied (EWC/PI/RW read the gradients and add their
                                 penalty's gradient here)
  end_epoch(e)                   after each training epoch (WILSON reports pseudo-labels that stayed empty)
  finish_step(passes)            once, after the last epoch and before the test, on every rank with the model in
                                 eval mode: passes over the whole training set (TrainingSetPasses), whose results
                                 go into carry_state (STAR's class statistics, the -M variants' exemplar memory);
                                 gather them over all ranks (each rank sees its shard only)
  eval_views(batch, outputs)     in validation: the method's own per-pixel predictions (WILSON's localizer and its
                                 pseudo-labels), each scored against its target (if any) and drawn in the
                                 validation pictures beside the model's; `eval_features` names the model features
                                 they read
  carry_state() / carry_over(s)  statistics for the next step, kept in the step's artifact (EWC's Fisher, PI's
                                 score); carry_over gets step t-1's at the start of step t
  state_dict() / load_state_dict(s)  the running statistics of this step, in run states: restored on resume,
                                 after carry_over; both load hooks receive tensors on the training device
Class attribute `teacher_features` names the teacher features `losses` reads (Segmenter.forward's `features`; the
logits always come): the others are freed during the teacher's forward instead of being held to the loss.
Class attribute `uses_old_data`: the method trains on images of earlier steps (the -M variants' exemplar memory);
`--forbid_old_data` refuses it and its results say so. Class method `memory_ids(carried)`: the ids of those images
(source image ids) in step t-1's carried state, which the step adds to its training set.
Class attributes: `Options`, the frozen dataclass of the method's own flags (options.py; the step hands an instance
to __init__), `learns_from_image_labels` (the step then loads no pixel label at t>0) and `flag_defaults` (the
preset: values, or functions of the flags, for the method's options and for general flags left unset on the
command line). Class method `step0_key(options)`: what step 0 trains with under these options. Methods with equal
keys (and equal general flags) train the same step 0, which a benchmark then trains once for all of them; the
default key is the method's own name, so a new method shares no step 0 until it declares which one it trains
(FT, LwF, MiB, CIL: ("ce",), plain CE).
Where the student starts at step t>0 is the flag --student_init ("previous": the teacher's weights; "imagenet": a
fresh model from --pretrained, as CIL), which a method's preset may set.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, NamedTuple

import torch
from torch import nn

from segmentation.methods.losses import cross_entropy_map, global_mean
from segmentation.methods.options import NoOptions

if TYPE_CHECKING:
    from segmentation.tasks import Task

Batch = dict[str, torch.Tensor]
Outputs = tuple[torch.Tensor, dict[str, Any]]


@dataclass(frozen=True)
class StepInfo:
    task: "Task"
    step: int
    num_old: int      # output channels of the teacher (seen classes before this step, background included)
    num_classes: int  # output channels of the student
    epochs: int
    norm_act: str = "iabn_sync"   # for a method's extra modules (WILSON's localizer): --norm_act, --norm_impl
    norm_impl: str = "auto"
    device_type: str = "cpu"
    overlap: bool = True          # --overlap: the protocol (STAR's replay counts differ between overlap and disjoint)
    seed: int = 0                 # --random_seed: a method's own draws (the -M variants' exemplar choice) start from it


@dataclass(frozen=True)
class TrainingSetPasses:
    """What Method.finish_step may read: loaders over the step's whole training set (exemplars included), each image
    exactly once over all ranks (rank r: images r, r+W, ...; no padding, no dropped batch), `batch` images per rank.
    `augmented()`: with the training augmentation of the step's last epoch (STAR's statistics, as its reference
    computes them on training crops); `plain()`: with the evaluation transform (the whole image resized and
    centre-cropped as in validation). Each call makes a new loader; `device` is the training device."""

    augmented: Callable[[], Iterable[Batch]]
    plain: Callable[[], Iterable[Batch]]
    device: torch.device
    # The training set in its order: source index (the items' "index") -> image id (SegmentationSource.ids), so
    # that what a method finds per image can be ordered and named the same under any number of ranks.
    image_ids: dict[int, str] = dataclasses.field(default_factory=dict)


class EvalView(NamedTuple):
    """A method's own prediction in validation: `pred` N x H x W class indices in learning order (255 = none) at
    the label's size; `target` the label it is scored against (None: drawn, not scored)."""

    pred: torch.Tensor
    target: torch.Tensor | None


class Method:
    name = "base"
    teacher_features: frozenset[str] = frozenset()
    uses_old_data = False                 # True: trains on exemplars of earlier steps (refused by --forbid_old_data)
    learns_from_image_labels = False      # True: steps t>0 train on image-level labels, no pixel label is loaded
    flag_defaults: dict[str, Any] = {}    # the method's preset for flags the user did not give (config.py)
    Options: type = NoOptions

    def __init__(self, info: StepInfo, model: nn.Module, teacher: nn.Module | None, options: Any) -> None:
        if not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} takes a {self.Options.__name__}, not {type(options).__name__}")
        self.info = info
        self.model = model
        self.teacher = teacher
        self.options = options
        self.forward_modules: dict[str, nn.Module] = {}  # extra modules as wrapped by the step (DDP or themselves)

    @classmethod
    def step0_key(cls, options: Any) -> tuple:
        """What step 0 trains with under these options: methods whose keys are equal (under equal general flags)
        train the same step 0, so a benchmark trains it once for all of them (FT, LwF, MiB, CIL: plain CE; WILSON
        and LwF-MC: BCE; EWC, PI, RW: CE while gathering every regularizer's statistics). By default a method's
        own: a method that trains step 0 like another must say so by returning that key."""
        return ("own", cls.name)

    @classmethod
    def predict(cls, scores: torch.Tensor, options: Any) -> torch.Tensor:
        """How this method's outputs become a prediction: scores N x C x H x W -> learning-order class indices
        N x H x W. The argmax over the channels, as MiB, PLOP, WILSON and CIL predict; a method whose outputs are
        not one distribution over the classes (per-class sigmoids without a background channel) overrides it.
        Every place that predicts calls it (methods.predictor): validation, the test after a step, --test,
        --infer and the pictures."""
        return scores.argmax(dim=1)

    @classmethod
    def memory_ids(cls, carried: dict[str, Any]) -> list[str]:
        """Image ids of earlier steps' training images that this step trains on too (the exemplar memory kept in
        step t-1's carried state); none for a method that uses no old data."""
        return []

    @property
    def needs_teacher(self) -> bool:
        return self.info.step > 0

    def init_new_classifier(self) -> None:
        pass

    def extra_modules(self) -> dict[str, nn.Module]:
        return {}

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        params: Iterable[nn.Parameter] = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": list(params), "lr": base_lr, "name": "model"}]
        for name, module in self.extra_modules().items():
            groups.append({"params": [p for p in module.parameters() if p.requires_grad], "lr": base_lr, "name": name})
        return groups

    def before_training(self, loader: Iterable[Batch], device: torch.device) -> None:
        pass

    def losses(self, batch: Batch, outputs: Outputs, teacher_outputs: Outputs | None, epoch: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_mode(self) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def end_epoch(self, epoch: int) -> None:
        pass

    def finish_step(self, passes: "TrainingSetPasses") -> None:
        pass

    @property
    def eval_features(self) -> frozenset[str]:
        """Model features `eval_views` reads (Segmenter.forward's `features`)."""
        return frozenset()

    def eval_views(self, batch: Batch, outputs: Outputs) -> dict[str, EvalView]:
        return {}

    def carry_state(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def carry_over(self, state: dict[str, Any]) -> None:
        pass


def supervised_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain CE over valid pixels of the global batch."""
    return global_mean(cross_entropy_map(logits, labels), labels != 255)
