"""Convert published ImageNet weights (ResNet, ERFNet encoder) into the format `--pretrained` loads.

  python pretrained/convert.py pretrained/resnet101_iabn_sync.pth.tar pretrained/resnet101_imagenet.pth
  python pretrained/convert.py pretrained/resnet50_torchvision.pth pretrained/resnet50_imagenet.pth
  python pretrained/convert.py pretrained/erfnet_encoder_pretrained.pth.tar pretrained/erfnet_imagenet.pth

Input: inplace_abn's `.pth.tar` (`state_dict` with the `module.` prefix and `classifier.fc.*`) or a torchvision
resnet18/50/101 state dict, or erfnet_pytorch's `erfnet_encoder_pretrained.pth.tar` (the ImageNet encoder CIL uses);
the format is detected from the keys (or forced with --format). Output:
`{"state_dict": body weights in our key names, "arch": "resnet101", "source": "<format>:<input path>"}`.
The result is checked by loading it with strict=True into our ResNet of the detected architecture.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segmentation.models.erfnet import ERFNetEncoder  # noqa: E402
from segmentation.models.norm import make_norm_act  # noqa: E402
from segmentation.models.resnet import ResNet  # noqa: E402
from segmentation.models.weights import WeightsError, check_fits, convert_checkpoint, read_weights_file  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="downloaded weights (.pth.tar from inplace_abn, .pth from torchvision)")
    p.add_argument("dst", type=Path, help="output file for --pretrained")
    p.add_argument("--format", choices=["auto", "inplace_abn", "torchvision", "erfnet"], default="auto")
    p.add_argument("--arch", choices=["resnet18", "resnet50", "resnet101", "erfnet"], default=None,
                   help="fail unless the file holds this architecture")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        converted = convert_checkpoint(read_weights_file(args.src), str(args.src), args.format)
        if args.arch is not None and converted["arch"] != args.arch:
            raise WeightsError(f"{args.src} holds {converted['arch']} weights, not {args.arch}")
        norm = make_norm_act("bn")
        body = ERFNetEncoder(norm) if converted["arch"] == "erfnet" else ResNet(converted["arch"], norm)
        check_fits(body.state_dict(), converted["state_dict"], str(args.src))
        body.load_state_dict(converted["state_dict"], strict=True)
    except (WeightsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    args.dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.dst.with_name(args.dst.name + ".tmp")
    torch.save(converted, tmp)
    tmp.replace(args.dst)  # never leave a half-written file under the final name
    print(f"{args.src} -> {args.dst}: {converted['arch']}, {len(converted['state_dict'])} tensors "
          f"({converted['source'].split(':')[0]} format)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
