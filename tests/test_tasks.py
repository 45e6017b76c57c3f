"""tasks/*.toml and segmentation/tasks.py: every split loads, matches the reference counts, bad files fail clearly."""
from __future__ import annotations

from pathlib import Path

import pytest

from segmentation.tasks import Task, TaskError, list_datasets, list_tasks, load_task

ALL_TASKS = [(d, t) for d in list_datasets() for t in list_tasks(d, include_aliases=True)]


def test_datasets_present() -> None:
    assert set(list_datasets()) >= {"voc", "ade", "coco-voc", "cityscapes", "shapes"}


@pytest.mark.parametrize("dataset,name", ALL_TASKS)
def test_every_task_loads_and_is_a_partition(dataset: str, name: str) -> None:
    task = load_task(dataset, name)
    seen = task.seen_classes(task.num_steps - 1)
    assert len(seen) == len(set(seen))
    assert set(seen) | set(task.ignore_ids) == set(range(task.num_classes))
    if task.has_background:
        assert 0 in task.steps[0]
    assert all(task.steps)


def test_required_task_names() -> None:
    voc = set(list_tasks("voc", include_aliases=True))
    assert voc >= {"offline", "19-1", "15-5", "15-1", "15-5s", "10-1", "10-10", "10-5", "10-5-5", "10-2", "5-3",
                   "5-1", "2-2", "2-1", "5-5", "19-1b"}
    assert voc >= {f"15-1_{c}" for c in "bcdefghijklmnopqrstuvw"} | {f"15-5s_{c}" for c in "bcdefghijklmnopqrstuvw"}
    ade = set(list_tasks("ade", include_aliases=True))
    assert ade >= {"offline", "100-50", "100-10", "100-5", "50-50", "50", "50-20", "100-50b", "100-50c", "100-10b",
                   "100-10c", "50b", "50c"}
    assert set(list_tasks("coco-voc")) >= {"voc", "offline"}
    assert set(list_tasks("cityscapes", include_aliases=True)) >= {"offline", "5-6-8", "cil", "10-9"}
    assert set(list_tasks("shapes")) == {"offline", "6-4", "6-2", "6-1"}


@pytest.mark.parametrize("dataset,name,counts", [
    ("voc", "offline", [21]),
    ("voc", "19-1", [20, 1]),
    ("voc", "15-5", [16, 5]),
    ("voc", "15-1", [16, 1, 1, 1, 1, 1]),
    ("voc", "10-1", [11] + [1] * 10),
    ("voc", "10-10", [11, 10]),
    ("voc", "10-5", [11, 5, 5]),
    ("voc", "10-2", [11, 2, 2, 2, 2, 2]),
    ("voc", "5-5", [6, 5, 5, 5]),
    ("voc", "5-3", [6, 3, 3, 3, 3, 3]),
    ("voc", "5-1", [6] + [1] * 15),
    ("voc", "2-2", [3] + [2] * 9),
    ("voc", "2-1", [3] + [1] * 18),
    ("voc", "19-1b", [20, 1]),
    ("ade", "offline", [151]),
    ("ade", "100-50", [101, 50]),
    ("ade", "100-10", [101, 10, 10, 10, 10, 10]),
    ("ade", "100-5", [101] + [5] * 10),
    ("ade", "50-50", [51, 50, 50]),
    ("ade", "50-20", [51, 20, 20, 20, 20, 20]),
    ("ade", "100-50b", [101, 50]),
    ("ade", "100-10c", [101, 10, 10, 10, 10, 10]),
    ("ade", "50b", [51, 50, 50]),
    ("coco-voc", "voc", [61, 20]),
    ("coco-voc", "offline", [81]),
    ("cityscapes", "offline", [19]),
    ("cityscapes", "5-6-8", [5, 6, 8]),
    ("cityscapes", "10-9", [10, 9]),
    ("shapes", "6-4", [7, 4]),
    ("shapes", "6-2", [7, 2, 2]),
    ("shapes", "6-1", [7, 1, 1, 1, 1]),
])
def test_classes_per_step(dataset: str, name: str, counts: list[int]) -> None:
    task = load_task(dataset, name)
    assert task.classes_per_step(task.num_steps - 1) == counts


def test_class_name_tables() -> None:
    voc = load_task("voc", "offline")
    assert voc.num_classes == 21 and voc.class_names[0] == "background" and voc.class_names[20] == "tvmonitor"
    ade = load_task("ade", "offline")
    assert ade.num_classes == 151 and ade.class_names[1] == "wall" and ade.class_names[150] == "flag"
    city = load_task("cityscapes", "offline")
    assert not city.has_background and city.num_classes == 19 and city.class_names[18] == "bicycle"
    shapes = load_task("shapes", "offline")
    assert shapes.class_names == ("background", "disc", "square", "triangle", "star", "cross", "ring", "hexagon",
                                  "crescent", "L-shape", "heart")


def test_coco_voc_ids() -> None:
    task = load_task("coco-voc", "voc")
    assert task.num_classes == 91
    assert task.ignore_ids == (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
    # WILSON's coco_map: VOC class k is COCO id coco_map[k-1]; the names must agree with VOC's
    assert task.steps[1] == (1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72)
    names = [task.class_names[c] for c in task.steps[1]]
    assert names[:3] == ["person", "bicycle", "car"] and names[-1] == "tv"
    assert task.steps[0][:4] == (0, 8, 10, 11) and len(task.steps[0]) == 61
    assert all(task.class_names[i] == f"unused_{i}" for i in task.ignore_ids)


def test_cil_stages_by_name() -> None:
    task = load_task("cityscapes", "cil")
    assert task.name == "5-6-8"
    assert [task.class_names[c] for c in task.steps[0]] == ["road", "sidewalk", "vegetation", "terrain", "sky"]
    assert [task.class_names[c] for c in task.steps[1]] == ["building", "wall", "fence", "pole", "traffic light",
                                                            "traffic sign"]
    assert task.steps[2] == tuple(range(11, 19))


def test_aliases_resolve() -> None:
    assert load_task("voc", "15-5s") == load_task("voc", "15-1")
    assert load_task("voc", "15-5s").name == "15-1"
    assert load_task("voc", "10-5-5") == load_task("voc", "10-5")
    assert load_task("voc", "15-5s_k") == load_task("voc", "15-1_k")
    assert load_task("ade", "50") == load_task("ade", "50-50")


@pytest.mark.parametrize("letter", "bcdefghijklmnopqrstuvw")
def test_shuffled_orders(letter: str) -> None:
    task = load_task("voc", f"15-1_{letter}")
    order = task.seen_classes(5)
    assert order[0] == 0 and sorted(order) == list(range(21))
    assert task.classes_per_step(5) == [16, 1, 1, 1, 1, 1]
    assert order != tuple(range(21))


def test_spot_values_copied_verbatim() -> None:
    assert load_task("voc", "15-1_b").steps == (
        (0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11), (17,), (3,), (6,), (18,), (10,))
    assert load_task("voc", "19-1b").steps[1] == (5,)
    assert load_task("ade", "100-10b").steps[1] == (11, 16, 50, 64, 66, 73, 89, 92, 145, 146)
    assert load_task("ade", "50c").steps[0][:5] == (0, 5, 10, 11, 12)


def test_step_helpers() -> None:
    task = load_task("voc", "15-1")
    assert task.num_steps == 6
    assert task.new_classes(0) == tuple(range(16))
    assert task.new_classes(2) == (17,)
    assert task.old_classes(2) == tuple(range(17))
    assert task.old_classes(0) == ()
    assert task.seen_classes(2) == tuple(range(18))
    assert task.classes_per_step(2) == [16, 1, 1]
    assert task.seen_class_names(1)[-1] == "pottedplant"
    shuffled = load_task("voc", "15-1_b")
    assert shuffled.seen_class_names(1)[:2] == ["background", "dog"]


def test_check_step() -> None:
    task = load_task("voc", "15-1")
    task.check_step(0)
    task.check_step(5)
    with pytest.raises(TaskError, match=r"--step 6 is beyond the last step \(5\) of voc 15-1"):
        task.check_step(6)
    with pytest.raises(TaskError, match="negative"):
        task.check_step(-1)
    with pytest.raises(TaskError):
        task.new_classes(6)


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(TaskError, match=r"unknown dataset 'vco'.*voc") as exc:
        load_task("vco", "15-1")
    assert isinstance(exc.value, ValueError)
    with pytest.raises(TaskError, match=r"unknown task '15-2'.*15-1.*15-5s \(= 15-1\)"):
        load_task("voc", "15-2")


def test_tasks_dir_override_by_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, "toy", _TOY.format(steps='["0-2", [3]]'))
    monkeypatch.setenv("CISS_TASKS_DIR", str(tmp_path))
    assert list_datasets() == ["toy"]
    assert load_task("toy", "a").steps == ((0, 1, 2), (3,))


# ---- bad files ---------------------------------------------------------------------------------------------------

_TOY = """
dataset = "toy"
has_background = true
classes = ["background", "a", "b", "c"]
[aliases]
"alias" = "a"
[tasks."a"]
steps = {steps}
"""


def _write(folder: Path, dataset: str, text: str) -> Path:
    path = folder / f"{dataset}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("steps,message", [
    ('["0-2", [2, 3]]', r"class id 2 appears in step 1 and also in step 0"),
    ('[[0, 1, 1], [2, 3]]', r"class id 1 appears in step 0 and twice in that step"),
    ('[[1, 2], [0, 3]]', r"background \(id 0\) must be in step 0, not in step 1"),
    ('[[1, 2, 3]]', r"background \(id 0\) must be in step 0"),
    ('["0-2", [4]]', r"class id 4, outside the 4 classes"),
    ('["0-2", []]', r"step 1 is empty"),
    ('["0-2"]', r"class ids \[3\] are in no step"),
    ('["2-0", [3]]', r"increasing range"),
    ('[[0, "x"], "1-3"]', r"'x' is neither a class id"),
])
def test_bad_task_names_file_and_task(tmp_path: Path, steps: str, message: str) -> None:
    path = _write(tmp_path, "toy", _TOY.format(steps=steps))
    with pytest.raises(TaskError, match=message) as exc:
        load_task("toy", "a", tmp_path)
    assert str(path) in str(exc.value) and "task 'a'" in str(exc.value)


def test_bad_alias(tmp_path: Path) -> None:
    text = _TOY.format(steps='["0-3"]').replace('"alias" = "a"', '"alias" = "nope"')
    path = _write(tmp_path, "toy", text)
    with pytest.raises(TaskError, match=r"alias 'alias' points to unknown task 'nope'") as exc:
        load_task("toy", "a", tmp_path)
    assert str(path) in str(exc.value)


def test_ignored_id_in_a_step(tmp_path: Path) -> None:
    text = _TOY.format(steps='["0-3"]').replace("has_background = true", "has_background = true\nignore = [2]")
    _write(tmp_path, "toy", text)
    with pytest.raises(TaskError, match=r"class id 2, which the file lists in `ignore`"):
        load_task("toy", "a", tmp_path)
    _write(tmp_path, "toy", text.replace('["0-3"]', '[[0, 1], [3]]'))
    assert load_task("toy", "a", tmp_path).ignore_ids == (2,)


def test_evaluation_groups_of_a_one_step_task(tmp_path: Path) -> None:
    """`groups`: a one-step task scored on another task's stages (CIL's offline row); checked on load."""
    text = _TOY.format(steps='["0-3"]').replace('steps = ["0-3"]', 'steps = ["0-3"]\ngroups = [[0, 2], [3, 1]]')
    _write(tmp_path, "toy", text)
    assert load_task("toy", "a", tmp_path).group_parts(0) == [(0, 2), (3, 1)]
    _write(tmp_path, "toy", text.replace("[[0, 2], [3, 1]]", "[[0, 2], [3]]"))
    with pytest.raises(TaskError, match=r"task 'a': `groups` must hold each class of the task exactly once"):
        load_task("toy", "a", tmp_path)
    _write(tmp_path, "toy", text.replace('steps = ["0-3"]', 'steps = [[0, 1], [2, 3]]'))
    with pytest.raises(TaskError, match=r"`groups` is for one-step tasks"):
        load_task("toy", "a", tmp_path)


def test_dataset_name_must_match_file(tmp_path: Path) -> None:
    _write(tmp_path, "other", _TOY.format(steps='["0-3"]'))
    with pytest.raises(TaskError, match=r"other.toml.*must match the file name"):
        load_task("other", "a", tmp_path)


def test_invalid_toml(tmp_path: Path) -> None:
    _write(tmp_path, "toy", "dataset = \n")
    with pytest.raises(TaskError, match=r"toy.toml: not valid TOML"):
        load_task("toy", "a", tmp_path)


def test_no_background_dataset_needs_no_zero(tmp_path: Path) -> None:
    text = _TOY.format(steps='[[1, 0], [2, 3]]').replace("has_background = true", "has_background = false")
    _write(tmp_path, "toy", text)
    task = load_task("toy", "alias", tmp_path)
    assert isinstance(task, Task) and task.name == "a" and task.seen_classes(1) == (1, 0, 2, 3)


def test_shapes_defaults_apply_only_to_the_flags_not_given(capsys):
    """tasks/shapes.toml's [defaults]: a small network at the images' size, so that `run.py --dataset shapes` with
    no other flag fits a laptop; each flag given on the command line wins, the others keep the dataset's."""
    from segmentation.config import parse_config

    bare = parse_config(["--dataset", "shapes", "--task", "6-2"])
    assert (bare.backbone, bare.output_stride, bare.crop_size) == ("resnet18", 8, (64, 64))
    mine = parse_config(["--dataset", "shapes", "--backbone", "resnet50", "--crop_size", "32"])
    assert (mine.backbone, mine.output_stride, mine.crop_size) == ("resnet50", 8, (32, 32))
    voc = parse_config(["--dataset", "voc"])
    assert (voc.backbone, voc.output_stride, voc.crop_size) == ("resnet101", 16, (512, 512))
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    assert "shapes: --backbone resnet18 --output_stride 8 --crop_size 64" in " ".join(capsys.readouterr().out.split())
