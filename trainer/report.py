"""report.html: the run as pictures, one self-contained file (images inline, no script, no fetch).

What it shows: the subject photos; the loss and fidelity curves; a table of every scored step
with the best (by `validation.fidelity.select`) and the served checkpoint marked; before and after
(the instance and class prompts' images before training and at the end); and for each scored
step the prompt set's images. Written by the trainer at the end of the run beside final/
(`report.html`, and a copy inside each export folder so a server finds it beside its model), and
again by `dreambooth export` when another checkpoint is served.
"""
from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from PIL import Image

from .callbacks import METRICS
from .evaluate import PAPER_ROWS
from .storage import Storage, StorageError

REPORT = "report.html"
PHOTO_SIDE = 128
COLUMNS = (("fidelity/dino", "DINO"), ("fidelity/clip_i", "CLIP-I"), ("fidelity/clip_t", "CLIP-T"),
           ("fidelity/instance_distance", "pixel"), ("fidelity/prior_similarity", "prior sim."), ("fidelity/prior_diversity", "prior div."))
CURVE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse}td,th{padding:3px 10px;text-align:right;border-bottom:1px solid #eee}
th:first-child,td:first-child{text-align:left}tr.best td{background:#fff6d5;font-weight:600}
.photos img{width:128px;height:128px;object-fit:cover;margin:0 6px 6px 0;border-radius:4px}
.ckpt{display:inline-block;vertical-align:top;margin:0 12px 16px 0;padding:6px;border:2px solid transparent;border-radius:6px}
.ckpt.best{border-color:#e0a800;background:#fffbea}.ckpt img{display:block;max-width:520px;image-rendering:pixelated}
.tag{display:inline-block;font-size:12px;padding:0 6px;border-radius:8px;background:#e0a800;color:#fff;margin-left:6px}
.tag.served{background:#2c7be5}.muted{color:#777}svg{background:#fafafa;border:1px solid #eee;margin:0 12px 12px 0}
.pair{display:inline-block;margin-right:16px;vertical-align:top}.pair img{display:block;max-width:480px;image-rendering:pixelated}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def png_of(image: Image.Image, side: int | None = None) -> bytes:
    image = image.convert("RGB")
    if side and max(image.size) > side:
        image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def read_optional(storage: Storage, key: str) -> bytes | None:
    try:
        return storage.read_bytes(key) if storage.exists(key) else None
    except StorageError:
        return None


def metric_lines(storage: Storage) -> list[dict[str, Any]]:
    data = read_optional(storage, METRICS)
    lines = []
    for text in (data or b"").decode().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            continue
    return lines


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], width: int = 520, height: int = 220) -> str:
    """An SVG line chart of (x, y) series, with the y range and x range written at the axes."""
    points = [p for values in series.values() for p in values]
    if not points:
        return ""
    left, right, top, bottom = 48, 12, 24, 28
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-6
    scale_x = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    scale_y = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg role="img" aria-label="{html.escape(title)}" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f'<text x="{left}" y="16" font-size="13" font-weight="600">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>',
             f'<text x="{left - 4}" y="{top + 4}" font-size="11" text-anchor="end">{y1:.3g}</text>',
             f'<text x="{left - 4}" y="{height - bottom}" font-size="11" text-anchor="end">{y0:.3g}</text>',
             f'<text x="{left}" y="{height - 8}" font-size="11">step {x0:g}</text>',
             f'<text x="{width - right}" y="{height - 8}" font-size="11" text-anchor="end">{x1:g}</text>']
    for index, (name, values) in enumerate(series.items()):
        colour = CURVE_COLOURS[index % len(CURVE_COLOURS)]
        path = " ".join(f"{scale_x(x):.1f},{scale_y(y):.1f}" for x, y in values)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{path}"/>')
        if len(values) <= 40:
            parts += [f'<circle cx="{scale_x(x):.1f}" cy="{scale_y(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in values]
        parts.append(f'<text x="{width - right - 4}" y="{top + 14 * (index + 1)}" font-size="11" fill="{colour}" text-anchor="end">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "–"


def scores_table(document: dict[str, Any], served_step: int | None) -> str:
    best = (document.get("best") or {}).get("step")
    head = "".join(f"<th>{label}</th>" for _, label in COLUMNS)
    rows = [f"<table><tr><th>step</th>{head}<th></th></tr>"]
    for row in document.get("steps", []):
        step = row["step"]
        tags = []
        if step == best:
            tags.append('<span class="tag">best</span>')
        if served_step is not None and step == served_step:
            tags.append('<span class="tag served">served</span>')
        if step == 0:
            tags.append('<span class="muted">base model</span>')
        elif row.get("kept") is False:
            tags.append('<span class="muted">pruned</span>')
        cls = ' class="best"' if step == best else ""
        rows.append(f"<tr{cls}><td>{step}</td>" + "".join(f"<td>{cell(row.get(name))}</td>" for name, _ in COLUMNS) + f"<td>{''.join(tags)}</td></tr>")
    for label, figures in PAPER_ROWS:
        rows.append(f'<tr class="muted"><td>{html.escape(label)}</td>' + "".join(f"<td>{cell(figures.get(name))}</td>" for name, _ in COLUMNS) + "<td></td></tr>")
    rows.append("</table>")
    return "".join(rows)


def image_tag(png: bytes | None, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{data_uri(png)}">' if png else f'<p class="muted">{html.escape(alt)}: not drawn</p>'


def render_report(title: str, facts: list[tuple[str, str]], document: dict[str, Any], lines: list[dict[str, Any]],
                  photos: list[bytes], before_after: tuple[bytes | None, bytes | None],
                  grids: list[tuple[int, bool, bytes]], served_step: int | None) -> str:
    """The HTML itself (pure): every image arrives as PNG bytes. `grids`: (step, is it the last step, PNG)."""
    best = (document.get("best") or {}).get("step")
    loss = [(line["step"], line["loss"]) for line in lines if isinstance(line.get("loss"), (int, float))]
    curves = {label: [(row["step"], row[name]) for row in document.get("steps", []) if isinstance(row.get(name), (int, float))]
              for name, label in COLUMNS}
    similarity = {k: v for k, v in curves.items() if k in ("DINO", "CLIP-I", "CLIP-T", "prior sim.") and v}
    other = {k: v for k, v in curves.items() if k in ("pixel", "prior div.") and v}
    out = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
           f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><table>"]
    out += [f"<tr><td>{html.escape(k)}</td><td style=\"text-align:left\">{html.escape(v)}</td></tr>" for k, v in facts]
    out.append("</table><h2>Subject photos</h2><div class=\"photos\">")
    out += [f'<img alt="subject photo {i + 1}" src="{data_uri(p)}">' for i, p in enumerate(photos)]
    out.append("</div><h2>Curves</h2>")
    out.append(line_chart("training loss", {"loss": loss}) if loss else '<p class="muted">no loss recorded</p>')
    out.append(line_chart("similarity to the subject and prompt (higher is closer)", similarity))
    out.append(line_chart("pixel distance, prior diversity", other))
    out.append("<h2>Scores per checkpoint</h2>")
    out.append(scores_table(document, served_step))
    out.append('<p class="muted">Cosine similarities, mean over every (generated, photo) pair (CLIP-T: image and prompt); '
               "compare only with figures of the same backbones and prompt set.</p>")
    out.append("<h2>Before and after</h2><p class=\"muted\">Top rows: the instance prompt; bottom rows: the class prompt.</p>")
    out.append(f'<div class="pair">before training{image_tag(before_after[0], "before training")}</div>')
    out.append(f'<div class="pair">after training{image_tag(before_after[1], "after training")}</div>')
    out.append("<h2>The prompt set at each checkpoint</h2>")
    for step, last, png in grids:
        marks = ('<span class="tag">best</span>' if step == best else "") + \
                ('<span class="tag served">served</span>' if served_step is not None and step == served_step else "")
        label = "base model" if step == 0 else f"step {step}" + (" (final)" if last else "")
        cls = "ckpt best" if step == best else "ckpt"
        out.append(f'<div class="{cls}" data-step="{step}"><div>{label}{marks}</div>{image_tag(png, label)}</div>')
    out.append("</body></html>")
    return "".join(out)


def write_report(output: Storage, cfg: Any, document: dict[str, Any], photos: list[Image.Image],
                 served: str | None = None) -> str:
    """Render report.html from what the run stored; returns its URI. `served`: final or step-N."""
    from .validation import step_label

    max_steps = cfg.training.max_steps
    served_step = max_steps if served == "final" else int(served.removeprefix("step-")) if served and served.startswith("step-") else None
    grids = []
    for row in document.get("steps", []):
        step = row["step"]
        png = read_optional(output, f"samples/prompts-{step_label(None if step == max_steps else step)}.png")
        if png:
            grids.append((step, step == max_steps, png))
    before = read_optional(output, f"samples/fidelity-{step_label(0)}.png")
    after = read_optional(output, f"samples/fidelity-{step_label(None)}.png")
    best = document.get("best") or {}
    facts = [("model", cfg.model.source), ("subject", cfg.data.instance_prompt), ("steps", str(max_steps)),
             ("best checkpoint", f"step {best['step']} ({document.get('select')})" if best else "none scored"),
             ("backbones", "; ".join(f"{k}: {v['name']}@{v['revision']} (scale {v['scale']:g})" for k, v in (document.get("backbones") or {}).items()) or "none (pixel distance only)"),
             ("output", output.describe())]
    text = render_report(f"DreamBooth run: {cfg.data.instance_prompt}", facts, document, metric_lines(output),
                         [png_of(photo, PHOTO_SIDE) for photo in photos], (before, after), grids, served_step)
    output.write_text(REPORT, text)
    for prefix in (document.get("exports") or {}).values():
        if isinstance(prefix, str) and output.exists(f"{prefix}/dreambooth.json"):
            output.write_text(f"{prefix}/{REPORT}", text)
    return output.describe(REPORT)
