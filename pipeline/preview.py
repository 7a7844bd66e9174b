"""Before/after contact sheets: how a user checks a configuration before a ten-hour run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.outputs import foreign_names, record_names, unique_names
from pipeline.process import Prepared, Rejection

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
