"""DKD (methods/dkd.py): each loss term on hand-made 1x1 cases whose values are derived in the comments, the AC's
init and detachment, the optimiser groups, frozen norms, the prediction rule, the presets, and end-to-end runs of
shapes 6-4 through run.py (one process, and two gloo ranks against one)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from segmentation.config import parse_config
from segmentation.engine.trainer import build_optimizer
from segmentation.methods import METHODS, StepInfo, build_method
from segmentation.methods.dkd import DKD
from test_pipeline import TINY, load_weights, run_py, torchrun

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


class StubTask:
    name = "2-2"
    has_background = True


class Tiny(nn.Module):
    """body / head / cls as Segmenter names them, with a norm layer and dropout in each of body and head; 2-d
    features so that the hand-made classifier rows below are easy to follow."""

    def __init__(self, classes_per_step: list[int]) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.Dropout(0.1))
        self.head = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.Dropout2d(0.1))
        self.cls = nn.ModuleList([nn.Conv2d(2, c, 1) for c in classes_per_step])

    def forward(self, x: torch.Tensor, features=None):
        f = self.head(self.body(x))
        return torch.cat([c(f) for c in self.cls], 1), {"pre_logits": f}


def method_at(step: int, options: dict | None = None) -> DKD:
    """Step 0: channels AC, 1, 2. Step 1: the same plus new classes 3, 4; the teacher is a step-0 model."""
    torch.manual_seed(0)
    if step == 0:
        info = StepInfo(task=StubTask(), step=0, num_old=0, num_classes=3, epochs=1)
        return build_method("dkd", info, Tiny([3]), None, options or {})
    info = StepInfo(task=StubTask(), step=1, num_old=3, num_classes=5, epochs=1)
    return build_method("dkd", info, Tiny([3, 2]), Tiny([3]), options or {})


def set_rows(classifier: nn.Conv2d, rows: list[list[float]], bias: list[float]) -> None:
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor(rows).view_as(classifier.weight))
        classifier.bias.copy_(torch.tensor(bias))


def feature_map(*values: float) -> torch.Tensor:
    """One image, one stride-16 position: N x K x 1 x 1."""
    return torch.tensor(values).view(1, -1, 1, 1)


# ------------------------------------------------------------------------------------------------ the loss terms

def test_mbce_weights_positives_and_counts_void_pixels_as_negatives():
    method = method_at(0, {"pos_weight": 2.0})
    # Two pixels: a is class 1, b is void (255). Channel 0 is the AC (no loss reads the output's channel 0).
    # a: z_1 = ln 3 (sigma 3/4, positive), z_2 = 0 (sigma 1/2); b: z_1 = -ln 3 (sigma 1/4), z_2 = ln 3 (sigma 3/4).
    logits = torch.tensor([[9.0, 9.0], [LN3, -LN3], [0.0, LN3]]).view(1, 3, 1, 2)
    labels = torch.tensor([[[1, 255]]])
    terms = method.losses({"label": labels}, (logits, {"pre_logits": feature_map(0.0, 0.0)}), None, epoch=0)
    assert set(terms) == {"mbce", "ac"}
    # a: -2 log(3/4) + -log(1/2) = 2 ln(4/3) + ln 2; b, both negatives: -log(3/4) - log(1/4) = ln(4/3) + ln 4.
    # Mean over the 2 pixels: (3 ln(4/3) + 3 ln 2) / 2 = 1.5 ln(8/3).
    torch.testing.assert_close(terms["mbce"], torch.tensor(1.5 * math.log(8 / 3)))


def test_ac_is_every_pixel_a_negative_and_trains_only_its_own_row():
    method = method_at(0, {"loss_ac": 2.0})
    # AC row W_0 = (1, 0.5), b_0 = ln 3 - 2; on f = (1, 2): z_aux = 1 + 1 + ln 3 - 2 = ln 3, sigma = 3/4.
    set_rows(method.model.cls[0], [[1.0, 0.5], [0.0, 0.0], [0.0, 0.0]], [LN3 - 2, 0.0, 0.0])
    f = feature_map(1.0, 2.0).requires_grad_(True)
    logits = torch.zeros(1, 3, 1, 2)  # the full-resolution size: the AC's 1x1 map is upsampled to 1x2
    terms = method.losses({"label": torch.zeros(1, 1, 2, dtype=torch.long)}, (logits, {"pre_logits": f}), None, 0)
    # BCE(ln 3, 0) = -log(1 - 3/4) = ln 4 at both pixels; weight 2.
    torch.testing.assert_close(terms["ac"], torch.tensor(2 * LN4))
    terms["ac"].backward()
    assert f.grad is None  # the AC reads detached features: no gradient to the head or the backbone
    # d/dW_0 of 2 * mean softplus(z) = 2 * sigma(z) * f = 2 * 3/4 * (1, 2); the class rows get nothing.
    grad = method.model.cls[0].weight.grad.view(3, 2)
    torch.testing.assert_close(grad, torch.tensor([[1.5, 3.0], [0.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(method.model.cls[0].bias.grad, torch.tensor([1.5, 0.0, 0.0]))


def step1_case(method: DKD) -> tuple[tuple, tuple]:
    """Student and teacher outputs for one image with one pixel and one stride-16 position.

    Logits (old channels 1, 2): student (0, ln 3), teacher (ln 3, 0); channel 0 (the AC) is -5 vs 5 and must not
    count. Features: student f = (1, 2), teacher f = (2, 1). Old rows: student W_1 = (ln 3, -ln 3 / 2),
    W_2 = (0, ln 3 / 2); teacher W_1 = (0, -ln 3), W_2 = (ln 3 / 2, 0). Biases 7 (the decomposition has no bias) and
    AC rows 9 (the AC is no old class)."""
    set_rows(method.model.cls[0], [[9.0, 9.0], [LN3, -LN3 / 2], [0.0, LN3 / 2]], [7.0, 7.0, 7.0])
    set_rows(method.teacher.cls[0], [[9.0, 9.0], [0.0, -LN3], [LN3 / 2, 0.0]], [7.0, 7.0, 7.0])
    student_logits = torch.tensor([-5.0, 0.0, LN3, 0.0, 0.0]).view(1, 5, 1, 1)
    teacher_logits = torch.tensor([5.0, LN3, 0.0]).view(1, 3, 1, 1)
    return (student_logits, {"pre_logits": feature_map(1.0, 2.0)}), (teacher_logits, {"pre_logits": feature_map(2.0, 1.0)})


def test_kd_distils_the_old_sigmoids_without_the_ac():
    method = method_at(1)
    student, teacher = step1_case(method)
    terms = method.losses({"label": torch.zeros(1, 1, 1, dtype=torch.long)}, student, teacher, epoch=0)
    assert set(terms) == {"mbce", "ac", "kd", "dkd_pos", "dkd_neg"}
    # BCE(z, q) = -[q log sigma(z) + (1 - q) log(1 - sigma(z))].
    # c=1: z = 0, q = sigma(ln 3) = 3/4: -(3/4 + 1/4) log(1/2) = ln 2.
    # c=2: z = ln 3, q = 1/2: -(1/2 log(3/4) + 1/2 log(1/4)) = (ln(4/3) + ln 4) / 2 = ln 4 - 0.5 ln 3.
    torch.testing.assert_close(terms["kd"], torch.tensor(5 * (LN2 + LN4 - 0.5 * LN3)))


def test_decomposed_distillation_splits_by_the_sign_of_the_weights():
    method = method_at(1, {"loss_dkd_pos": 2.0, "loss_dkd_neg": 3.0})
    student, teacher = step1_case(method)
    terms = method.losses({"label": torch.zeros(1, 1, 1, dtype=torch.long)}, student, teacher, epoch=0)
    # Student, f = (1, 2): z+_1 = ln 3, z-_1 = 2 * (-ln 3 / 2) = -ln 3; z+_2 = 2 * ln 3 / 2 = ln 3, z-_2 = 0.
    # Teacher, f = (2, 1): z+_1 = 0, z-_1 = -ln 3; z+_2 = 2 * ln 3 / 2 = ln 3, z-_2 = 0.
    # L+ = BCE(ln 3, sigma(0) = 1/2) + BCE(ln 3, sigma(ln 3) = 3/4)
    #    = (ln 4 - 0.5 ln 3) + (-(3/4) log(3/4) - (1/4) log(1/4) = ln 4 - 0.75 ln 3) = 2 ln 4 - 1.25 ln 3.
    # L- = BCE(-ln 3, sigma(-ln 3) = 1/4) + BCE(0, sigma(0) = 1/2)
    #    = (-(1/4) log(1/4) - (3/4) log(3/4) = ln 4 - 0.75 ln 3) + ln 2 = 3 ln 2 - 0.75 ln 3.
    torch.testing.assert_close(terms["dkd_pos"], torch.tensor(2 * (2 * LN4 - 1.25 * LN3)))
    torch.testing.assert_close(terms["dkd_neg"], torch.tensor(3 * (3 * LN2 - 0.75 * LN3)))


def test_step1_total_has_the_reference_weights_and_float32_terms_under_bf16():
    """DKD's t>0 loss is 1 L_mbce + 5 L_kd + 5 L_dkd+ + 5 L_dkd- + 1 L_ac; with bf16 inputs every term is float32."""
    method = method_at(1)
    assert (method.options.loss_kd, method.options.loss_dkd_pos, method.options.loss_dkd_neg,
            method.options.loss_ac, method.options.pos_weight) == (5.0, 5.0, 5.0, 1.0, 1.0)
    (logits, features), (old_logits, old_features) = step1_case(method)
    student = (logits.bfloat16(), {"pre_logits": features["pre_logits"].bfloat16()})
    teacher = (old_logits.bfloat16(), {"pre_logits": old_features["pre_logits"].bfloat16()})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = method.losses({"label": torch.zeros(1, 1, 1, dtype=torch.long)}, student, teacher, epoch=0)
    assert all(t.dtype == torch.float32 for t in terms.values())
    # f = (1, 2) and (2, 1) and ln 3 / 2 are exact enough in bf16 for the sums above to hold to 1e-2.
    torch.testing.assert_close(terms["dkd_pos"], torch.tensor(5 * (2 * LN4 - 1.25 * LN3)), atol=2e-2, rtol=0)


# ------------------------------------------------------------------------------------------------ the rest

def test_new_rows_start_as_copies_of_the_auxiliary_classifier():
    method = method_at(1)
    set_rows(method.model.cls[0], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [-3.0, 1.0, 2.0])
    method.init_new_classifier()
    assert torch.equal(method.model.cls[1].weight.view(2, 2), torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    assert torch.equal(method.model.cls[1].bias, torch.tensor([-3.0, -3.0]))
    assert torch.equal(method.model.cls[0].bias, torch.tensor([-3.0, 1.0, 2.0]))  # the old rows are untouched

    first = method_at(0)
    before = first.model.cls[0].weight.clone()
    first.init_new_classifier()
    assert torch.equal(first.model.cls[0].weight, before)  # step 0 has no new classifier to initialise


def effective_groups(method: DKD, lr: float) -> dict[str, tuple[float, float, set[int]]]:
    """name -> (lr, weight decay, ids of the parameters) as the optimiser sees them (default decay 1e-4)."""
    optimizer = build_optimizer(method.param_groups(lr), momentum=0.9, weight_decay=1e-4)
    return {g["name"]: (g["lr"], g["weight_decay"], {id(p) for p in g["params"]}) for g in optimizer.param_groups}


def ids(*modules: nn.Module) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def test_param_groups_at_step0():
    method = method_at(0)
    m = method.model
    groups = effective_groups(method, 0.01)
    assert groups == {"backbone": (0.01, 1e-4, ids(m.body)), "aspp": (0.1, 1e-4, ids(m.head)),
                      "classifiers": (0.1, 1e-4, ids(m.cls))}  # norm weights are trained at step 0


def test_param_groups_at_step1_and_norms_left_out():
    method = method_at(1)
    m = method.model
    groups = effective_groups(method, 0.001)
    assert groups == {"backbone": (0.001, 0.0, ids(m.body[0])), "aspp": (0.01, 0.0, ids(m.head[0])),
                      "old_classifiers": (0.01, 0.0, ids(m.cls[0])), "new_classifier": (0.01, 1e-4, ids(m.cls[1]))}
    assert not any(p.requires_grad for p in [*m.body[1].parameters(), *m.head[1].parameters()])


def test_norms_and_dropout_stay_in_eval_mode_at_t_gt_0_only():
    for step, frozen in ((0, False), (1, True)):
        method = method_at(step)
        method.model.train()
        method.train_mode()
        for module in (method.model.body[1], method.model.body[2], method.model.head[1], method.model.head[2]):
            assert module.training is not frozen, (step, module)
        assert method.model.body[0].training and method.model.cls[0].training


def test_prediction_is_background_unless_a_class_sigmoid_is_above_half():
    # Channel 0 (the AC) at 5 everywhere must not count. Pixel 0: class logits -1 and 0 (sigmoids 0.27, 0.5 <= 0.5)
    # -> 0; pixel 1: 1 and 2 -> class 2; pixel 2: 3 and -1 -> class 1.
    scores = torch.tensor([[5.0, 5.0, 5.0], [-1.0, 1.0, 3.0], [0.0, 2.0, -1.0]]).view(1, 3, 1, 3)
    assert DKD.predict(scores, DKD.Options()).tolist() == [[[0, 2, 1]]]


def test_presets_and_step0_key():
    voc0, voc1 = (parse_config(["--method", "DKD", "--dataset", "voc", "--step", s]) for s in ("0", "1"))
    assert (voc0.step_lr(), voc1.step_lr(), voc0.lr_policy) == (1e-3, 1e-4, "poly")
    assert (voc0.method_options.pos_weight, voc1.method_options.pos_weight) == (2.0, 1.0)
    ade = parse_config(["--method", "dkd", "--dataset", "ade", "--task", "100-50", "--step", "1", "--epochs", "100"])
    assert (ade.step_lr(), ade.lr_policy, ade.warmup_epochs, ade.crop_size) == (2.5e-4, "warm_poly", 20.0, (512, 512))
    assert ade.method_options.pos_weight == 35.0
    shapes = parse_config(["--method", "dkd", "--dataset", "shapes", "--task", "6-4", "--step", "1"])
    assert shapes.lr is None and shapes.step_lr() == 0.001  # no DKD schedule for shapes: our default
    assert shapes.method_options.pos_weight == 1.0          # VOC's value
    given = parse_config(["--method", "dkd", "--dataset", "voc", "--lr", "0.5", "--pos_weight", "3"])
    assert (given.lr, given.method_options.pos_weight) == (0.5, 3.0)
    # The step-0 key carries the step-0 pos weight: ADE's step 0 is not VOC's, and no method outside DKD's own
    # (DKD-M trains DKD's step 0) shares either.
    key = DKD.step0_key(voc0.method_options)
    assert 2.0 in key and key != DKD.step0_key(parse_config(["--method", "dkd", "--dataset", "ade", "--task",
                                                            "100-50"]).method_options)
    others = {cls.step0_key(cls.Options()) for cls in METHODS.values() if not issubclass(cls, DKD)}
    assert key not in others


def test_refuses_a_task_without_background_and_a_classifier_that_is_no_1x1_conv():
    class NoBackground(StubTask):
        has_background = False

    with pytest.raises(ValueError, match="needs a task with a background class"):
        build_method("dkd", StepInfo(task=NoBackground(), step=0, num_old=0, num_classes=3, epochs=1), Tiny([3]),
                     None, {})
    info = StepInfo(task=StubTask(), step=0, num_old=0, num_classes=3, epochs=1)
    model = Tiny([3])
    model.cls[0] = nn.Conv2d(2, 3, 3, padding=1)
    with pytest.raises(ValueError, match="1x1 classifiers"):
        build_method("dkd", info, model, None, {})


# ------------------------------------------------------------------------------------------------ end to end

STEP = [*TINY, "--task", "6-4", "--batch_size", "4", "--norm_act", "iabn_sync", "--method", "DKD", "--epochs", "1"]


def run_step(root: Path, tmp: Path, name: str, step: int, *extra: str, nproc: int = 0):
    args = [*STEP, "--data_root", str(root), "--checkpoint_dir", str(tmp / "ck"), "--logdir", str(tmp / "tb"),
            "--name", name, "--step", str(step), *extra]
    result = torchrun(nproc, *args, cwd=tmp) if nproc else run_py(*args, cwd=tmp)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def assert_finite_results(folder: Path, name: str) -> None:
    assert (folder / f"{name}.pth").is_file()
    metrics = json.loads((folder / f"{name}.json").read_text())
    for key in ("miou_all", "miou_old", "miou_new"):
        if metrics.get(key) is not None:
            assert math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 1.0, (key, metrics[key])


@pytest.fixture(scope="module")
def base(shapes_root: Path, tmp_path_factory) -> Path:
    """Step 0 of shapes 6-4 with DKD (its own step 0: pos_weight 2 and the AC), one process."""
    tmp = tmp_path_factory.mktemp("dkd0")
    result = run_step(shapes_root, tmp, "d", 0)
    assert "mbce=" in result.stdout and "ac=" in result.stdout
    assert_finite_results(tmp / "ck/step/shapes-6-4", "d_0")
    return tmp / "ck/step/shapes-6-4/d_0.pth"


def test_step1_runs_end_to_end(shapes_root, tmp_path, base):
    result = run_step(shapes_root, tmp_path, "d", 1, "--step_ckpt", str(base))
    assert all(f"{term}=" in result.stdout for term in ("mbce", "kd", "dkd_pos", "dkd_neg", "ac"))
    folder = tmp_path / "ck/step/shapes-6-4"
    assert_finite_results(folder, "d_1")
    weights = load_weights(folder / "d_1.pth")
    assert weights["cls.1.weight"].shape[0] == 4 and torch.isfinite(weights["cls.1.weight"]).all()


def test_two_gloo_ranks_train_step1_as_one(shapes_root, tmp_path, base):
    """The same global batch of 8 on 1 and on 2 ranks: every mean is over the global batch and the norm layers are
    frozen at t>0 (no batch statistics), so the weights agree up to float summation order."""
    run_step(shapes_root, tmp_path, "one", 1, "--step_ckpt", str(base), "--batch_size", "8", nproc=1)
    run_step(shapes_root, tmp_path, "two", 1, "--step_ckpt", str(base), "--batch_size", "8", nproc=2)
    folder = tmp_path / "ck/step/shapes-6-4"
    w1, w2 = load_weights(folder / "one_1.pth"), load_weights(folder / "two_1.pth")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-5, atol=1e-6, msg=key)
