"""A self-contained HTML report: every figure embedded as a base64 PNG, no external resources."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

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
    """``panels`` = (id, heading, inner HTML); each becomes ``<div class="panel" id=...>``."""
    parts = [
        (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        )
    ]
    if intro:
        parts.append(f"<p>{intro}</p>")
    for pid, heading, inner in panels:
        parts.append(f"<div class='panel' id='{html.escape(pid)}'><h2>{html.escape(heading)}</h2>{inner}</div>")
    parts.append("</body></html>")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
