"""``drpipe report``: one self-contained HTML page about a dataset and the runs trained on it.

Everything is inside the file — figures as PNG data URIs, the example photos as their stored
JPEG/PNG bytes, the style inline, no script — so it can be mailed, attached to a ticket or
opened offline. No TensorFlow: shards are read with the package's own record reader.

Sections: the preprocessing settings; photos per grade per split (table and chart);
rejections by reason with example files; quality verdicts per split and grade with example
photos per verdict (reporting/quality.py); a grid of processed examples per grade; then for
each run: its settings, training curves, confusion matrix, kappa and per-grade scores.

    make_report(data, runs, out)  # what drpipe report does: infer data, build, write
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from reporting.page import esc as _esc
from reporting.page import example_row, f3, figure, stored_examples, table
from reporting.plots import (
    COLORS,
    GRADES,
    data_uri,
    grade_chart,
    plot_confusion,
    plot_history,
    read_history,
    rejection_chart,
)
from reporting.quality import quality_section
from tfrecord_writer.info import has_info, load_info
from tfrecord_writer.writer import atomic_write_bytes
from training import runs as run_dirs


class ReportError(RuntimeError):
    """A one-line reason the report cannot be made."""


class NoShards(ReportError):
    """The data directory holds no drpipe output (a missing input, not a failed run)."""


def no_shards(data) -> NoShards:
    return NoShards(f"{data}: no drpipe shards here (no dataset_info.json); give --data")


# ---------------------------------------------------------------- dataset sections


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
    chart = rejection_chart([(r[0], r[1]) for r in rows], len(rejected), len(manifest))
    return (figure(chart, "rejected photos by reason", "fig-rejections")
            + table(["reason", "photos", "examples"], rows))


def examples_by_grade(data: Path, splits: list[str], per_grade: int) -> dict[int, list[dict]]:
    """Up to ``per_grade`` stored records per grade, from the splits in order."""
    return stored_examples(data, splits, range(5), lambda ex: int(ex["image/class/label"]),
                           per_grade)


def examples_section(examples: dict[int, list[dict]]) -> str:
    return "".join(example_row(f"grade {_esc(GRADES[g])}", COLORS[g], examples[g], "example",
                               "no photo of this grade") for g in range(5))


# ---------------------------------------------------------------- run sections


def run_section(run: Path, index: int) -> str:
    try:
        cfg = run_dirs.read_config(run)
    except run_dirs.RunError as e:
        raise ReportError(str(e)) from None
    keys = ["model", "task", "image_size", "epochs", "fine_tune_epochs", "batch_size", "lr",
            "optimizer", "balance", "augment", "freeze", "weights", "seed", "data", "min_quality"]
    parts = [f'<h2 id="run-{index}">Run {_esc(run.name)}</h2>',
             table(["setting", "value"], [[k, cfg.get(k)] for k in keys if k in cfg], "kv")]
    if read_history(run):
        if not (run / "training_curves.png").exists():
            plot_history(run)
        src = data_uri((run / "training_curves.png").read_bytes(), "png")
        parts.append(figure(src, f"training curves of {run.name}", f"fig-curves-{index}"))
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
    buf = io.BytesIO()
    try:  # a hand-edited metrics file: the plot shows what is a number
        kappa = float(m.get("quadratic_kappa"))
    except (TypeError, ValueError):
        kappa = None
    plot_confusion({**m, "quadratic_kappa": kappa}, buf)
    src = data_uri(buf.getvalue(), "png")
    head = (f"<h3>{_esc(m.get('split', ''))} split: n = {_esc(m.get('n'))}, quadratic kappa "
            f"<b>{f3(m['quadratic_kappa'])}</b>, accuracy {f3(m['accuracy'])}")
    if "majority_baseline_accuracy" in m:
        head += f" (always the majority grade: {f3(m['majority_baseline_accuracy'])})"
    if "auc" in m:
        head += (f", AUC {f3(m['auc'])}, sensitivity {f3(m['sensitivity'])}, "
                 f"specificity {f3(m['specificity'])}")
    head += "</h3>"
    out = head + figure(src, f"confusion matrix, {m.get('split', '')}", f"fig-confusion-{fig_id}")
    pc = m.get("per_class")
    if pc:
        out += table(["grade", "precision", "recall", "F1", "photos"],
                     [[GRADES[g], f3(pc['precision'][g]), f3(pc['recall'][g]),
                       f3(pc['f1'][g]), pc["support"][g]] for g in range(5)])
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
        raise no_shards(data)
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
        '<h2 id="data">Data</h2>', table(["setting", "value"], settings, "kv"),
        table(["split", *GRADES, "photos", "% per grade"], count_rows),
        figure(grade_chart(counts), "grade distribution per split", "fig-grades"),
        '<h2 id="rejections">Rejected photos</h2>', rejection_section(manifest),
        f'<h2 id="quality">Quality ({_esc(", ".join(splits))})</h2>',
        quality_section(data, manifest, splits, per_grade),
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
    atomic_write_bytes(out, page.encode("utf-8"))
    return out


def infer_data(data: str | Path | None, runs=()) -> Path:
    """The shards to report on: ``data``, else the first run's, else ./shards."""
    if data is not None:
        return Path(data)
    if runs:
        try:
            cfg = run_dirs.read_config(runs[0])
        except run_dirs.RunError:  # the run's own section says why it is not one
            cfg = {}
        return Path(cfg.get("data", "shards"))
    return Path("shards")


@dataclass(frozen=True)
class Report:
    out: Path
    data: Path
    size: int  # bytes of the page
    runs: int

    def summary(self) -> str:
        return (f"{self.out} ({self.size / 1e6:.1f} MB): {self.data}"
                + (f" and {self.runs} run(s)" if self.runs else ""))


def make_report(data: str | Path | None, runs=(), out: str | Path = "report.html",
                per_grade: int = 8) -> Report:
    """``drpipe report``: the page about ``data`` (:func:`infer_data`) and ``runs``, written
    to ``out``. NoShards without a drpipe output there; ReportError for a run it cannot show."""
    data = infer_data(data, runs)
    if not has_info(data):
        raise no_shards(data)
    page = build(data, runs, per_grade=per_grade)
    write(page, out)
    return Report(Path(out), data, len(page.encode()), len(runs))
