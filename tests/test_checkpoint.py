"""Step artifacts: atomic, complete-only, validated against the run that loads them."""
from __future__ import annotations

import os

import pytest
import torch

from segmentation.engine import checkpoint as ckpt


def meta(**overrides):
    base = {"dataset": "shapes", "task": "6-2", "overlap": False, "step": 0, "classes_per_step": [7]}
    return base | overrides


def test_paths_follow_anchor_naming(tmp_path):
    assert ckpt.step_artifact_path(tmp_path, "voc", "15-1", True, "MiB", 2) == tmp_path / "step/voc-15-1-ov/MiB_2.pth"
    assert ckpt.step_artifact_path(tmp_path, "voc", "15-1", False, "MiB", 0) == tmp_path / "step/voc-15-1/MiB_0.pth"


def test_save_load_roundtrip_and_no_temp_left(tmp_path):
    path = tmp_path / "a" / "x_0.pth"
    ckpt.save_step_artifact(path, model_state={"w": torch.ones(2)}, method_state={}, meta=meta())
    artifact = ckpt.load_artifact(path)
    assert artifact["complete"] and torch.equal(artifact["model_state"]["w"], torch.ones(2))
    assert os.listdir(path.parent) == ["x_0.pth"]


def test_failed_write_keeps_the_good_file(tmp_path):
    path = tmp_path / "x_0.pth"
    ckpt.save_step_artifact(path, model_state={"w": torch.ones(2)}, method_state={}, meta=meta())

    def explode(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write_bytes(path, explode)
    assert torch.equal(ckpt.load_artifact(path)["model_state"]["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["x_0.pth"]


def test_truncated_incomplete_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "x_0.pth"
    ckpt.save_step_artifact(path, model_state={"w": torch.ones(2)}, method_state={}, meta=meta())
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_artifact(path)
    torch.save({"format": 1, "complete": False, "meta": meta()}, path)
    with pytest.raises(ckpt.CheckpointError, match="not marked complete"):
        ckpt.load_artifact(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ckpt.CheckpointError, match="not a step artifact"):
        ckpt.load_artifact(path)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_artifact(tmp_path / "missing.pth")


def test_mismatched_previous_artifact_names_the_difference(tmp_path):
    path = tmp_path / "x_0.pth"
    ckpt.save_step_artifact(path, model_state={}, method_state={}, meta=meta())
    artifact = ckpt.load_artifact(path)
    ckpt.check_previous_artifact(path, artifact, meta())
    with pytest.raises(ckpt.CheckpointError, match=r"task: artifact has '6-2', this run needs '6-4'"):
        ckpt.check_previous_artifact(path, artifact, meta(task="6-4"))
    with pytest.raises(ckpt.CheckpointError, match="overlap"):
        ckpt.check_previous_artifact(path, artifact, meta(overlap=True))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_permissions_the_umask_asks_for(tmp_path, umask):
    """Artifacts, results, run states and caches all go through atomic_write_bytes: not owner-only (mkstemp's 0600)
    but 0666 minus the umask, as any ordinary file, so that a group can read a shared project folder."""
    import os
    import stat

    from segmentation.utils.io import atomic_write_bytes, current_umask

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_bytes(tmp_path / "a.bin", lambda f: f.write(b"x"))
        mode = stat.S_IMODE((tmp_path / "a.bin").stat().st_mode)
    finally:
        os.umask(old)
    assert mode == 0o666 & ~umask


def test_an_artifact_and_a_run_state_written_before_a_flag_existed_still_match_its_old_behaviour(tmp_path):
    """--train_images, --test_images and --train_scale_divide came later: a file without them was made with
    "new", "seen" and no division, so the same command still finds it complete (or resumable)."""
    from segmentation.config import config_to_dict, parse_config
    from segmentation.engine import runstate
    from segmentation.step.existing import already_complete
    from segmentation.tasks import load_task

    cfg = parse_config(["--dataset", "shapes", "--task", "6-2", "--checkpoint_dir", str(tmp_path), "--name", "x"])
    older = {k: v for k, v in config_to_dict(cfg).items() if k not in runstate.ADDED_FLAGS}
    path = ckpt.step_artifact_path(tmp_path, "shapes", "6-2", False, "x", 0)
    ckpt.save_step_artifact(path, model_state={}, method_state={}, meta=meta(config=older))
    task = load_task("shapes", "6-2")
    assert already_complete(cfg, task) == path
    runstate.check_resumable(path, {"config": older}, config_to_dict(cfg))
    # a file made with what is now another value is not complete for this command
    every = parse_config(["--dataset", "shapes", "--task", "6-2", "--checkpoint_dir", str(tmp_path), "--name", "x",
                          "--train_images", "all"])
    assert already_complete(every, task) is None
    with pytest.raises(ckpt.CheckpointError, match="--train_images: saved 'new', now 'all'"):
        runstate.check_resumable(path, {"config": older}, config_to_dict(every))
