"""An incremental ``drpipe preprocess``: process what is new or changed, commit a new version.

See :mod:`pipeline.versions` for the layout and the rules. The steps, each resumable like a
full run (same staging batches, shards under temporary names, recorded in the state file):

1. Compare the listing with the latest version's: added, removed, replaced, relabelled.
2. Keep every earlier patient's split; assign new patients by the greedy from the counts.
3. Process the added, replaced and relabelled photos on Dask (as a full run does; a few
   hundred or fewer in this process, :data:`IN_PROCESS_MAX`).
4. Shards holding a record of a removed, replaced or relabelled photo are dropped from the
   new version; their other records are copied as they are, with the new records, into new
   shards ``{split}-vNNNN-{i:05d}-of-{n:05d}.tfrecord``. Every other shard is kept as it is.
5. Commit ``versions/vNNNN/`` and then the top-level manifest and info (the marker last).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from pipeline import job, manifest, versions
from pipeline.split import assign_splits
from pipeline.split_quota import QuotaError
from tfrecord_writer import info as output_info
from tfrecord_writer.files import remove_temporaries

# Up to this many photos to process (and no --scheduler), an incremental run processes them
# in this process: starting a local Dask cluster (seconds on a loaded machine) costs more
# than the work. Same function, same committed batches, so the same bytes (tested with
# DRPIPE_IN_PROCESS_MAX=0, which always uses Dask).
IN_PROCESS_MAX = int(os.environ.get("DRPIPE_IN_PROCESS_MAX", "256"))


def _process_here(batches, todo, root, config, staging, progress_factory, initial, total):
    bar = progress_factory(total, initial) if progress_factory else None
    try:
        for b in todo:
            result = job.process_batch(job._task_root(root, batches[b]), batches[b],
                                       config.process, not config.follow_links)
            job._commit_batch(staging, b, result)
            if bar:
                bar.update(len(batches[b]))
    finally:
        if bar:
            bar.close()


class _Records:
    """Staged records of this run, and records copied from a dropped shard (``_data``)."""

    def __init__(self, staged):
        self.staged = staged

    def read(self, row: dict) -> bytes:
        return row["_data"] if "_data" in row else self.staged.read(row)


def run_incremental(config, opts, progress_factory, out: Path, source, photos, missing,
                    state: dict, old: dict, t0: float) -> dict:
    job._refuse_strays(out, old)
    # A run killed after LATEST moved but before its state was cleared finishes that version.
    new_k = old.get("pending_version") or versions.latest_version(out) + 1
    k = new_k - 1
    prev_dir = versions.version_dir(out, k)
    prev_rows = versions.read_rows(prev_dir)
    prev_listing = json.loads((prev_dir / versions.LISTING_FILE).read_text())
    prev_info = output_info.load_info(prev_dir)
    current = versions.listing(source, photos)
    changes = versions.diff(prev_listing, current)
    changed = set(changes["added"]) | set(changes["replaced"]) | set(changes["relabelled"])
    gone = set(changes["removed"]) | set(changes["replaced"]) | set(changes["relabelled"])
    todo_photos = [p for p in photos if p.image_id in changed]

    # The split first: a grown set whose split cannot be made (an unreachable --split-quota:
    # exit 3) is refused before anything in --out changes, as in a full run.
    try:
        # every label, --limit or not, as a full run plans it
        splits = assign_splits(job.split_rows(source.photos, source.labels_without_photo),
                               config.split, config.seed,
                               keep=versions.patient_splits(prev_rows),
                               quota=config.split_quota)
    except QuotaError:  # bad input data (exit 3), as in a full run; not a JobError
        raise
    except ValueError as e:
        raise job.JobError(f"{out}: {e}") from None

    staging = out / job.STAGING
    if old.get("input_hash") != state["input_hash"]:  # not a resume of the same inputs
        shutil.rmtree(staging, ignore_errors=True)
    state["shards"] = dict(old.get("shards") or {})
    state["pending_version"] = new_k
    job._write_state(out, state)
    staging.mkdir(exist_ok=True)
    remove_temporaries(staging)
    remove_temporaries(out)

    batches = job._batches(todo_photos)
    todo = [b for b in range(len(batches)) if not (staging / f"batch-{b:06d}.json").exists()]
    t_process = time.time()
    if todo:
        done = sum(len(batches[b]) for b in range(len(batches)) if b not in set(todo))
        root = source.reader or source.root
        if opts.scheduler is None and len(todo_photos) <= IN_PROCESS_MAX:
            _process_here(batches, todo, root, config, staging, progress_factory, done,
                          len(todo_photos))
        else:
            job._process_batches(batches, todo, root, config, opts, staging,
                                 progress_factory, done, len(todo_photos))
    t_shards = time.time()

    new_rows, peak_rss, tf_loaded = job._read_batches(staging, len(batches))
    for row in new_rows:
        row["split"] = splits.get(row["image_id"], "")
    carried = [dict(r) for r in prev_rows if r.get("path") and r["image_id"] in current
               and r["image_id"] not in changed]
    dropped = {r["shard"] for r in prev_rows if r["status"] == "ok" and r["image_id"] in gone}
    survivors = [r for r in carried if r["status"] == "ok" and r["shard"] in dropped]
    for shard in sorted({r["shard"] for r in survivors}):
        these = [r for r in survivors if r["shard"] == shard]
        data = versions.read_records(out / shard, {r["image_id"] for r in these})
        for r in these:
            if r["image_id"] not in data:
                raise job.JobError(f"{out / shard} lacks the record of {r['image_id']}; "
                                   "re-run with --overwrite")
            r["_data"] = data[r["image_id"]]
            r["_length"] = len(r["_data"])

    with job._StagedRecords(staging) as staged:
        added = job._write_split_shards(new_rows + survivors, config, out, _Records(staged),
                                        state, names=versions.version_shard_name(new_k),
                                        order_key=(new_k,))
    shards = {}
    for split in config.split:
        kept = [{"name": f["file"], "records": f["records"], "bytes": f["bytes"]}
                for f in prev_info["splits"].get(split, {}).get("shards", [])
                if f["file"] not in dropped]
        files = kept + added[split]["shards"]
        shards[split] = {"shards": files, "records": sum(f["records"] for f in files)}

    rows = carried + new_rows
    job._flag_duplicates(rows)
    rows += job._missing_rows(missing, splits)
    job._drop_private(rows)
    t_end = time.time()
    summary = job._summary(rows, shards, config, len(photos), len(missing), peak_rss,
                           tf_loaded, timings={"total_s": t_end - t0,
                                               "setup_s": t_process - t0,
                                               "process_s": t_shards - t_process,
                                               "shards_and_manifest_s": t_end - t_shards},
                           processed_now=len(todo_photos))
    summary["version"] = new_k
    summary["changes"] = {key: len(v) for key, v in changes.items()}
    summary["shards_dropped"] = len(dropped)
    info = job._info(config, state, shards, summary, version=new_k,
                     tfds_template=versions.tfds_template(new_k))
    versions.write_version(out, new_k, info, rows, current, changes)
    manifest.write(rows, out)
    output_info.write_info(out, info)
    state.pop("pending_version", None)
    job._write_state(out, state)
    shutil.rmtree(staging, ignore_errors=True)
    return summary
