"""Before/after contact sheets: how a user checks a configuration before a ten-hour run.

    preview(src, out, config) -> PreviewResult  # what drpipe preview does
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline.encode import encode
from pipeline.outputs import check_not_an_input, foreign_names, record_names, unique_names
from pipeline.process import Prepared, ProcessConfig, Rejection, prepare_or_reject, read_photo
from pipeline.sources import expand_photo_paths
from tfrecord_writer.writer import atomic_write_bytes

CELL = 256  # px per image in the sheet
CAPTION = 22
VERDICT_COLOURS = {"good": (90, 230, 90), "usable": (240, 200, 60), "reject": (255, 80, 80)}


@dataclass(frozen=True)
class SheetEntry:
    image_id: str
    result: Prepared | Rejection


def contact_sheet(entries: list[SheetEntry], columns: int = 3) -> np.ndarray:
    """One RGB image: per photo, the original with the fitted retina circle (green) beside
    the processed square, captioned with its quality score and verdict (docs/QUALITY.md);
    rejected photos show their reason in red."""
    tiles = [_tile(e) for e in entries]
    if not tiles:
        raise ValueError("nothing to put on a contact sheet")
    blank = np.zeros_like(tiles[0])
    rows = []
    for i in range(0, len(tiles), columns):
        row = tiles[i:i + columns]
        row += [blank] * (columns - len(row))
        rows.append(np.hstack(row))
    return np.vstack(rows)


def _tile(e: SheetEntry) -> np.ndarray:
    tile = np.full((CELL + CAPTION, 2 * CELL, 3), 24, np.uint8)
    if isinstance(e.result, Rejection):
        _text(tile, e.image_id, (6, 16), (230, 230, 230))
        for k, line in enumerate(_wrap(str(e.result), 38)[:8]):
            _text(tile, line, (10, CAPTION + 30 + 20 * k), (255, 80, 80))
        return tile
    p = e.result
    h, w = p.decoded.shape[:2]
    s = CELL / max(h, w)
    before = cv2.resize(p.decoded, (max(1, round(w * s)), max(1, round(h * s))),
                        interpolation=cv2.INTER_AREA)
    up_w = p.info.upright_size[0]
    k = s * w / up_w  # original pixels -> sheet pixels
    c = p.circle
    cv2.circle(before, (round(c.cx * k), round(c.cy * k)), round(c.r * k), (0, 255, 0), 1,
               cv2.LINE_AA)
    y0 = CAPTION + (CELL - before.shape[0]) // 2
    x0 = (CELL - before.shape[1]) // 2
    tile[y0:y0 + before.shape[0], x0:x0 + before.shape[1]] = before
    tile[CAPTION:, CELL:] = cv2.resize(p.image, (CELL, CELL), interpolation=cv2.INTER_AREA)
    _text(tile, f"{e.image_id}  {p.info.width}x{p.info.height}  1/{p.factor} decode",
          (6, 16), (230, 230, 230))
    if p.quality is not None:  # what --min-quality would do to this photo
        q = p.quality
        _text(tile, f"quality {q.score:.2f} {q.verdict}", (CELL + 6, 16),
              VERDICT_COLOURS[q.verdict])
    return tile


def _text(img, s, org, color):
    cv2.putText(img, s, org, cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)


def _wrap(s: str, width: int) -> list[str]:
    words, lines, cur = s.split(), [], ""
    for word in words:
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return lines + ([cur] if cur else [])


# ---------------------------------------------------------------- where the outputs go

SHEET = "contact_sheet.jpeg"
RECORD = ".drpipe-preview.json"  # the names earlier previews wrote here: theirs to replace


def plan_outputs(out, files) -> tuple[str, list[str]]:
    """(contact sheet name, one output name per photo). Never a name of another output of
    this run (photos sharing a stem get ``{stem}~2.jpeg``), and never the name of a file in
    ``out`` that no preview wrote (it gets the next free name instead)."""
    foreign = foreign_names(Path(out), RECORD)
    sheet = unique_names([Path(SHEET)], "{stem}.jpeg", reserved=foreign)[0]
    return sheet, unique_names(files, "{stem}.jpeg", reserved=(*foreign, sheet))


def record_outputs(out, names: list[str]) -> None:
    record_names(out, RECORD, names)


# ---------------------------------------------------------------- drpipe preview


class NoPhotos(ValueError):
    """The sources hold no photo (a usage error)."""


@dataclass
class PreviewResult:
    out: Path
    files: list[Path]  # the photos, in order
    names: list[str]  # the output name of each photo
    sheet: str  # the contact sheet's name in out
    entries: list[SheetEntry] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    rejected: list[tuple[Path, Rejection]] = field(default_factory=list)

    def lines(self) -> list[str]:
        """What drpipe preview prints: counts, renamed outputs, verdicts, rejections."""
        out = self.out
        ok = len(self.files) - len(self.rejected)
        lines = [f"processed {ok} of {len(self.files)} photos into {out}/ "
                 f"(contact sheet: {out / self.sheet})"]
        lines += [f"  {p} -> {out / n} (its name was taken)"
                  for p, n in zip(self.files, self.names, strict=True)
                  if n != f"{p.stem}.jpeg" and n in self.written]
        verdicts = [e.result.quality.verdict for e in self.entries
                    if hasattr(e.result, "image")]
        if verdicts:
            lines.append("quality: " + ", ".join(f"{v} {verdicts.count(v)}"
                                                 for v in ("good", "usable", "reject")))
        if self.rejected:
            lines.append(f"rejected {len(self.rejected)}:")
            lines += [f"  {path}: {rej}" for path, rej in self.rejected]
        return lines


def preview(src: Iterable[Path], out: Path, cfg: ProcessConfig, limit: int | None = None,
            progress: Callable[[list], Iterable] = iter) -> PreviewResult:
    """Process the photos of ``src`` (files or folders; at most ``limit``) in this process:
    ``out/{id}.jpeg`` each and a contact sheet. ``progress`` wraps the list of photos (a
    progress bar). NoPhotos without photos; OutputRefused when ``out`` is (in) a source."""
    src = list(src)
    files = expand_photo_paths(src)[:limit]
    if not files:
        raise NoPhotos("no photos found in " + ", ".join(map(str, src)))
    check_not_an_input(out, src)
    out.mkdir(parents=True, exist_ok=True)
    sheet_name, names = plan_outputs(out, files)
    r = PreviewResult(out, files, names, sheet_name)
    for path, name in zip(progress(files), names, strict=True):
        data = read_photo(path, cfg.max_bytes)
        result = data if isinstance(data, Rejection) else prepare_or_reject(data, cfg)
        if hasattr(result, "image"):
            record_outputs(out, [name])  # before the write: a kill leaves it ours
            atomic_write_bytes(out / name, encode(result.image, "jpeg", cfg.quality))
            r.written.append(name)
        else:
            r.rejected.append((path, result))
        r.entries.append(SheetEntry(path.stem, result))
    record_outputs(out, [sheet_name])
    atomic_write_bytes(out / sheet_name, encode(contact_sheet(r.entries), "jpeg", 90))
    return r
