"""The report's quality section: verdicts per split and grade, scores, examples per verdict.

Read from the manifest (the measures) and the shards (the stored photos with their recorded
``image/quality/label``), without TensorFlow, like the rest of :mod:`drpipe.report`.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from tfrecord_writer.example import parse_example, read_records

VERDICTS = ("good", "usable", "reject")
VERDICT_COLORS = {"good": "#54a24b", "usable": "#eeca3b", "reject": "#e45756"}


def quality_table(manifest: list[dict]) -> tuple[list[str], list[list]] | None:
    """(header, rows): stored photos per split and grade by verdict; None without quality."""
    if not manifest or "quality" not in manifest[0]:
        return None
    ok = [r for r in manifest if r.get("status") == "ok" and r.get("quality")]
    rows = []
    for split in sorted({r["split"] for r in ok}):
        for g in range(5):
            these = [r for r in ok if r["split"] == split and r["label"] == str(g)]
            if not these:
                continue
            n = [sum(1 for r in these if r["quality"] == v) for v in VERDICTS]
            scores = [float(r["quality_score"]) for r in these]
            rows.append([split, g, *n, len(these),
                         f"{100 * n[2] / len(these):.1f}", f"{np.median(scores):.2f}"])
    return ["split", "grade", *VERDICTS, "photos", "% reject", "median score"], rows


def quality_chart(manifest: list[dict], png, pyplot) -> str:
    plt = pyplot()
    scores = {v: [float(r["quality_score"]) for r in manifest
                  if r.get("quality") == v and r.get("quality_score")] for v in VERDICTS}
    fig, ax = plt.subplots(figsize=(8, 2.8))
    bins = np.linspace(0, 1, 41)
    for v in VERDICTS:
        if scores[v]:
            ax.hist(scores[v], bins=bins, color=VERDICT_COLORS[v], label=f"{v} ({len(scores[v])})")
    ax.set_xlabel("quality score")
    ax.set_ylabel("photos")
    ax.set_title("quality scores of all measured photos (incl. rejected as ungradable)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def examples_by_verdict(data: Path, splits: list[str], per_verdict: int) -> dict[str, list]:
    found: dict[str, list[dict]] = {v: [] for v in VERDICTS}
    for split in splits:
        for shard in sorted(data.glob(f"{split}-*-of-*.tfrecord")):
            for rec in read_records(shard):
                ex = parse_example(rec)
                v = ex.get("image/quality/label", b"").decode()
                if v in found and len(found[v]) < per_verdict:
                    found[v].append(ex)
            if all(len(x) >= per_verdict for x in found.values()):
                return found
    return found


def quality_section(data: Path, manifest: list[dict], splits: list[str], per_verdict: int,
                    esc, table, figure, png, pyplot) -> str:
    t = quality_table(manifest)
    if t is None:
        return ("<p>No quality recorded for these shards (made by a drpipe before the quality "
                "gate); re-run drpipe preprocess to see it.</p>")
    ungradable = sum(1 for r in manifest if r.get("reason", "").startswith("ungradable"))
    parts = [
        "<p>Gradability of each photo (docs/QUALITY.md): verdicts of the stored photos per "
        "split and grade"
        + (f"; {ungradable} more were rejected as ungradable by --min-quality" if ungradable
           else "") + ".</p>",
        table(*t),
        figure(quality_chart(manifest, png, pyplot), "quality score distribution",
               "fig-quality")]
    examples = examples_by_verdict(data, splits, per_verdict)
    for v in VERDICTS:
        cells = []
        for ex in examples[v]:
            fmt = ex["image/format"].decode()
            src = (f"data:image/{'jpeg' if fmt == 'jpeg' else 'png'};base64,"
                   + base64.b64encode(ex["image/encoded"]).decode("ascii"))
            name = ex["image/id"].decode()
            caption = f'{esc(name)} {ex["image/quality/score"]:.2f}'
            cells.append(f'<div class="ex"><img class="quality-example" src="{src}" '
                         f'alt="{esc(name)}"><span>{caption}</span></div>')
        body = "".join(cells) or '<span class="none">no stored photo with this verdict</span>'
        parts.append(f'<div class="grade-row"><h3 style="border-color:{VERDICT_COLORS[v]}">'
                     f"{esc(v)}</h3><div class=\"grid\">{body}</div></div>")
    return "".join(parts)
