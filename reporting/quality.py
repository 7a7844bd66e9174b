"""The report's quality section: verdicts per split and grade, scores, examples per verdict.

Read from the manifest (the measures) and the shards (the stored photos with their recorded
``image/quality/label``), without TensorFlow, like the rest of :mod:`reporting.report`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reporting.page import esc, example_row, figure, stored_examples, table
from reporting.plots import VERDICT_COLORS, VERDICTS, quality_chart


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


def examples_by_verdict(data: Path, splits: list[str], per_verdict: int) -> dict[str, list]:
    return stored_examples(data, splits, VERDICTS,
                           lambda ex: ex.get("image/quality/label", b"").decode(), per_verdict)


def quality_section(data: Path, manifest: list[dict], splits: list[str],
                    per_verdict: int) -> str:
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
        figure(quality_chart(manifest), "quality score distribution", "fig-quality")]
    examples = examples_by_verdict(data, splits, per_verdict)
    for v in VERDICTS:
        parts.append(example_row(
            esc(v), VERDICT_COLORS[v], examples[v], "quality-example",
            "no stored photo with this verdict",
            lambda ex: f'{esc(ex["image/id"].decode())} {ex["image/quality/score"]:.2f}'))
    return "".join(parts)
