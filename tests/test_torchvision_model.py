"""DKD's and STAR's network: `--norm_act bn_relu|syncbn_relu` (torchvision's ResNet function) and `--head dkd`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segmentation.config import ConfigError, parse_config
from segmentation.models import ABN, build_segmenter, make_norm_act
from segmentation.models.deeplab import DeepLabV3Head, DKDHead
from segmentation.models.resnet import ResidualBlock, ResNet

torchvision = pytest.importorskip("torchvision")

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "shapes", "--backbone", "resnet18", "--output_stride", "16", "--crop_size", "32",
        "--num_workers", "0", "--val_interval", "0", "--print_interval", "5", "--random_seed", "3"]
# torchvision's replace_stride_with_dilation for layer2..layer4
DILATE = {16: [False, False, True], 8: [False, True, True]}


def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine params (some scales negative) and running stats in every norm layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.running_var.numel()
                m.weight.copy_(torch.rand(n, generator=g) * 1.5 - 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def dilate_basic_blocks(tv: nn.Module, dilate: list[bool]) -> None:
    """replace_stride_with_dilation for a BasicBlock ResNet, which torchvision refuses ("Dilation > 1 not supported
    in BasicBlock"): the same pattern as its _make_layer, with both 3x3 convs of a block dilated."""
    dilation = 1
    for layer, dilated in zip((tv.layer2, tv.layer3, tv.layer4), dilate):
        previous = dilation
        if dilated:
            dilation *= 2
            layer[0].conv1.stride = layer[0].downsample[0].stride = (1, 1)
        for i, block in enumerate(layer):
            d = previous if i == 0 else dilation
            for conv in (block.conv1, block.conv2):
                conv.dilation = conv.padding = (d, d)


def torchvision_resnet(arch: str, output_stride: int) -> nn.Module:
    torch.manual_seed(0)
    if arch == "resnet18":
        tv = torchvision.models.resnet18(weights=None)
        dilate_basic_blocks(tv, DILATE[output_stride])
    else:
        tv = getattr(torchvision.models, arch)(weights=None, replace_stride_with_dilation=DILATE[output_stride])
    randomise_norms(tv)
    return tv.eval()


def torchvision_stages(tv: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    t = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    outputs = []
    for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
        t = layer(t)
        outputs.append(t)
    return outputs


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-12)).item()


# ------------------------------------------------------------------------------------------ torchvision's ResNet

@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_bn_relu_body_computes_torchvision_resnet(tmp_path, arch, output_stride):
    """torchvision's state dict, loaded through --pretrained (converted on the fly, strict), gives our body
    torchvision's layer1..layer4 outputs; inplace_abn's dilation pattern with the same weights does not."""
    tv = torchvision_resnet(arch, output_stride)
    src = tmp_path / f"{arch}_tv.pth"
    torch.save(tv.state_dict(), src)
    model = build_segmenter(arch, output_stride, "bn_relu", [2], pretrained=src, device_type="cpu").eval()
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        expected = torchvision_stages(tv, x)
        body, pre_activations = model.body(x)
        assert body.shape == expected[-1].shape
        assert relative_error(body, expected[-1]) < 1e-5
        for pre, stage in zip(pre_activations, expected):
            assert relative_error(F.relu(pre), stage) < 1e-5

        every_block_dilated = ResNet(arch, make_norm_act("bn_relu"), output_stride)  # inplace_abn's pattern
        for m in every_block_dilated.modules():
            if isinstance(m, ResidualBlock):
                m.slope = 0.0
        every_block_dilated.load_state_dict(model.body.state_dict())
        assert relative_error(every_block_dilated.eval()(x)[0], expected[-1]) > 1e-2


@pytest.mark.parametrize("kind", ["bn_relu", "syncbn_relu"])
def test_bn_relu_kinds_are_batch_norm_relu_with_dkd_momentum(kind):
    model = build_segmenter("resnet18", 16, kind, [2], device_type="cpu")
    norms = [m for m in model.modules() if isinstance(m, ABN)]
    assert all(not m.abs_weight and m.sync == (kind == "syncbn_relu") for m in norms)
    assert model.body.variant == "torchvision"
    assert {m.momentum for m in model.body.modules() if isinstance(m, ABN)} == {0.01}  # DKD's train_voc.py
    assert {m.momentum for m in model.head.modules() if isinstance(m, ABN)} == {0.1}
    relu = ("leaky_relu", 0.0)
    assert (model.body.mod1.bn1.activation, model.body.mod1.bn1.activation_param) == relu
    assert model.body.mod2.block1.convs.bn2.activation == "identity"
    assert (model.head.red_bn.activation, model.head.red_bn.activation_param) == relu
    assert all(b.slope == 0 for b in model.body.modules() if isinstance(b, ResidualBlock))
    # the existing kinds keep inplace_abn's ResNet
    assert build_segmenter("resnet18", 16, "bn", [2], device_type="cpu").body.variant == "inplace_abn"


def test_relu_norm_formula():
    torch.manual_seed(0)
    m = make_norm_act("bn_relu")(4).eval()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.5, -0.7, 0.3, -2.0]))
        m.running_mean.copy_(torch.randn(4))
        x = torch.randn(2, 4, 5, 5)
        expected = F.relu(F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps))
        torch.testing.assert_close(m(x), expected)


# ------------------------------------------------------------------------------------------------- the dkd head

def test_dkd_head_structure():
    model = build_segmenter("resnet18", 16, "bn_relu", [3, 2], head="dkd", device_type="cpu")
    head = model.head
    assert isinstance(head, DKDHead)
    assert isinstance(head.dropout, nn.Dropout) and head.dropout.p == 0.1
    conv = head.last_conv
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding, conv.bias) == (256, 256, (3, 3),
                                                                                                (1, 1), None)
    assert isinstance(head.last_bn, ABN) and (head.last_bn.activation, head.last_bn.activation_param) == (
        "leaky_relu", 0.0)
    mib = build_segmenter("resnet18", 16, "bn_relu", [3, 2], device_type="cpu")
    assert type(mib.head) is DeepLabV3Head
    extra = set(model.state_dict()) - set(mib.state_dict())
    bn_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert extra == {"head.last_conv.weight"} | {f"head.last_bn.{k}" for k in bn_keys}
    assert set(mib.state_dict()) <= set(model.state_dict())
    with pytest.raises(ValueError, match="--head 'nope'"):
        build_segmenter("resnet18", 16, "bn_relu", [2], head="nope")
    with pytest.raises(ValueError, match="ERFNet"):
        build_segmenter("erfnet", 8, "bn", [2], head="dkd")


@pytest.mark.parametrize("kind", ["bn_relu", "iabn"])
def test_dkd_head_is_mib_head_then_conv_norm_activation(kind):
    torch.manual_seed(0)
    model = build_segmenter("resnet18", 16, kind, [2], head="dkd", pooling_size=3, device_type="cpu")
    randomise_norms(model)
    head = model.head.eval()
    mib = DeepLabV3Head(512, make_norm_act(kind), 16, pooling_size=3)
    own = {k: v for k, v in head.state_dict().items() if not k.startswith("last_")}
    mib.load_state_dict(own, strict=True)
    mib.eval()
    x = torch.randn(2, 512, 6, 5)
    bn = head.last_bn
    with torch.no_grad():
        y = F.conv2d(mib(x), head.last_conv.weight, padding=1)
        scale = bn.weight.abs() + bn.eps if kind == "iabn" else bn.weight
        y = F.batch_norm(y, bn.running_mean, bn.running_var, scale, bn.bias, False, 0.0, bn.eps)
        expected = F.relu(y) if kind == "bn_relu" else F.leaky_relu(y, 0.01)
        torch.testing.assert_close(head(x), expected)
        # Dropout acts in training only: two training passes differ, eval passes do not
        head.train()
        assert not torch.equal(head(x), head(x))


def test_head_flag_in_config():
    assert parse_config(["--dataset", "shapes"]).head == "mib"
    assert parse_config(["--dataset", "shapes", "--head", "dkd", "--norm_act", "syncbn_relu"]).head == "dkd"
    with pytest.raises(ConfigError, match="--head dkd"):
        parse_config(["--dataset", "shapes", "--backbone", "erfnet", "--head", "dkd"])


# ------------------------------------------------------------------------------------------------ end to end

def run_py(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_dkd_model_trains_two_steps_and_tests_and_other_heads_are_refused(shapes_root, tmp_path):
    base = [*TINY, "--data_root", str(shapes_root), "--batch_size", "4", "--epochs", "1", "--task", "6-4",
            "--checkpoint_dir", str(tmp_path / "ck")]
    dkd = [*base, "--norm_act", "syncbn_relu", "--head", "dkd", "--name", "dkd"]
    folder = tmp_path / "ck/step/shapes-6-4"
    for step in ("0", "1"):
        result = run_py(*dkd, "--step", step, "--method", "MiB", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    artifact = torch.load(folder / "dkd_1.pth", weights_only=True)
    assert artifact["meta"]["head"] == "dkd" and artifact["meta"]["config"]["norm_act"] == "syncbn_relu"
    assert "head.last_conv.weight" in artifact["model_state"]

    # --test rebuilds the artifact's model (head and norm) whatever this command's model flags say
    tested = run_py(*base, "--test", "--ckpt", str(folder / "dkd_1.pth"), cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-3000:]
    metrics = json.loads((folder / "dkd_1.json").read_text())
    retest = json.loads((folder / "dkd_1_test.json").read_text())
    assert retest["miou_all"] == pytest.approx(metrics["miou_all"])

    # a step whose previous artifact has the other head is refused before training, naming the flag
    mib = run_py(*base, "--norm_act", "syncbn_relu", "--step", "1", "--method", "MiB", "--name", "mib",
                 "--step_ckpt", str(folder / "dkd_0.pth"), cwd=tmp_path)
    assert mib.returncode == 2 and "head: artifact has 'dkd', this run needs 'mib'" in mib.stderr, mib.stderr[-2000:]
    assert "Traceback" not in mib.stderr and not (folder / "mib_1.pth").exists()

    # an artifact written before --head existed (no "head" in its meta or config) is a mib-head model
    old = torch.load(folder / "dkd_0.pth", weights_only=True)
    del old["meta"]["head"], old["meta"]["config"]["head"]
    old["model_state"] = build_segmenter("resnet18", 16, "syncbn_relu", [7], device_type="cpu").state_dict()
    torch.save(old, tmp_path / "old_0.pth")
    from_old = run_py(*base, "--norm_act", "syncbn_relu", "--step", "1", "--method", "MiB", "--name", "old",
                      "--step_ckpt", str(tmp_path / "old_0.pth"), cwd=tmp_path)
    assert from_old.returncode == 0, from_old.stderr[-3000:]
