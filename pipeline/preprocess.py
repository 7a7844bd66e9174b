"""``drpipe preprocess`` around one job (pipeline/job.py): the run, locally or to a store, its
summary file and printed lines, and its line in the output's history (versions/).

    summary = preprocess(JobConfig(...), RunOptions(...), summary_json=None)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from pipeline import storage
from pipeline.job import JobConfig, JobError, LockHeld, RunOptions, run
from pipeline.remote_out import run_to_store
from pipeline.sources import LabelError, SourceError
from pipeline.versions import history_entry
from tfrecord_writer.files import atomic_write_bytes

# Keys every preprocess summary has: an existing --summary-json without them is not ours.
SUMMARY_KEYS = ("photos", "ok", "rejected", "rejected_by_reason", "shards")


def preprocess(cfg: JobConfig, opts: RunOptions, summary_json: Path | None = None,
               progress_factory=None, show: Callable[[dict], None] | None = None) -> dict:
    """Run the job (to a store URL: staged here, uploaded shard by shard), write the summary
    to ``summary_json``, ``show`` it, and append the run to the output's history whatever
    happens (exit status 0, 1, 3, 75 or 130 recorded).

    Raises what the job raises (KeyboardInterrupt, LockHeld, LabelError, SourceError,
    JobError), and JobError for a summary that cannot be written, a run with no usable
    photo, or one with rejections under ``opts.strict``."""
    out = cfg.out
    run_job = run_to_store if storage.is_url(out) else run
    started, status, summary = time.time(), 1, None
    try:
        try:
            summary = run_job(cfg, opts, progress_factory=progress_factory)
        except KeyboardInterrupt:
            status = 130
            raise
        except LockHeld:
            status = 75
            raise
        except (LabelError, SourceError):
            status = 3
            raise
        if summary_json:
            try:
                atomic_write_bytes(summary_json, (json.dumps(summary, indent=2) + "\n").encode())
            except OSError as e:
                raise JobError(f"cannot write --summary-json {summary_json}: "
                               f"{e.strerror or e} (the run itself is complete)") from None
        if show:
            show(summary)
        if not summary["ok"]:  # nothing to train on is a failed run, never a silent exit 0
            reasons = ", ".join(f"{k} {v}" for k, v in summary["rejected_by_reason"].items())
            raise JobError(f"no usable photo: {summary['photos']} found, "
                           f"{summary['rejected']} rejected ({reasons or 'none'}; see "
                           f"{out}/data_manifest.csv)")
        if opts.strict and summary["rejected"]:
            raise JobError(f"--strict: {summary['rejected']} photo(s) rejected "
                           f"(reasons in {out}/data_manifest.csv)")
        status = 0
        return summary
    finally:
        if not storage.is_url(out):
            history_entry(out, status, summary, started)


def short_summary(s: dict, out) -> list[str]:
    """One line for a scheduler's log."""
    c = s.get("changes") or {}
    what = ("no change" if s.get("already_complete") else
            ", ".join(f"{v} {k}" for k, v in c.items() if v) or "no photo changed")
    return [f"{out}: version {s.get('version', 1)}: {s['ok']} of {s['photos']} photos in "
            f"{sum(s['shards'].values())} shards ({what}; {s['rejected']} rejected; "
            + ("already complete)" if s.get("already_complete") else
               f"{s['timings']['total_s']:.1f} s)")]


def summary_lines(s: dict, out) -> list[str]:
    """The summary for a terminal: photos and shards, grades per split, rejections."""
    if s.get("already_complete"):
        return [f"{out}: already complete ({s['ok']} photos in "
                f"{sum(s['shards'].values())} shards); nothing to do"]
    n_shards = sum(s["shards"].values())
    lines = [f"{s['ok']} of {s['photos']} photos written to {n_shards} "
             f"shard{'s' if n_shards != 1 else ''} in {out}/ ({s['timings']['total_s']:.1f} s"
             + (f", {s['photos_per_s']:.1f} photos/s" if s.get("photos_per_s") else "") + ")"]
    for split, grades in s["counts"].items():
        lines.append(f"  {split:>6}: {sum(grades):6d} photos, grades 0-4: "
                     + " / ".join(map(str, grades)))
    if s["rejected"]:
        reasons = ", ".join(f"{k} {v}" for k, v in s["rejected_by_reason"].items())
        lines.append(f"  rejected {s['rejected']}: {reasons} (see {out}/data_manifest.csv)")
    if s["labels_without_photo"]:
        lines.append(f"  labels without a photo: {s['labels_without_photo']}")
    if s["duplicates"]:
        lines.append(f"  identical files under different ids: {s['duplicates']} "
                     "(column duplicate_of)")
    return lines
