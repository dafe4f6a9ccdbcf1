"""compare report: one self-contained HTML page (inline CSS and SVG, no JS, no external resources) for the
results.json of a compare run, {"version", "concept", "model", "created", "goals", "verdicts", "methods": {name:
RESULT}} with RESULT in the per-model schema of `evaluate.py`. Shows every metric side by side (with paired
differences against the base row and their 95% CIs), the goal verdicts of every method (goals.py), four plots
and the generations before/after. All data text is HTML-escaped; missing, null or non-finite values show as "—".
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

from sae_unlearn.evaluation.goals import nested, verdicts
from sae_unlearn.evaluation.result_keys import current_results_keys
from sae_unlearn.evaluation.scoring import SCORE_KINDS

RINGS = ("target", "near", "mid", "far")
METHOD_ORDER = ("base", "crisp", "clamp", "ablate", "rmu", "npo")
COLORS = {
    "base": "#7f7f7f",
    "crisp": "#d62728",
    "clamp": "#1f77b4",
    "ablate": "#2ca02c",
    "rmu": "#9467bd",
    "npo": "#ff7f0e",
}
EXTRA_COLORS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22")
CHANCE = 0.25
DASH = "—"
FLUENCY = ("base_model_ppl", "repeated_3gram_share", "distinct_2", "foreign_script_share")
W, H, PL, PR, PT, PB = 560, 260, 54, 16, 16, 40
CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{margin:.2em 0}.meta td{padding:1px 12px 1px 0}table.data{border-collapse:collapse;background:#fff;margin:.5em 0}
table.data th,table.data td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top;font-size:.9em}
table.data th{background:#f0f0f0}td.n{font-variant-numeric:tabular-nums;white-space:nowrap}
.pass{color:#1a7f37;font-weight:bold}.fail{color:#c62828;font-weight:bold}.na{color:#999}
.plots{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0;background:#fff;border:1px solid #ddd;padding:.4em}
figcaption{font-size:.9em;font-weight:bold}svg text{font-size:11px;fill:#333}.gen{max-width:28em;white-space:pre-wrap}
.legend span{display:inline-block;width:.9em;height:.9em;margin:0 .3em 0 1em;vertical-align:middle}"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any) -> float | None:
    """A finite float, or None for missing, null, NaN, inf and non-numbers."""
    if isinstance(x, dict):
        x = x.get("acc")
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def fmt(x: Any) -> str:
    """Three significant digits (no exponent below 1e6); integers as they are; None/NaN as a dash."""
    if isinstance(x, str):
        return x
    v = _num(x)
    if v is None:
        return DASH
    if isinstance(x, int) or (abs(v) >= 1000 and abs(v) < 1e6):
        return f"{v:.0f}"
    return f"{v:.3g}"


def _acc_cell(acc: Any) -> str:
    v = _num(acc)
    if v is None:
        return DASH
    ci = acc.get("ci95") if isinstance(acc, dict) else None
    lo, hi = (_num(ci[0]), _num(ci[1])) if isinstance(ci, list | tuple) and len(ci) == 2 else (None, None)
    return f"{v:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else "")


def _curve(r: Any) -> list[tuple[float, float]]:
    pts = [(_num(nested(p, "step")), _num(nested(p, "target_acc"))) for p in nested(r, "relearning", "curve") or []]
    return sorted((s, a) for s, a in pts if s is not None and a is not None)


def _lp(r: Any, ring: str) -> float | None:
    return _num(nested(r, "probes", "rings", ring, "logprob"))


def goal_rows(results: dict[str, Any]) -> list[tuple[str, str, Any, dict[str, Any]]]:
    """(method, goal, limit, verdict row of goals.judge) for every non-base method and goal: the run's
    stored verdicts, or ones computed from its results when it has none."""
    stored = results.get("verdicts")
    table = stored if isinstance(stored, dict) else verdicts(results)
    return [
        (str(method), str(goal), row.get("limit"), row)
        for method, goals in table.items()
        if isinstance(goals, dict)
        for goal, row in goals.items()
        if isinstance(row, dict)
    ]


def _diff_cell(d: Any) -> str:
    v = _num(nested(d, "diff"))
    if v is None:
        return DASH
    ci = nested(d, "ci95")
    lo, hi = (_num(ci[0]), _num(ci[1])) if isinstance(ci, list | tuple) and len(ci) == 2 else (None, None)
    return f"{v:+.2f}" + (f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None and hi is not None else "")


def _metric_rows(ms: dict[str, Any]) -> list[tuple[str, list[str]]]:
    rs = list(ms.values())
    rings = [*RINGS, *sorted({k for r in rs for k in nested(r, "probes", "rings") or {} if k not in RINGS})]
    rows = [
        (f"{kind} · {ring}", [_acc_cell(nested(r, "probes", "rings", ring, kind)) for r in rs])
        for kind in SCORE_KINDS
        for ring in rings
    ]
    rows += [
        (f"Δ vs base · {kind} · {ring}", [_diff_cell(nested(r, "paired", "rings", ring, kind)) for r in rs])
        for kind in ("logprob", "letter")
        for ring in rings
        if any(nested(r, "paired", "rings", ring, kind) for r in rs)
    ]
    rows.append(("chance (1/options) · target", [fmt(nested(r, "probes", "rings", "target", "chance")) for r in rs]))
    rows += [
        (k, [fmt(nested(r, "retention", k)) for r in rs])
        for k in ("retain_heldout_ppl", "generic_ppl", "forget_heldout_ppl")
    ]
    rows += [
        (f"fluency {p} · {k}", [fmt(nested(r, "fluency", p, k)) for r in rs])
        for p in ("coherence", "concept_prompts")
        for k in FLUENCY
    ]
    rows.append(("reactivation fraction", [fmt(nested(r, "reactivation", "fraction")) for r in rs]))
    rows.append(
        ("adversarial any-template acc", [_acc_cell(nested(r, "adversarial", "any_template_accuracy")) for r in rs])
    )
    rows.append(
        ("adversarial any-template chance", [fmt(nested(r, "adversarial", "chance", "any_template")) for r in rs])
    )
    rows.append(("adversarial any-template above chance", [fmt(_adv_excess(r)) for r in rs]))
    rows.append(("relearning final target acc", [fmt(c[-1][1]) if (c := _curve(r)) else DASH for r in rs]))
    lm = sorted({(t, m) for r in rs for t, v in (nested(r, "lm_eval") or {}).items() if isinstance(v, dict) for m in v})
    rows += [(f"lm_eval {t} · {m}", [fmt(nested(r, "lm_eval", t, m)) for r in rs]) for t, m in lm]
    rows.append(("seconds", [fmt(nested(r, "seconds")) for r in rs]))
    return rows


def _sub(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _adv_excess(r: Any) -> float | None:
    """Any-template accuracy minus what random guessing scores under the same union."""
    return _sub(
        _num(nested(r, "adversarial", "any_template_accuracy")),
        _num(nested(r, "adversarial", "chance", "any_template")),
    )


def _diff_ci(ci: Any) -> str:
    if not isinstance(ci, list | tuple) or len(ci) != 2 or _num(ci[0]) is None or _num(ci[1]) is None:
        return DASH
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def _table(head: list[str], rows: list[list[str]], raw: bool = False) -> str:
    th = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=n' if i else ''}>{c if raw else _esc(c)}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f'<table class="data"><tr>{th}</tr>{body}</table>'


def _xs(v: float, lo: float, hi: float) -> float:
    return PL + (W - PL - PR) * (v - lo) / ((hi - lo) or 1.0)


def _ys(v: float, lo: float, hi: float) -> float:
    return PT + (H - PT - PB) * (1 - (v - lo) / ((hi - lo) or 1.0))


def _svg(
    pid: str, title: str, body: list[str], lo: float, hi: float, ylabel: str, xlabel: str = "", chance: bool = False
) -> str:
    ticks = [lo + (hi - lo) * i / 4 for i in range(5)]
    parts = [
        f'<line x1="{PL}" y1="{PT}" x2="{PL}" y2="{H - PB}" stroke="#444"/>',
        f'<line x1="{PL}" y1="{H - PB}" x2="{W - PR}" y2="{H - PB}" stroke="#444"/>',
    ]
    parts += [f'<text x="{PL - 4}" y="{_ys(t, lo, hi) + 4:.1f}" text-anchor="end">{fmt(t)}</text>' for t in ticks]
    parts.append(
        f'<text x="12" y="{(H - PB + PT) / 2}" transform="rotate(-90 12 {(H - PB + PT) / 2})" '
        f'text-anchor="middle">{_esc(ylabel)}</text>'
    )
    parts.append(f'<text x="{(W + PL) / 2}" y="{H - 4}" text-anchor="middle">{_esc(xlabel)}</text>')
    if chance:
        y = _ys(CHANCE, lo, hi)
        parts.append(
            f'<line class="chance" x1="{PL}" y1="{y:.1f}" x2="{W - PR}" y2="{y:.1f}" stroke="#555" '
            f'stroke-dasharray="5,4"/><text x="{W - PR - 2}" y="{y - 3:.1f}" text-anchor="end">'
            f"chance {CHANCE}</text>"
        )
    return (
        f'<figure><figcaption>{_esc(title)}</figcaption><svg id="{pid}" class="plot" role="img" '
        f'aria-label="{_esc(title)}" width="{W}" height="{H}" viewBox="0 0 {W} {H}">'
        + "".join(parts + body)
        + "</svg></figure>"
    )


def _bars(
    groups: list[str], series: dict[str, list[float | None]], colors: dict[str, str], hi: float, by_group: bool = False
) -> list[str]:
    out, gw = [], (W - PL - PR) / max(1, len(groups))
    bw = min(gw * 0.8 / max(1, len(series)), 48.0)
    for gi, g in enumerate(groups):
        out.append(f'<text x="{PL + gw * (gi + 0.5):.1f}" y="{H - PB + 14}" text-anchor="middle">{_esc(g)}</text>')
        for si, (name, vals) in enumerate(series.items()):
            if (v := vals[gi]) is not None:
                x, y = PL + gw * gi + (gw - bw * len(series)) / 2 + bw * si, _ys(v, 0, hi)
                tip = _esc(f"{name} {g}".strip())
                out.append(
                    f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{H - PB - y:.1f}" '
                    f'fill="{colors[g if by_group else name]}"><title>{tip}: {fmt(v)}</title></rect>'
                )
    return out


def _plots(ms: dict[str, Any], colors: dict[str, str]) -> str:
    rings = [g for g in RINGS if any(_lp(r, g) is not None for r in ms.values())] or list(RINGS)
    bars = _bars(rings, {n: [_lp(r, g) for g in rings] for n, r in ms.items()}, colors, 1.0)
    out = [_svg("plot-rings", "Logprob accuracy per ring", bars, 0, 1, "accuracy", "ring", chance=True)]
    base_retain_ppl = _num(nested(ms.get("base"), "retention", "retain_heldout_ppl"))
    pts = [(n, _lp(r, "target"), _num(nested(r, "retention", "retain_heldout_ppl"))) for n, r in ms.items()]
    pts = [(n, x, y / base_retain_ppl if base_retain_ppl else y) for n, x, y in pts if x is not None and y is not None]
    ys = [y for *_, y in pts] or [1.0]
    lo, hi = min(ys) - 0.05 * (max(ys) - min(ys) or 1), max(ys) + 0.05 * (max(ys) - min(ys) or 1)
    dots = [
        f'<circle cx="{_xs(x, 0, 1):.1f}" cy="{_ys(y, lo, hi):.1f}" r="5" fill="{colors[n]}"/><text '
        f'x="{_xs(x, 0, 1) + 7:.1f}" y="{_ys(y, lo, hi) - 5:.1f}">{_esc(n)}</text>'
        for n, x, y in pts
    ]
    dots += [
        f'<text x="{_xs(t, 0, 1):.1f}" y="{H - PB + 14}" text-anchor="middle">{fmt(t)}</text>'
        for t in (0, 0.25, 0.5, 0.75, 1)
    ]
    ylab = "retain ppl / base" if base_retain_ppl else "retain_heldout_ppl"
    out.append(_svg("plot-tradeoff", "Forget vs retain trade-off", dots, lo, hi, ylab, "target accuracy"))
    curves = {n: c for n, r in ms.items() if (c := _curve(r))}
    steps = [s for c in curves.values() for s, _ in c] or [0.0, 1.0]
    s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    lines = [
        f'<text x="{_xs(s, s0, s1):.1f}" y="{H - PB + 14}" text-anchor="middle">{fmt(s)}</text>'
        for s in sorted(set(steps))
    ]
    for n, c in curves.items():
        xy = [(_xs(s, s0, s1), _ys(a, 0, 1)) for s, a in c]
        lines.append(
            f'<polyline fill="none" stroke="{colors[n]}" stroke-width="2" '
            f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in xy)}"/>'
        )
        lines += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colors[n]}"/>' for x, y in xy]
    out.append(
        _svg("plot-relearning", "Relearning attack: target accuracy", lines, 0, 1, "target acc", "step", chance=True)
    )
    react = {n: v for n, r in ms.items() if (v := _num(nested(r, "reactivation", "fraction"))) is not None}
    top = max([1.0, *react.values()])
    rbars = _bars(list(react), {"": list(react.values())}, colors, top, by_group=True)
    out.append(
        _svg("plot-reactivation", "Feature re-activation (fraction of base)", rbars, 0, top, "fraction", "method")
    )
    return '<div class="plots">' + "".join(out) + "</div>"


def _generations(ms: dict[str, Any]) -> str:
    out = []
    for part in ("concept_prompts", "coherence"):
        texts = {
            n: {
                str(s.get("prompt")): str(s.get("text"))
                for s in nested(r, "fluency", part, "samples") or []
                if isinstance(s, dict)
            }
            for n, r in ms.items()
        }
        prompts = list(dict.fromkeys(p for t in texts.values() for p in t))
        if prompts:
            rows = [
                [
                    f'<span class="gen">{_esc(p)}</span>',
                    *(f'<span class="gen">{_esc(texts[n][p])}</span>' if p in texts[n] else DASH for n in ms),
                ]
                for p in prompts
            ]
            out.append(f"<h3>{_esc(part)}</h3>" + _table(["prompt", *ms], rows, raw=True))
    return "".join(out) or '<p class="na">no samples</p>'


def render_compare_report(results: dict[str, Any]) -> str:
    """The whole compare page as one HTML string (results.json files with older key names too)."""
    results = current_results_keys(results)
    raw = results.get("methods") or {}
    names = [n for n in METHOD_ORDER if n in raw] + [n for n in raw if n not in METHOD_ORDER]
    ms = {str(n): raw[n] for n in names}
    colors = {n: COLORS.get(n, EXTRA_COLORS[i % len(EXTRA_COLORS)]) for i, n in enumerate(ms)}
    meta = "".join(
        f"<tr><td>{k}</td><td>{_esc(v)}</td></tr>"
        for k, v in (
            ("concept", results.get("concept", DASH)),
            ("model", results.get("model", DASH)),
            ("created", results.get("created", DASH)),
            ("methods", ", ".join(ms)),
        )
    )
    css = {"met": "pass", "missed": "fail", "inconclusive": "na"}
    goals = [
        [
            _esc(method),
            _esc(f"{goal}: {fmt(limit) if _num(limit) is not None else json.dumps(limit)}"),
            fmt(row.get("value")),
            _diff_ci(row.get("ci95")),
            f'<span class="{css.get(str(row.get("verdict")), "na")}">{_esc(row.get("verdict", DASH))}</span>',
            _esc(row.get("note") or ""),
        ]
        for method, goal, limit, row in goal_rows(results)
    ]
    gtable = _table(["method", "goal", "measured (vs base)", "95% CI", "verdict", "note"], goals, raw=True)
    legend = (
        '<p class="legend">'
        + "".join(f'<span style="background:{c}"></span>{_esc(n)}' for n, c in colors.items())
        + "</p>"
    )
    title = _esc(f"compare · {results.get('concept', '')} · {results.get('model', '')}")
    from sae_unlearn.evaluation.relearning import relearning_html

    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f'<style>{CSS}</style></head><body><h1>{title}</h1><table class="meta">{meta}</table>'
        f"<h2>Metrics</h2>{_table(['metric', *ms], [[k, *v] for k, v in _metric_rows(ms)])}"
        f"<h2>Goals</h2>{gtable if goals else '<p class=na>no goals</p>'}{relearning_html(ms)}"
        f"<h2>Plots</h2>{legend}{_plots(ms, colors)}<h2>Generations before/after</h2>{_generations(ms)}"
        "</body></html>"
    )


def _relearn_cell(r: Any, attack: str, is_base: bool) -> str:
    """`0.6 -> 0.9, recovery 0.75 (base control +0.00)` for one attack of one method's relearning record."""
    a = nested(r, "relearning", "attacks", attack)
    curve = nested(a, "curve") or []
    if not curve:
        return DASH
    first, last = _num(nested(curve[0], "target_acc")), _num(nested(curve[-1], "target_acc"))
    cell = f"{fmt(first)} -> {fmt(last)}"
    if not is_base and nested(r, "relearning", "gap", "defined") is not None:
        recovery = _num(nested(a, "recovery"))
        cell += f", recovery {fmt(recovery)}" if recovery is not None else ", recovery undefined (gap within noise)"
    gain = _num(nested(a, "control", "gain"))
    return cell + (f" (base control {gain:+.2f})" if gain is not None else "")


def summary_markdown(results: dict[str, Any]) -> str:
    """The headline table of a compare run as Markdown (methods as columns): per-ring log-prob accuracy
    with the paired difference against the base model and its 95% CI, perplexities, concept-prompt
    fluency, the adversarial union above its chance level, and every relearning attack with its control."""
    results = current_results_keys(results)
    raw = results.get("methods") or {}
    names = [n for n in METHOD_ORDER if n in raw] + [n for n in raw if n not in METHOD_ORDER]
    rs = [raw[n] for n in names]
    rows: list[tuple[str, list[str]]] = []
    for ring in RINGS:
        cells = []
        for n, r in zip(names, rs, strict=True):
            acc = _num(nested(r, "probes", "rings", ring, "logprob"))
            diff = nested(r, "paired", "rings", ring, "logprob")
            shown = DASH if acc is None else f"{acc:.3f}"
            cells.append(shown if n == "base" or not diff else f"{shown} ({_diff_cell(diff)})")
        rows.append((f"{ring} accuracy", cells))
    rows += [
        ("retain perplexity", [fmt(nested(r, "retention", "retain_heldout_ppl")) for r in rs]),
        ("generic perplexity", [fmt(nested(r, "retention", "generic_ppl")) for r in rs]),
        (
            "concept-prompt generations, base-model ppl",
            [fmt(nested(r, "fluency", "concept_prompts", "base_model_ppl")) for r in rs],
        ),
        (
            "concept-prompt repeated 3-grams",
            [fmt(nested(r, "fluency", "concept_prompts", "repeated_3gram_share")) for r in rs],
        ),
        ("adversarial any-template accuracy above chance", [fmt(_adv_excess(r)) for r in rs]),
    ]
    attacks = sorted({a for r in rs for a in nested(r, "relearning", "attacks") or {}})
    rows += [
        (
            f"relearning `{a}`: target acc step 0 -> last",
            [_relearn_cell(r, a, n == "base") for n, r in zip(names, rs, strict=True)],
        )
        for a in attacks
    ]
    head = ["", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in rows]
    chance = fmt(nested(rs[0], "probes", "rings", "target", "chance")) if rs else DASH
    n_probes = {ring: nested(rs[0], "probes", "rings", ring, "logprob", "n") for ring in RINGS} if rs else {}
    note = (
        f"Log-probability accuracy (chance {chance}); in brackets the paired difference against the base model "
        f"and its 95% bootstrap CI. Probes per ring: {', '.join(f'{k} {v}' for k, v in n_probes.items())}."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"
