"""Tests written to kill mutants that survived `python bench/mutation.py` (README, "Mutation testing").

Each test checks a property of a public function against hand-computed values or an independent
oracle; the comment says which claim it protects. Fast: tiny tensors and tiny random models only."""
import math

import pytest
import torch

import rewards
from t5 import InputError


# ----------------------------------------------------------------------------- rewards.py
def test_reward_combinations_keep_the_scores_dtype_and_device():
    """combine_logsum / combine_mean compute in the scores' precision and on their device
    (the code is device-agnostic): weights given as a Python list follow the scores."""
    scores = torch.tensor([[0.3, 0.6, 0.9]], dtype=torch.float64)
    third = [1 / 3] * 3
    assert abs(rewards.combine_mean(scores, third).item() - 0.6) < 1e-15  # float64, not float32 weights
    logsum = sum(math.log(s) / 3 for s in (0.3, 0.6, 0.9))
    assert abs(rewards.combine_logsum(scores, third).item() - logsum) < 1e-15
    meta = torch.empty(4, 3, device="meta")  # any device but the CPU: list weights must be placed beside the scores
    assert rewards.combine_mean(meta, third).device.type == "meta"
    assert rewards.combine_logsum(meta, third).shape == (4,)


def test_scorer_count_mismatch_names_the_scorer_and_counts():
    """A bad input is a one-line error that names the problem."""
    with pytest.raises(InputError, match=r"^fluency scorer: 2 prompts but 1 responses$"):
        rewards.FluencyScorer(None, None)(["a", "b"], ["x"])


# ----------------------------------------------------------------------------- report.py
import report  # noqa: E402


def test_hypervolume_with_a_reference_per_objective():
    """SPEC §8: the volume above a reference point given per objective (d = 3, unequal coordinates)."""
    assert report.hypervolume([(1.0, 1.0, 1.0)], reference=(0.5, 0.75, 0.875)) == 0.5 * 0.25 * 0.125
    # two points: slabs along the last objective use the reference's own last coordinate
    volume = report.hypervolume([(1.0, 1.0, 0.5), (0.5, 0.5, 1.0)], reference=(0.0, 0.25, 0.125))
    assert volume == pytest.approx(1.0 * 0.75 * 0.375 + 0.5 * 0.25 * 0.5)


def test_pareto_report_and_its_printout():
    """search.json's Pareto entry (front, hypervolume, its reference 0) and the lines `search` prints:
    the front sorted by mean, best first."""
    records = [
        {"weights": [1, 0], "direction": [1.0, 0.0], "scores": [0.9, 0.1], "mean": 0.5, "iteration": 1},
        {"weights": [0, 1], "direction": [0.0, 1.0], "scores": [0.2, 0.8], "mean": 0.5, "iteration": 1},
        {"weights": [1, 1], "direction": [0.5, 0.5], "scores": [0.7, 0.7], "mean": 0.7, "iteration": 1},
        {"weights": [1, 0.5], "direction": [2 / 3, 1 / 3], "scores": [0.6, 0.1], "mean": 0.35, "iteration": 2},
    ]
    rep = report.pareto_report(records, ["x", "y"])
    assert rep["reference"] == 0.0 and rep["objectives"] == ["x", "y"]
    assert [r["weights"] for r in rep["front"]] == [[1, 0], [0, 1], [1, 1]]
    assert rep["hypervolume"] == pytest.approx(0.9 * 0.1 + 0.7 * 0.6 + 0.2 * 0.1)
    assert report.format_report(rep) == (
        "Pareto front: 3 non-dominated weight vectors | hypervolume 0.5300 (reference 0)\n"
        "  w=(1.000,1.000) | x 0.700 y 0.700 | mean 0.700\n"
        "  w=(1.000,0.000) | x 0.900 y 0.100 | mean 0.500\n"
        "  w=(0.000,1.000) | x 0.200 y 0.800 | mean 0.500")
