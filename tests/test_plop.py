"""PLOP against direct implementations of the formulas of its paper and code (arthurdouillard/CVPR2021_PLOP,
train.py and utils/loss.py)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segmentation.config import ConfigError, parse_config
from segmentation.methods import StepInfo, build_method
from segmentation.methods.plop import (adaptive_factor, entropy_histogram, entropy_pseudo_labels, entropy_thresholds,
                                       fold_new_channels, histogram_median, local_pod, normalized_entropy,
                                       pod_distance)

REPO = Path(__file__).resolve().parents[1]


class StubTask:
    name = "4-2"


def step1_info(num_old: int = 4, num_classes: int = 6) -> StepInfo:
    return StepInfo(task=StubTask(), step=1, num_old=num_old, num_classes=num_classes, epochs=1)


# --- thresholds ------------------------------------------------------------------------------------------------

def plop_buggy_median(row: np.ndarray) -> float:
    """PLOP's find_median loop for one class, as written there: the running count adds the bin INDEX."""
    nb_bins, half, running = len(row), row.sum() / 2, 0.0
    for index in range(nb_bins):
        if running <= half <= running + row[index]:
            break
        running += index
    with np.errstate(divide="ignore"):  # no bin met the test: PLOP divides by the empty last bin's 0
        return float(index / nb_bins + (half - running) / np.float64(row[index]) * (1 / nb_bins))


def test_histogram_median_is_the_true_median_within_one_bin():
    rng = np.random.default_rng(0)
    nb_bins = 1000
    samples = [rng.beta(2, 5, size=2001), rng.uniform(0.3, 0.9, size=501), rng.exponential(0.05, size=999).clip(0, 1)]
    values = torch.from_numpy(np.concatenate(samples))
    classes = torch.cat([torch.full((len(s),), c) for c, s in enumerate(samples)])
    histograms = entropy_histogram(values, classes, num_rows=4, nb_bins=nb_bins)  # class 3: no pixel
    assert histograms.dtype == torch.int64 and histograms.sum(1).tolist() == [2001, 501, 999, 0]
    median, has_pixels = histogram_median(histograms)
    assert has_pixels.tolist() == [True, True, True, False]
    for c, s in enumerate(samples):
        assert abs(median[c].item() - np.median(s)) <= 1 / nb_bins
    # PLOP's loop gets the medians that lie past the first bins wrong: here its test never holds (the running
    # "count" outgrows half the total) and it ends with a negative number / 0 = -inf, which the floor then
    # replaces: the class gets --threshold whatever its median.
    assert plop_buggy_median(histograms[1].numpy()) == -math.inf


def test_histogram_median_interpolates_inside_its_bin():
    # 10 bins; counts 2, 0, 4, 4: half = 5 falls 3 pixels into bin 2 (4 pixels) -> 0.2 + 3/4 * 0.1.
    histograms = torch.tensor([[2, 0, 4, 4, 0, 0, 0, 0, 0, 0]])
    median, _ = histogram_median(histograms)
    assert median.item() == pytest.approx(0.275)
    assert plop_buggy_median(histograms[0].numpy()) == pytest.approx(0.2 + (5 - 1) / 4 * 0.1)  # the bug differs


def test_thresholds_take_the_floor_and_an_empty_class_gets_it():
    histograms = torch.zeros(3, 100, dtype=torch.int64)
    histograms[0, 0] = 9          # median 0.005
    histograms[1, 50] = 1         # median 0.505
    thresholds = entropy_thresholds(histograms, floor=0.01)
    torch.testing.assert_close(thresholds, torch.tensor([0.01, 0.505, 0.01]))


def plop_entropy_loop(probs: torch.Tensor) -> torch.Tensor:
    """-(1 / log C) * (1 / C) * sum_c p log p, pixel by pixel."""
    n, c, h, w = probs.shape
    out = torch.zeros(n, h, w, dtype=probs.dtype)
    for i, y, x in np.ndindex(n, h, w):
        p = probs[i, :, y, x]
        out[i, y, x] = -sum(float(v) * math.log(float(v) + 1e-8) for v in p) / c / math.log(c + 1e-8)
    return out


def test_normalized_entropy_is_plop_formula_over_log_current_classes():
    logits = torch.randn(2, 4, 3, 5, dtype=torch.float64) * 3
    pseudo, values = normalized_entropy(logits, num_classes=6)
    probs = torch.softmax(logits, 1)
    torch.testing.assert_close(values, plop_entropy_loop(probs) / math.log(6))
    assert torch.equal(pseudo, probs.argmax(1))
    # Bounded by 1 / (C_old log C_t): why the histogram needs many bins over [0, 1].
    assert values.max() <= 1 / (4 * math.log(6))


class ConvTeacher(nn.Module):
    """A Segmenter-like teacher: 1x1 convolution to C_old logits, asked for no features."""

    def __init__(self, num_old: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_old, 1)
        self.classes_per_step = [num_old]

    def forward(self, x, features=None):
        return self.conv(x) * 4, {}


def fake_loader(seed: int, batches: int = 3, n: int = 2, size: int = 6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        labels = torch.randint(0, 6, (n, size, size), generator=g).to(torch.uint8)
        labels[:, 0, :2] = 255
        out.append({"image": torch.randint(0, 256, (n, 3, size, size), generator=g).to(torch.uint8),
                    "label": labels, "valid_box": torch.tensor([[0, size, 0, size]] * n, dtype=torch.int32)})
    return out


def test_before_training_thresholds_are_the_per_class_median_of_background_pixels():
    from segmentation.engine.trainer import prepare_batch

    torch.manual_seed(0)
    teacher, student = ConvTeacher(4).eval(), nn.Conv2d(3, 6, 1)
    loader = fake_loader(1)
    method = build_method("plop", step1_info(), student, teacher, {"pseudo_nb_bins": 100000, "threshold": 0.0})
    method.before_training(loader, torch.device("cpu"))
    entropies: dict[int, list[float]] = {}
    with torch.no_grad():
        for raw in loader:
            batch = prepare_batch(raw, torch.device("cpu"))
            pseudo, values = normalized_entropy(teacher(batch["image"])[0], 6)
            bg = batch["label"] == 0
            for c, v in zip(pseudo[bg].tolist(), values[bg].tolist()):
                entropies.setdefault(c, []).append(v)
    assert method.thresholds is not None and method.thresholds.shape == (4,)
    assert len(entropies) >= 3
    for c in range(4):
        # The smallest m with at least half the values <= m (numpy's median averages the two middle ones).
        values = sorted(entropies.get(c, [0.0]))
        middle = values[(len(values) - 1) // 2]
        assert abs(method.thresholds[c].item() - middle) <= 1e-5, c
    state = method.state_dict()
    other = build_method("plop", step1_info(), student, teacher, {})
    other.load_state_dict(state)
    assert torch.equal(other.thresholds, method.thresholds)


# --- pseudo-labels and the adaptive factor ---------------------------------------------------------------------

def test_pseudo_labels_and_adaptive_factor_match_a_direct_implementation():
    g = torch.Generator().manual_seed(3)
    num_old, num_classes = 4, 6
    teacher_logits = torch.randn(3, num_old, 4, 5, generator=g) * 3
    labels = torch.randint(0, num_classes, (3, 4, 5), generator=g)
    labels[0, 0, 0] = 255
    labels[2] = torch.randint(num_old, num_classes, (4, 5), generator=g)  # image 2: no background pixel
    thresholds = torch.tensor([0.01, 0.02, 0.015, 0.03])
    new_labels, confident, background = entropy_pseudo_labels(labels, teacher_logits, thresholds, num_old,
                                                              num_classes)
    probs = torch.softmax(teacher_logits, 1)
    expected = labels.clone()
    for i, y, x in np.ndindex(3, 4, 5):
        if labels[i, y, x] < num_old:
            p = probs[i, :, y, x]
            c = int(p.argmax())
            u = -sum(float(v) * math.log(float(v) + 1e-8) for v in p) / num_old / math.log(num_old) / math.log(6)
            expected[i, y, x] = c if u < thresholds[c] else 255
    assert torch.equal(new_labels, expected)
    assert (new_labels[0] == 255).any() and ((new_labels[0] < num_old) & (new_labels[0] >= 0)).any()
    factor = adaptive_factor(confident, background, 0.0)
    for i in range(2):  # PLOP's train.py (since b70fb8f): num / (den + 1e-6)
        bg = labels[i] < num_old
        expected_factor = ((new_labels[i] != 255) & bg).sum().item() / (bg.sum().item() + 1e-6)
        assert factor[i].item() == pytest.approx(expected_factor, rel=1e-7)
    assert factor[2].item() == 0.0  # no background pixel: 0 / (0 + 1e-6), the image's CE counts for nothing
    assert adaptive_factor(confident, background, 0.9).min().item() == pytest.approx(0.9)


def test_plop_ce_is_the_adaptive_ce_over_valid_pixels_and_zero_weight_without_background():
    g = torch.Generator().manual_seed(4)
    num_old, num_classes = 4, 6
    teacher_logits = torch.randn(2, num_old, 4, 4, generator=g) * 3
    logits = torch.randn(2, num_classes, 4, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, num_classes, (2, 4, 4), generator=g)
    labels[1] = 5  # no background pixel
    method = build_method("plop", step1_info(), nn.Identity(), nn.Identity(), {"pod": "none"})
    method.thresholds = torch.tensor([0.01, 0.02, 0.015, 0.03])
    terms = method.losses({"label": labels}, (logits, {}), (teacher_logits, {}), epoch=0)
    assert set(terms) == {"ce"} and torch.isfinite(terms["ce"])
    pseudo, confident, background = entropy_pseudo_labels(labels, teacher_logits, method.thresholds, 4, 6)
    ce = F.cross_entropy(logits, pseudo, ignore_index=255, reduction="none")
    factor = torch.tensor([(confident & background)[0].sum().item() / (background[0].sum().item() + 1e-6), 0.0])
    expected = (ce * factor[:, None, None]).sum() / (pseudo != 255).sum()
    torch.testing.assert_close(terms["ce"], expected)
    terms["ce"].backward()
    assert torch.isfinite(logits.grad).all()


def test_step0_is_plain_ce():
    info = StepInfo(task=StubTask(), step=0, num_old=0, num_classes=4, epochs=1)
    logits, labels = torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3))
    method = build_method("plop", info, nn.Identity(), None, {})
    assert not method.needs_teacher
    terms = method.losses({"label": labels}, (logits, {}), None, epoch=0)
    assert set(terms) == {"ce"}
    torch.testing.assert_close(terms["ce"], F.cross_entropy(logits, labels))


# --- local POD -------------------------------------------------------------------------------------------------

def plop_local_pod_loop(x: torch.Tensor, scales=(1, 2, 4)) -> torch.Tensor:
    """PLOP's _local_pod layout on a square map: windows of k = W // s, width-mean then height-mean per window."""
    n, w = x.shape[0], x.shape[-1]
    emb = []
    for s in scales:
        k = w // s
        for i in range(s):
            for j in range(s):
                t = x[..., i * k:(i + 1) * k, j * k:(j + 1) * k]
                emb += [t.mean(dim=3).reshape(n, -1), t.mean(dim=2).reshape(n, -1)]
    return torch.cat(emb, dim=1)


def pod_distance_loop(a: torch.Tensor, b: torch.Tensor, kh_kw) -> float:
    """Per sample sqrt of the summed squared differences of every window mean, by loops; mean over samples."""
    n, c, h, w = a.shape
    a, b = a.double() ** 2, b.double() ** 2
    total = 0.0
    for i in range(n):
        sq = 0.0
        for s in (1, 2, 4):
            kh, kw = kh_kw(h, w, s)
            for r in range(s):
                for q in range(s):
                    wa = a[i, :, r * kh:(r + 1) * kh, q * kw:(q + 1) * kw]
                    wb = b[i, :, r * kh:(r + 1) * kh, q * kw:(q + 1) * kw]
                    sq += float(((wa.mean(2) - wb.mean(2)) ** 2).sum() + ((wa.mean(1) - wb.mean(1)) ** 2).sum())
        total += math.sqrt(sq)
    return total / n


def test_local_pod_matches_plop_layout_and_distance_on_square_maps():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 3, 9, 9, generator=g), torch.randn(2, 3, 9, 9, generator=g)  # 9 // 4 = 2: a tail dropped
    emb = local_pod(a)
    reference = plop_local_pod_loop(a)
    # Per scale s, s^2 windows of k = 9 // s pixels, each giving 2 * C * k means: the same entries as PLOP's.
    assert emb.shape == reference.shape == (2, 2 * 3 * (9 + 4 * 4 + 16 * 2))
    torch.testing.assert_close(emb.sort(dim=1).values, reference.sort(dim=1).values)
    plop_value = torch.linalg.vector_norm(plop_local_pod_loop(a ** 2) - plop_local_pod_loop(b ** 2), dim=1).mean()
    torch.testing.assert_close(pod_distance(a, b).mean(), plop_value)
    assert pod_distance(a, b).mean().item() == pytest.approx(pod_distance_loop(a, b, lambda h, w, s: (w // s, w // s)))


def test_local_pod_on_non_square_maps_and_tiny_maps():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(2, 2, 8, 12, generator=g), torch.randn(2, 2, 8, 12, generator=g)
    assert pod_distance(a, b).mean().item() == pytest.approx(pod_distance_loop(a, b, lambda h, w, s: (h // s, w // s)))
    tiny = torch.randn(1, 2, 2, 2, generator=g)  # scale 4 has no full pixel per window: skipped, no NaN
    assert local_pod(tiny).shape == (1, 2 * 2 * (2 + 4 * 1))
    # PLOP's loop slices empty windows there (k = 0): empty means, nothing added, the same entries
    torch.testing.assert_close(local_pod(tiny).sort(dim=1).values, plop_local_pod_loop(tiny).sort(dim=1).values)
    assert torch.isfinite(pod_distance(tiny, tiny * 2)).all()


def test_logits_sum_new_channels_into_background():
    logits = torch.arange(2 * 6 * 2 * 2, dtype=torch.float32).view(2, 6, 2, 2)
    folded = fold_new_channels(logits, num_old=4)
    assert folded.shape == (2, 4, 2, 2)
    torch.testing.assert_close(folded[:, 0], logits[:, 0] + logits[:, 4] + logits[:, 5])
    torch.testing.assert_close(folded[:, 1:], logits[:, 1:4])


def test_pod_term_weights_layers_schedules_and_averages():
    g = torch.Generator().manual_seed(7)
    old_maps = [torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 4, 4, generator=g)]
    new_maps = [torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 4, 4, generator=g)]
    old_logits, new_logits = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    method = build_method("plop", step1_info(), nn.Identity(), nn.Identity(), {"pseudo": "none"})
    assert method.teacher_features == {"attentions", "logits_small"}
    teacher_out = {"attentions": old_maps, "logits_small": old_logits}
    student_out = {"attentions": new_maps, "logits_small": new_logits}
    pod = method.pod_loss(student_out, teacher_out)
    layers = [0.01 * pod_distance(o, n).mean() for o, n in zip(old_maps, new_maps)]
    layers.append(0.0005 * pod_distance(old_logits, fold_new_channels(new_logits, 4)).mean())
    torch.testing.assert_close(pod, sum(layers) * math.sqrt(6 / 2) / 3)
    flat = build_method("plop", step1_info(), nn.Identity(), nn.Identity(),
                        {"pseudo": "none", "no_pod_schedule": True, "pod_logits": False})
    torch.testing.assert_close(flat.pod_loss(student_out, teacher_out), sum(layers[:2]) / 2)
    labels = torch.randint(0, 6, (2, 16, 16), generator=g)
    terms = method.losses({"label": labels}, (torch.randn(2, 6, 16, 16), student_out),
                          (torch.randn(2, 4, 16, 16), teacher_out), epoch=0)
    assert set(terms) == {"ce", "pod"}


# --- flags -----------------------------------------------------------------------------------------------------

def test_plop_flags_preset_and_refusals():
    o = parse_config(["--method", "plop"]).method_options
    assert (o.pod, o.pod_factor, o.pod_logits, o.pod_logits_factor, o.no_pod_schedule) == ("local", 0.01, True,
                                                                                            0.0005, False)
    assert (o.pseudo, o.threshold, o.classif_adaptive_factor, o.classif_adaptive_min_factor) == ("entropy", 0.001,
                                                                                                 True, 0.0)
    assert o.init_balanced and o.pseudo_nb_bins == 10000 and not o.unce and o.loss_kd == 0.0
    o = parse_config(["--method", "plop", "--pod", "none", "--no-pod_logits", "--no_pod_schedule", "--loss_kd",
                      "10", "--pseudo_nb_bins", "500"]).method_options
    assert (o.pod, o.pod_logits, o.no_pod_schedule, o.loss_kd, o.pseudo_nb_bins) == ("none", False, True, 10.0, 500)
    with pytest.raises(ConfigError, match="does not read --pod_factor"):
        parse_config(["--method", "mib", "--pod_factor", "1"])
    with pytest.raises(ConfigError, match="--unce"):
        parse_config(["--method", "plop", "--unce"])
    assert parse_config(["--method", "plop", "--unce", "--pseudo", "none"]).method_options.unce


@pytest.mark.parametrize("task", ["100-50", "100-10", "100-5", "50-50"])
def test_plop_on_ade_takes_the_pod_weights_of_plops_ade_scripts(task):
    """PLOP's scripts/ade/plop_ade_*.sh: --pod_factor 0.001, and at t>0 the logits' factor 1e-5 (--pod_options)."""
    o = parse_config(["--method", "plop", "--dataset", "ade", "--task", task, "--step", "1"]).method_options
    assert (o.pod_factor, o.pod_logits_factor, o.pod_logits, o.pseudo) == (0.001, 1e-5, True, "entropy")
    given = parse_config(["--method", "plop", "--dataset", "ade", "--pod_logits_factor", "0.0005"]).method_options
    assert (given.pod_factor, given.pod_logits_factor) == (0.001, 0.0005)


# --- end to end ------------------------------------------------------------------------------------------------

def test_plop_step1_on_two_ranks(shapes_root, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    common = ["--dataset", "shapes", "--data_root", str(shapes_root), "--task", "6-4", "--backbone", "resnet18",
              "--crop_size", "64", "--num_workers", "0", "--val_interval", "0", "--print_interval", "5",
              "--random_seed", "3", "--batch_size", "4", "--epochs", "1", "--norm_act", "bn", "--name", "p",
              "--checkpoint_dir", str(tmp_path / "ck")]
    step0 = subprocess.run([sys.executable, str(REPO / "run.py"), *common, "--step", "0", "--method", "ft"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert step0.returncode == 0, step0.stderr[-3000:]
    step1 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(REPO / "run.py"), *common, "--step", "1", "--method", "plop"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert step1.returncode == 0, step1.stderr[-3000:]
    output = step1.stdout + step1.stderr
    assert "PLOP entropy thresholds per old class" in output
    epoch_line = next(line for line in output.splitlines() if "epoch 1/1:" in line)
    assert "ce=" in epoch_line and "pod=" in epoch_line
    assert (tmp_path / "ck/step/shapes-6-4/p_1.pth").exists()
