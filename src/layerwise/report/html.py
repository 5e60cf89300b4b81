"""One self-contained HTML page: sections of figures (PNG embedded as data URIs) and tables.

No external resource is referenced, so the file can be mailed or archived as it is. A few lines
of script count the images that failed to decode and say so on the console, which is how a
headless-browser test notices a broken figure.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field


@dataclass
class Figure:
    png: bytes
    alt: str
    caption: str


@dataclass
class Section:
    id: str
    title: str
    intro: str = ""
    figures: list[Figure] = field(default_factory=list)
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)  # (header, rows)
    provenance: list[str] = field(default_factory=list)  # commands and data files behind the section
    missing: str = ""  # what to run to fill a section the run directory has no data for


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
nav a { margin-right: 1em; } img { max-width: 100%; border: 1px solid #eee; }
figure { margin: 1em 0; } figcaption, .provenance { font-size: 0.85em; color: #555; }
code { background: #f4f4f4; padding: 0 0.2em; } .missing { color: #a33; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""

_CHECK_IMAGES = """
window.addEventListener("load", function () {
  var images = document.querySelectorAll("img"), broken = 0;
  images.forEach(function (image) { if (!image.complete || image.naturalWidth === 0) { broken += 1; } });
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-broken-images", String(broken));
  if (broken) { console.error("layerwise report: " + broken + " image(s) failed to load"); }
});
"""


def render(title: str, subtitle: str, sections: list[Section]) -> str:
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{_STYLE}</style>",
        f"<script>{_CHECK_IMAGES}</script>", "</head>", "<body>",
        f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(subtitle)}</p>",
        "<nav>" + "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections) + "</nav>",
    ]
    for section in sections:
        parts.append(f'<section id="{section.id}"><h2>{html.escape(section.title)}</h2>')
        if section.intro:
            parts.append(f"<p>{html.escape(section.intro)}</p>")
        if section.missing:
            parts.append(f'<p class="missing">Not in this run. {html.escape(section.missing)}</p>')
        for figure in section.figures:
            data = base64.b64encode(figure.png).decode("ascii")
            parts.append(f'<figure><img alt="{html.escape(figure.alt)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>")
        for header, rows in section.tables:
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            for row in rows:
                parts.append("<tr>" + "".join(_cell(value) for value in row) + "</tr>")
            parts.append("</table>")
        for line in section.provenance:
            parts.append(f'<p class="provenance">{html.escape(line)}</p>')
        parts.append("</section>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _cell(value: str) -> str:
    numeric = value.replace(".", "", 1).replace("-", "", 1).replace("e", "", 1).isdigit()
    return f'<td class="num">{html.escape(value)}</td>' if numeric else f"<td>{html.escape(value)}</td>"
