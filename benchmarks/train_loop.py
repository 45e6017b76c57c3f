"""Throughput of our real training loop, beside the bare model step as its ceiling; max batch per norm; eval speed.

Rows (one process, the device of this machine):
  bare step      forward + CE + backward + SGD on a batch already on the device (benchmarks/train_step.py's ceiling)
  FT step 0      segmentation.step's loader (VOC-sized JPEGs, workers, uint8 transfer, device normalisation),
                 model, FT's loss, the Updater (finite/stop flags, scheduler) and trainer.train_one_epoch
  MiB step 1     the same with the frozen teacher's forward and MiB's UNCE + UNKD (VOC 15-5, 16 -> 21 classes)
  WILSON step 1  weak items (no pixel labels), teacher, localizer, PAMR and the pseudo-supervised losses
For each: img/s, the fraction of the loop's time spent waiting for the next batch (the host blocks in the loader's
next() while the device has nothing queued) and peak device memory. `--max_batch` adds the largest batch per GPU
that trains at the crop size for each norm implementation; `--eval_images N` times the VOC val protocol (resize the
short side to the crop, centre crop) over N generated images.

  python benchmarks/train_loop.py                                 # GPU: R101 OS16 512x512, batch 8, bf16 (defaults)
  python benchmarks/train_loop.py --channels_last --max_batch --eval_images 1449
  python benchmarks/train_loop.py --backbone resnet18 --crop 64 --batch_size 2 --iters 2 --images 24 --device cpu
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_path import write_fixture  # noqa: E402

from segmentation.config import parse_config  # noqa: E402
from segmentation.engine.trainer import (Updater, build_optimizer, evaluate, make_amp, prepare_batch,  # noqa: E402
                                         train_one_epoch)
from segmentation.methods import StepInfo, build_method  # noqa: E402
from segmentation.models import load_previous_step  # noqa: E402
from segmentation.step.build import build_model, build_step_data, make_eval_loader, make_train_loader, model_memory_format  # noqa: E402
from segmentation.tasks import load_task  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet101")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8, help="per process")
    p.add_argument("--iters", type=int, default=30, help="timed iterations per row")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (cuDNN autotuning, workers)")
    p.add_argument("--images", type=int, default=120, help="generated 500x375 training JPEGs (reused cyclically)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: run.py's default)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 (default: bf16 autocast)")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--norm_act", default="iabn_sync")
    p.add_argument("--norm_impl", default="auto", choices=["auto", "pytorch", "inplace_abn"])
    p.add_argument("--max_batch", action="store_true", help="also find the largest batch per norm (GPU only)")
    p.add_argument("--eval_images", type=int, default=0, help="also time evaluation over this many images")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    return p.parse_args(argv)


class TimedEnough(Exception):
    """Raised after the last timed update to leave the epoch."""


class TimedLoader:
    """The loader, timing how long the host waits in next() once `timing` is on."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.wait, self.timing = loader, 0.0, False

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            if self.timing:
                self.wait += time.perf_counter() - start
            yield batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_flags(args: argparse.Namespace, root: Path, step: int, method: str, *extra: str) -> list[str]:
    flags = ["--dataset", "voc", "--task", "15-5", "--overlap", "--data_root", str(root), "--step", str(step),
             "--method", method, "--backbone", args.backbone, "--crop_size", str(args.crop),
             "--batch_size", str(args.batch_size), "--norm_act", args.norm_act, "--norm_impl", args.norm_impl,
             "--epochs", "1", "--val_interval", "0", "--print_interval", str(10**9), "--device", args.device]
    flags += ["--amp"] if args.amp else ["--no-amp"]
    flags += ["--channels_last"] if args.channels_last else []
    flags += ["--num_workers", str(args.workers)] if args.workers is not None else []
    return flags + list(extra)


def loop_row(args: argparse.Namespace, root: Path, device: torch.device, step: int, method_name: str,
             *extra: str) -> dict:
    """The real loop on `warmup + iters` batches; times the last `iters`."""
    cfg = parse_config(run_flags(args, root, step, method_name, *extra))
    task = load_task("voc", "15-5")
    data = build_step_data(cfg, task, step)
    teacher = None
    model = build_model(cfg, task, step, None, device)
    if step > 0:
        teacher = build_model(cfg, task, step - 1, None, device).requires_grad_(False).eval()
        load_previous_step(model, teacher.state_dict())
    memory_format = model_memory_format(cfg)
    model.to(device, memory_format=memory_format)
    if teacher is not None:
        teacher.to(device, memory_format=memory_format)
    info = StepInfo(task=task, step=step, num_old=sum(task.classes_per_step(step)[:-1]) if step else 0,
                    num_classes=sum(task.classes_per_step(step)), epochs=1, norm_act=cfg.norm_act,
                    norm_impl=cfg.norm_impl, device_type=device.type)
    method = build_method(method_name, info, model, teacher, cfg.method_options)
    method.init_new_classifier()
    for name, module in method.extra_modules().items():  # WILSON's localizer (one process: no DDP wrapper)
        method.forward_modules[name] = module.to(device, memory_format=memory_format)
    loader, sampler = make_train_loader(data.train, cfg, args.batch_size, device)
    total = args.warmup + args.iters
    if len(loader) < total:
        raise SystemExit(f"--images {args.images} gives {len(loader)} batches; need {total} (raise --images)")
    optimizer = build_optimizer(method.param_groups(cfg.step_lr()), cfg.momentum, cfg.weight_decay, cfg.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    amp, scaler = make_amp(cfg.amp_enabled(device.type), cfg.amp_dtype, device)
    timed = TimedLoader(loader)
    clock: dict[str, float] = {}

    def after_update(global_iter: int, stop: bool) -> None:
        if global_iter == args.warmup:
            sync(device)
            reset_peak(device)
            timed.timing, clock["start"] = True, time.perf_counter()
        if global_iter == total:
            sync(device)
            clock["end"] = time.perf_counter()
            raise TimedEnough  # ends the epoch early: the rest of the loader is not timed

    sampler.start_epoch(0, 0, args.batch_size)
    try:
        train_one_epoch(model=model, teacher=teacher if method.needs_teacher else None, method=method, loader=timed,
                        updater=Updater(optimizer, scheduler, scaler, method.after_backward), amp=amp, device=device, epoch=0, writer=None,
                        global_iter=0, print_interval=10**9, memory_format=memory_format, after_update=after_update)
    except TimedEnough:
        pass
    elapsed = clock["end"] - clock["start"]
    return {"img/s": args.batch_size * args.iters / elapsed, "wait": timed.wait / elapsed, "peak": peak_memory(device),
            "cfg": cfg, "model": model, "data": data}


def bare_step_row(args: argparse.Namespace, device: torch.device, model: torch.nn.Module, cfg: Any) -> dict:
    """Forward + CE + backward + SGD on one batch kept on the device: no loader, no flags, no teacher."""
    amp, scaler = make_amp(cfg.amp_enabled(device.type), cfg.amp_dtype, device)
    memory_format = model_memory_format(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4, nesterov=True)
    images = torch.randn(args.batch_size, 3, args.crop, args.crop, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, model.num_classes, (args.batch_size, args.crop, args.crop), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with amp.autocast():
            logits, _ = model(images)
        scaler.scale(F.cross_entropy(logits.float(), labels, ignore_index=255)).backward()
        scaler.step(optimizer)
        scaler.update()

    model.train()
    for _ in range(args.warmup):
        step()
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync(device)
    elapsed = time.perf_counter() - start
    return {"img/s": args.batch_size * args.iters / elapsed, "wait": 0.0, "peak": peak_memory(device)}


def fits(try_step: Callable[[int], None], batch: int) -> bool:
    try:
        try_step(batch)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def max_batch(args: argparse.Namespace, device: torch.device, norm_act: str, norm_impl: str,
              cap: int = 4096) -> int:
    """Largest batch (doubling, then bisection) for which one bf16/fp32 training step fits, at most `cap` (a CPU
    never runs out of device memory: the CPU rehearsal of benchmarks/gpu_check.py runs the search up to a cap)."""
    cfg = parse_config(["--backbone", args.backbone, "--norm_act", norm_act, "--norm_impl", norm_impl,
                        "--crop_size", str(args.crop), "--device", device.type,
                        *(["--amp"] if args.amp else ["--no-amp"]), *(["--channels_last"] if args.channels_last else [])])
    model = build_model(cfg, load_task("voc", "15-5"), 0, None, device).to(device, memory_format=model_memory_format(cfg))
    amp, _ = make_amp(cfg.amp_enabled(device.type), cfg.amp_dtype, device)

    def try_step(batch: int) -> None:
        images = torch.randn(batch, 3, args.crop, args.crop, device=device).to(memory_format=model_memory_format(cfg))
        with amp.autocast():
            logits, _ = model(images)
        logits.float().mean().backward()
        model.zero_grad(set_to_none=True)
        sync(device)

    lo, hi = 1, 2
    while fits(try_step, hi):
        lo, hi = hi, hi * 2
        if hi > cap:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(try_step, mid) else (lo, mid)
    del model
    return lo


def eval_row(args: argparse.Namespace, root: Path, device: torch.device, model: torch.nn.Module, cfg: Any) -> dict:
    task = load_task("voc", "15-5")
    data = build_step_data(cfg, task, 0)
    amp, _ = make_amp(cfg.amp_enabled(device.type), cfg.amp_dtype, device)
    loader = make_eval_loader(data.test, cfg, args.batch_size)
    sync(device)
    start = time.perf_counter()
    evaluate(model=model, loader=loader, num_classes=model.num_classes, device=device, amp=amp,
             memory_format=model_memory_format(cfg))
    sync(device)
    elapsed = time.perf_counter() - start
    return {"images": len(data.test), "seconds": elapsed, "img/s": len(data.test) / elapsed}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "VOC"
        write_fixture(root, args.images)
        ids = (root / "splits" / "train_aug.txt").read_text()
        n_val = max(args.eval_images, 1)
        (root / "splits" / "val.txt").write_text("".join(ids.splitlines(keepends=True)[i % args.images]
                                                         for i in range(n_val)))
        ft = loop_row(args, root, device, 0, "ft")
        rows = [("bare step (ceiling)", bare_step_row(args, device, ft["model"], ft["cfg"])),
                ("FT step 0 (our loop)", ft), ("MiB step 1 (our loop, teacher)", loop_row(args, root, device, 1, "mib")),
                # epoch 0 >= --pseudo_ep 0: the localizer, PAMR and the pseudo-supervised losses all run
                ("WILSON step 1 (weak, pseudo-labels)", loop_row(args, root, device, 1, "wilson", "--pseudo_ep", "0"))]
        evaluation = eval_row(args, root, device, ft["model"], ft["cfg"]) if args.eval_images else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    cfg = ft["cfg"]
    print(f"\n{name}: DeepLabV3-{args.backbone} OS16, {args.crop}x{args.crop}, batch {args.batch_size}, "
          f"{'bf16' if cfg.amp_enabled(device.type) else 'fp32'}, {'channels-last' if args.channels_last else 'NCHW'}, "
          f"--norm_act {args.norm_act} --norm_impl {args.norm_impl}, {cfg.loader_workers()} loader workers, "
          f"{args.iters} timed iterations after {args.warmup}\n")
    ceiling = rows[0][1]["img/s"]
    print("| row | img/s | of bare step | waiting for data | peak memory |")
    print("|---|---|---|---|---|")
    for label, row in rows:
        print(f"| {label} | {row['img/s']:.2f} | {100 * row['img/s'] / ceiling:.0f} % | {100 * row['wait']:.1f} % "
              f"| {row['peak']} |")
    if evaluation:
        print(f"\nevaluation, resize short side + centre crop {args.crop}: {evaluation['images']} images in "
              f"{evaluation['seconds']:.1f} s ({evaluation['img/s']:.1f} img/s)")
    if args.max_batch:
        if device.type != "cuda":
            print("\n--max_batch needs a GPU")
            return
        print("\n| norm | largest batch per GPU |\n|---|---|")
        for label, norm_act, impl in (("InPlace-ABN (inplace_abn package)", "iabn", "inplace_abn"),
                                      ("ABN (ours, PyTorch)", "iabn", "pytorch"), ("BatchNorm", "bn", "auto")):
            print(f"| {label} | {max_batch(args, device, norm_act, impl)} |")


if __name__ == "__main__":
    main()
