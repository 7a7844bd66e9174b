"""``drpipe report``: one self-contained HTML page about a dataset and the runs trained on it.

Everything is inside the file — figures as PNG data URIs, the example photos as their stored
JPEG/PNG bytes, the style inline, no script — so it can be mailed, attached to a ticket or
opened offline. No TensorFlow: shards are read with the package's own record reader.

Sections: the preprocessing settings; photos per grade per split (table and chart);
rejections by reason with example files; quality verdicts per split and grade with example
photos per verdict (drpipe/quality_report.py); a grid of processed examples per grade; then for
each run: its settings, training curves, confusion matrix, kappa and per-grade scores.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from drpipe.quality_report import quality_section
from tfrecord_writer.example import parse_example, read_records
from tfrecord_writer.info import has_info, load_info

GRADES = ["0 no DR", "1 mild", "2 moderate", "3 severe", "4 proliferative"]
COLORS = ["#4c78a8", "#72b7b2", "#eeca3b", "#f58518", "#e45756"]


class ReportError(RuntimeError):
    """A one-line reason the report cannot be made."""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _esc(v) -> str:
    return html.escape(str(v))


def _f3(v) -> str:
    """A score as 0.123, or (a file edited by hand) the value itself, escaped."""
    try:
        return f"{float(v):.3f}"
    except (TypeError, ValueError):
        return _esc(v)


def _table(header: list, rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _figure(src: str, caption: str, fig_id: str) -> str:
    return (f'<figure id="{_esc(fig_id)}"><img src="{_esc(src)}" alt="{_esc(caption)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


# ---------------------------------------------------------------- dataset sections


def grade_chart(counts: dict[str, list[int]]) -> str:
    plt = _pyplot()
    splits = list(counts)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    left = np.zeros(len(splits))
    for g in range(5):
        vals = np.array([counts[s][g] for s in splits], float)
        axes[0].barh(splits, vals, left=left, color=COLORS[g], label=GRADES[g])
        left += vals
    axes[0].set_xlabel("photos")
    axes[0].invert_yaxis()
    axes[0].set_title("photos per grade")
    left = np.zeros(len(splits))
    for g in range(5):
        vals = np.array([100 * counts[s][g] / max(sum(counts[s]), 1) for s in splits])
        axes[1].barh(splits, vals, left=left, color=COLORS[g], label=GRADES[g])
        left += vals
    axes[1].set_xlabel("% of the split")
    axes[1].invert_yaxis()
    axes[1].set_xlim(0, 100)
    axes[1].set_title("grade shares (stratified splits look alike)")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    return _png(fig)


def read_manifest(data: Path) -> list[dict]:
    path = data / "data_manifest.csv"
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def rejection_section(manifest: list[dict]) -> str:
    rejected = [r for r in manifest if r.get("status") != "ok"]
    if not manifest:
        return "<p>No data_manifest.csv beside the shards.</p>"
    if not rejected:
        return f"<p>None of the {len(manifest)} photos was rejected.</p>"
    by = defaultdict(list)
    for r in rejected:
        by[r["reason"].split(":")[0]].append(r)
    rows = [[reason, len(rs), "; ".join(f"{r['path']} ({r['reason']})" for r in rs[:3])]
            for reason, rs in sorted(by.items(), key=lambda kv: -len(kv[1]))]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    ax.barh([r[0] for r in rows], [r[1] for r in rows], color="#e45756")
    ax.invert_yaxis()
    ax.set_xlabel("photos")
    ax.set_title(f"{len(rejected)} of {len(manifest)} photos rejected")
    fig.tight_layout()
    return (_figure(_png(fig), "rejected photos by reason", "fig-rejections")
            + _table(["reason", "photos", "examples"], rows))


def examples_by_grade(data: Path, splits: list[str], per_grade: int) -> dict[int, list[dict]]:
    """Up to ``per_grade`` stored records per grade, from the splits in order."""
    found: dict[int, list[dict]] = {g: [] for g in range(5)}
    for split in splits:
        for shard in sorted(data.glob(f"{split}-*-of-*.tfrecord")):
            for rec in read_records(shard):
                ex = parse_example(rec)
                g = int(ex["image/class/label"])
                if len(found[g]) < per_grade:
                    found[g].append(ex)
            if all(len(v) >= per_grade for v in found.values()):
                return found
    return found


def examples_section(examples: dict[int, list[dict]]) -> str:
    rows = []
    for g in range(5):
        cells = []
        for ex in examples[g]:
            fmt = ex["image/format"].decode()
            src = (f"data:image/{'jpeg' if fmt == 'jpeg' else 'png'};base64,"
                   + base64.b64encode(ex["image/encoded"]).decode("ascii"))
            name = ex["image/id"].decode()
            cells.append(f'<div class="ex"><img class="example" src="{src}" alt="{_esc(name)}">'
                         f"<span>{_esc(name)}</span></div>")
        body = "".join(cells) or '<span class="none">no photo of this grade</span>'
        rows.append(f'<div class="grade-row"><h3 style="border-color:{COLORS[g]}">'
                    f"grade {_esc(GRADES[g])}</h3><div class=\"grid\">{body}</div></div>")
    return "".join(rows)


# ---------------------------------------------------------------- run sections


def run_section(run: Path, index: int) -> str:
    from training.fit import plot_history, read_history

    try:
        cfg = json.loads((run / "config.json").read_text())
    except FileNotFoundError:
        raise ReportError(f"{run}: not a drpipe run (no config.json)") from None
    keys = ["model", "task", "image_size", "epochs", "fine_tune_epochs", "batch_size", "lr",
            "optimizer", "balance", "augment", "freeze", "weights", "seed", "data", "min_quality"]
    parts = [f'<h2 id="run-{index}">Run {_esc(run.name)}</h2>',
             _table(["setting", "value"], [[k, cfg.get(k)] for k in keys if k in cfg], "kv")]
    if read_history(run):
        if not (run / "training_curves.png").exists():
            plot_history(run)
        src = "data:image/png;base64," + base64.b64encode(
            (run / "training_curves.png").read_bytes()).decode("ascii")
        parts.append(_figure(src, f"training curves of {run.name}", f"fig-curves-{index}"))
    else:
        parts.append("<p>No training history yet (history.csv).</p>")
    evaluated = sorted(run.glob("metrics-*.json"))
    if (run / "metrics.json").exists():
        evaluated.insert(0, run / "metrics.json")
    if not evaluated:
        parts.append("<p>Not finished: no metrics yet.</p>")
    for path in evaluated:
        m = json.loads(path.read_text())
        parts.append(metrics_block(m, f"{index}-{m.get('split', path.stem)}"))
    return "".join(parts)


def metrics_block(m: dict, fig_id: str) -> str:
    from training.fit import plot_confusion

    buf = io.BytesIO()
    try:  # a hand-edited metrics file: the plot shows what is a number
        kappa = float(m.get("quadratic_kappa"))
    except (TypeError, ValueError):
        kappa = None
    plot_confusion({**m, "quadratic_kappa": kappa}, buf)
    src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    head = (f"<h3>{_esc(m.get('split', ''))} split: n = {_esc(m.get('n'))}, quadratic kappa "
            f"<b>{_f3(m['quadratic_kappa'])}</b>, accuracy {_f3(m['accuracy'])}")
    if "majority_baseline_accuracy" in m:
        head += f" (always the majority grade: {_f3(m['majority_baseline_accuracy'])})"
    if "auc" in m:
        head += (f", AUC {_f3(m['auc'])}, sensitivity {_f3(m['sensitivity'])}, "
                 f"specificity {_f3(m['specificity'])}")
    head += "</h3>"
    out = head + _figure(src, f"confusion matrix, {m.get('split', '')}", f"fig-confusion-{fig_id}")
    pc = m.get("per_class")
    if pc:
        out += _table(["grade", "precision", "recall", "F1", "photos"],
                      [[GRADES[g], _f3(pc['precision'][g]), _f3(pc['recall'][g]),
                        _f3(pc['f1'][g]), pc["support"][g]] for g in range(5)])
    return out


# ---------------------------------------------------------------- the page

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;
background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:18px 28px 60px;background:#fff}
h1{margin:0 0 4px}h2{margin-top:34px;border-bottom:2px solid #ddd;padding-bottom:4px}
.meta{color:#666}
table{border-collapse:collapse;margin:10px 0}td,th{border:1px solid #ddd;padding:3px 9px;
text-align:right}th{background:#f1f1f1}td:first-child,th:first-child{text-align:left}
table.kv td:last-child,table.kv th{text-align:left}
figure{margin:10px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#666;font-size:12px}
.grade-row h3{border-left:6px solid;padding-left:8px;margin:16px 0 6px}
.grid{display:flex;flex-wrap:wrap;gap:6px}.ex{display:flex;flex-direction:column;
align-items:center;font-size:11px;color:#555}.ex img{width:128px;height:128px;
background:#000}.none{color:#999}
nav a{margin-right:14px}
"""


def build(data: str | Path, runs: list[str | Path] = (), per_grade: int = 8,
          example_splits: tuple[str, ...] | None = None) -> str:
    data = Path(data)
    if not has_info(data):
        raise ReportError(f"{data}: no drpipe shards here (no dataset_info.json); give --data")
    info = load_info(data)
    counts: dict[str, list[int]] = info["counts"]
    proc = info["config"]["process"]
    summary = info.get("summary", {})
    manifest = read_manifest(data)

    total = sum(map(sum, counts.values()))
    count_rows = [[s, *c, sum(c), " / ".join(f"{100 * v / max(sum(c), 1):.1f}" for v in c)]
                  for s, c in counts.items()]
    all_c = [sum(c[g] for c in counts.values()) for g in range(5)]
    count_rows.append(["all", *all_c, total,
                       " / ".join(f"{100 * v / max(total, 1):.1f}" for v in all_c)])
    settings = [["size", f"{proc['size']} px"], ["filter", proc["filter"]],
                ["format", f"{proc['format']} (quality {proc.get('quality')})"],
                ["split", ", ".join(f"{k} {v:g}" for k, v in info["config"]["split"].items())],
                ["seed", info["config"].get("seed")], ["source", info["config"].get("src")],
                ["photos in", summary.get("photos", len(manifest))],
                ["stored", f"{summary.get('ok', total)} photos, "
                           f"{summary.get('shard_bytes', 0) / 1e6:.1f} MB of shards"],
                ["drpipe", info.get("drpipe_version")], ["config hash", info.get("config_hash")]]
    splits = list(example_splits or counts)
    examples = examples_by_grade(data, splits, per_grade)
    patients = len({r["patient_id"] for r in manifest if r.get("status") == "ok"})
    reasons = Counter(r["reason"].split(":")[0] for r in manifest if r.get("status") != "ok")

    run_paths = [Path(r) for r in runs]
    nav = ['<a href="#data">data</a>', '<a href="#rejections">rejections</a>',
           '<a href="#quality">quality</a>', '<a href="#examples">examples</a>'] + [
        f'<a href="#run-{i}">{_esc(r.name)}</a>' for i, r in enumerate(run_paths)]
    body = [
        f"<h1>drpipe report: {_esc(data.resolve().name)}</h1>",
        f'<p class="meta">{_esc(data.resolve())} — made {time.strftime("%Y-%m-%d %H:%M")} — '
        f"{total} photos stored"
        + (f" of {patients} patients" if patients else "")
        + (f", {sum(reasons.values())} rejected" if manifest else "") + "</p>",
        "<nav>" + "".join(nav) + "</nav>",
        '<h2 id="data">Data</h2>', _table(["setting", "value"], settings, "kv"),
        _table(["split", *GRADES, "photos", "% per grade"], count_rows),
        _figure(grade_chart(counts), "grade distribution per split", "fig-grades"),
        '<h2 id="rejections">Rejected photos</h2>', rejection_section(manifest),
        f'<h2 id="quality">Quality ({_esc(", ".join(splits))})</h2>',
        quality_section(data, manifest, splits, per_grade, _esc, _table, _figure, _png, _pyplot),
        f'<h2 id="examples">Processed examples per grade ({_esc(", ".join(splits))})</h2>',
        examples_section(examples),
    ]
    for i, run in enumerate(run_paths):
        body.append(run_section(run, i))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>drpipe report: {_esc(data.resolve().name)}</title>"
            f"<style>{STYLE}</style></head><body><main>{''.join(body)}</main></body></html>\n")


def write(page: str, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
