"""report.py: the hypervolume with a reference per objective, the Pareto report and its printout,
the slices of Figure 5 (hand-computed values); the figure itself is checked in test_search.py."""
import pytest

import report


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


def test_slice_grid_places_each_slice_of_figure_5():
    """Figure 5 for any d: slice (w3..wd) goes to (sub-row, column), column = w3's value, sub-row = the
    values of w4..wd read as a base-3 number, most significant first."""
    assert report.slice_grid(2) == {(): (0, 0)}
    assert report.slice_grid(3) == {(0,): (0, 0), (1,): (0, 1), (2,): (0, 2)}
    d5 = report.slice_grid(5)
    assert len(d5) == 27 and d5[(0, 0, 0)] == (0, 0) and d5[(2, 0, 1)] == (1, 2) and d5[(1, 1, 0)] == (3, 1)
    assert d5[(0, 2, 2)] == (8, 0) and sorted(set(d5.values())) == [(r, c) for r in range(9) for c in range(3)]
