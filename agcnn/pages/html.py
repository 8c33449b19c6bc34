"""The page every report shares: one self-contained HTML file, escaped, offline, printable.

Nothing on a page is fetched: pictures are ``data:`` URIs, the style and the small paging /
filtering script are inline, and a Content-Security-Policy meta tag forbids every other source,
so a page opened on a hospital workstation without network shows all of itself and asks the
network for nothing. Every string that comes from a run (paths, reasons, settings) goes through
:func:`esc`: file names and DICOM-derived reasons are user data.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

from agcnn import __version__

# default-src does not cover base-uri and form-action: both are closed too.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1180px;padding:0 18px 40px;color:#1b1b1b}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ccc;padding-bottom:3px}
h3{font-size:15px;margin:18px 0 6px}.sub{color:#555;margin:0 0 10px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #d4d4d4;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f1f1f1}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ci{color:#666;font-size:12px}.warn{background:#fff4d6;border-left:4px solid #e0a400;padding:6px 10px}
.note{color:#444;font-size:13px}nav a{margin-right:12px}
img.fig{max-width:100%;height:auto;border:1px solid #ddd}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.gallery figure{margin:0;width:360px}
.gallery img{width:100%;height:auto;border:1px solid #ddd}.gallery figcaption{font-size:12px;word-break:break-all}
.controls{margin:6px 0;display:flex;gap:10px;align-items:center;flex-wrap:wrap}
.card td:first-child{width:200px;font-weight:600}.items{color:#666;font-size:12px;font-style:italic}
.js [data-item]:not(.on){display:none}
code{font-size:12px;word-break:break-all}pre{font-size:12px;background:#f7f7f7;padding:8px;overflow-x:auto}
footer{margin-top:30px;color:#666;font-size:12px}
@media print{nav,.controls{display:none}body{max-width:none;font-size:11px}
 .js tr[data-item]{display:table-row!important}.js figure[data-item]{display:block!important}
 pre{white-space:pre-wrap}
 h2{break-after:avoid}img.fig,table,figure{break-inside:avoid}a{color:inherit;text-decoration:none}}
"""

# Paging and filtering of the long tables and the gallery: rows carry data-* attributes and the
# script marks the rows of the page shown ("on"). HEAD_SCRIPT marks the document "js" before the
# body is parsed, so the browser never lays out the 10,000 rows it would hide; without scripts
# (or printed) every row shows.
HEAD_SCRIPT = "document.documentElement.className+=' js';"
SCRIPT = """
(function(){
function pager(box){
  var size=+box.dataset.pageSize||100,items=[].slice.call(box.querySelectorAll('[data-item]')),page=0;
  var filter=box.querySelector('select[data-filter]'),search=box.querySelector('input[data-search]');
  var info=box.querySelector('[data-info]');
  function shown(){var f=filter?filter.value:'',q=search?search.value.toLowerCase():'';
    return items.filter(function(e){return (!f||(' '+e.dataset.tags+' ').indexOf(' '+f+' ')>=0)&&
      (!q||e.dataset.key.toLowerCase().indexOf(q)>=0);});}
  var on=[];
  function draw(){var s=shown(),pages=Math.max(1,Math.ceil(s.length/size));page=Math.min(page,pages-1);
    on.forEach(function(e){e.classList.remove('on');});
    on=s.slice(page*size,(page+1)*size);on.forEach(function(e){e.classList.add('on');});
    if(info)info.textContent=s.length+' of '+items.length+' shown; page '+(page+1)+' of '+pages;}
  box.querySelectorAll('button[data-step]').forEach(function(b){b.addEventListener('click',function(){
    page=Math.max(0,page+(+b.dataset.step));draw();});});
  if(filter)filter.addEventListener('change',function(){page=0;draw();});
  if(search)search.addEventListener('input',function(){page=0;draw();});
  draw();}
document.querySelectorAll('[data-pager]').forEach(pager);
})();
"""


def esc(x: Any) -> str:
    """Any value as HTML text, quotes included (it may land in an attribute)."""
    return html.escape("" if x is None else str(x), quote=True)


def num(x: Any, digits: int = 3) -> str:
    """A number as a table cell's text: fixed decimals, ``n/a`` for none."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{float(x):.{digits}f}"


def num_cell(x: Any, digits: int = 3, extra: str = "") -> str:
    """A right-aligned cell whose ``data-value`` keeps the full number (what tests read back)."""
    value = "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))
    return f'<td class="n" data-value="{esc(value)}">{esc(num(x, digits))}{extra}</td>'


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, raw: bool = False, cls: str = "", attrs: str = "") -> str:
    """An HTML table; cells are escaped unless ``raw`` (then each cell is given as ``<td>...</td>``)."""
    out = [f'<table class="{esc(cls)}" {attrs}><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + ("".join(r) if raw else "".join(f"<td>{esc(c)}</td>" for c in r)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def settings_table(values: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested settings flattened to ``(dotted key, value)`` rows."""
    rows = []
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            rows += settings_table(v, key + ".")
        else:
            rows.append((key, "" if v is None else str(v)))
    return rows


def figure_uri(fig, dpi: int = 90) -> str:
    """A matplotlib Figure as a ``data:image/png;base64`` URI (no metadata in the PNG)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def file_uri(path, *, max_width: int | None = None, jpeg: bool = False) -> str:
    """A picture file as a ``data:`` URI; ``max_width`` shrinks it first (Pillow), ``jpeg`` stores
    the shrunk copy as JPEG -- a tenth of a PNG's bytes for a gallery of radiographs."""
    if max_width is None and not jpeg:
        with open(path, "rb") as f:
            return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if max_width and im.width > max_width:
            im = im.resize((max_width, max(1, round(im.height * max_width / im.width))), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        if jpeg:
            im.save(buf, format="JPEG", quality=80)
            kind = "jpeg"
        else:
            im.save(buf, format="PNG")
            kind = "png"
    return f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img(uri: str, alt: str, cls: str = "fig") -> str:
    return f'<img class="{esc(cls)}" alt="{esc(alt)}" src="{esc(uri)}">'


def card_html(card) -> str:
    """The model card (:class:`agcnn.card.Card`) as HTML sections."""
    out = []
    for s in card.sections:
        out.append(f"<h3>{esc(s.title)}</h3><p class=\"items\">Checklist items: {esc(s.items)}</p>")
        if s.fields:
            out.append(table(["field", "value"], s.fields, cls="card"))
        if s.table and s.table[1]:
            out.append(table(*s.table))
        if s.notes:
            out.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in s.notes) + "</ul>")
    return "".join(out)


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]], *, kind: str) -> str:
    """The whole document. ``sections``: ``(anchor, heading, body HTML)``; ``kind`` goes into a
    ``meta`` tag so a reader (or a test) can tell what the page reports on."""
    nav = "".join(f'<a href="#{esc(a)}">{esc(h)}</a>' for a, h, _ in sections)
    body = "".join(f'<section id="{esc(a)}"><h2>{esc(h)}</h2>{b}</section>' for a, h, b in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="agcnn {esc(__version__)}"><meta name="agcnn-report" content="{esc(kind)}">'
        f"<title>{esc(title)}</title><style>{CSS}</style><script>{HEAD_SCRIPT}</script></head><body>"
        f"<h1>{esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p>"
        '<p class="warn">Research use only, not for diagnosis.</p>'
        f"<nav>{nav}</nav>{body}"
        f"<footer>Written by agcnn {esc(__version__)}. This file is self-contained: it loads nothing from the "
        f"network.</footer><script>{SCRIPT}</script></body></html>\n"
    )
