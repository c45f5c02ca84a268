"""data/: PAIR and Psych8k loaders, malformed input -> InputError naming file and line, split, subsample."""
import csv
import json
import os
from collections import Counter

import pytest

import data
from files import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pair_row(i, prompt=None):
    return [prompt or f"client statement {i}, with a comma"] + [f"{c} answer {i}" for c in data.RESPONSE_COLUMNS]


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return str(path)


def test_pair_with_and_without_header(tmp_path):
    rows = [pair_row(i) for i in range(5)]
    rows[2][0] = 'She said "no",\nthen left.'   # quoted comma, quote and newline
    with_header = data.load_pair(write_csv(tmp_path / "h.csv", [list(data.PAIR_COLUMNS)] + rows))
    without = data.load_pair(write_csv(tmp_path / "n.csv", rows))
    assert with_header == without
    assert [e.prompt for e in without] == [r[0] for r in rows]
    assert without[2].prompt == 'She said "no",\nthen left.'
    assert list(without[0].responses) == list(data.RESPONSE_COLUMNS)
    assert without[3].responses["lq4"] == "lq4 answer 3"
    assert set(data.LEVELS) == set(data.RESPONSE_COLUMNS) and data.LEVELS["hq2"] == 2 and data.LEVELS["mq1"] == 1


def test_pair_deduplicates_prompts_keeping_first(tmp_path):
    rows = [pair_row(0), pair_row(1), pair_row(9, prompt=pair_row(0)[0]), pair_row(2)]
    examples = data.load_pair(write_csv(tmp_path / "d.csv", rows))
    assert [e.prompt for e in examples] == [rows[0][0], rows[1][0], rows[3][0]]
    assert examples[0].responses["hq1"] == "hq1 answer 0"


def error_of(loader, path):
    with pytest.raises(InputError) as info:
        loader(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_pair_malformed_rows_name_file_and_line(tmp_path):
    header = list(data.PAIR_COLUMNS)
    good = [pair_row(i) for i in range(3)]
    path = write_csv(tmp_path / "short.csv", [header] + good + [pair_row(3)[:7]])
    assert error_of(data.load_pair, path) == f"{path}:5: expected 9 columns, got 7"
    # a quoted newline makes a record span two lines: the next record's line number must count it
    multi = [pair_row(0, prompt="two\nlines"), pair_row(1) + ["extra"]]
    path = write_csv(tmp_path / "long.csv", multi)
    assert error_of(data.load_pair, path) == f"{path}:3: expected 9 columns, got 10"
    path = write_csv(tmp_path / "empty_prompt.csv", good + [pair_row(5, prompt="  ")])
    assert error_of(data.load_pair, path) == f"{path}:4: column prompt is empty"
    path = write_csv(tmp_path / "all_empty.csv", good + [[], [""] * 9])   # blank line skipped, empty row not
    assert error_of(data.load_pair, path) == f"{path}:5: column prompt is empty"
    blank = pair_row(6)
    blank[5] = ""
    path = write_csv(tmp_path / "empty_response.csv", [blank])
    assert error_of(data.load_pair, path) == f"{path}:1: column lq2 is empty"
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,hq1,hq2,mq1,lq1,lq2,lq3,lq4,lq5\n" + b"caf\xe9,a,b,c,d,e,f,g,h\n")
    assert error_of(data.load_pair, path).startswith(f"{path}:2: not valid UTF-8")
    path = tmp_path / "quote.csv"
    path.write_text("a,b,c,d,e,f,g,h,i\n\"unterminated,b,c,d,e,f,g,h,i\n", encoding="utf-8")
    assert error_of(data.load_pair, path).startswith(f"{path}:2: malformed CSV")


def test_empty_files_are_errors(tmp_path):
    for name, text in [("e.csv", ""), ("w.csv", "\n  \n"), ("e.json", "")]:
        (tmp_path / name).write_text(text)
        assert "empty file" in error_of(data.load_dataset, tmp_path / name)
    header_only = write_csv(tmp_path / "h.csv", [list(data.PAIR_COLUMNS)])
    assert "no data rows" in error_of(data.load_pair, header_only)
    (tmp_path / "l.json").write_text("[ ]")
    assert "empty list" in error_of(data.load_psych8k, tmp_path / "l.json")
    assert "file not found" in error_of(data.load_pair, tmp_path / "missing.csv")
    (tmp_path / "x.txt").write_text("hello")
    assert "unknown dataset format" in error_of(data.load_dataset, tmp_path / "x.txt")


def write_json(path, items):
    path.write_text(json.dumps(items, indent=2), encoding="utf-8")
    return path


def test_psych8k_good_file_and_dispatch(tmp_path):
    items = [{"instruction": "be kind", "input": "I feel low.", "output": "You have been feeling down."},
             {"input": "I can't sleep.", "output": "Nights are hard for you."},
             {"input": "I feel low.", "output": "duplicate, dropped"}]
    path = write_json(tmp_path / "p.json", items)
    examples = data.load_dataset(str(path))
    assert examples == [data.Example("I feel low.", {"output": "You have been feeling down."}),
                        data.Example("I can't sleep.", {"output": "Nights are hard for you."})]
    assert data.load_dataset(write_csv(tmp_path / "p.csv", [pair_row(0)]))[0].prompt == pair_row(0)[0]


def test_psych8k_malformed_items_name_file_and_line(tmp_path):
    good = {"input": "a", "output": "b"}
    # json.dumps(indent=2): item k of the list starts on line 2 + 4 * k for 2-field objects
    cases = [([good, {"input": "a2"}], ":6: missing field 'output'"),
             ([good, good, {"input": 3, "output": "x"}], ":10: field 'input' must be a string, got int"),
             ([good, {"input": "  ", "output": "x"}], ":6: field 'input' is empty"),
             ([good, ["input", "output"]], ":6: expected an object"),
             ({"input": "a", "output": "b"}, ":1: expected a JSON list")]
    for k, (items, expected) in enumerate(cases):
        path = write_json(tmp_path / f"bad{k}.json", items)
        assert error_of(data.load_psych8k, path).startswith(f"{path}{expected}")
    for k, (text, line) in enumerate([('[\n{"input": "a", "output": "b"},\n{"input": "a" "output": "b"}\n]', 3),
                                      ('[\n{"input": "a", "output": "b"},\n]', 3),
                                      ('[\n{"input": "a", "output": "b"}\n', 3),
                                      ('[{"input": "a", "output": "b"}] []', 1)]):
        path = tmp_path / f"syntax{k}.json"
        path.write_text(text)
        assert error_of(data.load_psych8k, path).startswith(f"{path}:{line}: malformed JSON")
    path = tmp_path / "bytes.json"
    path.write_bytes(b'[\n{"input": "a", "output": "b"},\n{"input": "\xff", "output": "b"}\n]')
    assert error_of(data.load_psych8k, path).startswith(f"{path}:3: not valid UTF-8")


def examples_n(n):
    return [data.Example(f"p{i}", {"output": str(i)}) for i in range(n)]


def test_split_is_seeded_disjoint_and_complete():
    examples = examples_n(100)
    split = data.split_dataset(examples, seed=0)
    assert [len(split[k]) for k in ("train", "aggregation", "inference")] == [80, 10, 10]
    prompts = [e.prompt for part in split.values() for e in part]
    assert sorted(prompts) == sorted(e.prompt for e in examples)   # disjoint and covers all
    assert split == data.split_dataset(list(examples), seed=0)
    assert split["train"] != data.split_dataset(examples, seed=1)["train"]
    assert [e.prompt for e in split["train"]] != [e.prompt for e in examples[:80]]   # shuffled
    sizes = {n: [len(p) for p in data.split_dataset(examples_n(n), 3).values()] for n in (7, 13, 2544)}
    assert all(sum(s) == n for n, s in sizes.items()) and sizes[2544] == [2035, 255, 254]
    with pytest.raises(InputError):
        data.split_dataset(examples, 0, fractions=(0.8, 0.3, 0.1))


def test_subsample_and_policy_input():
    examples = examples_n(50)
    sample = data.subsample(examples, 0.1, seed=4)
    assert len(sample) == 5 and sample == data.subsample(examples, 0.1, seed=4)
    assert sample != data.subsample(examples, 0.1, seed=5)
    assert [examples.index(e) for e in sample] == sorted(examples.index(e) for e in sample)
    assert data.subsample(examples, 1.0, seed=0) == examples
    assert len(data.subsample(examples, 0.001, seed=0)) == 1
    with pytest.raises(InputError):
        data.subsample(examples, 0.0, seed=0)
    assert data.policy_input("I am tired.") == "I am tired. [SEP] "


def test_empathy_labels_join_and_errors(tmp_path):
    pair = write_csv(tmp_path / "pair.csv", [pair_row(i) for i in range(2)])
    labels = [list(data.EMPATHY_COLUMNS), [pair_row(1)[0], "hq2", "2"], [pair_row(0)[0], "lq5", "0"]]
    got = data.load_empathy_labels(write_csv(tmp_path / "emp.csv", labels), pair)
    assert got == [(pair_row(1)[0], "hq2 answer 1", 2), (pair_row(0)[0], "lq5 answer 0", 0)]
    for k, (bad, message) in enumerate([(["nobody said this", "hq1", "1"], ":3: prompt not found"),
                                        ([pair_row(0)[0], "hq3", "1"], ":3: unknown column 'hq3'"),
                                        ([pair_row(0)[0], "mq1", "3"], ":3: empathy must be 0, 1 or 2"),
                                        ([pair_row(0)[0], "mq1"], ":3: expected 3 columns, got 2")]):
        path = write_csv(tmp_path / f"bad{k}.csv", labels[:2] + [bad])
        with pytest.raises(InputError) as info:
            data.load_empathy_labels(path, pair)
        assert str(info.value).startswith(f"{path}{message}")


# ----------------------------------------------------------------------------- shipped sample
SAMPLE = os.path.join(ROOT, data.DEFAULT_DATA)
EMPATHY = os.path.join(ROOT, data.DEFAULT_EMPATHY)
AUTONOMY = os.path.join(ROOT, data.DEFAULT_AUTONOMY)
PSYCH8K = os.path.join(ROOT, data.PSYCH8K_SAMPLE)


def test_shipped_pair_sample_is_complete():
    with open(SAMPLE, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    examples = data.load_pair(SAMPLE)
    assert len(examples) >= 200 and len(examples) == len(rows) - (rows[0] == list(data.PAIR_COLUMNS))
    for e in examples:
        assert all(e.responses[c] for c in data.RESPONSE_COLUMNS) and len(set(e.responses.values())) == 8


def test_shipped_empathy_labels_cover_every_response():
    labels = data.load_empathy_labels(EMPATHY, SAMPLE)
    covered = Counter((prompt, text) for prompt, text, _ in labels)
    expected = {(e.prompt, e.responses[c]) for e in data.load_pair(SAMPLE) for c in data.RESPONSE_COLUMNS}
    assert set(covered) == expected and max(covered.values()) == 1
    assert {label for _, _, label in labels} == {0, 1, 2}


def test_shipped_autonomy_labels_cover_every_response(tmp_path):
    labels = data.load_autonomy_labels(AUTONOMY, SAMPLE)
    assert [(p, t) for p, t, _ in labels] == [(p, t) for p, t, _ in data.load_empathy_labels(EMPATHY, SAMPLE)]
    by_text = {text: label for _, text, label in labels}
    assert {label for _, _, label in labels} == {0, 1}
    examples = data.load_pair(SAMPLE)
    assert all(by_text[e.responses[c]] == 1 for e in examples for c in ("hq1", "hq2", "mq1"))  # reflections give no advice
    assert all(by_text[e.responses["lq2"]] == 0 for e in examples)                          # the advice kind
    assert all(by_text[e.responses["lq3"]] == 1 for e in examples)                          # a poor response, but no advice
    bad = write_csv(tmp_path / "bad.csv", [list(data.AUTONOMY_COLUMNS), [examples[0].prompt, "hq1", "2"]])
    with pytest.raises(InputError, match=r"bad.csv:2: autonomy must be 0 or 1, got '2'"):
        data.load_autonomy_labels(bad, SAMPLE)


def test_shipped_psych8k_sample_loads():
    examples = data.load_psych8k(PSYCH8K)
    assert len(examples) >= 60 and all(e.prompt and e.responses["output"] for e in examples)


def test_shipped_label_files_are_the_kinds_of_the_columns():
    """data/write_labels.py writes both label files from the columns' kinds: the committed files are its output."""
    from data import write_labels
    examples = data.load_pair(SAMPLE)
    for path, header, labels in ((EMPATHY, data.EMPATHY_COLUMNS, write_labels.EMPATHY),
                                 (AUTONOMY, data.AUTONOMY_COLUMNS, write_labels.AUTONOMY)):
        with open(path, encoding="utf-8", newline="") as f:
            assert f.read() == write_labels.label_csv(examples, header, labels), path
    assert write_labels.EMPATHY["lq1"] > write_labels.EMPATHY["hq1"] > write_labels.EMPATHY["hq2"]  # the designed trade-off
