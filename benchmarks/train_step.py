"""Training-step throughput of DeepLabV3-ResNet-101 (OS16, 21 classes) at 512x512.

One step = forward + cross-entropy + backward + SGD (Nesterov, momentum 0.9, wd 1e-4), on random images/labels.
Runs on CUDA when available, else CPU. Single process, so --norm_act iabn_sync takes the non-sync path
(our pure-PyTorch ABN, or inplace_abn's InPlaceABN with --norm_impl inplace_abn; the table names which).

  python benchmarks/train_step.py                       # GPU: batch 8, 20 timed iterations
  python benchmarks/train_step.py --amp                 # bf16 autocast
  python benchmarks/train_step.py --amp --amp_dtype fp16  # fp16 autocast + GradScaler
  python benchmarks/train_step.py --iters 2 --batch_size 1   # CPU smoke run (slow)
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segmentation.models import build_segmenter  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=None, help="default 8 on GPU, 2 on CPU")
    p.add_argument("--iters", type=int, default=None, help="timed iterations; default 20 on GPU, 3 on CPU")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first; default 3 on GPU, 1 on CPU")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--amp", action="store_true", help="autocast (bf16 unless --amp_dtype fp16)")
    p.add_argument("--amp_dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--norm_act", default="iabn_sync", choices=["iabn_sync", "iabn", "abn", "bn", "syncbn"])
    p.add_argument("--norm_impl", default="auto", choices=["auto", "pytorch", "inplace_abn"],
                   help="code behind the iabn kinds (run.py's --norm_impl)")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--backbone", default="resnet101")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    """Times `iters` training steps after `warmup`; returns img/s, ms/iter, peak memory and what ran."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    batch = args.batch_size or (8 if gpu else 2)
    iters = args.iters or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if gpu:
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    model = build_segmenter(args.backbone, 16, args.norm_act, [21], device_type=device.type,
                            norm_impl=args.norm_impl).to(device).train()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    norm_impl = type(model.head.map_bn)
    package = any(c.__module__.startswith("inplace_abn") for c in norm_impl.__mro__)
    norm_name = f"{args.norm_act} ({'inplace_abn' if package else 'pure PyTorch'} {norm_impl.__name__})"

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4, nesterov=True)
    amp_dtype = torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype == torch.float16)

    images = torch.randn(batch, 3, args.crop, args.crop, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, 21, (batch, args.crop, args.crop), device=device)
    labels[:, :8] = 255  # some ignored pixels, as VOC borders

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            logits, _ = model(images)
            loss = F.cross_entropy(logits.float(), labels, ignore_index=255)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    elapsed = time.perf_counter() - start

    if gpu:
        device_name = torch.cuda.get_device_name(device)
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (max_memory_allocated)"
    else:
        device_name = f"CPU ({torch.get_num_threads()} threads)"
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (ru_maxrss)"
    amp = (args.amp_dtype + (" + GradScaler" if amp_dtype == torch.float16 else "")) if args.amp else "off (fp32)"
    return {"device": device_name, "norm": norm_name, "amp": amp, "batch": batch, "iters": iters, "warmup": warmup,
            "img/s": batch * iters / elapsed, "ms/iter": elapsed / iters * 1000, "peak": peak,
            "channels_last": args.channels_last}


def main(argv=None) -> None:
    args = parse_args(argv)
    row = measure(args)
    print(f"DeepLabV3-{args.backbone} OS16, {args.crop}x{args.crop}, {row['iters']} timed iterations after "
          f"{row['warmup']} warm-up{', channels_last' if args.channels_last else ''}\n")
    print("| device | norm | amp | batch | img/s | ms/iter | peak memory |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {row['device']} | {row['norm']} | {row['amp']} | {row['batch']} | {row['img/s']:.2f} "
          f"| {row['ms/iter']:.0f} | {row['peak']} |")


if __name__ == "__main__":
    main()
