"""segmentation/engine/metrics.py against a direct NumPy computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from segmentation.engine.metrics import ConfusionMatrix, format_table


def _numpy_matrix(pred: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    cm = np.zeros((n, n), np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if 0 <= t < n:
            cm[t, p] += 1
    return cm


def _numpy_iou(cm: np.ndarray) -> list[float | None]:
    out: list[float | None] = []
    for c in range(cm.shape[0]):
        gt, pr, tp = cm[c].sum(), cm[:, c].sum(), cm[c, c]
        out.append(None if gt == 0 else tp / (gt + pr - tp))
    return out


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _random_batch(rng: np.random.Generator, n: int, shape: tuple[int, ...], absent: tuple[int, ...] = ()):
    target = rng.integers(0, n, size=shape)
    for c in absent:  # make class c absent from the GT (it may still be predicted)
        target[target == c] = (c + 1) % n
    target[rng.random(shape) < 0.15] = 255
    target[rng.random(shape) < 0.05] = n + 2      # e.g. a future class left in the label: ignored too
    pred = np.where(rng.random(shape) < 0.6, np.clip(target, 0, n - 1), rng.integers(0, n, size=shape))
    return pred, target


def test_matrix_and_metrics_match_numpy() -> None:
    rng = np.random.default_rng(0)
    n, names = 7, [f"c{k}" for k in range(7)]
    matrix = ConfusionMatrix(n, "cpu")
    preds, targets = [], []
    for _ in range(3):
        pred, target = _random_batch(rng, n, (2, 17, 19), absent=(4,))
        preds.append(pred)
        targets.append(target)
        matrix.update(torch.from_numpy(pred), torch.from_numpy(target).to(torch.uint8))
    cm = _numpy_matrix(np.concatenate(preds), np.concatenate(targets), n)
    assert matrix.matrix.dtype == torch.int64
    assert np.array_equal(matrix.matrix.numpy(), cm)

    res = matrix.compute(names, num_old=4)
    iou = _numpy_iou(cm)
    assert res["confusion_matrix"] == cm.tolist()
    assert iou[4] is None and res["class_iou"]["c4"] is None
    for k, name in enumerate(names):
        if iou[k] is not None:
            assert res["class_iou"][name] == pytest.approx(iou[k], abs=1e-12)
    assert res["miou_all"] == pytest.approx(_mean(iou), abs=1e-12)
    assert res["miou_old"] == pytest.approx(_mean(iou[:4]), abs=1e-12)
    assert res["miou_old_fg"] == pytest.approx(_mean(iou[1:4]), abs=1e-12)
    assert res["miou_new"] == pytest.approx(_mean(iou[4:]), abs=1e-12)   # c4 absent: mean of c5, c6 only
    assert res["miou_new"] == pytest.approx((iou[5] + iou[6]) / 2, abs=1e-12)
    assert res["pixel_acc"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-12)
    accs = [cm[c, c] / cm[c].sum() for c in range(n) if cm[c].sum()]
    assert res["mean_acc"] == pytest.approx(np.mean(accs), abs=1e-12)
    assert res["num_pixels"] == cm.sum()


def test_ignored_targets_do_not_count() -> None:
    matrix = ConfusionMatrix(3)
    target = torch.tensor([[0, 1, 255], [2, 3, 255]])
    pred = torch.tensor([[0, 2, 1], [2, 0, 0]])
    matrix.update(pred, target)
    assert matrix.matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]


def test_absent_class_is_none_and_excluded() -> None:
    matrix = ConfusionMatrix(3)
    # class 2 never in GT but predicted once: IoU None (not 0), mean over classes 0 and 1 only
    matrix.update(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 0, 1, 1]))
    res = matrix.compute(["bg", "a", "b"], num_old=2)
    assert res["class_iou"] == {"bg": 1.0, "a": 0.5, "b": None}
    assert res["miou_all"] == pytest.approx(0.75)
    assert res["miou_new"] is None      # the only new class is absent
    assert res["miou_h"] is None
    assert res["miou_old"] == pytest.approx(0.75)
    assert res["miou_old_fg"] == pytest.approx(0.5)


def test_old_new_split_and_step0() -> None:
    matrix = ConfusionMatrix(4)
    matrix.update(torch.tensor([0, 1, 1, 3, 3]), torch.tensor([0, 1, 2, 3, 3]))
    names = ["bg", "a", "b", "c"]
    res = matrix.compute(names, num_old=2)
    # IoU: bg 1, a 1/2, b 0, c 1
    assert res["miou_old"] == pytest.approx(0.75) and res["miou_old_fg"] == pytest.approx(0.5)
    assert res["miou_new"] == pytest.approx(0.5)
    assert res["miou_h"] == pytest.approx(0.6)  # hIoU: 2 x 0.75 x 0.5 / (0.75 + 0.5) = 0.75 / 1.25
    step0 = matrix.compute(names, num_old=4)
    assert step0["miou_new"] is None and step0["miou_old"] == pytest.approx(step0["miou_all"])
    assert step0["miou_h"] is None  # no new class yet
    no_bg = matrix.compute(names, num_old=2, has_background=False)
    assert no_bg["miou_old_fg"] == no_bg["miou_old"]


def test_empty_matrix() -> None:
    res = ConfusionMatrix(2).compute(["bg", "a"], 1)
    assert res["miou_all"] is None and res["pixel_acc"] is None and res["class_iou"] == {"bg": None, "a": None}
    assert "-" in format_table(res)


def test_all_reduce_is_noop_without_process_group() -> None:
    assert not torch.distributed.is_initialized()
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    before = matrix.matrix.clone()
    matrix.all_reduce()
    assert torch.equal(matrix.matrix, before)


def test_bad_inputs() -> None:
    matrix = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        matrix.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="predictions"):
        matrix.update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="class names"):
        matrix.compute(["a", "b"], 1)
    matrix.update(torch.tensor([1]), torch.tensor([255]))   # all ignored: fine, nothing counted
    assert matrix.matrix.sum() == 0


def test_format_table() -> None:
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 1]))
    res = matrix.compute(["background", "aeroplane", "bicycle"], num_old=2)
    res["samples"] = []   # extra keys added by callers must not matter
    text = format_table(res)
    assert "aeroplane" in text and "old" in text and "new" in text
    assert "old (0-1, bg incl.)" in text and "new (2-2)" in text
    assert f"{100 * res['miou_all']:.2f}" in text.splitlines()[-1] and "old fg" in text
    # without a background class "old fg" would repeat "old": it is not shown
    city = matrix.compute(["road", "sidewalk", "building"], num_old=2, has_background=False)
    summary = format_table(city).splitlines()[-1]
    assert "old (0-1) " in summary and "old fg" not in summary


def _reduce_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        matrix = ConfusionMatrix(3)
        matrix.update(torch.tensor([rank, 1]), torch.tensor([rank, 2]))
        matrix.all_reduce()
        torch.save(matrix.matrix, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_all_reduce_sums_over_ranks(tmp_path) -> None:
    torch.multiprocessing.spawn(_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    expected = [[1, 0, 0], [0, 1, 0], [0, 2, 0]]   # rank0: (0,0),(2,1); rank1: (1,1),(2,1)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt", weights_only=True).tolist() == expected


def test_harmonic_iou_is_zero_when_either_side_is() -> None:
    from segmentation.engine.metrics import harmonic_iou
    assert harmonic_iou(0.8, 0.0) == 0.0 and harmonic_iou(0.0, 0.0) == 0.0 and harmonic_iou(None, 0.5) is None
    assert harmonic_iou(0.5, 0.5) == pytest.approx(0.5)
