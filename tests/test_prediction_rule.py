"""A method's prediction rule (Method.predict): the argmax by default, and the one every predicting place uses."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch
from PIL import Image
from torch import nn

from segmentation.config import parse_config
from segmentation.engine.trainer import evaluate, make_amp
from segmentation.infer import predict as infer_predict
from segmentation.methods import METHODS, predictor, saved_predictor

SCORES = torch.tensor([0.1, 2.0, 0.5]).view(1, 3, 1, 1)  # channel 1 wins the argmax everywhere


class FixedScores(nn.Module):
    def forward(self, x: torch.Tensor, features=()) -> tuple[torch.Tensor, dict]:
        return SCORES.expand(x.shape[0], 3, *x.shape[-2:]).clone(), {}


def lowest(scores: torch.Tensor) -> torch.Tensor:
    """A rule that is not the argmax, to see who calls it."""
    return scores.argmin(dim=1)


def one_batch() -> list[dict]:
    return [{"image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "valid_box": torch.tensor([[0, 4, 0, 4]] * 2),
             "label": torch.full((2, 4, 4), 1, dtype=torch.uint8)}]


def test_every_method_predicts_by_the_argmax_unless_it_says_otherwise():
    cfg = parse_config(["--method", "mib"])
    for name, cls in METHODS.items():
        rule = predictor(name, cls.Options())
        assert torch.equal(rule(SCORES), torch.ones(1, 1, 1, dtype=torch.long)), name
    assert predictor(cfg.method, cfg.method_options)(SCORES).item() == 1


def test_evaluate_scores_and_draws_what_the_rule_predicts():
    amp, _ = make_amp(False, "bf16", torch.device("cpu"))
    common = dict(model=FixedScores(), num_classes=3, device=torch.device("cpu"), amp=amp, sample_num=1)
    default = evaluate(loader=one_batch(), **common)
    ruled = evaluate(loader=one_batch(), predict=lowest, **common)
    assert default.matrix.matrix[1, 1] == 32  # label 1 predicted 1 on all 2 x 16 pixels
    assert ruled.matrix.matrix[1, 0] == 32 and ruled.matrix.matrix[1, 1] == 0  # the rule's class 0
    assert torch.equal(ruled.samples[0][2], torch.zeros(4, 4, dtype=ruled.samples[0][2].dtype))  # the picture too


def test_inference_uses_the_rule():
    cfg = parse_config([])
    image = Image.fromarray(np.zeros((4, 5, 3), np.uint8))
    assert (infer_predict(FixedScores(), image, cfg, torch.device("cpu")) == 1).all()
    assert (infer_predict(FixedScores(), image, cfg, torch.device("cpu"), lowest) == 0).all()


def test_an_artifact_predicts_by_the_rule_of_the_method_that_trained_it():
    wilson = METHODS["wilson"]
    options = dataclasses.asdict(wilson.Options())
    rule = saved_predictor({"method": "wilson", "method_options": {**options, "gone_flag": 3}})
    assert rule.func.__self__ is wilson  # the artifact's method, whatever --method says now
    assert rule.keywords["options"] == wilson.Options()  # an option the method no longer has is dropped
    assert saved_predictor({}).func.__self__ is METHODS["ft"]  # an artifact without a saved method: FT's argmax


def test_dkd_and_star_predict_background_where_no_class_is_confident():
    """sigmoid(z_c) <= 0.5 for every class c >= 1: background, whatever channel 0 holds (DKD's auxiliary
    classifier, STAR's unused slot) and even where the argmax would pick a class."""
    scores = torch.tensor([[-9.0, -1.0, -2.0], [-9.0, 0.5, 3.0], [9.0, -1.0, -2.0], [9.0, 0.1, -2.0]])
    scores = scores.T.reshape(1, 3, 1, 4)
    for name in ("dkd", "star", "dkd-m", "star-m"):
        rule = predictor(name, METHODS[name].Options())
        assert rule(scores).tolist() == [[[0, 2, 0, 1]]], name
    assert scores.argmax(1).tolist() == [[[1, 2, 0, 0]]]  # the argmax disagrees on pixels 0 and 3


def test_a_dkd_artifact_tests_and_infers_by_the_sigmoid_rule(shapes_root, tmp_path):
    """--test and --infer of a DKD artifact whose classes are confident nowhere: every pixel is background by DKD's
    rule (the argmax would say class 1 everywhere), with --method MiB on the command line too."""
    from segmentation.engine.checkpoint import load_artifact, save_step_artifact
    from test_pipeline import TINY, run_py

    common = [*TINY, "--data_root", str(shapes_root), "--task", "6-4", "--checkpoint_dir", str(tmp_path / "ck"),
              "--logdir", str(tmp_path / "tb")]
    trained = run_py(*common, "--method", "DKD", "--name", "d", "--step", "0", "--epochs", "1", "--batch_size", "4",
                     cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    artifact = load_artifact(tmp_path / "ck/step/shapes-6-4/d_0.pth")
    state = artifact["model_state"]
    state["cls.0.weight"].zero_()
    state["cls.0.bias"].copy_(torch.tensor([-20.0] + [-10.0] * (state["cls.0.bias"].numel() - 1)))
    state["cls.0.bias"][1] = -5.0  # the argmax's class everywhere; its sigmoid is 0.007
    unsure = tmp_path / "unsure_0.pth"
    save_step_artifact(unsure, model_state=state, method_state=artifact["method_state"], meta=artifact["meta"],
                       extra_modules=artifact["extra_modules"])

    tested = run_py(*common, "--method", "MiB", "--test", "--ckpt", str(unsure), cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-3000:]
    results = json.loads((tmp_path / "unsure_0_test.json").read_text())
    assert results["class_iou"]["background"] > 0.5  # predicted everywhere: its IoU is its share of the pixels
    assert all(iou in (0.0, None) for name, iou in results["class_iou"].items() if name != "background")

    image = next(shapes_root.rglob("*.jpg"))
    inferred = run_py("--infer", str(image), "--ckpt", str(unsure), "--infer_out", str(tmp_path / "out"),
                      "--data_root", str(shapes_root), cwd=tmp_path)
    assert inferred.returncode == 0, inferred.stderr[-3000:]
    pred = np.asarray(Image.open(tmp_path / "out" / f"{image.stem}_pred.png").convert("RGB"))
    assert (pred == pred[0, 0]).all()  # one colour: background's
