"""HTML building blocks of the report: escaping, tables, figures, the page and its CSS.

The page is one self-contained file: inline CSS, images as ``data:`` URIs, no JavaScript, no
fonts, links or requests outside the file (internal ``#anchors`` only). Every piece of text
from the evaluation goes through :func:`esc`.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

from medtl.report.tables import fmt

CSS = """
:root { --fg: #1b1f24; --muted: #57606a; --line: #d0d7de; --alt: #f6f8fa; --accent: #0b5cad;
        --bad: #b42318; --badbg: #fef3f2; --note: #fff8e6; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1160px; margin: 0 auto; padding: 20px 28px 72px; }
h1 { font-size: 1.75rem; margin: 8px 0 2px; }
h2 { font-size: 1.4rem; margin: 44px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.12rem; margin: 26px 0 6px; }
h4 { font-size: 1rem; margin: 16px 0 4px; }
p { margin: 6px 0; }
a { color: var(--accent); }
.meta { color: var(--muted); margin: 0 0 12px; }
.box { background: var(--alt); border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; }
.box ul { margin: 4px 0; padding-left: 20px; }
nav.toc ul { margin: 4px 0; padding-left: 4px; list-style: none; }
nav.toc li.level1 { padding-left: 20px; }
details { margin: 8px 0; }
details > summary { cursor: pointer; font-weight: 600; }
details .defs { font-size: 0.9rem; }
.table-wrap { overflow-x: auto; margin: 6px 0 14px; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.88rem; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: right;
         vertical-align: top; white-space: nowrap; }
th { background: var(--alt); font-weight: 600; }
th:first-child, td:first-child { text-align: left; }
td.text, th.text { text-align: left; white-space: normal; }
.wrap { white-space: normal; min-width: 240px; text-align: left; }
.ops td:nth-child(2), .ops th:nth-child(2) { text-align: left; }
a.top { float: right; font-size: 0.8rem; font-weight: normal; margin-top: 8px; }
tr.group th { background: #e8eef6; text-align: left; }
.ci { color: var(--muted); font-size: 0.92em; }
table.stack .ci { display: block; font-size: 0.8em; }
.na { color: var(--muted); font-style: italic; }
.kv { display: grid; grid-template-columns: max-content 1fr; gap: 2px 18px; font-size: 0.92rem;
      margin: 4px 0 10px; }
.kv dt { color: var(--muted); }
.kv dd { margin: 0; }
.figs { display: grid; grid-template-columns: repeat(auto-fit, minmax(440px, 1fr)); gap: 12px 20px;
        align-items: start; }
figure { margin: 6px 0; }
figure img { max-width: 100%; height: auto; display: block; }
img.explain { max-width: 100%; height: auto; display: block; }
p.flag { background: var(--badbg); border-left: 3px solid var(--bad); padding: 4px 10px; }
figcaption { color: var(--muted); font-size: 0.85rem; }
.entry { margin-top: 56px; }
.entry > h2 { border-bottom-color: var(--accent); }
.tag { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 0.8rem;
       background: #e8eef6; color: var(--accent); vertical-align: middle; margin-left: 6px; }
.notes { background: var(--note); border-left: 4px solid #d4a72c; padding: 6px 12px 6px 28px; }
.notes li { margin: 2px 0; }
.failures li { background: var(--badbg); border-left: 4px solid var(--bad); list-style: none;
               padding: 6px 12px; margin: 6px 0; }
.failures ul { padding-left: 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.card { width: 136px; border: 1px solid var(--line); border-radius: 6px; padding: 6px;
        font-size: 0.76rem; line-height: 1.3; text-align: center; }
.card img, .card .missing { width: 96px; height: 96px; margin: 0 auto 4px; display: block;
        object-fit: contain; background: #111; }
.card .missing { background: #eee; color: var(--muted); display: flex; align-items: center;
        justify-content: center; padding: 4px; font-size: 0.72rem; }
footer { margin-top: 56px; color: var(--muted); font-size: 0.85rem; border-top: 1px solid var(--line);
         padding-top: 8px; }
@media print { .entry { break-before: page; } details { display: block; } }
"""


def esc(text: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(text), quote=True)


def ci_cell(entry: Any, digits: int = 3) -> str:
    """``value [low, high]`` of a metric entry as HTML (interval in muted text)."""
    if not isinstance(entry, dict):
        return '<span class="na">n/a</span>'
    value = fmt(entry.get("value"), digits)
    if value == "n/a":
        return '<span class="na">n/a</span>'
    if "ci_low" not in entry:
        return value
    low, high = fmt(entry.get("ci_low"), digits), fmt(entry.get("ci_high"), digits)
    return f'{value} <span class="ci">[{low}, {high}]</span>'


def na(text: str) -> str:
    """Plain formatted text, with ``n/a`` styled as undefined."""
    return '<span class="na">n/a</span>' if text == "n/a" else esc(text)


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    cls: str = "",
    caption: str = "",
) -> str:
    """A table in a horizontally scrolling wrapper; cells are trusted HTML (escape first)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{caption}</caption>" if caption else ""
    attr = f' class="{cls}"' if cls else ""
    return (
        f'<div class="table-wrap"><table{attr}>{cap}<thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def figure(uri: str, alt: str, caption: str = "") -> str:
    """An embedded PNG with alt text and an optional caption."""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{esc(alt)}">{cap}</figure>'


def bullet_list(items: Iterable[str], cls: str = "") -> str:
    """``<ul>`` of trusted HTML items."""
    attr = f' class="{cls}"' if cls else ""
    return f"<ul{attr}>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def definition_list(pairs: Iterable[tuple[str, str]]) -> str:
    """Key / value grid; keys are escaped, values are trusted HTML."""
    body = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in pairs)
    return f'<dl class="kv">{body}</dl>'


def page(title: str, body: str) -> str:
    """The whole document: doctype, strict CSP (nothing may load from outside), CSS, body."""
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )
