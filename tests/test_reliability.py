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
