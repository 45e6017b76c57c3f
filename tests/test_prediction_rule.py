"""A method's prediction rule (Method.predict): the argmax by default, and the one every predicting place uses."""
from __future__ import annotations

import dataclasses

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
