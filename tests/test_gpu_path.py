"""The GPU path's correctness, checked where a CPU can check it (issue: NCCL, srun, fp16/bf16 updates, devices).

NCCL has no CPU backend, so every tensor handed to a collective must live on the training device. A CPU machine
has only one real device, so the tests that would otherwise pass vacuously give the functions inputs on the `meta`
device and record where the collective's tensor was made.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data import DataLoader

from segmentation.datasets import IncrementalDataset, ShapesSource, TrainTransform
from segmentation.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_batch
from segmentation.engine.trainer import (MAX_SKIPPED_UPDATES, NonFiniteLossError, TrainSampler, Updater,
                                         all_ranks_flags, read_flags)
from segmentation.methods.losses import global_mean
from segmentation.models import build_segmenter
from segmentation.step.build import tensors_to, wrap_ddp
from segmentation.tasks import load_task
from segmentation.utils import dist
from test_pipeline import TINY, run_py


@contextlib.contextmanager
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A real 1-process gloo group in this process (what torchrun --nproc_per_node=1 now forms)."""
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        tdist.destroy_process_group()


@pytest.fixture
def collective_devices(monkeypatch, tmp_path) -> Iterator[list[torch.device]]:
    """Records the device of every tensor handed to all_reduce; meta tensors are recorded, not reduced."""
    seen: list[torch.device] = []
    real = tdist.all_reduce

    def recording(tensor, *args, **kwargs):
        seen.append(tensor.device)
        return None if tensor.device.type == "meta" else real(tensor, *args, **kwargs)

    with one_rank_group(tmp_path):
        monkeypatch.setattr(tdist, "all_reduce", recording)
        yield seen


def test_the_all_rank_flags_live_on_the_loss_device(collective_devices):
    """The bug: the finite/stop flags were a CPU tensor, which an NCCL group rejects on iteration 1."""
    loss_on_gpu_stand_in = torch.tensor(1.0, device="meta")
    flags = all_ranks_flags(~torch.isfinite(loss_on_gpu_stand_in), stop_requested=True)
    assert collective_devices == [torch.device("meta")] and flags.device.type == "meta"
    # and on a real device the values decide as they should
    collective_devices.clear()
    assert read_flags(all_ranks_flags(torch.tensor(True), False)) == (True, False)
    assert read_flags(all_ranks_flags(torch.tensor(False), True)) == (False, True)
    assert collective_devices == [torch.device("cpu")] * 2


def test_loss_normaliser_counts_on_the_loss_device(collective_devices):
    loss_map = torch.ones(2, 4, 4, device="meta")
    out = global_mean(loss_map, torch.ones(2, 4, 4, dtype=torch.bool, device="meta"))
    assert out.device.type == "meta" and collective_devices == [torch.device("meta")]


def test_every_collective_of_a_training_step_uses_the_training_device(collective_devices, shapes_root):
    """A whole iteration (model under DDP, losses, update, flags) and an evaluation: each all_reduce gets a tensor
    on the device the batch is on."""
    from segmentation.engine.metrics import ConfusionMatrix
    from segmentation.engine.trainer import AmpSettings, prepare_batch
    from segmentation.methods.mib import MiB
    from segmentation.methods.base import StepInfo

    task = load_task("shapes", "6-4")
    ds = IncrementalDataset(ShapesSource(shapes_root, "train"), task, 0, "train", False, TrainTransform(32), 0)
    loader = DataLoader(ds, batch_size=4)
    model = build_segmenter("resnet18", 16, "iabn_sync", [7], device_type="cpu")
    method = MiB(StepInfo(task, 0, 0, 7, 1), model, None, MiB.Options())
    train_model = wrap_ddp(model, torch.device("cpu"))
    assert isinstance(train_model, nn.parallel.DistributedDataParallel)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    updater = Updater(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0),
                      torch.amp.GradScaler("cpu", enabled=False))
    batch = prepare_batch(next(iter(loader)), torch.device("cpu"))
    with AmpSettings(False, torch.bfloat16, "cpu").autocast():
        outputs = train_model(batch["image"])
    terms = method.losses(batch, outputs, None, 0)
    updater.step(sum(terms.values()), terms, False)
    matrix = ConfusionMatrix(7, "cpu")
    matrix.update(outputs[0].argmax(1), batch["label"])
    matrix.all_reduce()
    assert collective_devices and set(collective_devices) == {torch.device("cpu")}


def test_state_loaded_from_disk_goes_to_the_training_device():
    state = {"fisher": {"w": torch.ones(2)}, "steps": [torch.zeros(1), 3], "name": "x"}
    moved = tensors_to(state, torch.device("meta"))
    assert moved["fisher"]["w"].device.type == "meta" and moved["steps"][0].device.type == "meta"
    assert moved["steps"][1] == 3 and moved["name"] == "x"


def test_extra_modules_are_wrapped_in_their_own_ddp(tmp_path):
    with one_rank_group(tmp_path):
        localizer = nn.Conv2d(4, 2, 1)
        wrapped = wrap_ddp(localizer, torch.device("cpu"))
        assert isinstance(wrapped, nn.parallel.DistributedDataParallel) and wrapped.module is localizer
        frozen = nn.Conv2d(4, 2, 1).requires_grad_(False)
        assert wrap_ddp(frozen, torch.device("cpu")) is frozen  # DDP refuses modules with nothing to train
    assert wrap_ddp(localizer, torch.device("cpu")) is localizer  # no group: plain python run.py


# ---------------------------------------------------------------- updates: fp16 skips, bf16/fp32 refusals

def tiny_updater(fp16: bool) -> tuple[nn.Linear, Updater]:
    torch.manual_seed(0)
    layer = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 / (1 + it))
    return layer, Updater(optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=fp16))


def loss_of(layer: nn.Linear, scale: float = 1.0) -> torch.Tensor:
    return layer(torch.ones(2, 3)).sum() * scale


def test_fp16_overflow_is_a_skipped_update_not_an_error():
    layer, updater = tiny_updater(fp16=True)
    before = [p.detach().clone() for p in layer.parameters()]
    scale = updater.scaler.get_scale()
    stop, applied, _ = updater.step(loss_of(layer, math.inf), {}, False)
    assert not stop and not applied
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))  # nothing applied
    assert updater.scaler.get_scale() == scale / 2  # the scaler's own back-off
    assert updater.scheduler.last_epoch == 0  # the schedule did not advance on a skipped update
    updater.step(loss_of(layer), {}, False)  # a finite one is applied and advances the schedule
    assert not all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert updater.scheduler.last_epoch == 1 and updater.skipped_in_a_row == 0


def test_fp16_endless_overflow_is_reported_as_a_nan():
    layer, updater = tiny_updater(fp16=True)
    for _ in range(MAX_SKIPPED_UPDATES):
        updater.step(loss_of(layer, math.nan), {"ce": torch.tensor(math.nan)}, False)
    with pytest.raises(NonFiniteLossError, match="fp16 updates in a row were skipped"):
        updater.step(loss_of(layer, math.nan), {"ce": torch.tensor(math.nan)}, False)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_bf16_and_fp32_refuse_any_non_finite_value_before_the_update(where):
    """A finite loss with a non-finite gradient used to be applied (and could be saved in a run state)."""
    layer, updater = tiny_updater(fp16=False)
    before = [p.detach().clone() for p in layer.parameters()]
    if where == "gradient":
        layer.weight.register_hook(lambda grad: grad * math.inf)
        loss = loss_of(layer)
        assert torch.isfinite(loss)
    else:
        loss = loss_of(layer, math.nan)
    with pytest.raises(NonFiniteLossError, match="non-finite loss on some rank"):
        updater.step(loss, {"ce": loss.detach()}, False)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert updater.scheduler.last_epoch == 0


# ---------------------------------------------------------------- SLURM rendezvous

@pytest.mark.parametrize("nodelist, first", [
    ("n[1-2]-ib", "n1-ib"), ("gpu[01-04,07],cpu3", "gpu01"), ("r[2-3]n[07,09]", "r2n07"), ("node7", "node7"),
    ("a-b,c[1-3]", "a-b"), ("x[010-012]-ib0,y", "x010-ib0"),
])
def test_first_host_of_a_node_list_keeps_suffixes(nodelist, first):
    assert dist.parse_first_host(nodelist) == first


@pytest.mark.slurm
def test_first_host_uses_scontrol_when_installed(monkeypatch, slurm_cluster):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])  # scontrol needs a slurm.conf to start
    calls = []
    real_run = dist.subprocess.run
    monkeypatch.setattr(dist.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real_run(cmd, **kw))
    assert dist.first_slurm_host("gpu[07-08],cpu3") == "gpu07"
    assert calls == [["scontrol", "show", "hostnames", "gpu[07-08],cpu3"]]
    result = real_run(["scontrol", "show", "hostnames", "gpu[07-08],cpu3"], capture_output=True, text=True)
    assert result.stdout.split() == ["gpu07", "gpu08", "cpu3"]  # scontrol itself answered
    # Slurm 22.05's scontrol prints "Invalid hostlist" (exit 0, empty stdout) for a suffix after the brackets;
    # our parser answers then
    assert dist.first_slurm_host("n[1-2]-ib") == "n1-ib"
    monkeypatch.setattr(dist.subprocess, "run", lambda cmd, **kw: real_run(["false"], **kw))
    assert dist.first_slurm_host("n[3-4]-ib") == "n3-ib"  # scontrol failing: our parser


def test_srun_rendezvous_reads_the_step_node_list_and_the_step_id(monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(key, "recorded")  # so that monkeypatch restores what the function writes
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "big[1-8]-ib")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "big[5-6]-ib")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setattr(dist, "first_slurm_host", dist.parse_first_host)  # same answer as scontrol, shown above
    dist._export_slurm_rendezvous(dist.DistEnv(1, 1, 4, "slurm"))
    assert os.environ["MASTER_ADDR"] == "big5-ib"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "4", "1")
    ports = {dist.slurm_port("4242", str(step)) for step in range(8)}
    assert len(ports) == 8 and all(20000 <= p < 60000 for p in ports)  # two steps of one job: two ports
    assert int(os.environ["MASTER_PORT"]) == dist.slurm_port("4242", "0")


# ---------------------------------------------------------------- batches and data

def test_one_image_per_rank_is_refused_before_training(shapes_root, tmp_path):
    result = run_py(*TINY, "--data_root", str(shapes_root), "--task", "6-4", "--batch_size", "1",
                    "--checkpoint_dir", str(tmp_path / "ck"), cwd=tmp_path)
    assert result.returncode == 2
    assert "--batch_size 1 over 1 process(es) is 1 image per process" in result.stderr
    assert "InPlaceABNSync" in result.stderr and "--batch_size 2" in result.stderr


def test_normalisation_on_the_device_matches_the_formula_and_zeroes_the_padding():
    pixels = torch.randint(0, 256, (2, 3, 6, 5), dtype=torch.uint8)
    boxes = torch.tensor([[0, 6, 0, 5], [1, 4, 2, 5]], dtype=torch.int32)
    out = normalize_batch(pixels, boxes, memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)
    expected = (pixels.float() - mean) * inv_std
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out[0], expected[0])
    assert torch.equal(out[1, :, 1:4, 2:5], expected[1, :, 1:4, 2:5])
    inside = torch.zeros(6, 5, dtype=torch.bool)
    inside[1:4, 2:5] = True
    assert (out[1][:, ~inside] == 0).all()


def test_persistent_workers_draw_each_epochs_augmentation(shapes_root):
    """The epoch travels with the index from the sampler, so a persistent worker (its own dataset copy, never told
    about set_epoch) gives exactly what the main process gives."""
    task = load_task("shapes", "6-4")
    ds = IncrementalDataset(ShapesSource(shapes_root, "train"), task, 0, "train", False, TrainTransform(32), 7)

    def batches(workers: int) -> list[torch.Tensor]:
        sampler = TrainSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=1, drop_last=True)
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
        out = []
        for epoch in range(2):
            sampler.start_epoch(epoch, 0, 4)
            out += [b["image"] for b in loader]
        return out

    inline, persistent = batches(0), batches(1)
    assert len(inline) == len(persistent) and all(torch.equal(a, b) for a, b in zip(inline, persistent))
    n = len(inline) // 2
    assert not all(torch.equal(a, b) for a, b in zip(inline[:n], inline[n:]))  # epochs differ


def test_a_teacher_returns_only_the_features_its_method_reads():
    model = build_segmenter("resnet18", 16, "bn", [3]).eval()
    logits, features = model(torch.randn(1, 3, 32, 32), features=("body",))
    assert set(features) == {"body"} and logits.shape == (1, 3, 32, 32)
    assert set(model(torch.randn(1, 3, 32, 32))[1]) == {"body", "pre_logits", "attentions", "logits_small"}


def test_auto_amp_is_bf16_on_gpus_only():
    from segmentation.config import parse_config

    cfg = parse_config([])
    assert cfg.amp_enabled("cuda") and not cfg.amp_enabled("cpu")
    assert not parse_config(["--no-amp"]).amp_enabled("cuda") and parse_config(["--amp"]).amp_enabled("cpu")
    assert cfg.amp_dtype == "bf16"
    assert parse_config(["--num_workers", "3"]).loader_workers() == 3 and 1 <= cfg.loader_workers() <= 8
    assert np.isclose(cfg.step_lr(), 0.01)
