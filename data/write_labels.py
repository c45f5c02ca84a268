"""Write the label files of the embedded sample from its columns:  python data/write_labels.py

Every row of data/pair_sample.csv was written to one brief (data/README section of the main README):
the eight responses of a row are eight fixed kinds, so a response's empathy and autonomy labels follow
from its column. This script writes them out as the label files the loaders read (data.load_empathy_labels,
data.load_autonomy_labels), so a real labelled file can replace them without a code change.

kind (column)                                   reflection level   empathy   autonomy
hq1  complex reflection: feeling + content          2 (PAIR)           1         1
hq2  complex reflection of meaning, no feeling      2                  0         1
mq1  simple reflection, the facts restated          1                  0         1
lq1  generic sympathy, nothing of the statement     0                  2         1
lq2  unsolicited advice                             0                  0         0
lq3  closed question                                0                  0         1
lq4  self-disclosure / off-topic                    0                  0         1
lq5  dismissive, minimising                         0                  0         1

Empathy here is the stand-in's reading of EPITOME's "emotional reactions" (expressed warmth, sympathy,
concern), the strongest signal of the paper's bert-empathy classifier: a stock sympathetic phrase earns
it fully, a reflection that names the client's feeling partly, a reflection of facts or meaning not at
all. That is the embedded world's designed trade-off (README, "The embedded default"): the response the
reflection scorer wants most (hq) is not the one the empathy scorer wants most (lq1).
"""
from __future__ import annotations

import csv
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import files  # noqa: E402

EMPATHY = {"hq1": 1, "hq2": 0, "mq1": 0, "lq1": 2, "lq2": 0, "lq3": 0, "lq4": 0, "lq5": 0}
AUTONOMY = {column: 0 if column == "lq2" else 1 for column in data.RESPONSE_COLUMNS}


def label_csv(examples, header, labels) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for example in examples:
        for column in data.RESPONSE_COLUMNS:
            writer.writerow([example.prompt, column, labels[column]])
    return out.getvalue()


def main(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
    examples = data.load_pair(os.path.join(root, data.DEFAULT_DATA))
    files.atomic_write(os.path.join(root, data.DEFAULT_EMPATHY), label_csv(examples, data.EMPATHY_COLUMNS, EMPATHY))
    files.atomic_write(os.path.join(root, data.DEFAULT_AUTONOMY), label_csv(examples, data.AUTONOMY_COLUMNS, AUTONOMY))
    print(f"{len(examples)} prompts: {data.DEFAULT_EMPATHY}, {data.DEFAULT_AUTONOMY}")


if __name__ == "__main__":
    main()
