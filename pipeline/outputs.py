"""Where drpipe writes: never over an input, another output, or a file it did not make.

- :func:`csv_cell`: a text cell a spreadsheet will not run as a formula (OWASP CSV injection).
- :func:`unique_names`: one output name per input file, never two alike (photos that share a
  stem in different folders), never a reserved name (``contact_sheet.jpeg``).
- :func:`check_not_an_input`: an output folder that is, or lies inside, a source folder (or
  would replace a source file) is refused.
- :class:`OutputRefused`: the one-line reason; the command exits 2 (a usage error: the
  output named is not one drpipe may write to).

TF-free: used by preprocess, preview, synth, predict, explain and export alike.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from tfrecord_writer.files import atomic_write_bytes

# Cells starting with these are formulas (or become ones) in Excel, LibreOffice, Sheets.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class OutputRefused(ValueError):
    """An output would replace or delete something drpipe did not create."""


def csv_cell(value: str) -> str:
    """``value`` with a leading ``'`` if a spreadsheet would read it as a formula (OWASP).

    Numbers (``-12.5``) are left as they are: a spreadsheet reads them as numbers, not
    formulas. Ordinary ids (``10_left``) are unchanged, so the bytes of a manifest of normal
    ids are too."""
    if value and value.startswith(FORMULA_START):
        try:
            float(value)
            return value
        except ValueError:
            return "'" + value
    return value


def unique_names(paths: list[Path], pattern: str = "{stem}{ext}", ext: str = "",
                 reserved: tuple[str, ...] = ()) -> list[str]:
    """One distinct file name per path, in order: ``pattern`` with the stem, and for the
    second and later photo of a stem (or a reserved name) ``{stem}~2``, ``{stem}~3``, ...
    Names compare case-insensitively (a case-insensitive file system would merge them)."""
    taken = {r.lower() for r in reserved}
    names = []
    for p in paths:
        stem, k = Path(p).stem, 1
        name = pattern.format(stem=stem, ext=ext)
        while name.lower() in taken:
            k += 1
            name = pattern.format(stem=f"{stem}~{k}", ext=ext)
        taken.add(name.lower())
        names.append(name)
    return names


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_not_an_input(out: Path, sources, what: str = "--out") -> None:
    """Refuse an output folder that is a source folder, inside one, or holds a source file
    (its outputs could then replace the photographs they were made from)."""
    o = Path(os.path.realpath(out))
    for s in map(Path, sources):
        r = Path(os.path.realpath(s))
        folder = r if r.is_dir() else r.parent
        if _inside(o, folder) and (r.is_dir() or o == folder):
            raise OutputRefused(f"{what} {out} is {'inside ' if o != folder else ''}the source "
                                f"{s}: outputs could replace the photographs; choose another "
                                "folder")


def refuse_existing(target: Path, what: str, why: str) -> None:
    """Refuse to write over ``target`` if it exists (a file drpipe did not make)."""
    if os.path.lexists(target):
        raise OutputRefused(f"{target} exists and {why}; {what} never replaces it (move it "
                            "away or choose another --out)")


# ------------------------------------------------ a folder of outputs shared with the user


def recorded(out: Path, record: str) -> set[str]:
    """Names an earlier run of the command recorded writing into ``out`` (its to replace)."""
    try:
        names = json.loads((Path(out) / record).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str) and "/" not in n}


def record_names(out: Path, record: str, names: list[str]) -> None:
    """Add ``names`` to ``out``'s record, before they are written (a kill leaves them ours)."""
    keep = sorted(recorded(out, record) | set(names))
    atomic_write_bytes(Path(out) / record, json.dumps({"files": keep}, indent=1).encode())


def foreign_names(out: Path, record: str) -> tuple[str, ...]:
    """Entries of ``out`` that the command did not record writing: never replaced."""
    out = Path(out)
    if not out.is_dir():
        return ()
    own = recorded(out, record)
    return tuple(p.name for p in out.iterdir() if p.name not in own and p.name != record)


# ------------------------------------------- an output that may replace an earlier one of its kind


def may_replace(target: Path, is_own) -> bool:
    """True if ``target`` does not exist, or is recognisably drpipe's own output of this
    kind: a plain file (not a link) for which ``is_own(target)`` holds. Unreadable or
    malformed is not ours."""
    target = Path(target)
    if not os.path.lexists(target):
        return True
    if target.is_symlink() or not target.is_file():
        return False
    try:
        return bool(is_own(target))
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def check_replaceable(target: Path, what: str, kind: str, is_own, inputs=()) -> None:
    """Refuse (OutputRefused) ``target`` if it is one of ``inputs`` or exists and is not
    ``kind`` (as ``is_own`` recognises it)."""
    target = Path(target)
    real = os.path.realpath(target)
    for s in inputs:
        if s is not None and os.path.realpath(s) == real:
            raise OutputRefused(f"{what} {target} is an input of this command; choose "
                                f"another {what}")
    if not may_replace(target, is_own):
        raise OutputRefused(f"{what} {target} exists and is not {kind}; drpipe never "
                            f"replaces it (move it away or choose another {what})")


def check_folder(out: Path, what: str, kind: str, marker: str) -> None:
    """Refuse an ``out`` folder that exists, is not empty, and does not hold ``marker``
    (the file an earlier run of the command wrote there): its files could be replaced."""
    out = Path(out)
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise OutputRefused(f"{what} {out} exists and is not a folder; choose another {what}")
    if any(out.iterdir()) and not (out / marker).is_file():
        raise OutputRefused(f"{what} {out} is not empty and not {kind} (no {marker}); "
                            f"drpipe never writes into it (choose a new or empty {what})")


def json_has_keys(keys):
    """``is_own`` for a JSON object holding all of ``keys``."""

    def check(path: Path) -> bool:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return isinstance(data, dict) and set(keys) <= set(data)
    return check


def csv_header_is(header):
    """``is_own`` for a CSV whose first row is ``header``."""

    def check(path: Path) -> bool:
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), None) == list(header)
    return check


def text_starts_with(prefix: str, within: int = 4096):
    """``is_own`` for a text file with ``prefix`` in its first ``within`` characters."""
    def check(path: Path) -> bool:
        with open(path, encoding="utf-8") as f:
            return prefix in f.read(within)
    return check
