"""The manifest: one row per input photo (and per label without a photo), ok or rejected.

Written as ``data_manifest.csv`` (sorted by image id, fixed float formatting, so the bytes
are reproducible) and, with the same data typed, ``manifest.parquet``. In the CSV a text
cell starting with ``= + - @``, tab or CR gets a leading ``'`` (OWASP CSV injection: a
spreadsheet would run it as a formula); the Parquet file keeps every value exactly.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.outputs import csv_cell
from tfrecord_writer.files import atomic_write_bytes

# (column, arrow type). Order is the CSV's column order.
COLUMNS: list[tuple[str, pa.DataType]] = [
    ("image_id", pa.string()),
    ("path", pa.string()),  # relative to --src
    ("patient_id", pa.string()),
    ("eye", pa.string()),
    ("label", pa.int8()),  # DR grade 0-4; empty when the photo has no label
    ("origin", pa.string()),  # where in the source: train, test/Public, a grade folder, ...
    ("status", pa.string()),  # ok | rejected
    ("reason", pa.string()),  # why rejected: "code: detail"
    ("split", pa.string()),
    ("shard", pa.string()),  # file name of the shard holding the record
    ("sha256", pa.string()),  # of the original file's bytes
    ("bytes", pa.int64()),  # original file size
    ("width", pa.int32()),  # original, upright
    ("height", pa.int32()),
    ("retina_cx", pa.float32()),  # retina circle in original pixels
    ("retina_cy", pa.float32()),
    ("retina_r", pa.float32()),
    ("duplicate_of", pa.string()),  # first image id with the same bytes, if any
    # Gradability (pipeline/quality.py, docs/QUALITY.md); empty when never measured.
    ("quality_score", pa.float32()),  # 0-1, higher is better
    ("quality", pa.string()),  # good | usable | reject
    ("quality_focus", pa.float32()),
    ("quality_vessels", pa.float32()),
    ("quality_vessel_field", pa.float32()),
    ("quality_brightness", pa.float32()),
    ("quality_contrast", pa.float32()),
    ("quality_exposure", pa.float32()),
    ("quality_coverage", pa.float32()),
]
NAMES = [c for c, _ in COLUMNS]


# Decimals in the CSV where two (the default for floats) would lose the measure.
DECIMALS = {c: 4 for c in NAMES if c.startswith("quality_")} | {"quality_brightness": 2}


def _cell(value, column: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{DECIMALS.get(column, 2)}f}"
    if isinstance(value, str):
        return csv_cell(value)  # an id like =HYPERLINK(...) is not run by a spreadsheet
    return str(value)


def to_csv_bytes(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(NAMES)
    for row in sorted(rows, key=lambda r: r["image_id"]):
        w.writerow([_cell(row.get(c), c) for c in NAMES])
    return buf.getvalue().encode("utf-8")


def write(rows: list[dict], out: Path) -> None:
    """Write ``data_manifest.csv`` and ``manifest.parquet`` into ``out``, atomically."""
    atomic_write_bytes(Path(out) / "data_manifest.csv", to_csv_bytes(rows))
    ordered = sorted(rows, key=lambda r: r["image_id"])
    table = pa.table({c: pa.array([r.get(c) for r in ordered], type=t) for c, t in COLUMNS})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(Path(out) / "manifest.parquet", sink.getvalue().to_pybytes())
