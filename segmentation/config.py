"""Command line -> one frozen Config.

Flag names follow MiB/PLOP/WILSON so their scripts carry over (`--overlap`, `--step_ckpt`, `--norm_act`, ...).
Differences from MiB, on purpose: `--batch_size` is the TOTAL batch over all ranks (WILSON's convention), `--method`
is case-insensitive, and `--lr` defaults to the anchors' per-step practice (0.01 at step 0, 0.001 later).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from segmentation.engine.preemption import parse_signal
from segmentation.methods import METHODS
from segmentation.methods.options import add_method_flags, option_names, resolve_options, show
from segmentation.models.deeplab import HEADS
from segmentation.models.norm import KINDS as NORM_ACTS
from segmentation.models.norm import NORM_IMPLS

BACKBONES = ("resnet18", "resnet50", "resnet101", "erfnet")
LR_POLICIES = ("poly", "poly_epoch", "warmup", "warm_poly", "step", "none")

# Flags whose default depends on the dataset or the method: None on the command line means, in this order, the
# dataset file's [defaults.<method>], the method's preset (Method.flag_defaults), the dataset file's [defaults],
# and then these. A method's own flags (Method.Options, methods/options.py) resolve the same way, ending at the
# options' field defaults.
FALLBACK_DEFAULTS: dict[str, object] = {
    "lr_policy": "poly", "warmup_epochs": 1.0, "student_init": "previous", "backbone": "resnet101", "output_stride": 16,
    "norm_act": "iabn_sync", "head": "mib", "crop_size": (512, 512), "weight_decay": 1e-4, "optimizer": "sgd",
    "train_images": "new", "test_images": "seen", "train_scale_divide": False, "epochs": 30, "batch_size": 24,
    "test_future": "background",
}


class ConfigError(ValueError):
    """A flag value that cannot work; the message names the flag and the fix."""


@dataclass(frozen=True)
class Config:
    # data
    data_root: Path
    dataset: str
    task: str
    step: int
    overlap: bool
    test_future: str
    ignore_test_bg: bool
    train_images: str                   # "new": images holding a class of the step (MiB's filter); "all" (CIL)
    test_images: str                    # "seen": val images holding a seen class (MiB's filter); "all" (WILSON)
    crop_size: tuple[int, int]          # (height, width) of the training crop and of --crop_val's centre crop
    crop_val: bool
    eval_size: tuple[int, int] | None   # the network's input at evaluation (CIL: 512x1024); scored at label size
    train_base_size: tuple[int, int] | None  # training images are first resized to this (CIL: 512x1024)
    train_scale: tuple[float, float] | None  # random rescale range (default: the dataset's, 0.5-2 for photos)
    train_scale_divide: bool            # resize by 1 / s, s drawn from train_scale (CIL's RandomRescale: zoom out)
    color_jitter: tuple[float, float, float, float] | None  # brightness, contrast, saturation, hue
    num_workers: int | None
    # method
    method: str
    method_options: Any                 # the method's own flags: an instance of METHODS[method].Options
    forbid_old_data: bool               # the protocol keeps earlier steps' images out: -M variants are refused
    weakly: bool
    image_labels: Path | None
    student_init: str
    # optimisation
    epochs: int
    batch_size: int
    lr: float | None
    lr_policy: str
    lr_power: float
    lr_decay_step: int
    lr_decay_factor: float
    warmup_epochs: float
    momentum: float
    weight_decay: float
    optimizer: str
    amp: bool | None
    amp_dtype: str
    channels_last: bool
    # model
    backbone: str
    output_stride: int
    norm_act: str
    head: str                           # "mib": the anchors' DeepLabV3 head; "dkd": DKD/STAR's (extra 3x3 conv)
    norm_impl: str
    pretrained: Path | None
    # checkpoints, logs
    name: str
    checkpoint_dir: Path
    step_ckpt: Path | None
    replace: bool                       # train a step whose complete artifact is another run's; the old kept aside
    logdir: Path
    val_interval: int
    print_interval: int
    sample_num: int
    test: bool
    ckpt: Path | None
    infer: list[Path] | None
    gt: list[Path] | None
    infer_out: Path
    random_seed: int
    device: str
    # resume and preemption
    save_interval: int
    keep_run_states: int
    no_resume: bool
    preempt_signal: str

    def amp_enabled(self, device_type: str) -> bool:
        """--amp / --no-amp, else on by default on GPUs (bf16: same range as fp32, no loss scaling) and off on CPUs."""
        return self.amp if self.amp is not None else device_type == "cuda"

    def loader_workers(self) -> int:
        """--num_workers, else this process's share of the CPU cores it may use, one left for the training process
        itself, at most 8 (beyond that decoding outruns any one GPU at 512x512)."""
        if self.num_workers is not None:
            return self.num_workers
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(8, cores // max(local, 1) - 1))

    def step_lr(self) -> float:
        """The learning rate of this step: --lr, else the anchors' 0.01 at step 0 and 0.001 afterwards."""
        if self.lr is not None:
            return self.lr
        return 0.01 if self.step == 0 else 0.001


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py",
        description="Train or test one step of a class-incremental segmentation protocol. "
        "Launch with torchrun (one process per GPU, or several CPU processes with gloo), srun, or plain python.",
        formatter_class=DefaultsHelpFormatter, epilog=dataset_defaults_epilog(),
    )
    d = p.add_argument_group("data")
    d.add_argument("--data_root", type=Path, default=Path("data"),
                   help="folder holding the dataset (for voc: JPEGImages/, SegmentationClassAug/, splits/); "
                   "shapes is generated into <data_root>/shapes on first use")
    d.add_argument("--dataset", default="voc", help="voc, ade, coco-voc, cityscapes or shapes")
    d.add_argument("--task", default="15-5", help="class split, e.g. 15-5, 15-1 (= 15-5s), 10-1, offline; see tasks/<dataset>.toml")
    d.add_argument("--step", type=int, default=0, help="incremental step to train (0 = base classes)")
    d.add_argument("--overlap", action="store_true", help="overlapped protocol (future classes may appear as background); default disjoint")
    d.add_argument("--test_future", choices=("background", "ignore"), default=None,
                   help="at test time, pixels of classes not seen yet count as background (PLOP/WILSON) or are ignored (MiB)")
    d.add_argument("--ignore_test_bg", action="store_true",
                   help="at val and test time, ignore the pixels that read as background instead of scoring them "
                   "(PLOP's flag). With --test_future ignore this is MiB's ADE evaluation, which ignores ADE's class "
                   "0 'other'; by default 'other' is scored as the background class, as PLOP does")
    d.add_argument("--train_images", choices=("new", "all"), default=None,
                   help="training images of a step: those holding a class of the step (MiB's filter, default), or "
                   "all of them, also those without any (CIL: every image of a stage's cities; the default of "
                   "tasks/cityscapes.toml and city-shapes.toml). The disjoint protocol still drops images holding a "
                   "future class")
    d.add_argument("--test_images", choices=("seen", "all"), default=None,
                   help="test images of a step: the val images holding a class seen so far (MiB's filter, default), "
                   "or every val image (WILSON's protocol and its preset). The last step of VOC is the same either "
                   "way")
    d.add_argument("--crop_size", nargs="+", type=size_part, default=None, metavar="SIZE",
                   help="training crop, and the val/test centre crop: 512, or height and width (192 640 or 192x640); "
                   "default 512 (CIL on Cityscapes: 192x640)")
    d.add_argument("--eval_size", nargs="+", type=size_part, default=None, metavar="SIZE",
                   help="the network sees val/test images resized to this height and width (CIL: 512 1024) "
                   "instead of --crop_val's centre crop; its prediction is resized (nearest) to the label's own size "
                   "and scored there, as CIL scores Cityscapes at 1024x2048")
    d.add_argument("--train_base_size", nargs="+", type=size_part, default=None, metavar="SIZE",
                   help="resize training images to this height and width before the random rescale (CIL: 512 1024)")
    d.add_argument("--train_scale", nargs=2, type=float, default=None, metavar=("MIN", "MAX"),
                   help="random rescale range of training images (default: the dataset's, 0.5 2 for photographs; "
                   "CIL: 1 1.5 with --train_scale_divide)")
    d.add_argument("--train_scale_divide", action=argparse.BooleanOptionalAction, default=None,
                   help="draw s in --train_scale and resize by 1/s instead of s (CIL's RandomRescale, which divides "
                   "the size by s in [1, 1.5]: a zoom of 0.67-1, out only; the default on Cityscapes and "
                   "city-shapes)")
    d.add_argument("--color_jitter", nargs=4, type=float, default=None,
                   metavar=("BRIGHTNESS", "CONTRAST", "SATURATION", "HUE"),
                   help="random colour jitter of training images, as torchvision's ColorJitter (CIL: 0.2 0.2 0.2 0.1)")
    d.add_argument("--no_crop_val", dest="crop_val", action="store_false",
                   help="evaluate on whole images instead of the anchors' resize-512 + centre crop")
    d.add_argument("--num_workers", type=int, default=None,
                   help="data loader worker processes per rank; default: this rank's share of the usable CPU cores "
                   "minus one, between 1 and 8")

    m = p.add_argument_group("method")
    m.add_argument("--method", type=str.lower, default="ft", choices=sorted(METHODS),
                   help="incremental method (case-insensitive: FT, LwF, MiB, WILSON, ...); its preset fills the "
                   "flags not given, among them its own (the 'method:' groups below; README 'Methods and their "
                   "flags')")
    m.add_argument("--forbid_old_data", action="store_true",
                   help="the protocol forbids training on images of earlier steps: a method that keeps an exemplar "
                   "memory of them (DKD-M, STAR-M) is refused")
    w = p.add_argument_group("weakly supervised steps (WILSON; see README)")
    w.add_argument("--weakly", action="store_true",
                   help="steps t>0 learn from image-level labels only: the loader hands out no pixel label "
                   "(implied by --method WILSON at t>0)")
    w.add_argument("--image_labels", type=Path, default=None,
                   help="CSV 'image_id,class,...' or JSON {id: [classes]} of the training images' classes; "
                   "then their masks are never read (default: the classes present in each mask)")
    m.add_argument("--student_init", choices=("previous", "imagenet"), default=None,
                   help="where the model of a step t>0 starts: the previous step's weights (default) or, as CIL, "
                   "fresh from --pretrained ImageNet weights (CIL's preset)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=None, help="epochs of this step (default 30; presets: DKD/STAR on "
                   "VOC 60, on ADE 100)")
    o.add_argument("--batch_size", type=int, default=None, help="TOTAL batch size over all ranks (split evenly across "
                   "them; default 24; presets: DKD on VOC 32)")
    o.add_argument("--lr", type=float, default=None, help="learning rate; default 0.01 at step 0 and 0.001 at later steps")
    o.add_argument("--lr_policy", choices=LR_POLICIES, default=None,
                   help="per-iteration schedule: poly; poly_epoch (poly stepped once per epoch, as CIL); warmup "
                   "(WILSON: constant for --warmup_epochs, then poly); warm_poly (linear warm-up for --warmup_epochs, "
                   "then poly); step; none. Default: poly (WILSON's weak steps: warmup; CIL on Cityscapes: "
                   "poly_epoch)")
    o.add_argument("--lr_power", type=float, default=0.9)
    o.add_argument("--lr_decay_step", type=int, default=5000, help="iterations between decays for --lr_policy step")
    o.add_argument("--lr_decay_factor", type=float, default=0.1)
    o.add_argument("--warmup_epochs", type=float, default=None,
                   help="warm-up length for --lr_policy warmup / warm_poly (default 1; WILSON: --pseudo_ep)")
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight_decay", type=float, default=None, help="default 1e-4 (CIL on Cityscapes: 3e-4)")
    o.add_argument("--optimizer", choices=("sgd", "adam"), default=None,
                   help="SGD with Nesterov momentum (MiB/PLOP/WILSON; default) or Adam (CIL on Cityscapes)")
    o.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision with torch.autocast (dtype: --amp_dtype); default: on for GPUs, off on CPU")
    o.add_argument("--channels_last", action="store_true",
                   help="keep weights and activations in channels-last (NHWC) memory order: about 25%% faster "
                        "convolutions on CPU (oneDNN) and with --amp on recent GPUs; same results up to float rounding")
    o.add_argument("--amp_dtype", choices=("bf16", "fp16"), default="bf16",
                   help="autocast dtype; fp16 uses a GradScaler (GPU only)")

    mo = p.add_argument_group("model")
    mo.add_argument("--backbone", choices=BACKBONES, default=None,
                    help="DeepLabV3 on a ResNet, or ERFNet (CIL's network); default resnet101 (CIL on Cityscapes: "
                    "erfnet)")
    mo.add_argument("--output_stride", type=int, choices=(8, 16), default=None,
                    help="backbone output stride: 16 (default) or 8 (dilated last stages)")
    mo.add_argument("--norm_act", choices=NORM_ACTS, default=None,
                    help="norm+activation: InPlace-ABN synchronised over GPUs (the anchors', default), InPlace-ABN "
                    "per GPU, ABN, BN, SyncBN (CIL on Cityscapes: ERFNet's batch norm, synchronised); bn_relu, "
                    "syncbn_relu: BN + ReLU with torchvision's ResNet (ReLU, its dilation pattern) and backbone BN "
                    "momentum 0.01, DKD's and STAR's network (with --head dkd and torchvision's ImageNet weights)")
    mo.add_argument("--head", choices=tuple(HEADS), default=None,
                    help="DeepLabV3 head: mib = ASPP + image pooling -> 1x1 projection + norm (MiB, PLOP, WILSON; "
                    "default); dkd = the same, then Dropout(0.1) and an extra 3x3 conv + norm + activation "
                    "(DKD's and STAR's models/modules/aspp.py). ResNet backbones only")
    mo.add_argument("--norm_impl", choices=NORM_IMPLS, default="auto",
                    help="code behind the iabn kinds, same maths and weights: auto = our PyTorch layer on every "
                    "device (on GPUs cuDNN batch norm with no host syncs, keeping bf16 and channels-last; on CPU "
                    "faster than the package, README 'Norm layers'); inplace_abn = the inplace_abn package's "
                    "layers, which save activation memory (a larger batch per GPU)")
    mo.add_argument("--pretrained", type=Path, default=None,
                    help="ImageNet weights for step 0 in our format (see pretrained/README.md); default: train from scratch")

    c = p.add_argument_group("checkpoints and logs")
    c.add_argument("--name", default="Experiment", help="experiment name used in artifact and log paths")
    c.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints"),
                   help="step artifacts go to <checkpoint_dir>/step/<dataset>-<task>[-ov]/<name>_<step>.pth")
    c.add_argument("--step_ckpt", type=Path, default=None,
                   help="previous-step artifact to start from (default: <name>_<step-1>.pth in the step folder)")
    c.add_argument("--replace", action="store_true",
                   help="train the step although a complete artifact of it exists that was made by other flags or "
                   "from another previous-step artifact (without it that is refused); the old artifact and its "
                   "results are kept beside the new ones as <name>_<step>.replaced-<date>.pth/.json. An artifact "
                   "made by the same flags from the same previous step is complete and never replaced")
    c.add_argument("--logdir", type=Path, default=Path("logs"), help="tensorboard logs")
    c.add_argument("--val_interval", type=int, default=1, help="validate on the step's val split every N epochs (0 = never)")
    c.add_argument("--print_interval", type=int, default=10, help="iterations between log lines when stdout is not a terminal")
    c.add_argument("--sample_num", type=int, default=4, help="colourised predictions logged to tensorboard after each validation")
    c.add_argument("--test", action="store_true", help="only evaluate --ckpt on the test split of its step")
    c.add_argument("--ckpt", type=Path, default=None, help="step artifact to evaluate with --test or --infer")
    c.add_argument("--infer", nargs="+", type=Path, default=None, metavar="IMAGE",
                   help="predict these images (or every image in these folders) with --ckpt: writes the coloured "
                   "prediction and an overlay of each into --infer_out")
    c.add_argument("--gt", nargs="+", type=Path, default=None, metavar="MASK",
                   help="with --infer: ground-truth masks (one per image, or folders of them); prints each image's mIoU")
    c.add_argument("--infer_out", type=Path, default=Path("predictions"), help="where --infer writes its pictures")
    c.add_argument("--random_seed", type=int, default=42)
    c.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when available")

    r = p.add_argument_group("resume and preemption (see README, 'Cluster')")
    r.add_argument("--save_interval", type=int, default=500,
                   help="iterations between run states (also saved at every epoch end and on preemption); 0 = epoch ends only. "
                   "The same command line resumes from the newest one")
    r.add_argument("--keep_run_states", type=int, default=2, help="how many run states to keep (the newest)")
    r.add_argument("--no_resume", action="store_true",
                   help="discard this step's run states and train it from the start")
    r.add_argument("--preempt_signal", default="USR2",
                   help="signal that asks for a save and a SLURM requeue at the next iteration (none = off; not USR1)")
    # torch.distributed.launch passes --local_rank (old) or --local-rank (torch>=2); torchrun sets LOCAL_RANK instead.
    c.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_method_flags(p, [cls.Options for cls in METHODS.values()], method_presets, option_readers)
    return p


def dataset_defaults_epilog() -> str:
    """--help's last paragraph: the flags each dataset's file sets when they are not given."""
    from segmentation.tasks import dataset_defaults, list_datasets

    def flags(values: dict) -> str:
        return " ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in values.items())

    parts = []
    for dataset in list_datasets():
        general, per_method = dataset_defaults(dataset)
        text = f"{dataset}: {flags(general)}" if general else ""
        for method, values in per_method.items():
            text += f"{'; ' if text else dataset + ': '}with --method {method}: {flags(values)}"
        if text:
            parts.append(text)
    return ("Dataset defaults (tasks/<dataset>.toml) for the flags not given on the command line (a 'with --method' "
            "table comes before that method's preset, the others after it): " + " | ".join(parts) + ".")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: those flags say in their help what fills them in."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def method_presets(flag: str) -> str:
    """For a method flag's help: the methods whose preset sets it, and to what."""
    return ", ".join(f"{name} {show(cls.flag_defaults[flag])}" for name, cls in METHODS.items()
                     if flag in cls.flag_defaults)


def option_readers(options_cls: type) -> list[str]:
    """The methods that read an options class's flags: those whose Options is it or extends it (PLOP's extend the
    MiB family's)."""
    return [name for name, cls in METHODS.items() if issubclass(cls.Options, options_cls)]


def method_flag_names() -> frozenset[str]:
    return frozenset().union(*(option_names(cls.Options) for cls in METHODS.values()))


def size_part(text: str) -> int | tuple[int, int]:
    """One --crop_size / --eval_size word: "512" or "192x640"."""
    try:
        parts = [int(x) for x in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (512, or 192x640)") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (512, or 192x640)")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


SIZE_FLAGS = ("crop_size", "eval_size", "train_base_size")


def as_size(flag: str, value: object) -> tuple[int, int] | None:
    """--crop_size 512 / 192 640 / 192x640 (or a dataset file's 512 / [192, 640]) -> (height, width)."""
    if value is None:
        return None
    items: list = []
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        items.extend(v if isinstance(v, tuple) else [v])
    if len(items) == 1:
        items = items * 2
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
        raise ConfigError(f"--{flag} {value}: give one size (512) or a height and a width (192 640 or 192x640)")
    return int(items[0]), int(items[1])


def parse_config(argv: Sequence[str] | None = None) -> Config:
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank")
    apply_defaults(args)
    for flag in SIZE_FLAGS:
        args[flag] = as_size(flag, args[flag])
    for flag in ("train_scale", "color_jitter"):
        if args[flag] is not None:
            args[flag] = tuple(float(v) for v in args[flag])
    cfg = Config(**args)
    check_config(cfg)
    return cfg


def apply_defaults(args: dict[str, object]) -> None:
    """Fill the flags left at None, first source first: the dataset file's [defaults.<method>], the method's preset
    (a value, or a function of the flags so far), the dataset file's [defaults], then FALLBACK_DEFAULTS (for the
    method's own flags: the defaults of its Options). The method's own flags are resolved first and gathered into
    args["method_options"]; a method flag given on the command line that the method does not read is refused."""
    from segmentation.tasks import dataset_defaults

    method = str(args["method"])
    cls = METHODS[method]
    general, per_method = dataset_defaults(str(args["dataset"]))
    method_specific = inherited_dataset_defaults(cls, per_method)
    own = option_names(cls.Options)
    others = method_flag_names() - own
    given = {name: args.pop(name) for name in method_flag_names()}
    refused = sorted(name for name in others if given[name] is not None)
    if refused:
        readers = {name: sorted(m for m, c in METHODS.items() if name in option_names(c.Options)) for name in refused}
        said = "; ".join(f"--{name} is read by {', '.join(readers[name])}" for name in refused)
        raise ConfigError(f"--method {method} does not read {', '.join('--' + n for n in refused)} ({said}): drop "
                          f"the flag or choose one of those methods")
    for key in method_specific:
        if key in others:
            raise ConfigError(f"the dataset file's [defaults.{method}] sets {key!r}, which --method {method} does "
                              f"not read")
    general_own = {k: v for k, v in general.items() if k in own}
    try:
        args["method_options"] = resolve_options(
            cls.Options, [given, method_specific, cls.flag_defaults, general_own], args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    general_rest = {k: v for k, v in general.items() if k not in method_flag_names()}
    for source in (method_specific, cls.flag_defaults, general_rest, FALLBACK_DEFAULTS):
        for key, value in source.items():
            if key in own:
                continue
            if key not in args:
                raise ConfigError(f"default {key!r} (from a dataset file or a method preset) is not a run.py flag")
            if args.get(key) is None:
                args[key] = value(args) if callable(value) else value
    for name in own:
        args.pop(name)  # resolve_options put them in args for the general presets that read them (WILSON's)


def inherited_dataset_defaults(cls: type, per_method: dict[str, dict[str, object]]) -> dict[str, object]:
    """The dataset file's [defaults.<method>] of the method and of the registered methods it extends, its own last
    so that it wins: a variant (DKD-M extends DKD) trains with its parent's dataset defaults, as with its preset."""
    values: dict[str, object] = {}
    for base in reversed(cls.__mro__):
        name = getattr(base, "name", None)
        if METHODS.get(str(name)) is base:
            values.update(per_method.get(str(name), {}))
    return values


def check_config(cfg: Config) -> None:
    if cfg.step < 0:
        raise ConfigError(f"--step {cfg.step}: steps start at 0")
    if cfg.lr is not None and not cfg.lr > 0:  # `not >` also catches NaN
        raise ConfigError(f"--lr {cfg.lr}: the learning rate must be positive (a step at lr 0 trains nothing and "
                          f"would be saved as complete)")
    if cfg.random_seed < 0:
        raise ConfigError(f"--random_seed {cfg.random_seed}: must be 0 or more")
    check_name(cfg.name)
    for flag in ("checkpoint_dir", "logdir"):
        folder = getattr(cfg, flag)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--{flag} {folder} is a file, not a folder: give a folder (it is created if missing)")
    if cfg.epochs < 1:
        raise ConfigError(f"--epochs {cfg.epochs}: train for at least one epoch")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch_size {cfg.batch_size}: must be positive")
    if cfg.backbone == "erfnet" and cfg.head != "mib":
        raise ConfigError(f"--head {cfg.head} is a DeepLabV3 head; --backbone erfnet has its own decoder: drop --head "
                          f"or choose a ResNet backbone")
    stride = 8 if cfg.backbone == "erfnet" else cfg.output_stride
    for flag in ("crop_size", "eval_size"):
        size = getattr(cfg, flag)
        if size is not None and (size[0] % stride or size[1] % stride):
            raise ConfigError(f"--{flag} {size[0]}x{size[1]} must be a multiple of the output stride {stride} "
                              f"(--backbone {cfg.backbone}" + ("" if cfg.backbone == "erfnet" else
                                                               f", --output_stride {cfg.output_stride}") + ")")
    if cfg.save_interval < 0 or cfg.keep_run_states < 1:
        raise ConfigError("--save_interval must be >= 0 and --keep_run_states >= 1")
    try:
        parse_signal(cfg.preempt_signal)
    except ValueError as exc:
        raise ConfigError(f"--preempt_signal {cfg.preempt_signal}: {exc}") from exc
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise ConfigError(f"--num_workers {cfg.num_workers}: must be >= 0 (0 = load in the training process)")
    if (cfg.weakly or cfg.image_labels is not None) and cfg.step == 0:
        flag = "--weakly" if cfg.weakly else "--image_labels"
        raise ConfigError(f"{flag} applies to steps t>0: step 0 learns the base classes from their masks")
    if (cfg.weakly or cfg.image_labels is not None) and not METHODS[cfg.method].learns_from_image_labels:
        weak = sorted(name for name, m in METHODS.items() if m.learns_from_image_labels)
        raise ConfigError(f"--method {cfg.method} needs pixel labels; --weakly / --image_labels work with "
                          f"{', '.join(weak)}")
    check_old_data(cfg)
    if cfg.test and cfg.ckpt is None:
        raise ConfigError("--test needs --ckpt PATH (the step artifact to evaluate)")
    if cfg.infer is not None and (cfg.ckpt is None or cfg.test):
        raise ConfigError("--infer needs --ckpt PATH (the step artifact to predict with), and not --test")
    if cfg.gt is not None and cfg.infer is None:
        raise ConfigError("--gt goes with --infer IMAGE ... (the images whose masks these are)")


def check_old_data(cfg: Config) -> None:
    """--forbid_old_data refuses a method that trains on images of earlier steps (Method.uses_old_data)."""
    if not (cfg.forbid_old_data and METHODS[cfg.method].uses_old_data):
        return
    plain = cfg.method.removesuffix("-m")
    instead = f"--method {plain} (without -M)" if plain != cfg.method and plain in METHODS else "another method"
    raise ConfigError(f"--forbid_old_data: --method {cfg.method} trains on an exemplar memory of earlier steps' "
                      f"images, which the flag forbids. Drop --forbid_old_data, or use {instead}.")


def check_name(name: str) -> None:
    """--name is one path component: it names files inside the checkpoint and log folders, never a path out of
    them (`--name ../../x` would write artifacts and logs elsewhere)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name or "\0" in name:
        raise ConfigError(f"--name {name!r}: an experiment name is one word of a file name (letters, digits, - _ .), "
                          f"without / or \\; choose where files go with --checkpoint_dir and --logdir")


def config_to_dict(cfg: Config) -> dict[str, object]:
    """Plain types only (paths as str, sizes as lists), so the config can live inside a weights_only checkpoint and
    a JSON file and compare equal after either round trip."""
    def plain(v: object) -> object:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return str(v) if isinstance(v, Path) else v
    return {k: plain(v) if not isinstance(v, dict) else {n: plain(x) for n, x in v.items()}
            for k, v in dataclasses.asdict(cfg).items()}
