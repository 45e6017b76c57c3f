"""ERFNet (CIL's network): architecture against the published one, steps growing like DeepLabV3, the converter for
erfnet_pytorch's ImageNet encoder file."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from segmentation.models import build_segmenter, load_previous_step
from segmentation.models.erfnet import ERFNetEncoder
from segmentation.models.norm import make_norm_act
from segmentation.models.weights import convert_checkpoint, detect_format
from test_pipeline import REPO


def published_parameter_count(classes: int) -> int:
    """Romera et al.'s layer table, parameter by parameter (conv weights + biases, BN scale + shift)."""
    def down(i: int, o: int) -> int:   # 3x3 stride-2 conv to o - i channels beside a max pool, BN over o
        return (o - i) * i * 9 + (o - i) + 2 * o

    def non_bottleneck(c: int) -> int:  # 3x1, 1x3, 3x1, 1x3 convolutions with bias, two BN
        return 4 * (3 * c * c + c) + 2 * 2 * c

    def up(i: int, o: int) -> int:     # 3x3 transposed conv with bias, BN
        return i * o * 9 + o + 2 * o

    encoder = down(3, 16) + down(16, 64) + 5 * non_bottleneck(64) + down(64, 128) + 8 * non_bottleneck(128)
    decoder = up(128, 64) + 2 * non_bottleneck(64) + up(64, 16) + 2 * non_bottleneck(16)
    return encoder + decoder + 16 * classes * 2 * 2 + classes  # the 2x2 transposed output convolution


def test_erfnet_shapes_and_parameter_count():
    model = build_segmenter("erfnet", 8, "bn", [19], device_type="cpu").eval()
    assert sum(p.numel() for p in model.parameters()) == published_parameter_count(19)
    logits, features = model(torch.randn(2, 3, 64, 128))
    assert logits.shape == (2, 19, 64, 128) and features["body"].shape == (2, 128, 8, 16)
    assert published_parameter_count(20) == 2_064_256  # "2.1M" in the paper (Cityscapes' 19 classes + void)


def test_erfnet_grows_by_steps_like_deeplab():
    step0 = build_segmenter("erfnet", 8, "bn", [5], device_type="cpu")
    step1 = build_segmenter("erfnet", 8, "bn", [5, 6], device_type="cpu")
    load_previous_step(step1, step0.state_dict())
    step0.eval(), step1.eval()
    x = torch.randn(1, 3, 32, 64)
    old, _ = step0(x)
    new, _ = step1(x)
    assert new.shape[1] == 11 and torch.allclose(new[:, :5], old)  # old channels unchanged by the new classifier


def erfnet_imagenet_file(path, with_output_conv: bool) -> dict[str, torch.Tensor]:
    """A file in erfnet_pytorch's published layout: DataParallel's `module.`, the encoder under `features.encoder`,
    the ImageNet classifier, BN without num_batches_tracked (PyTorch 0.3)."""
    encoder = ERFNetEncoder(make_norm_act("bn"))
    torch.manual_seed(0)
    for p in encoder.parameters():
        p.data.normal_()
    state = {f"module.features.encoder.{k}": v for k, v in encoder.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    if with_output_conv:
        state["module.features.encoder.output_conv.weight"] = torch.randn(1000, 128, 1, 1)
    state["module.classifier.linear.weight"] = torch.randn(1000, 128)
    state["module.classifier.linear.bias"] = torch.randn(1000)
    torch.save({"state_dict": state, "epoch": 90}, path)
    return encoder.state_dict()


@pytest.mark.parametrize("with_output_conv", [False, True])
def test_erfnet_encoder_converter_on_the_published_key_names(tmp_path, with_output_conv):
    src, dst = tmp_path / "erfnet_encoder_pretrained.pth.tar", tmp_path / "erfnet_imagenet.pth"
    expected = erfnet_imagenet_file(src, with_output_conv)
    result = subprocess.run([sys.executable, str(REPO / "pretrained/convert.py"), str(src), str(dst)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "erfnet" in result.stdout
    converted = torch.load(dst, weights_only=True)
    assert converted["arch"] == "erfnet"
    model = build_segmenter("erfnet", 8, "bn", [19], pretrained=dst, device_type="cpu")
    for key, value in expected.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(model.body.state_dict()[key], value), key
    # --pretrained also takes the downloaded file itself (converted on the fly).
    direct = build_segmenter("erfnet", 8, "bn", [19], pretrained=src, device_type="cpu")
    assert torch.equal(direct.body.initial_block.conv.weight, expected["initial_block.conv.weight"])


def test_a_whole_trained_erfnet_gives_its_encoder():
    model = build_segmenter("erfnet", 8, "bn", [19], device_type="cpu")
    official = {f"module.encoder.{k.removeprefix('body.')}": v for k, v in model.state_dict().items()
                if k.startswith("body.")}
    official["module.decoder.output_conv.weight"] = torch.randn(16, 20, 2, 2)
    assert detect_format({"state_dict": official}) == "erfnet"
    converted = convert_checkpoint({"state_dict": official}, "model.pth")
    assert set(converted["state_dict"]) == {k.removeprefix("body.") for k in model.state_dict() if k.startswith("body.")}


def test_resnet_weights_are_refused_for_erfnet(tmp_path):
    from segmentation.models.resnet import ResNet

    path = tmp_path / "r18.pth"
    torch.save({"state_dict": ResNet("resnet18", make_norm_act("bn")).state_dict(), "arch": "resnet18",
                "source": "test"}, path)
    with pytest.raises(ValueError, match="resnet18 weights but --backbone is erfnet"):
        build_segmenter("erfnet", 8, "bn", [19], pretrained=path, device_type="cpu")
