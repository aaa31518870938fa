"""A self-contained HTML report (no network, no external files): per volume the verdict,
the burden table, lesion area and class probability per slice, and a slice browser.

Everything is inlined: the plots as SVG (matplotlib), the slice overlays as JPEG data
URIs, the per-slice numbers as JSON for the browser's slider (plain HTML + JavaScript).
``report.html#v=0&s=42`` opens volume 0 at slice 42.
"""

from __future__ import annotations

import base64
import html
import io
import json

__all__ = ["render_report", "NOTICE"]

NOTICE = "Research software, not a medical device: not for diagnosis or treatment decisions."

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
h1{margin-bottom:4px} .notice{background:#fff3cd;border:1px solid #e0c36b;padding:8px 12px;border-radius:4px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2} td.k,th.k{text-align:left} section.volume{border-top:2px solid #444;margin-top:24px}
.browser{display:flex;gap:16px;align-items:flex-start} .browser img{width:384px;image-rendering:auto;background:#000}
input[type=range]{width:384px} .mono{font-family:monospace;font-size:12px;word-break:break-all}
.row{display:flex;gap:24px;flex-wrap:wrap} .note{font-size:12px;color:#555;max-width:480px}
"""

_SCRIPT = """
function show(v, s) {
  const vol = VOLUMES[v]; s = Math.max(0, Math.min(vol.slices.length - 1, s));
  document.getElementById('slider-' + v).value = s;
  const img = document.getElementById('frame-' + v);
  img.src = vol.frames[s] || ''; img.dataset.slice = s;
  document.getElementById('slice-label-' + v).textContent = 'slice ' + s + ' / ' + (vol.slices.length - 1);
  const info = vol.slices[s]; const parts = [];
  for (const [name, mm2] of Object.entries(info.lesion_area_mm2)) parts.push(name + ' ' + mm2.toFixed(2) + ' mm\\u00b2');
  if (info.probabilities) for (const [name, p] of Object.entries(info.probabilities)) parts.push('p(' + name + ') ' + p.toFixed(3));
  document.getElementById('slice-info-' + v).textContent = parts.join(' \\u00b7 ');
}
document.querySelectorAll('input.slider').forEach(el => {
  el.addEventListener('input', () => show(+el.dataset.volume, +el.value));
  show(+el.dataset.volume, +el.value);
});
const want = new URLSearchParams(location.hash.slice(1));
if (want.has('s')) {
  const el = document.getElementById('slider-' + (+want.get('v') || 0));
  if (el) { el.value = want.get('s'); el.dispatchEvent(new Event('input')); }
}
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _plot_svg(summary: dict) -> str:
    """Lesion area per slice (and class probabilities, when there are any) as inline SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = summary["slices"]
    index = [s["index"] for s in slices]
    has_probs = any("probabilities" in s for s in slices)
    # A fixed hash salt and no date: the same volumes give the same report (a resumed run's equals
    # an uninterrupted one's).
    with plt.rc_context({"svg.fonttype": "none", "font.size": 9, "svg.hashsalt": "ctlesion"}):
        fig, axes = plt.subplots(2 if has_probs else 1, 1, figsize=(7.5, 4.6 if has_probs else 2.6),
                                 sharex=True, squeeze=False)
        ax = axes[0, 0]
        for name in (slices[0]["lesion_area_mm2"] if slices else {}):
            ax.plot(index, [s["lesion_area_mm2"][name] for s in slices], label=name, lw=1.2)
        ax.set_ylabel("lesion area (mm²)")
        if ax.lines:
            ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
        if has_probs:
            ax = axes[1, 0]
            names = list(next(s["probabilities"] for s in slices if "probabilities" in s))
            for name in names:
                ax.plot(index, [s.get("probabilities", {}).get(name, float("nan")) for s in slices], label=name, lw=1.2)
            ax.set_ylabel("class probability")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(loc="upper right", fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("slice (volume order)")
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
        plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def _burden_table(summary: dict) -> str:
    burden = summary["burden"]
    rows = ["<tr><th class=k>class</th><th>volume (mL)</th><th>3-D lesions</th><th>largest (mL)</th></tr>"]
    for name, b in burden["classes"].items():
        rows.append(f"<tr><td class=k>{_esc(name)}</td><td data-key='{_esc(name)}.volume_ml'>{b['volume_ml']:.3f}</td>"
                    f"<td data-key='{_esc(name)}.lesions'>{b['lesions']}</td>"
                    f"<td data-key='{_esc(name)}.largest_ml'>{b['largest_ml']:.3f}</td></tr>")
    total = burden["all_lesions"]
    rows.append(f"<tr><td class=k>all lesions</td><td data-key='all.volume_ml'>{total['volume_ml']:.3f}</td>"
                f"<td data-key='all.lesions'>{total['lesions']}</td><td></td></tr>")
    pct = burden["percent_lung_affected"]
    rows.append(f"<tr><td class=k>lung</td><td data-key='lung.volume_ml'>{burden['lung']['volume_ml']:.3f}</td>"
                f"<td colspan=2 class=k>see below</td></tr>")
    rows.append(f"<tr><td class=k><b>lung affected</b></td><td data-key='percent_lung_affected'>"
                f"{'n/a' if pct is None else f'{pct:.2f}'}</td><td colspan=2 class=k>% of lung volume</td></tr>")
    return ("<table class=burden>" + "".join(rows) + "</table>"
            f"<p class=note>Lung mask: {_esc(burden['lung']['method'])}; "
            f"{burden['lung']['mask_ml']:.1f} mL before the lesions touching it joined. Lesions wholly "
            f"outside it ({burden['all_lesions']['outside_lung_ml']:.1f} mL) are not in the percentage.</p>")


def _verdict(summary: dict) -> str:
    verdict = summary.get("verdict")
    if not verdict:
        return "<p>No slice classifier in this model: no verdict (lesion detector only).</p>"
    probs = "".join(f"<tr><td class=k>{_esc(n)}</td><td data-key='prob.{_esc(n)}'>{p:.3f}</td></tr>"
                    for n, p in verdict["probabilities"].items())
    return (f"<p>Verdict: <b class=verdict>{_esc(verdict['class'])}</b> ({verdict['method']}; "
            f"{verdict['abnormal_slices']}/{verdict['num_slices']} abnormal slices)</p>"
            f"<table><tr><th class=k>class</th><th>probability</th></tr>{probs}</table>")


def _initial_slice(summary: dict) -> int:
    slices = summary["slices"]
    areas = [sum(s["lesion_area_mm2"].values()) for s in slices]
    if areas and max(areas) > 0:
        return max(range(len(areas)), key=areas.__getitem__)
    return len(slices) // 2


def _volume_section(v: int, summary: dict) -> str:
    n = len(summary["slices"])
    start = _initial_slice(summary)
    spacing = summary["spacing_mm"]
    files = ", ".join(_esc(f"{summary['folder']}/{f}") for f in summary["files"].values()) or "none"
    limits = "".join(f"<li>{_esc(t)}</li>" for t in summary["limits"])
    return f"""
<section class=volume id="volume-{v}">
<h2>{_esc(summary['folder'])}</h2>
<p class=mono>{_esc(summary['source'])}</p>
<p>{summary['input_kind']} input, {n} slices of {summary['shape_zyx'][1]} x {summary['shape_zyx'][2]},
spacing {spacing['row']:.3f} x {spacing['col']:.3f} x {spacing['slice']:.3f} mm. Files: {files}.</p>
<div class=row><div>{_verdict(summary)}<h3>Lesion burden</h3>{_burden_table(summary)}</div>
<div class=plot>{_plot_svg(summary)}</div></div>
<h3>Slices</h3>
<div class=browser><div>
<input type=range class=slider id="slider-{v}" data-volume="{v}" min=0 max={max(n - 1, 0)} value={start}><br>
<span id="slice-label-{v}"></span><br><img id="frame-{v}" alt="slice overlay"></div>
<div id="slice-info-{v}" class=info></div></div>
<h3>Limits</h3><ul>{limits}</ul>
</section>"""


def render_report(summaries: list[dict], thumbnails: list[list[bytes | None]], model_info: dict) -> str:
    """The report's HTML text for the volumes' summaries and their JPEG slice thumbnails."""
    volumes_js, sections = [], []
    for v, (summary, thumbs) in enumerate(zip(summaries, thumbnails)):
        frames = [("data:image/jpeg;base64," + base64.b64encode(t).decode("ascii")) if t else ""
                  for t in (thumbs or [None] * len(summary["slices"]))]
        volumes_js.append({"frames": frames, "slices": summary["slices"]})
        sections.append(_volume_section(v, summary))
    settings = "".join(f"<tr><td class=k>{_esc(k)}</td><td class=k>{_esc(val)}</td></tr>"
                       for k, val in (model_info.get("settings") or {}).items())
    model = (f"<table><tr><td class=k>model</td><td class=k>{_esc(model_info.get('name'))}</td></tr>"
             f"<tr><td class=k>checkpoint</td><td class='k mono'>{_esc(model_info.get('checkpoint'))}</td></tr>"
             f"<tr><td class=k>weights SHA-256</td><td class='k mono'>{_esc(model_info.get('checkpoint_sha256'))}</td></tr>"
             f"{settings}</table>")
    data = json.dumps(volumes_js).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang=en><head><meta charset=utf-8><title>ctlesion report</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<style>{_STYLE}</style></head><body>
<h1>ctlesion report</h1>
<p class=notice><b>{_esc(NOTICE)}</b></p>
<h3>Model</h3>{model}
{''.join(sections)}
<script>const VOLUMES = {data};</script>
<script>{_SCRIPT}</script>
</body></html>
"""
