"""HTML pieces of the report, shared by its sections: escaping, tables, figures, and the
example photos read from the shards (TensorFlow-free, with the package's record reader)."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

from reporting.plots import data_uri
from tfrecord_writer.example import parse_example, read_records


def esc(v) -> str:
    return html.escape(str(v))


def f3(v) -> str:
    """A score as 0.123, or (a file edited by hand) the value itself, escaped."""
    try:
        return f"{float(v):.3f}"
    except (TypeError, ValueError):
        return esc(v)


def table(header: list, rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def figure(src: str, caption: str, fig_id: str) -> str:
    return (f'<figure id="{esc(fig_id)}"><img src="{esc(src)}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def stored_examples(data: Path, splits: list[str], groups, group_of: Callable[[dict], object],
                    per_group: int) -> dict:
    """Up to ``per_group`` stored records (parsed) for each of ``groups``, from the shards of
    ``splits`` in order; ``group_of(example)`` says which group a record belongs to."""
    found: dict = {g: [] for g in groups}
    for split in splits:
        for shard in sorted(data.glob(f"{split}-*-of-*.tfrecord")):
            for rec in read_records(shard):
                ex = parse_example(rec)
                g = group_of(ex)
                if g in found and len(found[g]) < per_group:
                    found[g].append(ex)
            if all(len(v) >= per_group for v in found.values()):
                return found
    return found


def example_row(title: str, color: str, examples: list[dict], css_class: str, empty: str,
                caption: Callable[[dict], str] = lambda ex: esc(ex["image/id"].decode())) -> str:
    """One titled row of stored photos, embedded as their own bytes."""
    cells = []
    for ex in examples:
        src = data_uri(ex["image/encoded"], ex["image/format"].decode())
        name = ex["image/id"].decode()
        cells.append(f'<div class="ex"><img class="{css_class}" src="{src}" alt="{esc(name)}">'
                     f"<span>{caption(ex)}</span></div>")
    body = "".join(cells) or f'<span class="none">{empty}</span>'
    return (f'<div class="grade-row"><h3 style="border-color:{color}">'
            f"{title}</h3><div class=\"grid\">{body}</div></div>")
