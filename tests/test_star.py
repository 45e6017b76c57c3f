"""STAR (segmentation/methods/star.py): each loss term and the class statistics on hand-made tensors, the same
statistics and gradients on 1 and 2 gloo ranks, the rank-sliced replay draw, the carried and running state, and
steps 0 and 1 of shapes 6-2 through run.py (carried statistics, an exact resume)."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from segmentation.methods import StepInfo, build_method
from segmentation.methods.star import (STAR, ClassStatistics, ClassSums, derive_statistics, grid_sample,
                                       mbce_loss, new_class_sums, ocfm_loss, replay_plan, sad_loss, synthetic_features,
                                       teacher_pseudo_labels)
from test_pipeline import REPO, TINY, load_weights, run_py, torchrun

LOG2 = math.log(2.0)


# ---------------------------------------------------------------- losses on hand-made tensors

def test_mbce_mixes_the_class_term_with_the_replayed_and_extra_background_terms():
    # 2 synthetic features and 1 extra-background position, every logit 0: BCE(0, 0) = log 2 per row and class.
    # One new class. Counts over the global batch: 2 synthetic rows, |G| = 1, B h w = 8 grid positions; rho = 2.
    # w_f = 2 / 8 = 0.25, w_b = 2 * 1 / 8 = 0.25, F = G = log 2, A = 0.5:
    # L = (0.5 + 0.25 log 2 + 0.25 log 2) / (1 + 0.25 + 0.25).
    counts = torch.tensor([2.0, 1.0, 8.0], dtype=torch.float64)
    loss = mbce_loss(torch.tensor(0.5), torch.zeros(2, 1), torch.zeros(1, 1), counts, torch.tensor(2.0))
    assert loss.item() == pytest.approx((0.5 + 0.5 * LOG2) / 1.5)
    # No synthetic feature and no extra background: w_f = w_b = 0 and L = A, no NaN from the empty means.
    empty = mbce_loss(torch.tensor(0.5), torch.zeros(0, 1), torch.zeros(0, 1),
                      torch.tensor([0.0, 0.0, 8.0], dtype=torch.float64), torch.tensor(2.0))
    assert empty.item() == pytest.approx(0.5)


def test_the_class_term_of_mbce_is_weighted_bce_over_every_pixel():
    # One new class (channel 1), 2 pixels: z = 0 labelled 1 (positive, p = 4: 4 log 2), z = 0 labelled 255 (void is a
    # negative: log 2). Mean over the 2 pixels: 2.5 log 2. Through STAR.losses at step 0.
    method = star_method(step=0, num_old=0, num_classes=2, options={"pos_weight": 4.0})
    logits = torch.zeros(1, 2, 1, 2)
    terms = method.losses({"label": torch.tensor([[[1, 255]]])}, (logits, {}), None, 0)
    assert terms.keys() == {"mbce"} and terms["mbce"].item() == pytest.approx(2.5 * LOG2)


def test_ocfm_is_the_masked_feature_distance_with_the_mask_resized_bilinearly():
    # f: 1 x 2 channels x 1 x 2 positions, f_old = 0. Position 0: f = (1, 3) -> mean over channels of the squares 5;
    # position 1: f = (2, 4) -> 10. The full-resolution mask [1, 1, 0, 1] resized to 2 positions (bilinear, no
    # corner alignment: each output averages its 2 source pixels) is [1, 0.5]: L = (5 + 0.5 * 10) / 1.5.
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    mask = torch.tensor([[[True, True, False, True]]])
    assert ocfm_loss(f, torch.zeros_like(f), mask).item() == pytest.approx(10 / 1.5)
    # A mask already at f's size: only position 0 counts, L = 5.
    assert ocfm_loss(f, torch.zeros_like(f), torch.tensor([[[True, False]]])).item() == pytest.approx(5.0)


def test_ocfm_without_a_pseudo_labelled_pixel_is_zero_with_finite_gradients():
    f = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = ocfm_loss(f, torch.randn(2, 4, 3, 3), torch.zeros(2, 6, 6, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(f.grad).all() and not f.grad.any()


def test_sad_is_one_over_the_distance_to_the_nearest_old_prototype_and_one_for_an_absent_class():
    # Old prototypes (1, 0) and (0, 1). New classes 7 and 8; one position with f = (3, 4) labelled 7, one labelled 0.
    # q_7 = (0.6, 0.8): distances sqrt(0.16 + 0.64) and sqrt(0.36 + 0.04) -> 1 / sqrt(0.4). Class 8 is absent:
    # q_8 = 0, at distance 1 from every unit prototype -> 1. L = mean = (1 / sqrt(0.4) + 1) / 2.
    f = torch.tensor([[[[3.0, 1.0]], [[4.0, 1.0]]]])
    sums = new_class_sums(f, torch.tensor([[[7, 0]]]), range(7, 9))
    torch.testing.assert_close(sums, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    loss = sad_loss(sums, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert loss.item() == pytest.approx((1 / math.sqrt(0.4) + 1) / 2)


def test_teacher_pseudo_labels_threshold_the_raw_logit_and_skip_channel_0():
    # Channels: 0 (unused), 1, 2 old; channel 3 is not old (num_old = 3). Logits 0.6 (sigmoid 0.65) pass the 0.5
    # logit threshold; 0.4 does not, though sigmoid(0.4) = 0.6 > 0.5; channel 0's 9 is never a class.
    logits = torch.tensor([[[9.0, 9.0, 9.0]], [[0.6, 0.4, 0.0]], [[0.1, 0.3, 0.45]], [[5.0, 5.0, 5.0]]])[None]
    assert teacher_pseudo_labels(logits, 3).tolist() == [[[1, 0, 0]]]


def test_grid_sample_takes_the_centre_of_each_stride_16_cell():
    labels = torch.arange(32 * 32).reshape(1, 32, 32)
    assert torch.equal(grid_sample(labels, (2, 2)), labels[:, 8::16, 8::16])


# ---------------------------------------------------------------- class statistics

def hand_features() -> tuple[torch.Tensor, torch.Tensor]:
    """1 image, D = 2, a 2 x 3 grid: class 1 at f = (3, 4) and (0, 2); class 2 twice at (1, 0); background once;
    void once."""
    f = torch.tensor([[3.0, 0.0, 1.0], [1.0, 7.0, 7.0]])  # channel 0 per position
    g = torch.tensor([[4.0, 2.0, 0.0], [0.0, 7.0, 7.0]])  # channel 1
    features = torch.stack([f, g])[None]
    labels = torch.tensor([[[1, 1, 2], [2, 0, 255]]])
    return features, labels


def test_statistics_of_a_hand_made_feature_set():
    features, labels = hand_features()
    sums = ClassSums.zeros(3, 2, torch.device("cpu"))
    sums.add(features, labels, range(1, 4))   # classes 1, 2 and 3 (absent)
    stats = derive_statistics(sums)
    # Class 1: u = (0.6, 0.8) and (0, 1); p = normalize(0.6, 1.8) = (1, 3) / sqrt(10).
    p = torch.tensor([1.0, 3.0]) / math.sqrt(10)
    torch.testing.assert_close(stats.prototypes[0], p)
    # Spread around its OWN prototype: sqrt(mean over the 2 positions of (u - p)^2), per dimension.
    u = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    torch.testing.assert_close(stats.spreads[0], ((u - p) ** 2).mean(0).sqrt())
    # Norms 5 and 2: mean 3.5, unbiased std sqrt((1.5^2 + 1.5^2) / 1) = sqrt(4.5).
    assert stats.norm_mean[0].item() == pytest.approx(3.5)
    assert stats.norm_std[0].item() == pytest.approx(math.sqrt(4.5))
    # Class 2: twice (1, 0): prototype (1, 0), spread 0 around itself (around class 1's prototype it would not be),
    # norms 1 and 1: mean 1, std 0.
    torch.testing.assert_close(stats.prototypes[1], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(stats.spreads[1], torch.zeros(2))
    assert (stats.norm_mean[1].item(), stats.norm_std[1].item()) == pytest.approx((1.0, 0.0))
    # Class 3 is absent: zeros rather than NaN. Counts 2, 2, 0; one background position (void is not background).
    assert not stats.prototypes[2].any() and not stats.spreads[2].any() and stats.norm_std[2].item() == 0.0
    assert stats.counts.tolist() == [2.0, 2.0, 0.0] and sums.background.item() == 1.0


def _statistics_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        features, labels, weight, inputs, targets = shared_data()
        sums = ClassSums.zeros(3, 8, torch.device("cpu"))
        for i in range(rank, features.shape[0], world):  # this rank's images: r, r + W, ...
            sums.add(features[i:i + 1], labels[i:i + 1], range(1, 4))
        sums.all_reduce()
        stats = derive_statistics(sums)
        grads = loss_gradients(weight, inputs[rank::world], targets[rank::world])
        torch.save({"sums": vars(sums), "stats": stats.as_dict(), "grads": grads}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def shared_data():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(5, 8, 3, 4, generator=g).abs()
    labels = torch.randint(0, 4, (5, 3, 4), generator=g)
    labels[0, 0, 0] = 255
    weight = torch.randn(8, 8, generator=g)
    inputs = torch.randn(4, 8, 2, 4, generator=g)
    targets = torch.randint(0, 4, (4, 4, 8), generator=g)  # full resolution: twice the feature size
    return features, labels, weight, inputs, targets


def loss_gradients(weight: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of a shared parameter through L_sad and L_ocfm on this rank's images, averaged over the ranks as
    DDP averages them."""
    from segmentation.utils import dist

    out = {}
    for name in ("sad", "ocfm"):
        w = weight.clone().requires_grad_(True)
        f = torch.einsum("dc,nchw->ndhw", w, inputs)
        if name == "sad":
            loss = sad_loss(new_class_sums(f, targets, range(2, 4)), torch.eye(8)[:2])
        else:
            loss = ocfm_loss(f, inputs, targets == 1)
        loss.backward()
        grad = w.grad.clone()
        dist.all_reduce_sum(grad)
        out[name] = grad / dist.get_world_size()
    return out


def test_statistics_and_gradients_are_the_same_on_one_and_two_ranks(tmp_path):
    features, labels, weight, inputs, targets = shared_data()
    one = ClassSums.zeros(3, 8, torch.device("cpu"))
    one.add(features, labels, range(1, 4))
    expected = derive_statistics(one)
    expected_grads = loss_gradients(weight, inputs, targets)
    torch.multiprocessing.spawn(_statistics_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in vars(one).items():   # float64 sums: equal up to the order of additions
            torch.testing.assert_close(got["sums"][key], value, rtol=1e-12, atol=1e-12, msg=key)
        for key, value in expected.as_dict().items():
            torch.testing.assert_close(got["stats"][key], value, rtol=1e-6, atol=1e-7, msg=key)
        # all_gather_with_grad's backward sums the ranks' gradients of each part, DDP's average divides by W:
        # the 1-rank gradient (L_sad); the weighted global mean gives it too (L_ocfm).
        for name, grad in expected_grads.items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- replay

def old_statistics() -> ClassStatistics:
    g = torch.Generator().manual_seed(1)
    return ClassStatistics(nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1),
                           torch.rand(3, 4, generator=g),
                           torch.tensor([2.0, 3.0, 4.0]), torch.tensor([0.5, 0.1, 0.2]),
                           torch.tensor([30.0, 0.0, 20.0], dtype=torch.float64))


def test_the_replay_draws_of_two_ranks_are_the_one_rank_draw():
    stats, per_class = old_statistics(), [3, 0, 2]
    whole = synthetic_features(stats, per_class, seed=7, device=torch.device("cpu"))
    assert whole.shape == (5, 4)
    parts = [synthetic_features(stats, per_class, 7, torch.device("cpu"), rank, 2) for rank in range(2)]
    assert [p.shape[0] for p in parts] == [3, 2]
    assert torch.equal(torch.stack([parts[0][0], parts[1][0], parts[0][1], parts[1][1], parts[0][2]]), whole)
    # By hand: class 0 first (eps then r, each n x D), then class 2; class 1 draws nothing.
    g = torch.Generator().manual_seed(7)
    rows = []
    for k, n in ((0, 3), (2, 2)):
        eps, r = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g) * stats.norm_std[k] + stats.norm_mean[k]
        rows.append((stats.prototypes[k] + eps * stats.spreads[k]) * r)
    assert torch.equal(torch.cat(rows), whole)
    # The seed comes from the global torch RNG, the same on every rank seeded alike (and restored on resume).
    torch.manual_seed(5)
    first = STAR.replay_seed()
    torch.manual_seed(5)
    assert STAR.replay_seed() == first


def test_replay_plan_overlap_and_disjoint():
    # Carried N_k = (100, 10), N_bg = 1000; this step's grid: N^pl_bg = 400, N^pl = (20, 30); I = 10; |C_t| = 2.
    old, bg, pseudo = torch.tensor([100.0, 10.0]), torch.tensor(1000.0), torch.tensor([400, 20, 30])
    overlap = replay_plan(old, bg, pseudo, 10, 2, overlap=True)
    # n = int(80 / 10) = 8, int(-20 / 10) = -2 -> 0; N'_bg = 1000 * 0.98 = 980, rho = 980 / 400 - 0.5 = 1.95;
    # carried on: bg 0.5 * 400 + 980 = 1180, old counts unchanged.
    assert overlap.per_iteration.tolist() == [8, 0]
    assert overlap.bg_ratio.item() == pytest.approx(1.95)
    assert overlap.bg_count.item() == pytest.approx(1180.0) and overlap.old_counts.tolist() == [100.0, 10.0]
    disjoint = replay_plan(old, bg, pseudo, 10, 2, overlap=False)
    # n = (10, 1); rho = 1000 / 400; carried on: bg 400 + 1000, old counts + pseudo counts.
    assert disjoint.per_iteration.tolist() == [10, 1] and disjoint.bg_ratio.item() == pytest.approx(2.5)
    assert disjoint.bg_count.item() == 1400.0 and disjoint.old_counts.tolist() == [120.0, 40.0]
    # Truncation, as the reference's .to(torch.int): 19 / 10 -> 1. No pseudo-labelled background: rho 0, not inf.
    none = replay_plan(torch.tensor([19.0, 0.0]), bg, torch.tensor([0, 0, 0]), 10, 2, overlap=False)
    assert none.per_iteration.tolist() == [1, 0] and none.bg_ratio.item() == 0.0


# ---------------------------------------------------------------- carried and running state

class Tiny(nn.Module):
    def __init__(self, classes_per_step: list[int]) -> None:
        super().__init__()
        self.body, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.cls = nn.ModuleList([nn.Conv2d(4, c, 1) for c in classes_per_step])


class ShapesTask:
    name, dataset, has_background = "3-2", "shapes", True


def star_method(step: int, num_old: int, num_classes: int, options: dict | None = None, overlap: bool = True):
    steps = [num_classes] if step == 0 else [num_old, num_classes - num_old]
    info = StepInfo(task=ShapesTask(), step=step, num_old=num_old, num_classes=num_classes, epochs=1, overlap=overlap)
    return build_method("star", info, Tiny(steps), Tiny(steps[:1]) if step else None, options or {})


def test_carried_statistics_round_trip_and_the_running_state_restores_exactly():
    step0 = star_method(0, 0, 4)
    step0.new, step0.new_bg_count = old_statistics(), torch.tensor(500.0, dtype=torch.float64)
    carried = step0.carry_state()
    assert set(carried) == {"star_prototypes", "star_spreads", "star_norm_mean", "star_norm_std", "star_counts",
                            "star_bg_count"}

    step1 = star_method(1, 4, 6)
    step1.carry_over(carried)
    for key, value in old_statistics().as_dict().items():
        assert torch.equal(getattr(step1.old, key), value), key
    plan = replay_plan(step1.old.counts, step1.old_bg_count, torch.tensor([100, 5, 0, 7]), 3, 2, overlap=True)
    step1.set_plan(plan)
    new = ClassStatistics(torch.ones(2, 4), torch.zeros(2, 4), torch.ones(2), torch.zeros(2),
                          torch.tensor([9.0, 8.0], dtype=torch.float64))
    step1.new, step1.new_bg_count = new, torch.tensor(77.0, dtype=torch.float64)
    next_step = step1.carry_state()
    # Old rows as carried (counts from the plan), then the new classes; background from the plan.
    assert torch.equal(next_step["star_prototypes"], torch.cat([old_statistics().prototypes, new.prototypes]))
    assert next_step["star_counts"].tolist() == [30.0, 0.0, 20.0, 9.0, 8.0]
    assert next_step["star_bg_count"].item() == pytest.approx(0.5 * 100 + 500 * (1 - 0.02))

    state = step1.state_dict()
    resumed = star_method(1, 4, 6)
    resumed.carry_over(carried)
    resumed.load_state_dict(state)
    assert resumed.replay_list == step1.replay_list == [8, 0, 4]
    for key, value in state.items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert star_method(0, 0, 4).state_dict() == {}


def test_a_previous_step_without_statistics_is_refused():
    with pytest.raises(ValueError, match="--method STAR"):
        star_method(1, 4, 6).carry_over({})


def test_optimiser_groups_at_later_steps():
    method = star_method(1, 4, 6)
    groups = {g["name"]: g for g in method.param_groups(0.1)}
    assert groups["backbone"]["lr"] == 0.1 and groups["head_old_classifiers"]["lr"] == pytest.approx(1.0)
    assert groups["new_classifier"]["lr"] == pytest.approx(10.0)
    assert len(groups["head_old_classifiers"]["params"]) == 4 and len(groups["new_classifier"]["params"]) == 2
    assert all("weight_decay" not in g for g in groups.values())  # the optimiser's --weight_decay for every group


def test_presets():
    from segmentation.config import parse_config

    ade = parse_config(["--dataset", "ade", "--task", "100-50", "--method", "STAR", "--step", "1", "--epochs", "100"])
    assert (ade.lr, ade.lr_policy, ade.warmup_epochs, ade.method_options.pos_weight) == (2.5e-4, "warm_poly", 20.0,
                                                                                           30.0)
    voc = parse_config(["--dataset", "voc", "--task", "15-5", "--method", "STAR", "--step", "0"])
    assert (voc.lr, voc.lr_policy, voc.method_options.pos_weight, voc.method_options.loss_ocfm,
            voc.method_options.loss_sad) == (1e-3, "poly", 4.0, 5.0, 0.05)
    shapes = parse_config(["--dataset", "shapes", "--task", "6-2", "--method", "STAR", "--step", "1"])
    assert shapes.lr is None and shapes.method_options.pos_weight == 4.0
    assert STAR.step0_key(voc.method_options) == ("star", "pos_weight", 4.0)


# ---------------------------------------------------------------- end to end on shapes 6-2

STEP = [*TINY, "--task", "6-2", "--overlap", "--batch_size", "4", "--norm_act", "bn", "--method", "STAR",
        "--epochs", "2"]


def star_step(root: Path, tmp: Path, name: str, step: int, *extra: str, nproc: int = 0, env: dict | None = None
              ) -> subprocess.CompletedProcess:
    args = [*STEP, "--data_root", str(root), "--checkpoint_dir", str(tmp / "ck"), "--logdir", str(tmp / "tb"),
            "--name", name, "--step", str(step), *extra]
    if env:
        command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                   if nproc else [sys.executable])
        return subprocess.run([*command, str(REPO / "run.py"), *args], cwd=tmp, capture_output=True, text=True,
                              timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env})
    result = torchrun(nproc, *args, cwd=tmp) if nproc else run_py(*args, cwd=tmp)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


@pytest.fixture(scope="module")
def star_steps(shapes_root: Path, tmp_path_factory):
    """Step 0 (one process, a high lr so that the teacher pseudo-labels something), then an uninterrupted step 1
    on 2 gloo ranks, which the resume test compares against."""
    tmp = tmp_path_factory.mktemp("star")
    star_step(shapes_root, tmp, "s", 0, "--lr", "0.05", "--epochs", "3")
    step1 = star_step(shapes_root, tmp, "s", 1, "--save_interval", "1", nproc=2)
    return tmp, step1.stdout + step1.stderr


def load_artifact(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_step1_replays_the_statistics_carried_in_the_step0_artifact(star_steps):
    tmp, log = star_steps
    folder = tmp / "ck/step/shapes-6-2-ov"
    carried0 = load_artifact(folder / "s_0.pth")["method_state"]
    assert carried0["star_prototypes"].shape == (6, 256) and carried0["star_counts"].sum() > 0
    torch.testing.assert_close(carried0["star_prototypes"].norm(dim=1)[carried0["star_counts"] > 0],
                               torch.ones(int((carried0["star_counts"] > 0).sum())))
    # What step 1 derived from them, by the overlap formulas, from the teacher counts it logged.
    found = re.search(r"N\^pl_bg (\d+), old classes N\^pl \[([\d, ]*)\]; (\d+) iterations per epoch -> replayed "
                      r"features per iteration \[([\d, ]*)\], extra background ratio ([\d.e+-]+)", log)
    assert found, log[-3000:]
    pseudo_bg, iterations = int(found[1]), int(found[3])
    pseudo = [int(v) for v in found[2].split(",")]
    replayed = [int(v) for v in found[4].split(",")]
    counts, bg = carried0["star_counts"].tolist(), carried0["star_bg_count"].item()
    assert replayed == [max(int((n - p) / iterations), 0) for n, p in zip(counts, pseudo)]
    shrunk = bg * (1 - 0.01 * 2)
    assert float(found[5]) == pytest.approx(max(shrunk / pseudo_bg - 0.5, 0.0) if pseudo_bg else 0.0, rel=1e-5)
    assert sum(replayed) > 0 and " ocfm=" in log and " sad=" in log
    # Step 1's artifact: step 0's rows unchanged, counts carried as overlap says, then the 2 new classes.
    carried1 = load_artifact(folder / "s_1.pth")["method_state"]
    for key in ("star_prototypes", "star_spreads", "star_norm_mean", "star_norm_std", "star_counts"):
        assert carried1[key].shape[0] == 8 and torch.equal(carried1[key][:6], carried0[key]), key
    assert carried1["star_bg_count"].item() == pytest.approx(0.5 * pseudo_bg + shrunk)
    assert carried1["star_counts"][6:].sum() > 0


def test_a_killed_step1_resumes_to_the_same_weights_and_statistics(shapes_root, star_steps):
    tmp, _ = star_steps
    step0 = str(tmp / "ck/step/shapes-6-2-ov/s_0.pth")
    # A NaN injected on rank 0 at global iteration 4 of 6 stops both ranks before that update, after the run state
    # of iteration 4 (--save_interval 1): a resume in the middle of the second epoch.
    killed = star_step(shapes_root, tmp, "r", 1, "--save_interval", "1", "--step_ckpt", step0, nproc=2,
                       env={"SEGMENTATION_INJECT_NAN": "0:4"})
    assert killed.returncode != 0 and not (tmp / "ck/step/shapes-6-2-ov/r_1.pth").exists()
    resumed = star_step(shapes_root, tmp, "r", 1, "--save_interval", "1", "--step_ckpt", step0, nproc=2)
    assert "resuming from" in resumed.stdout + resumed.stderr
    folder = tmp / "ck/step/shapes-6-2-ov"
    reference, mine = load_weights(folder / "s_1.pth"), load_weights(folder / "r_1.pth")
    assert mine.keys() == reference.keys()
    for key in reference:
        assert torch.equal(mine[key], reference[key]), key
    expected, got = (load_artifact(folder / f"{n}_1.pth")["method_state"] for n in ("s", "r"))
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
