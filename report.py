"""The Pareto view of a weight search and its picture (SPEC §8; paper Figure 5).

- `pareto_front`, `hypervolume`: the non-dominated per-objective score vectors of every evaluated
  weight vector (maximisation) and the exact volume they dominate above a reference point.
- `pareto_report`, `format_report`, `format_evaluation`: what `search.py` stores in search.json and prints.
- `spearman`, `curves_svg`, `fronts_svg`: compare.py's objective relationships (MORL-P §2.2), Figure 3
  (validation reward vs data points, seeds shaded) and the methods' points in every pair of objectives.
- `claims`: reproduce's verdicts on the paper's claims, each computed from the measured tables (compare.py).
- `search_svg`: Figure 5 without a plotting library, for any d >= 2 — one panel per iteration of
  Algorithm 1, w1 on the x axis, w2 on the y axis, one slice per value of (w3..wd) (d = 2: one slice;
  d = 3: a row of three, one per w3 value; d = 4: a 3x3 block, columns w3, rows w4; d = 5: 9 rows of
  three), colour = mean reward, the sub-cube chosen for the next iteration outlined in red (not after
  the last iteration), the best weights ringed in red and their mean marked on the colour bar.

Deviations from the paper / public code:
- The paper draws Figure 5 with matplotlib as one 3-D scatter per iteration (d = 3); here each panel
  is a block of 2-D small multiples (one per value of w3..wd), drawn over that iteration's own bounds,
  so the same picture works for d = 2 and d >= 4.
- The Pareto front and hypervolume are not in the paper (SPEC §8, beyond the paper).
"""
from __future__ import annotations

import itertools
import math
import statistics
from xml.sax.saxutils import escape

import files


# ----------------------------------------------------------------------------- Pareto
def dominates(a, b) -> bool:
    """a dominates b (maximisation): no worse in every objective, better in one."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(points) -> list[int]:
    """Indices (in input order) of the non-dominated points. Equal points do not dominate each
    other, so duplicates on the front are all kept."""
    points = [tuple(float(x) for x in p) for p in points]
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def hypervolume(front, reference=0.0) -> float:
    """Exact volume dominated by `front` (maximisation) and bounded below by `reference` (a number
    or one per objective). Slicing along the last objective: the slab between two consecutive
    distinct values is the (d−1)-dimensional hypervolume of the points above it times its height;
    for d = 2 this is the usual sweep. O(n^d), fine for the small fronts of a grid search."""
    points = [tuple(float(x) for x in p) for p in front]
    if not points:
        return 0.0
    d = len(points[0])
    ref = tuple(float(reference) for _ in range(d)) if isinstance(reference, (int, float)) else tuple(map(float, reference))
    # A point not strictly above the reference in every objective dominates no volume.
    return _hypervolume([p for p in points if all(x > r for x, r in zip(p, ref))], ref)


def _hypervolume(points, ref) -> float:
    if not points:
        return 0.0
    if len(ref) == 1:
        return max(p[0] for p in points) - ref[0]
    points = sorted(points, key=lambda p: p[-1], reverse=True)
    volume = 0.0
    for i, p in enumerate(points):
        below = points[i + 1][-1] if i + 1 < len(points) else ref[-1]
        if p[-1] > below:  # slab (below, p[-1]] is dominated exactly by points[:i+1]
            volume += (p[-1] - below) * _hypervolume([q[:-1] for q in points[: i + 1]], ref[:-1])
    return volume


def pareto_report(records, names) -> dict:
    """Non-dominated set of the evaluated records ({weights, direction, scores, mean}) and its
    hypervolume with reference point 0."""
    front = pareto_front([r["scores"] for r in records])
    chosen = [records[i] for i in front]
    return {
        "objectives": list(names),
        "front": [{k: r[k] for k in ("weights", "direction", "scores", "mean")} for r in chosen],
        "hypervolume": hypervolume([r["scores"] for r in chosen], 0.0),
        "reference": 0.0,
    }


def format_report(report) -> str:
    names = report["objectives"]
    lines = [f"Pareto front: {len(report['front'])} non-dominated weight vectors "
             f"| hypervolume {report['hypervolume']:.4f} (reference 0)"]
    for r in sorted(report["front"], key=lambda r: -r["mean"]):
        weights = ",".join(f"{w:.3f}" for w in r["weights"])
        scores = " ".join(f"{n} {s:.3f}" for n, s in zip(names, r["scores"]))
        lines.append(f"  w=({weights}) | {scores} | mean {r['mean']:.3f}")
    return "\n".join(lines)


def format_evaluation(n, total, record, names) -> str:
    """The log line of one evaluation of the grid search."""
    weights = ",".join(f"{w:.3f}" for w in record["weights"])
    scores = " ".join(f"{name} {s:.3f}" for name, s in zip(names, record["scores"]))
    return f"eval {n}/{total} | w=({weights}) | {scores} | mean {record['mean']:.3f} | {record['seconds']:.1f}s"


# ----------------------------------------------------------------------------- Figure 5 as SVG
_COLORMAP = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]  # viridis anchors


def colour(value, low, high) -> str:
    """Piecewise-linear viridis; None (w = 0, never decoded) is grey."""
    if value is None:
        return "#bbbbbb"
    t = 0.5 if high <= low else min(max((value - low) / (high - low), 0.0), 1.0)
    i = min(int(t * (len(_COLORMAP) - 1)), len(_COLORMAP) - 2)
    f = t * (len(_COLORMAP) - 1) - i
    r, g, b = (round(a + (c - a) * f) for a, c in zip(_COLORMAP[i], _COLORMAP[i + 1]))
    return f"#{r:02x}{g:02x}{b:02x}"


def best_point(iterations):
    """(row, point index) of Algorithm 1's best_weights in the history: per iteration the first maximal
    mean (Alg. 1, line 10), kept only if strictly better than the best so far (lines 11-14). None if
    nothing was decoded."""
    best, best_mean = None, -math.inf
    for row, it in enumerate(iterations):
        means = [-math.inf if m is None else m for m in it["means"]]
        i = means.index(max(means))
        if means[i] > best_mean:
            best, best_mean = (row, i), means[i]
    return best


def slice_grid(d):
    """Where each slice (one value per axis w3..wd) goes in an iteration's block: (sub-row, column)
    with column = the w3 value (lo, mid, hi) and sub-row = the values of w4..wd, lexicographic.
    d = 2: one slice; d = 3: one row of three; d = 4: a 3x3 block; d = 5: 9 rows of three."""
    if d == 2:
        return {(): (0, 0)}
    return {index: (sum(i * 3 ** k for k, i in enumerate(reversed(index[1:]))), index[0])
            for index in itertools.product(range(3), repeat=d - 2)}


def search_svg(iterations, names, size=150, gap=46) -> str:
    """Figure 5 from `hierarchical_grid_search(...)["iterations"]`, for any d >= 2: a block per iteration
    (class "panel"), in it one slice per value of (w3..wd) (see slice_grid), each a 3x3 grid of w1 (x) by
    w2 (y) over that iteration's bounds; one circle (class "point") per grid point, colour = mean reward;
    the sub-cube chosen for the next iteration outlined (class "chosen", none after the last iteration);
    Algorithm 1's best point ringed (class "best") and its mean marked on the colour bar."""
    d = len(iterations[0]["bounds"])
    if d < 2 or len(names) != d:
        raise files.InputError(f"search figure: needs d >= 2 objectives and one name per weight, got d={d}, names {list(names)}")
    means = [m for it in iterations for m in it["means"] if m is not None]
    low, high = (min(means), max(means)) if means else (0.0, 1.0)
    layout = slice_grid(d)
    columns, sub_rows = min(3, len(layout)), max(r for r, _ in layout.values()) + 1
    row_gap = max(gap, 22 + 12 * (d - 2))                # room for the tick labels and a title line per w3..wd
    block = sub_rows * (size + row_gap) + 12
    margin = gap + 28                                      # the iteration label and the y tick labels
    width = max(margin + columns * (size + gap) + 90, 640)   # at least the width of the title
    height = 44 + len(iterations) * block
    rest_names = ", ".join(escape(n) for n in names[2:])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="10">',
           f'<text x="{gap}" y="16" font-size="12">Hierarchical grid search (Algorithm 1): '
           f'x = {escape(names[0])}, y = {escape(names[1])}, colour = mean reward</text>',
           f'<text x="{gap}" y="30">' + (f'one slice per value of ({rest_names}) in each iteration; ' if d > 2 else '')
           + 'red dashed box: region searched next; red ring: best weights</text>']
    best = best_point(iterations)
    for row, it in enumerate(iterations):
        top = 44 + row_gap - 22 + row * block   # the first slice's top; its title lines sit above it
        out.append(f'<g class="panel" id="iteration-{it["iteration"]}">')
        if row:  # a rule between iterations: with d >= 4 an iteration is a block of several rows of slices
            out.append(f'<line x1="4" x2="{width - 100}" y1="{top - row_gap + 12}" y2="{top - row_gap + 12}" stroke="#ccc"/>')
        centre = top + (block - row_gap) / 2
        out.append(f'<text x="14" y="{centre}" text-anchor="middle" transform="rotate(-90 14 {centre})">iteration {it["iteration"]}</text>')
        axes = [(lo, (lo + hi) / 2, hi) for lo, hi in it["bounds"][2:]]
        last = row == len(iterations) - 1
        for index, (sub_row, col) in layout.items():
            rest = tuple(axis[i] for axis, i in zip(axes, index))
            out.append(_subpanel(it, rest, margin + col * (size + gap), top + sub_row * (size + row_gap), size, low, high,
                                 names, None if last else it.get("next_bounds"), best[1] if best and best[0] == row else None))
        out.append("</g>")
    out.append(_colourbar(width - 70, 44, low, high, max(means) if means else None))
    out.append("</svg>")
    return "\n".join(out)


def _subpanel(it, rest, left, top, size, low, high, names, chosen, best) -> str:
    """One slice: w1 x w2 at the given values `rest` of w3..wd; `chosen`: next bounds to outline or
    None; `best`: index in it["points"] of the best point (ringed if it lies in this slice) or None."""
    (x0, x1), (y0, y1) = it["bounds"][0], it["bounds"][1]
    pad = 14

    def x(v):
        return left + pad + (v - x0) / (x1 - x0) * (size - 2 * pad)

    def y(v):
        return top + size - pad - (v - y0) / (y1 - y0) * (size - 2 * pad)

    parts = ['<g class="slice">', f'<rect x="{left}" y="{top}" width="{size}" height="{size}" fill="none" stroke="#888"/>']
    for line, (name, value) in enumerate(reversed(list(zip(names[2:], rest)))):  # w3 on top, wd nearest the slice
        parts.append(f'<text class="title" x="{left + size / 2}" y="{top - 4 - 12 * line}" text-anchor="middle">'
                     f'{escape(name)} = {value:.4g}</text>')
    for v in (x0, (x0 + x1) / 2, x1):
        parts.append(f'<text x="{x(v):.1f}" y="{top + size + 11}" text-anchor="middle">{v:.4g}</text>')
    for v in (y0, (y0 + y1) / 2, y1):
        parts.append(f'<text x="{left - 2}" y="{y(v) + 3:.1f}" text-anchor="end">{v:.4g}</text>')
    if chosen and all(lo <= r <= hi for r, (lo, hi) in zip(rest, chosen[2:])):
        (cx0, cx1), (cy0, cy1) = chosen[0], chosen[1]
        parts.append(f'<rect class="chosen" x="{x(cx0) - 6:.1f}" y="{y(cy1) - 6:.1f}" width="{x(cx1) - x(cx0) + 12:.1f}" '
                     f'height="{y(cy0) - y(cy1) + 12:.1f}" fill="none" stroke="red" stroke-width="1.5" stroke-dasharray="4 2"/>')
    for i, (point, mean) in enumerate(zip(it["points"], it["means"])):
        if tuple(point[2:]) != tuple(rest):
            continue
        label = "w=(" + ",".join(f"{w:.4g}" for w in point) + ") " + ("not decoded (w = 0)" if mean is None else f"mean {mean:.4f}")
        parts.append(f'<circle class="point" cx="{x(point[0]):.1f}" cy="{y(point[1]):.1f}" r="7" fill="{colour(mean, low, high)}" '
                     f'stroke="#333" stroke-width="0.5"><title>{escape(label)}</title></circle>')
        if i == best:
            parts.append(f'<circle class="best" cx="{x(point[0]):.1f}" cy="{y(point[1]):.1f}" r="11" fill="none" stroke="red" '
                         f'stroke-width="2"><title>best weights: {escape(label)}</title></circle>')
    parts.append("</g>")
    return "\n".join(parts)


def _colourbar(left, top, low, high, best, height=150, steps=20) -> str:
    parts = ['<g class="legend">', f'<text x="{left}" y="{top - 4}">mean reward</text>']
    for k in range(steps):
        value = high - (high - low) * (k + 0.5) / steps
        parts.append(f'<rect x="{left}" y="{top + k * height / steps:.1f}" width="14" height="{height / steps + 0.5:.1f}" fill="{colour(value, low, high)}"/>')
    parts.append(f'<text x="{left + 18}" y="{top + 8}">{high:.3f}</text>')
    parts.append(f'<text x="{left + 18}" y="{top + height}">{low:.3f}</text>')
    if best is not None and math.isfinite(best):  # the paper's red line: the best mean reward
        yb = top + (0.0 if high <= low else (high - best) / (high - low)) * height
        parts.append(f'<line x1="{left - 3}" x2="{left + 17}" y1="{yb:.1f}" y2="{yb:.1f}" stroke="red" stroke-width="2"/>')
    parts.append("</g>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- objective relationships (compare.py)
def ranks(values) -> list[float]:
    """Ranks 1..n, ties given their average rank (Spearman's convention)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out, i = [0.0] * len(values), 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x, y) -> float | None:
    """Spearman's ρ: the Pearson correlation of the ranks; None when one side is constant."""
    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


# ----------------------------------------------------------------------------- the paper's claims (compare.py's reproduce)
LABELS = {"base": "base", "uniform": "Uniform", "dynaopt": "DynaOpt", "param": "Model Soups (param)",
          "logit": "EMORL logit", "hidden": "EMORL hidden"}


def average(rows, column="average") -> float:
    return statistics.fmean(r[column] for r in rows)


def verdict(holds) -> str:
    return "reproduced" if holds else "not reproduced"


def claims(t2: dict[str, dict], cost: dict, names, share=0.15) -> list[tuple[str, str, str, str]]:
    """(claim, the paper's number, measured here, verdict) for each of the paper's claims this run can test;
    t2 = {protocol: {label: rows}}. The verdict is computed: reproduced, not reproduced, or not measured."""
    out = []
    for protocol, rows in t2.items():
        h, p, u, dy, b = (average(rows[LABELS[k]]) for k in ("hidden", "param", "uniform", "dynaopt", "base"))
        div = {k: average(rows[LABELS[k]], "diversity-2") for k in ("hidden", "param", "uniform", "dynaopt")}
        out += [(f"Table 2 ({protocol} protocol): EMORL hidden outperforms Model Soups on the average",
                 "0.7907 vs 0.6982", f"{h:.4f} vs {p:.4f}", verdict(h > p)),
                (f"Table 2 ({protocol} protocol): EMORL is comparable to Uniform and DynaOpt (within 0.05 of each)",
                 "0.7907 vs 0.8397 / 0.8254", f"{h:.4f} vs {u:.4f} / {dy:.4f}", verdict(h >= max(u, dy) - 0.05)),
                (f"Table 2 ({protocol} protocol): every multi-objective method improves on the base model",
                 "base 0.33, others >= 0.70", f"base {b:.4f}, others {min(h, p, u, dy):.4f} to {max(h, p, u, dy):.4f}",
                 verdict(min(h, p, u, dy) > b)),
                (f"Table 1 ({protocol} protocol): EMORL has the highest diversity-2 of the fine-tuned models",
                 "> 0.65 vs 0.35-0.43", ", ".join(f"{LABELS[k]} {v:.3f}" for k, v in div.items()),
                 verdict(div["hidden"] > max(v for k, v in div.items() if k != "hidden")))]
    data = {m: [r["data points"] for r in runs] for m, runs in cost.items()}
    mean = {m: statistics.fmean(v) for m, v in data.items()}
    std = {m: statistics.pstdev(v) for m, v in data.items()}
    unconverged = [LABELS.get(m, m) for m, runs in cost.items() if not all(r["converged"] for r in runs)]
    why = f"runs of {', '.join(unconverged)} stopped at --max-steps, not by the CV rule"
    worst = max(names, key=mean.get)
    measured = [(f"slowest objective ({worst}) {mean[worst]:,.0f} vs Uniform {mean['uniform']:,.0f} / DynaOpt "
                 f"{mean['dynaopt']:,.0f}", mean[worst] < min(mean["uniform"], mean["dynaopt"])),
                (f"{mean['EMORL (Eq. 3)']:,.0f} vs {mean['uniform']:,.0f} / {mean['dynaopt']:,.0f}",
                 mean["EMORL (Eq. 3)"] < min(mean["uniform"], mean["dynaopt"])),
                (f"± {std['EMORL (Eq. 3)']:,.0f} vs ± {std['uniform']:,.0f} / ± {std['dynaopt']:,.0f}",
                 None if len(data["uniform"]) < 2 else std["EMORL (Eq. 3)"] < min(std["uniform"], std["dynaopt"]))]
    for (claim, paper), (text, holds) in zip(
            [("Table 3 / Figure 3: every single-objective run converges with less data than Uniform and DynaOpt",
              "4,809-13,209 vs 23,398 / 31,328"), ("Table 1: EMORL (Eq. 3) needs less data than Uniform and DynaOpt",
                                                   "17,529 vs 23,398 / 31,328"),
             ("Table 1: EMORL's data consumption is more stable over seeds than Uniform's and DynaOpt's",
              "± 1,650 vs ± 7,390 / ± 16,736")], measured):
        out.append((claim, paper, why if unconverged else text + ("" if holds is not None else " (one seed)"),
                    "not measured" if unconverged or holds is None else verdict(holds)))
    weights = [r["weights"] for r in cost["EMORL (Eq. 3)"]]
    mixed = [sum(w >= share * sum(ws) for w in ws) >= 2 for ws in weights]
    out.append((f"Figure 5 / §6 explainability: the searched weights mix the adapters (>= 2 with >= {share:.0%} of Σw)",
                "(0.8, 0.5, 0.05)", f"{sum(mixed)}/{len(mixed)} seeds: " +
                "; ".join("(" + ", ".join(f"{w:.3g}" for w in ws) + ")" for ws in weights), verdict(all(mixed))))
    return out


# ----------------------------------------------------------------------------- Figure 3 and the fronts (compare.py)
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _axes(left, top, width, height, x_range, y_range, x_label, y_label):
    """An empty plot frame with 3 ticks per axis; returns (svg parts, x(v), y(v))."""
    (x0, x1), (y0, y1) = x_range, y_range
    x1, y1 = (x1 if x1 > x0 else x0 + 1.0), (y1 if y1 > y0 else y0 + 1.0)

    def x(v):
        return left + (v - x0) / (x1 - x0) * width

    def y(v):
        return top + height - (v - y0) / (y1 - y0) * height

    parts = [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#888"/>',
             f'<text x="{left + width / 2}" y="{top + height + 28}" text-anchor="middle">{escape(x_label)}</text>',
             f'<text x="{left - 38}" y="{top + height / 2}" text-anchor="middle" '
             f'transform="rotate(-90 {left - 38} {top + height / 2})">{escape(y_label)}</text>']
    for k in range(3):
        vx, vy = x0 + (x1 - x0) * k / 2, y0 + (y1 - y0) * k / 2
        parts.append(f'<text x="{x(vx):.1f}" y="{top + height + 13}" text-anchor="middle">{vx:.4g}</text>')
        parts.append(f'<text x="{left - 4}" y="{y(vy) + 3:.1f}" text-anchor="end">{vy:.3g}</text>')
    return parts, x, y


def _legend(labels, left, top) -> list[str]:
    return [f'<g class="legend"><rect x="{left}" y="{top + 14 * i - 8}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
            f'<text x="{left + 14}" y="{top + 14 * i + 1}">{escape(label)}</text></g>' for i, label in enumerate(labels)]


def curves_svg(curves: dict, title="Validation reward vs data points (Figure 3)", width=560, height=300) -> str:
    """Figure 3: for each method (class "curve"), its seeds' validation curves {seed: [(data points, reward)]}
    as the mean over the seeds that reached each x (line) and their min..max (shaded band)."""
    points = [p for runs in curves.values() for curve in runs.values() for p in curve]
    if not points:
        raise files.InputError("Figure 3: no validation records to draw")
    x_range = (min(p[0] for p in points), max(p[0] for p in points))
    y_range = (min(p[1] for p in points), max(p[1] for p in points))
    left, top = 70, 40
    parts, x, y = _axes(left, top, width, height, x_range, y_range, "data points", "validation reward")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 190}" height="{top + height + 50}" '
           f'font-family="sans-serif" font-size="10">', f'<text x="{left}" y="20" font-size="12">{escape(title)}</text>', *parts]
    for i, (method, runs) in enumerate(curves.items()):
        colour_ = PALETTE[i % len(PALETTE)]
        xs = sorted({p[0] for curve in runs.values() for p in curve})
        at = [[dict(curve)[v] for curve in runs.values() if v in dict(curve)] for v in xs]
        band = [(v, min(values), max(values)) for v, values in zip(xs, at)]
        polygon = [f"{x(v):.1f},{y(hi):.1f}" for v, _, hi in band] + [f"{x(v):.1f},{y(lo):.1f}" for v, lo, _ in reversed(band)]
        line = " ".join(f"{x(v):.1f},{y(sum(values) / len(values)):.1f}" for v, values in zip(xs, at))
        out.append(f'<g class="curve" id="{escape(method)}"><polygon points="{" ".join(polygon)}" fill="{colour_}" '
                   f'fill-opacity="0.2" stroke="none"/><polyline points="{line}" fill="none" stroke="{colour_}" '
                   f'stroke-width="1.5"><title>{escape(method)} ({len(runs)} seeds)</title></polyline></g>')
    out += _legend([f"{m} ({len(r)} seeds)" for m, r in curves.items()], left + width + 16, top + 8)
    out.append("</svg>")
    return "\n".join(out)


def fronts_svg(fronts: dict, names, base=None, size=220, gap=70) -> str:
    """The methods' points (class "point", one colour per method; fronts = {method: [score vectors]})
    in every pairwise projection of the objectives (one panel per pair), the base model as a black cross."""
    pairs = list(itertools.combinations(range(len(names)), 2))
    every = [p for points in fronts.values() for p in points] + ([base] if base else [])
    if not pairs or not every:
        raise files.InputError("fronts figure: needs >= 2 objectives and at least one point")
    left, top = 60, 40
    width = left + len(pairs) * (size + gap) + 200
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + size + 50}" font-family="sans-serif" '
           f'font-size="10">', f'<text x="{left}" y="20" font-size="12">Points per preference, every pair of objectives '
           '(mean over seeds); black cross: base model</text>']
    for k, (a, b) in enumerate(pairs):
        x_range = (min(p[a] for p in every), max(p[a] for p in every))
        y_range = (min(p[b] for p in every), max(p[b] for p in every))
        parts, x, y = _axes(left + k * (size + gap), top, size, size, x_range, y_range, names[a], names[b])
        out += ['<g class="panel">', *parts]
        for i, (method, points) in enumerate(fronts.items()):
            out += [f'<circle class="point" cx="{x(p[a]):.1f}" cy="{y(p[b]):.1f}" r="3.5" fill="{PALETTE[i % len(PALETTE)]}" '
                    f'fill-opacity="0.8"><title>{escape(method)}: {escape(", ".join(f"{v:.3f}" for v in p))}</title></circle>'
                    for p in points]
        if base:
            cx, cy = x(base[a]), y(base[b])
            out.append(f'<path class="base" d="M{cx - 5:.1f},{cy - 5:.1f}L{cx + 5:.1f},{cy + 5:.1f}M{cx - 5:.1f},{cy + 5:.1f}'
                       f'L{cx + 5:.1f},{cy - 5:.1f}" stroke="black" stroke-width="1.5"/>')
        out.append("</g>")
    out += _legend(list(fronts), left + len(pairs) * (size + gap), top + 8)
    out.append("</svg>")
    return "\n".join(out)
