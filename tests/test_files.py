"""The run folder layout (files.py): runs/<method>-<seed>/ as train writes it, the finished runs that
search, generate and evaluate find there, and the newest adapter of each objective."""
import json
import os
import time

import pytest

import files
from files import InputError


def test_find_runs_takes_any_method_and_seed_labels(tmp_path):
    for folder in ("reflection-0", "dynaopt-3", "four_objectives-1", "reflection-authors", "empathy-2"):
        os.makedirs(tmp_path / folder)
        if folder != "empathy-2":  # unfinished
            (tmp_path / folder / "summary.json").write_text("{}")
    found = files.find_runs(str(tmp_path))
    assert found == {0: {"reflection": str(tmp_path / "reflection-0")}, 3: {"dynaopt": str(tmp_path / "dynaopt-3")},
                     1: {"four_objectives": str(tmp_path / "four_objectives-1")},
                     "authors": {"reflection": str(tmp_path / "reflection-authors")}}


def test_find_runs_keeps_finished_runs_of_known_methods(tmp_path):
    """Every finished (summary.json) <method>-<seed> folder, any method but base and the aggregation levels;
    an integer seed, else the text after the last dash is a label; a negative number stays a label."""
    for folder, finished in (("reflection-0", True), ("uniform-1", True), ("fluency-2", False),
                             ("other-0", True), ("empathy-x", True), ("dynaopt-1", True), ("base-0", True),
                             ("hidden-1", True), ("param-x", True), ("noseed", True), ("reflection--1", True)):
        (tmp_path / folder).mkdir()
        if finished:
            (tmp_path / folder / "summary.json").write_text("{}")
    assert files.find_runs(str(tmp_path)) == {0: {"reflection": str(tmp_path / "reflection-0"),
                                                     "other": str(tmp_path / "other-0")},
                                                 1: {"uniform": str(tmp_path / "uniform-1"),
                                                     "dynaopt": str(tmp_path / "dynaopt-1")},
                                                 "x": {"empathy": str(tmp_path / "empathy-x")},
                                                 "-1": {"reflection": str(tmp_path / "reflection--1")}}


def test_find_runs_reads_the_seed_after_the_last_dash(tmp_path):
    """<method>-<seed>: the seed is the text after the last dash, whatever the method's name holds."""
    for folder in ("four-objectives-3", "reflection-authors"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "summary.json").write_text("{}")
    assert files.find_runs(str(tmp_path)) == {3: {"four-objectives": str(tmp_path / "four-objectives-3")},
                                                 "authors": {"reflection": str(tmp_path / "reflection-authors")}}


def finished(folder, mtime=None):
    os.makedirs(folder / "adapter")
    (folder / "summary.json").write_text(json.dumps({"objective": folder.name}))
    if mtime is not None:
        os.utime(folder / "summary.json", (mtime, mtime))


def test_run_folder_is_the_one_find_runs_reads(tmp_path):
    """What train writes (run_folder) is what find_runs and newest_adapters read back, a label seed too."""
    for method, seed in (("reflection", 0), ("uniform", 12), ("empathy", "authors")):
        finished(tmp_path / os.path.basename(files.run_folder(str(tmp_path), method, seed)))
        assert files.run_folder(str(tmp_path), method, seed) == os.path.join(str(tmp_path), f"{method}-{seed}")
    assert files.find_runs(str(tmp_path)) == {0: {"reflection": str(tmp_path / "reflection-0")},
                                              12: {"uniform": str(tmp_path / "uniform-12")},
                                              "authors": {"empathy": str(tmp_path / "empathy-authors")}}


def test_newest_adapters_takes_the_newest_finished_run_of_each_objective(tmp_path):
    now = time.time()
    finished(tmp_path / "reflection-7", now - 100)
    finished(tmp_path / "reflection-0", now - 10)          # newer, whatever its seed
    finished(tmp_path / "empathy-3", now - 50)
    os.makedirs(tmp_path / "empathy-9" / "adapter")          # unfinished (no summary.json): not a candidate
    assert files.newest_adapters(str(tmp_path), ["empathy", "reflection"]) == [
        str(tmp_path / "empathy-3" / "adapter"), str(tmp_path / "reflection-0" / "adapter")]
    with pytest.raises(InputError, match=r"^no finished 'fluency' run under .*/: run `python emorl.py train fluency` "
                                         r"first, or pass --adapters$"):
        files.newest_adapters(str(tmp_path), ["reflection", "fluency"])


def test_find_runs_in_a_folder_whose_name_is_a_glob_pattern(tmp_path):
    runs = tmp_path / "runs[1]"
    finished(runs / "reflection-0")
    assert files.find_runs(str(runs)) == {0: {"reflection": str(runs / "reflection-0")}}
