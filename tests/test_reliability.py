"""Bad input and faults: each gets exit code 2 and one line that names the flag or file and the fix, before anything
is written; nothing good is replaced."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from segmentation.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv,message", [
    (["--lr", "0"], r"--lr 0.0: the learning rate must be positive"),
    (["--lr", "-0.01"], r"--lr -0.01: the learning rate must be positive"),
    (["--random_seed", "-1"], r"--random_seed -1: must be 0 or more"),
    (["--name", "../../x"], r"--name '../../x': an experiment name is one word"),
    (["--name", ".."], r"--name '..'"),
    (["--name", "a/b"], r"--name 'a/b'"),
    (["--name", ""], r"--name ''"),
])
def test_flag_values_that_cannot_work_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_a_file_where_a_folder_belongs_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    for flag in ("--checkpoint_dir", "--logdir"):
        with pytest.raises(ConfigError, match=rf"{flag} {file} is a file, not a folder"):
            parse_config([flag, str(file)])
    assert parse_config(["--checkpoint_dir", str(tmp_path / "new")]).checkpoint_dir == tmp_path / "new"


@pytest.mark.parametrize("argv,message", [
    (["--device", "cuda"], "--device cuda: no CUDA GPU is visible"),
    (["--device", "cpu", "--amp", "--amp_dtype", "fp16"], "--amp_dtype fp16 needs a GPU"),
    (["--lr", "0"], "--lr 0.0: the learning rate must be positive"),
])
def test_run_py_exits_2_with_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run([sys.executable, str(REPO / "run.py"), "--dataset", "shapes", "--data_root",
                             str(tmp_path / "data"), "--checkpoint_dir", str(tmp_path / "ck"), *argv],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.py: error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "ck").exists() and not (tmp_path / "data").exists()


def test_a_ckpt_that_is_not_an_artifact_says_what_it_is(tmp_path: Path) -> None:
    """A text file ("...: 101"), an image (PyTorch's advice to load it with weights_only=False, which must never be
    given) or a folder ("does not exist") pointed the wrong way."""
    import torch
    from PIL import Image

    from segmentation.engine.checkpoint import CheckpointError, load_artifact

    (tmp_path / "notes.pth").write_text("101\n")
    Image.new("RGB", (4, 4)).save(tmp_path / "picture.png")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    cases = {"notes.pth": "is a text file", "picture.png": "is a PNG image", "empty.pth": "is an empty file",
             "pickled.pth": "is a PyTorch file that holds Python objects", ".": "is a folder"}
    for name, kind in cases.items():
        with pytest.raises(CheckpointError) as exc:
            load_artifact(tmp_path / name)
        text = str(exc.value)
        assert kind in text and "<name>_<step>.pth" in text and "weights_only" not in text, text
    result = subprocess.run([sys.executable, str(REPO / "run.py"), "--test", "--ckpt", str(tmp_path / "picture.png")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "picture.png is a PNG image, not a step artifact" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_image_listed_twice_is_refused_with_the_list_the_id_and_the_lines(tmp_path: Path) -> None:
    from segmentation.datasets.base import DatasetError
    from segmentation.datasets.voc import read_split_list

    listing = tmp_path / "val.txt"
    listing.write_text("a\n# comment\n/JPEGImages/b.jpg /SegmentationClassAug/b.png\n\nc\nb\n")
    with pytest.raises(DatasetError, match=rf"split list {listing} names image 'b' twice \(lines 3 and 6\)"):
        read_split_list(listing)
    listing.write_text("a\nb\n")
    assert read_split_list(listing) == ["a", "b"]


def test_your_own_voc_layout_dataset_with_an_empty_list_gets_its_own_advice(tmp_path: Path) -> None:
    """Not the advice about SBD and 10,582 ids, which is Pascal VOC's."""
    from segmentation.datasets.base import DatasetError
    from segmentation.datasets.folders import VOCLayoutSource

    for sub in ("JPEGImages", "SegmentationClassAug", "splits"):
        (tmp_path / sub).mkdir()
    (tmp_path / "splits" / "train.txt").write_text("\n")
    with pytest.raises(DatasetError) as exc:
        VOCLayoutSource(tmp_path, "train", name="fruit", num_classes=3)
    assert "is empty" in str(exc.value) and "tasks/fruit.toml" in str(exc.value) and "SBD" not in str(exc.value)


# ---------------------------------------------------------------- complete artifacts are never replaced unasked

def plain_run(root: Path, tmp: Path, *argv: str) -> subprocess.CompletedProcess:
    """One process, no torchrun: the tiny 6-4 protocol on the conftest shapes, 1 epoch per step."""
    import os

    from test_pipeline import TINY

    command = [sys.executable, str(REPO / "run.py"), *TINY, "--task", "6-4", "--epochs", "1", "--batch_size", "4",
               "--data_root", str(root), "--checkpoint_dir", str(tmp / "ck"), "--logdir", str(tmp / "logs"), *argv]
    return subprocess.run(command, cwd=tmp, env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)


def test_a_complete_step_is_replaced_only_when_asked_and_a_changed_parent_makes_the_next_stale(shapes_root,
                                                                                               tmp_path):
    folder = tmp_path / "ck/step/shapes-6-4"
    first = plain_run(shapes_root, tmp_path, "--name", "x", "--step", "0")
    assert first.returncode == 0, first.stdout[-3000:]
    one = plain_run(shapes_root, tmp_path, "--name", "x", "--step", "1")
    assert one.returncode == 0, one.stdout[-3000:]
    step0, step1 = (folder / "x_0.pth").read_bytes(), (folder / "x_1.pth").read_bytes()

    # the same command again: complete, nothing trained, said once
    again = plain_run(shapes_root, tmp_path, "--name", "x", "--step", "0")
    assert again.returncode == 0 and again.stdout.count("already complete") == 1, again.stdout[-2000:]

    # other flags: refused with the fix, the good artifact untouched
    other = plain_run(shapes_root, tmp_path, "--name", "x", "--step", "0", "--lr", "0.02")
    assert other.returncode == 2, other.stdout[-2000:]
    assert "x_0.pth is a complete step, but it was made by other flags (--lr not given there, 0.02 now)" in other.stdout
    assert "--replace" in other.stdout and (folder / "x_0.pth").read_bytes() == step0

    # --replace: trained again, the old one kept beside it under a dated name, with its results
    replaced = plain_run(shapes_root, tmp_path, "--name", "x", "--step", "0", "--lr", "0.02", "--replace")
    assert replaced.returncode == 0, replaced.stdout[-3000:]
    kept = sorted(folder.glob("x_0.replaced-*.pth"))
    assert len(kept) == 1 and kept[0].read_bytes() == step0 and kept[0].with_suffix(".json").is_file()
    assert (folder / "x_0.pth").read_bytes() != step0

    # step 1 was trained from the old step 0: no longer complete; refused, then retrained with --replace
    stale = plain_run(shapes_root, tmp_path, "--name", "x", "--step", "1")
    assert stale.returncode == 2, stale.stdout[-2000:]
    assert "it was trained from an earlier version of" in stale.stdout and "x_0.pth (step 0 was trained again" \
        in stale.stdout
    assert (folder / "x_1.pth").read_bytes() == step1
    redone = plain_run(shapes_root, tmp_path, "--name", "x", "--step", "1", "--replace")
    assert redone.returncode == 0 and len(list(folder.glob("x_1.replaced-*.pth"))) == 1, redone.stdout[-3000:]


def test_run_protocol_skips_only_what_run_py_calls_complete(shapes_root, tmp_path):
    """FT's artifacts under one --name: `--method MiB` with that name trains nothing over them and writes no
    "mib" table with FT's numbers; a truncated artifact is trained again, not skipped."""
    import os

    from test_pipeline import TINY

    def protocol(*argv: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(REPO / "launch/run_protocol.py"), "--nproc_per_node", "1", "--", *TINY,
                   "--task", "6-4", "--epochs", "1", "--batch_size", "4", "--data_root", str(shapes_root),
                   "--checkpoint_dir", str(tmp_path / "ck"), "--logdir", str(tmp_path / "logs"), "--name", "run",
                   *argv]
        return subprocess.run(command, cwd=tmp_path, env=os.environ | {"OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)

    folder = tmp_path / "ck/step/shapes-6-4"
    ft = protocol("--method", "FT")
    assert ft.returncode == 0, ft.stdout[-3000:]
    ft_bytes = (folder / "run_1.pth").read_bytes()
    mib = protocol("--method", "MiB")
    # run.py's own exit code (2: bad input) reaches the caller through torchrun, which reports every failure as 1
    assert mib.returncode == 2 and "made by other flags (--method 'ft' there, 'mib' now" in mib.stdout
    assert (folder / "run_1.pth").read_bytes() == ft_bytes and "# shapes 6-4: mib" not in \
        (folder / "run_results.md").read_text()
    (folder / "run_1.pth").write_bytes(ft_bytes[:len(ft_bytes) // 3])   # a truncated artifact is no result
    again = protocol("--method", "FT")
    assert again.returncode == 0 and "step 0: " in again.stdout and "skipping" in again.stdout, again.stdout[-3000:]
    assert "[launch] step 1: " in again.stdout and "is complete" not in again.stdout.split("[launch] step 1")[1]
    from segmentation.engine.checkpoint import load_artifact

    assert load_artifact(folder / "run_1.pth")["complete"]


# ---------------------------------------------------------------- writes that cannot happen (in-process, monkeypatched)

def tiny_argv(root: Path, tmp: Path, *argv: str) -> list[str]:
    from test_pipeline import TINY

    return [*TINY, "--task", "6-4", "--epochs", "1", "--batch_size", "4", "--data_root", str(root),
            "--checkpoint_dir", str(tmp / "ck"), "--logdir", str(tmp / "logs"), "--name", "x", *argv]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run.py: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_folder_that_cannot_be_written_is_refused_before_training(shapes_root, tmp_path, monkeypatch, capsys):
    """A read-only --checkpoint_dir (root writes anywhere, so the refusal is injected at the same call)."""
    import errno
    import tempfile

    from segmentation.cli import main

    real = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and str(tmp_path / "ck") in str(dir):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert main(tiny_argv(shapes_root, tmp_path, "--step", "0")) == 2
    line = one_error_line(capsys)
    assert "--checkpoint_dir: cannot write in" in line and "(Permission denied)" in line
    assert not list((tmp_path / "ck").rglob("*.pth"))


def test_a_full_disk_is_said_before_the_save_with_the_folder_and_the_bytes(shapes_root, tmp_path, monkeypatch,
                                                                            capsys):
    import shutil
    from collections import namedtuple

    from segmentation.cli import main

    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096)
                        if str(tmp_path / "ck") in str(path) else real(path))
    assert main(tiny_argv(shapes_root, tmp_path, "--step", "0")) == 2
    line = one_error_line(capsys)
    assert "not enough free space in" in line and "/ck/run/shapes-6-4/x_0 to write iter_" in line
    assert "MB are free" in line and "run the same command again" in line
    assert not (tmp_path / "ck/step/shapes-6-4/x_0.pth").exists()


def test_a_disk_that_fills_up_while_writing_replaces_nothing(shapes_root, tmp_path, monkeypatch, capsys, caplog):
    import errno
    import logging

    import torch

    from segmentation.cli import main

    assert main(tiny_argv(shapes_root, tmp_path, "--step", "0")) == 0
    good = (tmp_path / "ck/step/shapes-6-4/x_0.pth").read_bytes()
    capsys.readouterr()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    assert main(tiny_argv(shapes_root, tmp_path, "--step", "0", "--lr", "0.02", "--replace")) == 2
    line = one_error_line(capsys)
    assert "filled up while writing" in line and "nothing was replaced" in line
    assert (tmp_path / "ck/step/shapes-6-4/x_0.pth").read_bytes() == good
    assert not list((tmp_path / "ck/step/shapes-6-4").glob("*.replaced-*"))
    monkeypatch.undo()

    # --test on an artifact in a folder it cannot write to: the metrics are printed, then one line
    import tempfile

    real = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and "shapes-6-4" in str(dir):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with caplog.at_level(logging.INFO, logger="segmentation"):
        assert main(["--test", "--ckpt", str(tmp_path / "ck/step/shapes-6-4/x_0.pth"), "--data_root",
                     str(shapes_root), "--num_workers", "0", "--batch_size", "4"]) == 2
    assert "mIoU all" in caplog.text
    line = one_error_line(capsys)
    assert "the test metrics above are complete, but" in line and "x_0_test.json" in line


def test_the_launchers_return_run_py_s_own_exit_code(tmp_path: Path) -> None:
    """torchrun ends with 1 whatever its workers returned; the ranks' status files carry 2, 3 or 4 through."""
    import os

    sys.path.insert(0, str(REPO / "launch"))
    import run_protocol

    fake_torchrun = ("import os, sys; p = os.environ['SEGMENTATION_EXIT_STATUS']; "
                     "open(p + '.0', 'w').write('0'); open(p + '.1', 'w').write('3'); sys.exit(1)")
    assert run_protocol.call_step([sys.executable, "-c", fake_torchrun], dict(os.environ)) == 3
    no_status = [sys.executable, "-c", "import sys; sys.exit(7)"]
    assert run_protocol.call_step(no_status, dict(os.environ)) == 7  # nothing written: torchrun's own code
    assert run_protocol.call_step([sys.executable, "-c", "pass"], dict(os.environ)) == 0


def test_a_generated_dataset_missing_files_says_so_at_start(tmp_path: Path) -> None:
    """Deleted images of the built-in data were reported seconds into an epoch, with advice to re-download."""
    from segmentation.datasets import build_source, ensure_shapes
    from segmentation.datasets.base import DatasetError

    folder = ensure_shapes(tmp_path, size=32, n_train=8, n_val=4)
    build_source("shapes", folder, "train")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.npy").write_bytes(b"cached")  # caches do not count as generated files
    next((folder / "JPEGImages").iterdir()).unlink()
    message = rf"{folder} is a generated dataset missing 1 of its 26 files: delete the folder \(rm -r {folder}\)"
    with pytest.raises(DatasetError, match=message):
        build_source("shapes", folder, "train")  # the generated folder as --data_root
    with pytest.raises(DatasetError, match=message):
        ensure_shapes(tmp_path, size=32, n_train=8, n_val=4)  # the data root: found and checked


def test_an_image_tagged_twice_in_an_image_label_file_is_refused(tmp_path: Path) -> None:
    from segmentation.datasets.base import DatasetError
    from segmentation.datasets.image_labels import read_image_labels

    names = ("background", "cat", "dog")
    csv_file = tmp_path / "tags.csv"
    csv_file.write_text("image_id,labels\na,cat\nb,dog\na,dog\n")
    with pytest.raises(DatasetError, match=r"names image 'a' twice \(lines 2 and 4\)"):
        read_image_labels(csv_file, names)
    json_file = tmp_path / "tags.json"
    json_file.write_text('{"a": ["cat"], "b": [], "a": ["dog"]}')
    with pytest.raises(DatasetError, match=r"names image 'a' twice"):
        read_image_labels(json_file, names)
    json_file.write_text('{"a": ["cat"], "b": []}')
    assert read_image_labels(json_file, names) == {"a": {1}, "b": set()}
