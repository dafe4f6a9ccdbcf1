"""report.html: one self-contained page (inline CSS, SVG and a little JS, no external resources) showing a
FeatureSelection's header, a sort control and one card per selected feature with its numbers, top activating
contexts in both corpora and a forget-vs-retain activation histogram. All data text is HTML-escaped."""

from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from sae_unlearn.features import FeatureSelection
    from sae_unlearn.features.contexts import FeatureExamples
    from sae_unlearn.features.selection import SelectedFeature

SORT_KEYS = {
    "layer": "layer",
    "score": "score",
    "relative": "relative (ratio)",
    "forget_rate": "forget rate",
    "retain_rate": "retain rate",
}
COLORS = {"forget": "#d9534f", "retain": "#337ab7"}

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{margin:.2em 0}.meta{color:#555}.meta td,.meta th{padding:2px 10px 2px 0;text-align:left}
.controls{margin:1em 0}#cards{display:flex;flex-direction:column;gap:1em}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em 1em}
.card h2{margin:0 0 .4em;font-size:1.15em}.card h2 a{font-size:.75em;font-weight:normal;margin-left:.8em}
.nums{display:flex;flex-wrap:wrap;gap:.3em 1.4em;font-size:.9em;margin-bottom:.6em}.nums b{color:#000}
.body{display:flex;flex-wrap:wrap;gap:1.2em}.ctxs{flex:1;min-width:420px}
.ctxs h3{font-size:.9em;margin:.5em 0 .2em}.ctx{font-family:monospace;font-size:.85em;margin:2px 0;
white-space:pre-wrap;word-break:break-word}.act{display:inline-block;width:5em;color:#777}
mark{border-radius:2px;padding:0 1px;color:#000}.none{color:#999;font-style:italic}
"""

JS = """
document.getElementById('sort').addEventListener('change', function () {
  var key = this.value, box = document.getElementById('cards');
  var num = function (el, k) { return parseFloat(el.getAttribute('data-' + k)); };
  var cards = Array.prototype.slice.call(box.querySelectorAll('.card'));
  cards.sort(function (a, b) {
    if (key === 'layer') return (num(a, 'layer') - num(b, 'layer')) || (num(a, 'index') - num(b, 'index'));
    return (num(b, key) - num(a, key)) || (num(a, 'layer') - num(b, 'layer'));
  });
  cards.forEach(function (c) { box.appendChild(c); });
});
"""


def _num(x: float) -> str:
    """A number for a data-* attribute that JS parseFloat reads; NaN sorts last."""
    x = float(x)
    if math.isnan(x):
        return "-Infinity"
    return ("Infinity" if x > 0 else "-Infinity") if math.isinf(x) else repr(x)


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def _text(s: str) -> str:
    return escape(str(s).replace("\n", "↵"), quote=True)


def _neuronpedia(saes: list[dict[str, Any]], layer: int, index: int) -> str | None:
    for sae in saes:
        npid = sae.get("neuronpedia_id")
        if sae.get("layer") == layer and npid:
            return f"https://www.neuronpedia.org/{quote(str(npid), safe='/')}/{index}"
    return None


def _contexts(rows: list[tuple[float, str, str, str]]) -> str:
    if not rows:
        return '<div class="none">no firing contexts</div>'
    top = max((a for a, *_ in rows), default=0.0) or 1.0
    out = []
    for act, left, token, right in rows:
        alpha = 0.15 + 0.85 * max(0.0, min(1.0, act / top))
        out.append(
            f'<div class="ctx"><span class="act">{_fmt(act)}</span>{_text(left)}'
            f'<mark style="background:rgba(255,165,0,{alpha:.2f})">{_text(token)}</mark>{_text(right)}</div>'
        )
    return "\n".join(out)


def _histogram(ex: FeatureExamples) -> str:
    """Grouped bars per bin; each side log-scaled and normalised to its own largest bin."""
    w, h, left, bottom, top = 340, 150, 8, 22, 22
    n = len(ex.hist["forget"])
    bw = (w - 2 * left) / max(1, n)
    parts = [
        f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="activation histogram">',
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - left}" y2="{h - bottom}" stroke="#999"/>',
    ]
    for k, side in enumerate(("forget", "retain")):
        counts = ex.hist.get(side, [0] * n)
        peak = math.log1p(max(counts, default=0)) or 1.0
        for i, c in enumerate(counts):
            bar = (h - bottom - top) * math.log1p(c) / peak
            x = left + i * bw + k * bw / 2
            parts.append(
                f'<rect x="{x:.1f}" y="{h - bottom - bar:.1f}" width="{bw / 2 - 0.5:.1f}" height="{bar:.1f}" '
                f'fill="{COLORS[side]}"><title>{side} bin {i}: {c}</title></rect>'
            )
        parts.append(
            f'<rect x="{left + k * 70}" y="4" width="10" height="10" fill="{COLORS[side]}"/>'
            f'<text x="{left + k * 70 + 14}" y="13" font-size="11">{side}</text>'
        )
    parts.append(f'<text x="{left + 140}" y="13" font-size="10" fill="#777">log count, each side / its max</text>')
    for frac, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        x = left + frac * (w - 2 * left)
        parts.append(
            f'<text x="{x:.1f}" y="{h - 6}" font-size="10" text-anchor="{anchor}">{_fmt(frac * ex.bin_max)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _card(f: SelectedFeature, ex: FeatureExamples | None, link: str | None) -> str:
    attrs = f'data-layer="{int(f.layer)}" data-index="{int(f.index)}" ' + " ".join(
        f'data-{k}="{_num(getattr(f, k))}"' for k in list(SORT_KEYS)[1:]
    )
    title = f"L{int(f.layer)} #{int(f.index)}"
    if link:
        title += f' <a href="{escape(link, quote=True)}" target="_blank" rel="noopener">neuronpedia</a>'
    nums = [
        ("score", _fmt(f.score)),
        ("forget count", _fmt(f.forget_count)),
        ("retain count", _fmt(f.retain_count)),
        ("forget rate", f"{100 * f.forget_rate:.3f}%"),
        ("retain rate", f"{100 * f.retain_rate:.3f}%"),
        ("relative", _fmt(f.relative)),
        ("forget max", _fmt(f.forget_max)),
        ("retain max", _fmt(f.retain_max)),
    ]
    nums_html = "".join(f"<span>{k}: <b>{v}</b></span>" for k, v in nums)
    if ex is None:
        body = '<div class="none">no examples</div>'
    else:
        ctx = "".join(f"<h3>top {side} contexts</h3>{_contexts(ex.top.get(side, []))}" for side in ("forget", "retain"))
        body = f'<div class="ctxs">{ctx}</div><div class="hist">{_histogram(ex)}</div>'
    return (
        f'<div class="card" id="f-{int(f.layer)}-{int(f.index)}" {attrs}>\n<h2>{title}</h2>\n'
        f'<div class="nums">{nums_html}</div>\n<div class="body">{body}</div>\n</div>'
    )


def _header(sel: FeatureSelection) -> str:
    params = ", ".join(f"{_text(k)}={_text(repr(v))}" for k, v in sel.params.items()) or "none"
    tokens = ", ".join(f"{_text(k)}: {_text(str(v))}" for k, v in sel.tokens.items())
    saes = "".join(
        f"<tr><td>{_text(s.get('layer', ''))}</td><td>{_text(s.get('spec', ''))}</td>"
        f"<td>{_text(s.get('d_sae', ''))}</td><td>{_text(s.get('neuronpedia_id') or '')}</td></tr>"
        for s in sel.saes
    )
    return (
        f'<h1>Concept: {_text(sel.concept)}</h1>\n<table class="meta">'
        f"<tr><th>model</th><td>{_text(sel.model)} ({_text(sel.model_source)})</td></tr>"
        f"<tr><th>strategy</th><td>{_text(sel.strategy)} ({params})</td></tr>"
        f"<tr><th>tokens</th><td>{tokens}</td></tr><tr><th>features</th><td>{len(sel.features)}</td></tr></table>\n"
        f'<h3>SAEs</h3><table class="meta"><tr><th>layer</th><th>spec</th><th>d_sae</th><th>neuronpedia</th></tr>'
        f"{saes}</table>"
    )


def render_report(selection: FeatureSelection) -> str:
    """The whole report as one HTML string that works offline from file://."""
    options = "".join(f'<option value="{k}">{v}</option>' for k, v in SORT_KEYS.items())
    cards = "\n".join(
        _card(f, selection.examples.get((f.layer, f.index)), _neuronpedia(selection.saes, f.layer, f.index))
        for f in selection.features
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Features: {_text(selection.concept)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"{_header(selection)}\n"
        f'<div class="controls"><label for="sort">sort by </label><select id="sort">{options}</select></div>\n'
        f'<div id="cards">\n{cards}\n</div>\n<script>{JS}</script>\n</body>\n</html>\n'
    )
