"""Model: shapes, the pure-PyTorch InPlace-ABN (`ABN`) against its formula and the real package, weight loading."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segmentation.models import (ABN, Segmenter, WeightsError, build_segmenter, inplace_abn_available,
                                 load_pretrained_body, load_previous_step, make_norm_act)
from segmentation.models import norm as norm_module
from segmentation.models.deeplab import DeepLabV3Head
from segmentation.models.resnet import ResidualBlock, ResNet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pretrained"))
import convert  # noqa: E402  (pretrained/convert.py, the CLI)

SLOPE = 0.01


def build_with(norm: functools.partial | type, backbone="resnet18", output_stride=16, classes=(3, 2),
               pooling_size=None) -> Segmenter:
    body = ResNet(backbone, norm, output_stride)
    head = DeepLabV3Head(body.out_channels, norm, output_stride, pooling_size=pooling_size)
    return Segmenter(body, head, list(classes))


def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine params (about a third of the weights negative) and running stats in every norm layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_var") and m.running_var is not None:
                n = m.running_var.numel()
                m.weight.copy_(torch.rand(n, generator=g) * 1.5 - 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def formula(x, mean, var, w, b, eps=1e-5, abs_weight=True, slope=SLOPE):
    c = lambda t: t[None, :, None, None]  # noqa: E731
    scale = w.abs() + eps if abs_weight else w
    return F.leaky_relu((x - c(mean)) / torch.sqrt(c(var) + eps) * c(scale) + c(b), slope)


def assert_tensor_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str) -> None:
    """Whole-tensor relative error: gradients summed in a different order differ by float noise, which
    elementwise rtol flags on entries that are ~0 (e.g. a conv bias right before batch norm)."""
    err = (actual - expected).norm() / expected.norm().clamp(min=1e-12)
    assert err < rel, f"{name}: relative error {err:.2e} (tolerance {rel:.0e})"


def abn_with_params(channels=4, seed=0, **kwargs) -> ABN:
    g = torch.Generator().manual_seed(seed)
    m = ABN(channels, **kwargs)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.5, -0.7, 0.3, -2.0])[:channels])
        m.bias.copy_(torch.randn(channels, generator=g))
        m.running_mean.copy_(torch.randn(channels, generator=g))
        m.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return m


# ---------------------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("train", [True, False])
def test_output_shapes(output_stride, train):
    torch.manual_seed(0)
    model = build_segmenter("resnet18", output_stride, "bn", [3, 2, 1]).train(train)
    x = torch.randn(2, 3, 67, 50)
    with torch.no_grad():
        logits, feats = model(x)
    assert logits.shape == (2, 6, 67, 50)
    assert feats["logits_small"].shape[1] == 6
    fh, fw = feats["body"].shape[-2:]
    assert feats["pre_logits"].shape == (2, 256, fh, fw)
    # OS8/16: the feature map is about input/OS (conv/pool padding rounds up)
    assert fh == -(-67 // output_stride) and fw == -(-50 // output_stride)
    assert [a.shape[1] for a in feats["attentions"]] == [64, 128, 256, 512, 256]
    assert feats["attentions"][-1] is feats["pre_logits"]


def test_attentions_are_pre_activations():
    """PLOP's POD reads each stage's sum before the block's leaky ReLU; the body output is its activation."""
    torch.manual_seed(0)
    model = build_segmenter("resnet18", 16, "bn", [2]).eval()
    with torch.no_grad():
        _, feats = model(torch.randn(1, 3, 64, 64))
        pre = feats["attentions"]
        assert all((a < 0).any() for a in pre[:4])  # not activated
        torch.testing.assert_close(feats["body"], F.leaky_relu(pre[3], SLOPE))
        torch.testing.assert_close(model.body.mod3(F.leaky_relu(pre[0], SLOPE)), F.leaky_relu(pre[1], SLOPE))


def test_logits_are_in_learning_order():
    torch.manual_seed(0)
    model = build_segmenter("resnet18", 16, "bn", [3, 2]).eval()
    with torch.no_grad():
        _, feats = model(torch.randn(1, 3, 32, 32))
        pl = feats["pre_logits"]
        expected = torch.cat([model.cls[0](pl), model.cls[1](pl)], 1)
    torch.testing.assert_close(feats["logits_small"], expected)


def test_eval_pooling_smaller_than_feature_map():
    torch.manual_seed(0)
    model = build_segmenter("resnet18", 16, "bn", [3, 2], pooling_size=3).eval()
    x = torch.randn(1, 3, 128, 96)  # 8 x 6 features, 3 x 3 pooling windows (and 2 x 2: even padding)
    with torch.no_grad():
        logits, feats = model(x)
        assert logits.shape == (1, 5, 128, 96) and torch.isfinite(logits).all()
        head = model.head
        pooled = head._pool(feats["body"])
        assert pooled.shape == feats["body"].shape
        # the centre value is the 3x3 window mean around it
        torch.testing.assert_close(pooled[0, :, 4, 3], feats["body"][0, :, 3:6, 2:5].mean(dim=(1, 2)))
        head.pooling_size = 2
        assert head._pool(feats["body"]).shape == feats["body"].shape
        # pooling larger than the map = global mean
        head.pooling_size = 32
        torch.testing.assert_close(head._pool(feats["body"]), feats["body"].mean(dim=(2, 3), keepdim=True).expand_as(
            feats["body"]))


def test_bad_config_errors():
    with pytest.raises(ValueError, match="backbone"):
        build_segmenter("resnet7", 16, "bn", [2])
    with pytest.raises(ValueError, match="output_stride"):
        build_segmenter("resnet18", 32, "bn", [2])
    with pytest.raises(ValueError, match="norm_act"):
        build_segmenter("resnet18", 16, "gn", [2])


# ------------------------------------------------------------------------------------------------- ABN fallback

@pytest.mark.parametrize("sync", [False, True])
def test_abn_matches_formula_train_and_eval(sync):
    m = abn_with_params(sync=sync)
    ref_mean, ref_var = m.running_mean.clone(), m.running_var.clone()
    x = torch.randn(3, 4, 5, 6) * 2 + 1
    y = m(x)  # train: batch statistics
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(y, formula(x, mean, var, m.weight, m.bias))
    # running stats: momentum 0.1 with the unbiased batch variance, as F.batch_norm
    torch.testing.assert_close(m.running_mean, 0.9 * ref_mean + 0.1 * mean)
    torch.testing.assert_close(m.running_var, 0.9 * ref_var + 0.1 * x.var(dim=(0, 2, 3), unbiased=True))
    rm, rv = ref_mean.clone(), ref_var.clone()
    F.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(m.running_mean, rm)
    torch.testing.assert_close(m.running_var, rv)
    assert m.num_batches_tracked.item() == 1
    m.eval()  # eval: running statistics, nothing updated
    y = m(x)
    torch.testing.assert_close(y, formula(x, m.running_mean, m.running_var, m.weight, m.bias))
    torch.testing.assert_close(m.running_var, rv)


def test_abn_identity_activation_and_negative_weight_sign():
    m = abn_with_params(activation="identity").eval()
    x = torch.randn(2, 4, 3, 3)
    y = m(x)
    torch.testing.assert_close(y, formula(x, m.running_mean, m.running_var, m.weight, m.bias, slope=1.0))
    # |w| + eps: a negative weight scales like its absolute value
    m2 = abn_with_params(activation="identity").eval()
    with torch.no_grad():
        m2.weight.abs_()
    torch.testing.assert_close(m2(x), y)
    with pytest.raises(ValueError, match="activation"):
        ABN(4, activation="relu")


def test_abn_without_abs_weight_is_batchnorm_plus_leaky_relu():
    m = abn_with_params(abs_weight=False)
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(m.state_dict())
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(m(x), F.leaky_relu(bn(x), SLOPE))
    torch.testing.assert_close(m.running_var, bn.running_var)
    m.eval(), bn.eval()
    torch.testing.assert_close(m(x), F.leaky_relu(bn(x), SLOPE))
    assert make_norm_act("bn").keywords == {"abs_weight": False, "sync": False}


def test_make_norm_act_fallbacks(monkeypatch):
    for kind in ("iabn", "iabn_sync"):
        layer = make_norm_act(kind, "cpu", prefer_package=False)(8)
        assert isinstance(layer, ABN) and layer.abs_weight and layer.sync == (kind == "iabn_sync")
    layer = make_norm_act("syncbn", "cpu")(8, activation="identity")
    assert isinstance(layer, ABN) and layer.sync and not layer.abs_weight and layer.activation == "identity"
    # without the package: our ABN, unless the real layer is required, then a message saying how to build it
    monkeypatch.setattr(norm_module, "inplace_abn_available", lambda: False)
    assert isinstance(make_norm_act("iabn_sync", "cuda")(8), ABN)
    with pytest.raises(ImportError, match="build_inplace_abn.sh"):
        make_norm_act("iabn", "cpu", require_package=True)


def test_make_norm_act_uses_package_when_asked():
    inplace_abn = pytest.importorskip("inplace_abn")
    # --norm_impl auto: our ABN everywhere (faster, same maths); inplace_abn: the package's layers
    assert isinstance(make_norm_act("iabn", "cpu")(8), ABN) and isinstance(make_norm_act("iabn", "cuda")(8), ABN)
    # iabn: the package's InPlaceABN; iabn_sync on CPU: our ABN, so 1 and N CPU ranks run the same code
    layer = make_norm_act("iabn", "cpu", prefer_package=True)(8, activation="identity")
    assert isinstance(layer, inplace_abn.InPlaceABN) and layer.activation == "identity"
    assert isinstance(make_norm_act("iabn_sync", "cpu", prefer_package=True)(8), ABN)
    # under autocast the convolutions emit bf16; inplace_abn's kernels need x in the weight's dtype
    layer = make_norm_act("iabn", "cpu", prefer_package=True)(4)
    conv = nn.Conv2d(3, 4, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(conv(torch.randn(2, 3, 5, 5)))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert isinstance(make_norm_act("abn")(8), ABN)


# ------------------------------------------------------------------------------------------- real inplace_abn

def _pair(seed=0):
    inplace_abn = pytest.importorskip("inplace_abn")
    ours = abn_with_params(seed=seed)
    real = inplace_abn.InPlaceABN(4, activation="leaky_relu", activation_param=SLOPE)
    real.load_state_dict(ours.state_dict(), strict=True)
    return real, ours


@pytest.mark.parametrize("train", [True, False])
def test_real_inplace_abn_equals_fallback(train):
    real, ours = _pair()
    real.train(train), ours.train(train)
    torch.manual_seed(1)
    x = torch.randn(3, 4, 5, 6) * 2 + 0.5
    grad_out = torch.randn_like(x)
    x_real, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    # InPlaceABN overwrites its input, and a leaf that requires grad cannot be modified in place: feed a clone
    y_real = real(x_real.clone())
    y_ours = ours(x_ours)
    torch.testing.assert_close(y_real, y_ours)
    torch.testing.assert_close(real.running_mean, ours.running_mean)
    torch.testing.assert_close(real.running_var, ours.running_var)
    y_real.backward(grad_out)
    y_ours.backward(grad_out)
    torch.testing.assert_close(x_real.grad, x_ours.grad)
    torch.testing.assert_close(real.weight.grad, ours.weight.grad)  # includes the sign flip for w < 0
    torch.testing.assert_close(real.bias.grad, ours.bias.grad)
    assert (ours.weight < 0).any()


def test_real_inplace_abn_whole_model_equals_fallback():
    inplace_abn = pytest.importorskip("inplace_abn")
    torch.manual_seed(0)
    real = build_segmenter("resnet18", 16, "iabn", [3, 2], norm_impl="inplace_abn")
    assert isinstance(real.head.map_bn, inplace_abn.InPlaceABN)
    fallback = build_with(make_norm_act("iabn", "cpu", prefer_package=False))
    assert isinstance(fallback.head.map_bn, ABN)
    randomise_norms(real)
    state = real.state_dict()
    fallback.load_state_dict(state, strict=True)
    real.load_state_dict(fallback.state_dict(), strict=True)  # and back
    real.eval(), fallback.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out_real, feats_real = real(x)
        out_fb, feats_fb = fallback(x)
    torch.testing.assert_close(out_real, out_fb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats_real["body"], feats_fb["body"], rtol=1e-4, atol=1e-4)
    # one training step's forward too (batch statistics; running stats updated alike)
    real.train(), fallback.train()
    with torch.no_grad():
        out_real, _ = real(x)
        out_fb, _ = fallback(x)
    torch.testing.assert_close(out_real, out_fb, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(real.head.red_bn.running_var, fallback.head.red_bn.running_var, rtol=1e-4, atol=1e-5)
    # and the gradients of a training step (batch statistics, |w| sign flip, in-place backward)
    real.zero_grad(), fallback.zero_grad()
    target = torch.randint(0, 5, (2, 32, 32))
    F.cross_entropy(real(x)[0], target).backward()
    F.cross_entropy(fallback(x)[0], target).backward()
    grads_fb = dict(fallback.named_parameters())
    for name, p in real.named_parameters():
        assert_tensor_close(p.grad, grads_fb[name].grad, 1e-3, name)


# ----------------------------------------------------------------------------------------------- weight loading

def _published_checkpoint(body: nn.Module, with_num_batches: bool) -> dict:
    """inplace_abn's ImageNet file layout: DataParallel's `module.` prefix plus the ImageNet classifier."""
    state = {f"module.{k}": v.clone() for k, v in body.state_dict().items()
             if with_num_batches or not k.endswith("num_batches_tracked")}
    state["module.classifier.fc.weight"] = torch.randn(1000, body.out_channels)
    state["module.classifier.fc.bias"] = torch.randn(1000)
    return {"epoch": 90, "arch": None, "state_dict": state}  # arch=None: some files carry a null arch entry


def _assert_same_weights(target: nn.Module, source: nn.Module) -> None:
    src = source.state_dict()
    for k, v in target.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, src[k]), k


def test_convert_inplace_abn_resnet101_round_trip(tmp_path, capsys):
    """The published R101 layout (2018 file: no num_batches_tracked) -> convert.py -> build_segmenter(pretrained)."""
    torch.manual_seed(0)
    source = ResNet("resnet101", make_norm_act("iabn", prefer_package=False))
    randomise_norms(source)
    src = tmp_path / "resnet101_iabn_sync.pth.tar"
    raw = _published_checkpoint(source, with_num_batches=False)
    raw.pop("arch")
    torch.save(raw, src)
    dst = tmp_path / "resnet101_imagenet.pth"
    assert convert.main([str(src), str(dst), "--arch", "resnet101"]) == 0
    assert "resnet101" in capsys.readouterr().out
    converted = torch.load(dst, weights_only=True)
    assert converted["arch"] == "resnet101" and converted["source"] == f"inplace_abn:{src}"
    assert not any(k.startswith(("module.", "classifier.")) for k in converted["state_dict"])
    model = build_segmenter("resnet101", 16, "iabn", [2], pretrained=dst)
    _assert_same_weights(model.body, source)
    # the wrong architecture is refused, naming the file
    assert convert.main([str(src), str(tmp_path / "x.pth"), "--arch", "resnet50"]) == 1
    assert "resnet101 weights, not resnet50" in capsys.readouterr().err
    with pytest.raises(WeightsError, match=f"{dst}.*resnet101 weights but --backbone is resnet50"):
        build_segmenter("resnet50", 16, "bn", [2], pretrained=dst)


@pytest.mark.parametrize("with_num_batches", [True, False])
def test_convert_inplace_abn_format_resnet18(tmp_path, with_num_batches):
    torch.manual_seed(0)
    source = ResNet("resnet18", make_norm_act("iabn", prefer_package=False))
    randomise_norms(source)
    src, dst = tmp_path / "r18.pth.tar", tmp_path / "r18.pth"
    torch.save(_published_checkpoint(source, with_num_batches), src)
    assert convert.main([str(src), str(dst)]) == 0
    target = ResNet("resnet18", make_norm_act("iabn", prefer_package=False), 8)  # OS does not change the keys
    load_pretrained_body(target, dst)
    _assert_same_weights(target, source)
    # an unconverted published file also loads (converted on the fly by the same code)
    other = ResNet("resnet18", make_norm_act("bn"))
    load_pretrained_body(other, src)
    _assert_same_weights(other, source)


def _relu_everywhere(body: nn.Module) -> None:
    """Slope 0: leaky ReLU becomes ReLU, so our body computes exactly torchvision's function."""
    for m in body.modules():
        if isinstance(m, ABN):
            m.activation_param = 0.0
        if isinstance(m, ResidualBlock):
            m.slope = 0.0


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_convert_torchvision_state_dict(tmp_path, arch):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None)
    randomise_norms(tv)
    src, dst = tmp_path / f"{arch}_tv.pth", tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), src)
    assert convert.main([str(src), str(dst)]) == 0
    converted = torch.load(dst, weights_only=True)
    assert converted["arch"] == arch and converted["source"].startswith("torchvision:")
    ours = ResNet(arch, make_norm_act("bn"), 16)
    load_pretrained_body(ours, dst)  # strict
    tvs, os_ = tv.state_dict(), ours.state_dict()
    assert torch.equal(os_["mod1.conv1.weight"], tvs["conv1.weight"])
    assert torch.equal(os_["mod1.bn1.running_var"], tvs["bn1.running_var"])
    assert torch.equal(os_["mod5.block2.convs.conv2.weight"], tvs["layer4.1.conv2.weight"])
    assert torch.equal(os_["mod3.block1.proj_conv.weight"], tvs["layer2.0.downsample.0.weight"])
    assert torch.equal(os_["mod3.block1.proj_bn.bias"], tvs["layer2.0.downsample.1.bias"])
    assert len(os_) == len(tvs) - 2  # everything but fc.weight/bias
    # Same function where the architectures agree: with ReLU slopes and plain BN, mod1..mod4 equal torchvision's
    # stem and layer1..layer3 (stride on the 3x3 conv in both). mod5 is dilated at OS16; torchvision's
    # replace_stride_with_dilation keeps layer4's first block undilated, so mod5 is compared as the undilated
    # network only by its weights above.
    _relu_everywhere(ours)
    ours.eval(), tv.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, pre = ours(x)
        t = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for stage_pre, layer in zip(pre[:3], (tv.layer1, tv.layer2, tv.layer3)):
            t = layer(t)
            torch.testing.assert_close(F.relu(stage_pre), t, rtol=1e-4, atol=1e-4)


def test_wrong_pretrained_file_gives_clear_error(tmp_path):
    body = ResNet("resnet18", make_norm_act("bn"))
    with pytest.raises(FileNotFoundError, match="pretrained/README.md"):
        load_pretrained_body(body, tmp_path / "missing.pth")
    partial = tmp_path / "partial.pth"
    state = {k: v for k, v in body.state_dict().items() if not k.startswith("mod5.block2")}
    torch.save({"state_dict": state, "arch": "resnet18", "source": "test"}, partial)
    with pytest.raises(WeightsError, match=f"{partial}.*missing keys"):
        load_pretrained_body(body, partial)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match=f"{junk} is not a readable weights file"):
        load_pretrained_body(body, junk)
    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], a_list)
    with pytest.raises(WeightsError, match=f"{a_list}: not an inplace_abn or torchvision"):
        load_pretrained_body(body, a_list)
    assert convert.main([str(a_list), str(tmp_path / "out.pth")]) == 1


def test_resnet101_key_layout():
    """No forward: the key names inplace_abn's ResNet-101 file uses."""
    keys = ResNet("resnet101", make_norm_act("iabn", prefer_package=False)).state_dict().keys()
    assert "mod1.conv1.weight" in keys and "mod1.bn1.running_var" in keys
    assert "mod4.block23.convs.bn3.weight" in keys and "mod4.block24.convs.conv1.weight" not in keys
    assert "mod2.block1.proj_conv.weight" in keys and "mod2.block2.proj_conv.weight" not in keys
    assert sum(k.endswith("proj_conv.weight") for k in keys) == 4


# ------------------------------------------------------------------------------------------------ previous step

def test_load_previous_step_accepts_t_minus_1():
    torch.manual_seed(0)
    old = build_segmenter("resnet18", 16, "bn", [3, 2])
    new = build_segmenter("resnet18", 16, "bn", [3, 2, 1])
    new_cls = new.cls[2].weight.clone()
    load_previous_step(new, old.state_dict())
    assert torch.equal(new.cls[1].weight, old.cls[1].weight)
    assert torch.equal(new.body.mod5.block2.convs.bn2.running_var, old.body.mod5.block2.convs.bn2.running_var)
    assert torch.equal(new.cls[2].weight, new_cls)  # untouched: not in the old state


@pytest.mark.parametrize("old_backbone, old_classes", [
    ("resnet18", [2, 2]),     # different classes in an existing step (shape mismatch)
    ("resnet18", [3]),        # two steps behind: cls.1 missing too
    ("resnet18", [3, 2, 1, 1]),  # a later step (unexpected cls.3)
    ("resnet50", [3, 2]),     # different backbone
])
def test_load_previous_step_rejects_mismatch(old_backbone, old_classes):
    new = build_segmenter("resnet18", 16, "bn", [3, 2, 1])
    old_state = build_segmenter(old_backbone, 16, "bn", old_classes).state_dict()
    with pytest.raises(ValueError, match="previous-step weights do not fit"):
        load_previous_step(new, old_state)


# ------------------------------------------------------------------------------------ synchronised fallback (gloo)

def _sync_net(kind: str) -> nn.Module:
    torch.manual_seed(0)
    norm = make_norm_act(kind, "cpu")
    # conv biases before batch norm have zero gradient (as in the ResNet: bias=False), nothing to compare
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), norm(4), nn.Conv2d(4, 4, 1, bias=False),
                        norm(4, activation="identity"))
    randomise_norms(net)
    return net


def _sync_step(net: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = net(x)
    y.backward(grad_out)
    out = {"y": y.detach(), "x_grad": x.grad}
    out.update({f"grad.{k}": p.grad for k, p in net.named_parameters()})
    out.update({f"buf.{k}": b.clone() for k, b in net.named_buffers()})
    return out


def _union_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 5, 6, generator=g) * 2 + 1, torch.randn(4, 4, 5, 6, generator=g)


RANK_SLICES = (slice(0, 1), slice(1, 4))  # unequal per-rank batches: the statistics must weight by count


SYNC_KINDS = ("iabn_sync", "syncbn")


def _sync_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for kind in SYNC_KINDS:  # one spawn for both kinds: starting processes is most of this test's time
            net = _sync_net(kind)
            assert all(m.sync for m in net.modules() if isinstance(m, ABN)), "expected the synchronised ABN"
            x, g = _union_batch()
            result = _sync_step(net, x[RANK_SLICES[rank]], g[RANK_SLICES[rank]])
            torch.save(result, f"{out_dir}/{kind}_rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> Path:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("gloo")
    mp.spawn(_sync_worker, args=(str(out / "init"), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_sync_fallback_two_ranks_equal_one_rank_on_union_batch(two_rank_results, kind):
    ranks = [torch.load(two_rank_results / f"{kind}_rank{r}.pt", weights_only=True) for r in range(2)]
    x, g = _union_batch()
    net = _sync_net(kind)
    if kind == "iabn_sync":  # outside a process group the real package may be picked: force our layer
        net = nn.Sequential(*[_as_fallback(m) for m in net])
    single = _sync_step(net, x, g)
    close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-6)
    close(torch.cat([r["y"] for r in ranks]), single["y"])
    close(torch.cat([r["x_grad"] for r in ranks]), single["x_grad"])
    for key in single:
        if key.startswith("grad."):  # DDP would average; the sum over ranks is the union batch's gradient
            assert_tensor_close(ranks[0][key] + ranks[1][key], single[key], 1e-5, key)
        if key.startswith("buf."):  # identical running stats on every rank, equal to the union batch's
            for r in ranks:
                close(r[key], single[key], msg=key)


def _as_fallback(m: nn.Module) -> nn.Module:
    if isinstance(m, ABN) or not hasattr(m, "running_var"):
        return m
    layer = ABN(m.num_features, activation=m.activation, activation_param=m.activation_param, sync=True)
    layer.load_state_dict(m.state_dict())
    return layer
