"""MiB's losses against direct, loop-level implementations of the formulas in the reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segmentation.methods import METHODS, StepInfo, build_method
from segmentation.methods.losses import (global_mean, knowledge_distillation_map, unbiased_cross_entropy_map,
                                         unbiased_knowledge_distillation_map)
from segmentation.methods.mib import default_kd_weight


def random_case(seed: int, num_classes: int = 6, num_old: int = 4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, num_classes, 3, 4, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(2, num_old, 3, 4, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, num_classes, (2, 3, 4), generator=g)
    labels[0, 0, :2] = 255
    return logits, teacher, labels


def test_unce_equals_ce_without_old_classes():
    logits, _, labels = random_case(0)
    expected = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    torch.testing.assert_close(unbiased_cross_entropy_map(logits, labels, num_old=0), expected.float())


def test_unce_matches_direct_formula():
    logits, _, labels = random_case(1)
    num_old = 4
    result = unbiased_cross_entropy_map(logits, labels, num_old)
    for n, i, j in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(4)).tolist():
        x, y = logits[n, :, i, j], int(labels[n, i, j])
        den = math.log(sum(math.exp(v) for v in x.tolist()))
        if y == 255:
            expected = 0.0
        elif y < num_old:  # background absorbs every old class
            expected = -(math.log(sum(math.exp(v) for v in x[:num_old].tolist())) - den)
        else:
            expected = -(x[y].item() - den)
        assert result[n, i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_unkd_matches_direct_formula():
    logits, teacher, _ = random_case(2)
    num_old, alpha = 4, 0.7
    result = unbiased_knowledge_distillation_map(logits, teacher, alpha)
    for n, i, j in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(4)).tolist():
        x, t = logits[n, :, i, j].tolist(), teacher[n, :, i, j].tolist()
        den = math.log(sum(math.exp(v) for v in x))
        q_den = sum(math.exp(alpha * v) for v in t)
        q = [math.exp(alpha * v) / q_den for v in t]
        log_bg = math.log(math.exp(x[0]) + sum(math.exp(v) for v in x[num_old:])) - den
        total = q[0] * log_bg + sum(q[c] * (x[c] - den) for c in range(1, num_old))
        assert result[n, i, j].item() == pytest.approx(-total / num_old, rel=1e-5)


def test_kd_is_mean_over_old_channels():
    logits, teacher, _ = random_case(3)
    result = knowledge_distillation_map(logits, teacher)
    q = torch.softmax(teacher, 1)
    log_p = torch.log_softmax(logits[:, :4], 1)
    torch.testing.assert_close(result, (-(q * log_p).sum(1) / 4).float())


def test_global_mean_single_process_is_masked_mean():
    loss = torch.arange(12.0).reshape(1, 3, 4)
    valid = loss % 3 != 0
    assert global_mean(loss, valid).item() == pytest.approx(loss[valid].mean().item())
    assert global_mean(loss).item() == pytest.approx(loss.mean().item())


class TinySegmenter(nn.Module):
    def __init__(self, classes_per_step: list[int]) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 8, 1)
        self.cls = nn.ModuleList([nn.Conv2d(8, c, 1) for c in classes_per_step])

    def forward(self, x):
        f = self.features(x)
        return torch.cat([c(f) for c in self.cls], 1), {"pre_logits": f}


class StubTask:
    name = "4-2"


def test_balanced_init_keeps_old_predictions():
    torch.manual_seed(0)
    teacher = TinySegmenter([4])
    student = TinySegmenter([4, 2])
    student.load_state_dict(teacher.state_dict(), strict=False)
    info = StepInfo(task=StubTask(), step=1, num_old=4, num_classes=6, epochs=1)
    build_method("MiB", info, student, teacher, {"loss_kd": None, "alpha": 1.0}).init_new_classifier()
    x = torch.randn(2, 3, 5, 5)
    p_old = torch.softmax(teacher(x)[0], 1)
    p_new = torch.softmax(student(x)[0], 1)
    torch.testing.assert_close(student.cls[1].weight, teacher.cls[0].weight[:1].expand(2, -1, -1, -1))
    torch.testing.assert_close(student.cls[1].bias, (teacher.cls[0].bias[0] - math.log(3)).expand(2))
    # Old classes keep their probability; background's mass is shared evenly by background and the 2 new classes.
    torch.testing.assert_close(p_new[:, 1:4], p_old[:, 1:4])
    torch.testing.assert_close(p_new[:, [0, 4, 5]], (p_old[:, :1] / 3).expand(-1, 3, -1, -1))


def test_mib_losses_and_kd_weight():
    torch.manual_seed(1)
    teacher, student = TinySegmenter([4]), TinySegmenter([4, 2])
    info = StepInfo(task=StubTask(), step=1, num_old=4, num_classes=6, epochs=1)
    method = build_method("mib", info, student, teacher, {"loss_kd": None, "alpha": 1.0})
    x = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 6, (2, 4, 4))
    terms = method.losses({"label": labels}, student(x), teacher(x), epoch=0)
    assert set(terms) == {"unce", "unkd"}
    expected_kd = 10 * unbiased_knowledge_distillation_map(student(x)[0], teacher(x)[0]).mean()
    torch.testing.assert_close(terms["unkd"], expected_kd)
    assert [default_kd_weight({"task": t}) for t in ("15-1", "15-5s", "15-5")] == [100, 100, 10]


def test_ft_is_plain_ce_and_methods_are_case_insensitive():
    torch.manual_seed(2)
    model = TinySegmenter([4, 2])
    info = StepInfo(task=StubTask(), step=1, num_old=4, num_classes=6, epochs=1)
    method = build_method("FT", info, model, None, {})
    x, labels = torch.randn(2, 3, 4, 4), torch.randint(0, 6, (2, 4, 4))
    labels[0, 0] = 255
    terms = method.losses({"label": labels}, model(x), None, epoch=0)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(model(x)[0], labels, ignore_index=255))
    assert set(METHODS) >= {"ft", "mib"}
    with pytest.raises(ValueError, match="valid methods"):
        build_method("nope", info, model, None, {})


def test_a_new_method_shares_no_step0_until_it_says_which():
    """step0_key is part of the interface: by default a method's step 0 is its own, so a benchmark never hands a
    method another method's step 0 by accident."""
    from segmentation.methods.base import Method
    from segmentation.methods.options import resolve_options

    class Newcomer(Method):
        name = "newcomer"

    assert Newcomer.step0_key(None) == ("own", "newcomer")
    flags = {"dataset": "voc", "task": "15-1", "step": 0, "epochs": 30}
    keys = {name: cls.step0_key(resolve_options(cls.Options, [cls.flag_defaults], dict(flags)))
            for name, cls in METHODS.items()}
    assert keys["ft"] == keys["lwf"] == keys["mib"] == keys["plop"] == keys["cil"] == ("ce",)
    assert keys["lwf-mc"] == keys["wilson"] == ("bce",) and keys["ewc"] == keys["pi"] == keys["rw"]
    # The -M variants' step-0 artifact carries the memory chosen at its end: their own step 0, not the parent's.
    assert len({keys["dkd"], keys["dkd-m"], keys["star"], keys["star-m"]}) == 4


def test_the_flag_groups_name_every_method_that_reads_them():
    """--help's "Read by" lines are derived from the registry (a method added later is listed without an edit)."""
    from segmentation.config import build_parser, option_readers
    from segmentation.methods.distillation import DistillationOptions

    family = option_readers(DistillationOptions)
    assert set(family) == {"ft", "lwf", "lwf-mc", "ilt", "ewc", "pi", "rw", "mib", "plop"}
    groups = {g.title: g.description for g in build_parser()._action_groups}
    assert groups["method: MiB family"].startswith(f"Read by {', '.join(family)}.")
    assert groups["method: PLOP"].startswith("Read by plop.") and groups["method: CIL"].startswith("Read by cil.")
