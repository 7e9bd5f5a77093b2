"""A self-contained HTML report: every figure embedded as a base64 PNG, no external resources.

Nothing in the page comes from data unescaped: :func:`table` escapes every cell,
:func:`write_report` the title, headings, ids and intro; a panel's inner HTML is built by the
caller with :func:`esc` around every value it did not write itself (class and file names, values
read from ``test_metrics.json``). The page carries :data:`GENERATOR` so that a later report may
replace it (:func:`is_our_report`) and nothing else.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from diffmic.atomic import atomic_write_text

#: ``<meta name='generator'>`` of every report: how a later ``diffmic report`` knows the file is ours
GENERATOR = "diffmic report"
#: how reports written before the generator tag began (recognised as ours too)
_OLD_PREFIX = "<!DOCTYPE html><html><head><meta charset='utf-8'><title>diffmic report: "


def esc(value: object) -> str:
    """Any value as HTML text (also safe inside a quoted attribute)."""
    return html.escape(str(value), quote=True)


def is_our_report(path: str | Path) -> bool:
    """Whether ``path`` is an HTML report written by ``diffmic report`` (read: its first 4 KB)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    return head.startswith(_OLD_PREFIX) or f"<meta name='generator' content='{GENERATOR}'>" in head


CSS = """
body{font-family:sans-serif;margin:16px;max-width:1180px;color:#222}
h1{font-size:20px} h2{font-size:16px;border-bottom:1px solid #ccc;padding-bottom:2px}
.panel{margin:10px 0 18px 0;overflow:visible}
.panel img{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}
th{background:#eee} .gallery{display:flex;flex-wrap:wrap;gap:6px} .gallery figure{margin:0;max-width:100%}
figcaption{font-size:11px}
"""


def png_data_uri(fig_or_path) -> str:
    """A matplotlib figure (closed afterwards) or a PNG file -> ``data:image/png;base64,...``."""
    if isinstance(fig_or_path, (str, Path)):
        data = Path(fig_or_path).read_bytes()
    else:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig_or_path.savefig(buf, format="png")
        plt.close(fig_or_path)
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def table(header: list[str], rows: list[list], fmt: str = "{:.3f}") -> str:
    def cell(v):
        if isinstance(v, float):
            return fmt.format(v)
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(path: str | Path, title: str, panels: list[tuple[str, str, str]], intro: str | None = None) -> Path:
    """``panels`` = (id, heading, inner HTML); each becomes ``<div class="panel" id=...>``.
    ``title``, ``heading`` and ``intro`` are plain text (escaped here); the inner HTML is the
    caller's, with every value from data escaped (:func:`esc`). Written to a fresh temporary
    name and renamed, so a reader never sees half a page and no other file is touched; the
    caller decides whether ``path`` may be replaced (:func:`is_our_report`)."""
    parts = [
        (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><meta name='generator' content='{GENERATOR}'>"
            f"<title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        )
    ]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    for pid, heading, inner in panels:
        parts.append(f"<div class='panel' id='{html.escape(pid)}'><h2>{html.escape(heading)}</h2>{inner}</div>")
    parts.append("</body></html>")
    return atomic_write_text(path, "".join(parts))
