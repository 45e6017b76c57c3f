"""The -M variants' exemplar memory (segmentation/methods/exemplars.py): the class-balanced selection, the
pseudo-label rule, --forbid_old_data, and DKD-M through run.py on tiny shapes (6-2, steps 0-2, one and two
processes)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from segmentation.config import ConfigError, parse_config
from segmentation.datasets import EvalTransform, IncrementalDataset, ShapesSource
from segmentation.engine.checkpoint import CheckpointError, load_artifact, save_step_artifact
from segmentation.methods import METHODS
from segmentation.methods.exemplars import (choose_exemplars, image_classes, memory_rng, pseudo_labelled,
                                            round_robin)
from segmentation.step.build import add_exemplars, build_step_data
from segmentation.tasks import load_task
from test_pipeline import TINY, run_py, torchrun

MEM_SIZE = 6
CONFIDENT_CLASS = 3  # the class whose bias the step-1 fixture raises, so that the model pseudo-labels it everywhere


# ---------------------------------------------------------------- selection

CANDIDATES = [  # (image id, classes it shows), in training-set order
    ("a", frozenset({1})),
    ("b", frozenset({1, 2})),
    ("c", frozenset({2})),
    ("d", frozenset({3})),
    ("e", frozenset({1, 3})),
    ("f", frozenset({2})),
]


def test_round_robin_takes_the_first_unchosen_image_of_each_class_in_turn():
    # Round 1: class 2 -> b (first with 2), class 1 -> a (b is taken), class 3 -> d. Round 2: 2 -> c, 1 -> e, 3 ->
    # none left (d, e taken). Round 3: 2 -> f.
    assert round_robin(CANDIDATES, [2, 1, 3], 6) == ["b", "a", "d", "c", "e", "f"]
    assert round_robin(CANDIDATES, [3, 1, 2], 4) == ["d", "a", "b", "e"]  # stops at mem_size, mid-round
    assert round_robin(CANDIDATES, [1, 2, 3], 100) == ["a", "b", "d", "e", "c", "f"]  # no class can add: stops
    assert round_robin(CANDIDATES, [4, 1], 2) == ["a", "b"]  # a class no image shows is passed over
    assert round_robin(CANDIDATES, [1, 2], 0) == [] and round_robin([], [1], 3) == []


def test_choose_shuffles_candidates_and_classes_with_the_seeded_generator():
    """DKD utils/memory.py:127-147: candidates shuffled, then the class order drawn, then round-robin."""
    classes = [1, 2, 3]
    chosen = choose_exemplars(CANDIDATES, classes, 4, memory_rng(3, 1))
    rng = memory_rng(3, 1)
    shuffled = [CANDIDATES[k] for k in rng.permutation(len(CANDIDATES))]
    order = [classes[k] for k in rng.permutation(len(classes))]
    assert chosen == round_robin(shuffled, order, 4)
    assert chosen == choose_exemplars(CANDIDATES, classes, 4, memory_rng(3, 1))  # same seed and step: same memory
    draws = {tuple(choose_exemplars(CANDIDATES, classes, 3, memory_rng(seed, step)))
             for seed in range(4) for step in range(4)}
    assert len(draws) > 1  # the seed and the step do change the draw


# ---------------------------------------------------------------- pseudo-labels

def test_pseudo_labels_fill_background_pixels_with_confident_classes_only():
    labels = torch.tensor([[[0, 0, 5, 255, 0]]])        # 1 image, 1 x 5 pixels
    logit = lambda p: float(np.log(p / (1 - p)))        # noqa: E731: the logit of a probability
    scores = torch.full((1, 6, 1, 5), -10.0)
    scores[0, 0] = 10.0                                 # channel 0 (DKD's AC, STAR's slot) is never a class
    scores[0, 2, 0, 0] = logit(0.95)                    # pixel 0: class 2 at 0.95 -> pseudo-label 2
    scores[0, 4, 0, 1] = logit(0.85)                    # pixel 1: best is 0.85 < 0.9 -> stays background
    scores[0, 1, 0, 2] = logit(0.99)                    # pixel 2: labelled 5 -> its label stays
    scores[0, 3, 0, 3] = logit(0.99)                    # pixel 3: void -> stays void
    scores[0, 1, 0, 4] = logit(0.97)                    # pixel 4: class 1, which STAR's sampler would skip
    scores[0, 5, 0, 4] = logit(0.92)
    assert pseudo_labelled(labels, scores).tolist() == [[[2, 0, 5, 255, 1]]]
    assert image_classes(labels, scores) == [frozenset({1, 2, 5})]
    assert image_classes(labels) == [frozenset({5})]  # without the model: the label's classes, 0 and 255 left out


def test_pseudo_labels_read_scores_at_another_size():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    scores = torch.full((1, 3, 2, 2), -10.0)
    scores[0, 2] = 10.0
    assert pseudo_labelled(labels, scores).unique().tolist() == [2]


# ---------------------------------------------------------------- flags

def flags(*extra: str) -> list[str]:
    return [*TINY, "--data_root", "unused", "--task", "6-2", "--batch_size", "4", *extra]


@pytest.mark.parametrize("method, plain", [("DKD-M", "dkd"), ("STAR-M", "star")])
def test_forbid_old_data_refuses_the_memory_variants(method, plain):
    with pytest.raises(ConfigError) as refused:
        parse_config(flags("--method", method, "--forbid_old_data"))
    message = str(refused.value)
    assert "--forbid_old_data" in message and f"--method {method.lower()}" in message
    assert f"--method {plain} (without -M)" in message and "Drop --forbid_old_data" in message
    assert parse_config(flags("--method", plain, "--forbid_old_data")).forbid_old_data  # no old data: allowed
    assert not parse_config(flags("--method", method)).forbid_old_data  # off by default


def test_memory_variants_train_their_own_step0_and_preset_the_memory_size():
    for variant, parent, voc in (("dkd-m", "dkd", 100), ("star-m", "star", 50)):
        cls = METHODS[variant]
        assert cls.uses_old_data and not METHODS[parent].uses_old_data
        for dataset, task, size in (("voc", "15-1", voc), ("ade", "100-10", 300), ("shapes", "6-2", voc)):
            cfg = parse_config(["--dataset", dataset, "--task", task, "--epochs", "2", "--method", variant])
            assert cfg.method_options.mem_size == size
            parent_cfg = parse_config(["--dataset", dataset, "--task", task, "--epochs", "2", "--method", parent])
            # Their step 0 carries the memory: never the parent's (which has none), whatever the benchmark groups.
            assert cls.step0_key(cfg.method_options) != METHODS[parent].step0_key(parent_cfg.method_options)
            assert (cfg.lr_policy, cfg.crop_size) == (parent_cfg.lr_policy, parent_cfg.crop_size)  # its [defaults]
        assert cls.memory_ids({"memory_ids": ["x", "y"]}) == ["x", "y"] and cls.memory_ids({}) == []


def test_memory_ids_are_looked_up_in_the_training_source(shapes_root):
    cfg = parse_config(flags("--data_root", str(shapes_root), "--method", "DKD-M", "--step", "1",
                             "--step_ckpt", "somewhere/m_0.pth"))
    task = load_task("shapes", "6-2")
    data = build_step_data(cfg, task, 1)
    own = [data.train.source.ids[i] for i in data.train.indices]
    other = next(image_id for image_id in data.train.source.ids if image_id not in own)
    extended, old_data = add_exemplars(cfg, task, data, {"method_state": {"memory_ids": [own[0], other, other]}})
    assert len(extended.train) == len(data.train) + 1  # an image already there, and one twice: added once
    assert old_data == {"exemplars": 3, "added": 1}
    assert extended.train[len(data.train)]["index"] == data.train.source.ids.index(other)
    with pytest.raises(CheckpointError, match=r"somewhere/m_0\.pth carries .*'no_such_image'"):
        add_exemplars(cfg, task, data, {"method_state": {"memory_ids": [other, "no_such_image"]}})
    plain = parse_config(flags("--data_root", str(shapes_root), "--method", "DKD", "--step", "1"))
    assert add_exemplars(plain, task, data, None) == (data, None)


# ---------------------------------------------------------------- end to end

STEP = [*TINY, "--task", "6-2", "--batch_size", "4", "--epochs", "1", "--method", "DKD-M",
        "--mem_size", str(MEM_SIZE)]


def run_step(root: Path, tmp: Path, name: str, step: int, *extra: str, nproc: int = 0) -> str:
    args = [*STEP, "--data_root", str(root), "--checkpoint_dir", str(tmp / "ck"), "--logdir", str(tmp / "tb"),
            "--name", name, "--step", str(step), *extra]
    result = torchrun(nproc, *args, cwd=tmp) if nproc else run_py(*args, cwd=tmp)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def chain(shapes_root: Path, tmp_path_factory) -> dict:
    """DKD-M steps 0, 1, 2 in one process, step 1 again in two. Step 1 starts from step 0's artifact with class
    3's bias raised to 20, so that the model that chooses step 2's memory pseudo-labels class 3 on every
    background pixel (a model trained for one epoch on 17 tiny images is confident nowhere)."""
    tmp = tmp_path_factory.mktemp("exemplars")
    folder = tmp / "ck/step/shapes-6-2"
    logs = {0: run_step(shapes_root, tmp, "m", 0)}
    step0 = load_artifact(folder / "m_0.pth")
    step0["model_state"]["cls.0.bias"][CONFIDENT_CLASS] = 20.0
    confident = tmp / "confident_0.pth"
    save_step_artifact(confident, model_state=step0["model_state"], method_state=step0["method_state"],
                       meta=step0["meta"], extra_modules=step0["extra_modules"])
    logs[1] = run_step(shapes_root, tmp, "m", 1, "--step_ckpt", str(confident))
    logs[2] = run_step(shapes_root, tmp, "m", 2)
    logs["two"] = run_step(shapes_root, tmp, "two", 1, "--step_ckpt", str(confident), nproc=2)
    return {"folder": folder, "logs": logs}


def memory(path: Path) -> list[str]:
    return load_artifact(path)["method_state"]["memory_ids"]


def training_set(root: Path, step: int, memory_ids: list[str] = ()) -> IncrementalDataset:
    """Step `step`'s training set as run.py builds it (disjoint 6-2), with the evaluation transform of the
    memory's candidate pass."""
    dataset = IncrementalDataset(ShapesSource(root, "train"), load_task("shapes", "6-2"), step, mode="train",
                                 overlap=False, transform=EvalTransform((32, 32), True, None))
    return dataset.with_images(list(memory_ids))


def ids_of(dataset: IncrementalDataset) -> list[str]:
    return list(dataset.image_ids().values())


def results(folder: Path, name: str, step: int) -> dict:
    return json.loads((folder / f"{name}_{step}.json").read_text())


def test_step0_carries_a_memory_of_its_training_images(chain, shapes_root):
    ids = memory(chain["folder"] / "m_0.pth")
    assert len(ids) == MEM_SIZE == len(set(ids)) and set(ids) <= set(ids_of(training_set(shapes_root, 0)))
    assert results(chain["folder"], "m", 0)["old_data"] == {"exemplars": 0, "added": 0}
    assert "pseudo-labels added a class to 0 images" in chain["logs"][0]  # step 0: labels only


def test_step1_trains_on_its_images_plus_the_exemplars(chain, shapes_root):
    ids = memory(chain["folder"] / "m_0.pth")
    own = ids_of(training_set(shapes_root, 1))
    added = len(set(ids) - set(own))
    assert f"exemplar memory of step 0: {MEM_SIZE} images, {added} added to the {len(own)} training images of " \
           f"step 1" in chain["logs"][1]
    assert results(chain["folder"], "m", 1)["old_data"] == {"exemplars": MEM_SIZE, "added": added}
    assert load_artifact(chain["folder"] / "m_1.pth")["meta"]["old_data"] == {"exemplars": MEM_SIZE, "added": added}


def test_step2_memory_is_chosen_with_the_models_pseudo_labels(chain, shapes_root):
    """Step 1's candidates: its images and step 0's exemplars, each with its step-1 label's classes plus class 3
    wherever a pixel reads background; the memory is the seeded choice over them (--random_seed 3, step 1)."""
    candidates_set = training_set(shapes_root, 1, memory(chain["folder"] / "m_0.pth"))
    candidates = []
    for k, image_id in enumerate(ids_of(candidates_set)):
        label = candidates_set[k]["label"]
        shown = set(label.unique().tolist()) - {0, 255}
        candidates.append((image_id, frozenset(shown | ({CONFIDENT_CLASS} if (label == 0).any() else set()))))
    expected = choose_exemplars(candidates, list(range(1, 9)), MEM_SIZE, memory_rng(3, 1))
    chosen = memory(chain["folder"] / "m_1.pth")
    assert chosen == expected
    assert any(CONFIDENT_CLASS in classes for image_id, classes in candidates if image_id in chosen)
    pseudo = re.search(r"pseudo-labels added a class to (\d+) images", chain["logs"][1])
    assert pseudo and int(pseudo.group(1)) == sum((candidates_set[k]["label"] == 0).any().item()
                                                 for k in range(len(candidates_set)))
    own = ids_of(training_set(shapes_root, 2))
    added = len(set(chosen) - set(own))
    assert f"exemplar memory of step 1: {MEM_SIZE} images, {added} added" in chain["logs"][2]
    assert results(chain["folder"], "m", 2)["old_data"] == {"exemplars": MEM_SIZE, "added": added}


def test_two_processes_choose_the_same_memory_as_one(chain):
    assert memory(chain["folder"] / "two_1.pth") == memory(chain["folder"] / "m_1.pth")


def test_a_memory_variant_refuses_a_previous_step_without_a_memory(shapes_root, tmp_path):
    """Step 1 of DKD-M from step 0 of plain DKD (which chose no memory) would train without old data while saying
    it used some: it stops before training, naming the fix."""
    common = ["--data_root", str(shapes_root), "--checkpoint_dir", str(tmp_path / "ck"), "--logdir",
              str(tmp_path / "tb")]
    plain = [*TINY, "--task", "6-2", "--batch_size", "4", "--epochs", "1", "--method", "DKD", *common]
    assert run_py(*plain, "--name", "plain", "--step", "0", cwd=tmp_path).returncode == 0
    result = run_py(*STEP, *common, "--name", "m", "--step", "1", "--step_ckpt",
                    str(tmp_path / "ck/step/shapes-6-2/plain_0.pth"), cwd=tmp_path)
    assert result.returncode != 0
    assert "carries none" in result.stderr and "--method DKD-M" in result.stderr
    assert not (tmp_path / "ck/step/shapes-6-2/m_1.pth").exists()
