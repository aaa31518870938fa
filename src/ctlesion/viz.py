"""Pictures: prediction overlays, contact sheets and confusion matrices.

Overlays are plain PIL images (no matplotlib) so they are cheap enough to write for
every slice of a volume; the confusion matrix uses matplotlib's object API (a bare
``Figure``), which renders off-screen without touching the global pyplot backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

__all__ = [
    "CLASS_COLOURS", "FALLBACK_PALETTE", "GROUND_TRUTH_COLOUR", "class_colour",
    "draw_overlay", "save_overlay", "contact_sheet", "plot_confusion_matrix", "draw_roi_weights",
]

# RGB per class name; unknown names take the fallback palette by class id.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "GGO": (255, 215, 0),      # yellow: faint ground-glass
    "C": (230, 30, 30),        # red: dense consolidation
    "lesion": (255, 130, 0),   # orange: GGO and C merged
    "lung": (60, 140, 255),    # blue, drawn more translucent (see _FILL_ALPHA)
}
FALLBACK_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 200, 120), (200, 80, 255), (0, 200, 230), (255, 90, 180),
    (150, 220, 0), (255, 160, 120), (120, 120, 255), (255, 255, 255),
)
GROUND_TRUTH_COLOUR = (255, 255, 255)
_FILL_ALPHA = {"lung": 0.2}
_DEFAULT_ALPHA = 0.4
_MIN_SIDE = 256  # smaller images are upscaled (integer factor) so labels stay legible


def class_colour(name: str, class_id: int = 1) -> tuple[int, int, int]:
    """The RGB colour of a class: :data:`CLASS_COLOURS` by name, else the fallback
    palette by (1-based) class id."""
    if name in CLASS_COLOURS:
        return CLASS_COLOURS[name]
    return FALLBACK_PALETTE[(max(int(class_id), 1) - 1) % len(FALLBACK_PALETTE)]


def _numpy(x) -> np.ndarray:
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _grey_rgb(image) -> np.ndarray:
    """``[1,H,W]``, ``[H,W]`` or ``[3,H,W]`` values in [0, 1] -> uint8 ``[H,W,3]``."""
    arr = _numpy(image).astype(np.float32)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be [1,H,W], [H,W] or [3,H,W]; got shape {_numpy(image).shape}")
    return (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _masks(masks, threshold: float, shape: tuple[int, int]) -> np.ndarray:
    """``[K,1,H,W]`` / ``[K,H,W]`` probabilities or 0/1 -> bool ``[K,H,W]``."""
    if masks is None:
        return np.zeros((0, *shape), bool)
    m = _numpy(masks)
    if m.ndim == 4:
        m = m[:, 0]
    if m.ndim == 2:
        m = m[None]
    if m.shape[1:] != tuple(shape):
        raise ValueError(f"masks of shape {m.shape[1:]} do not match the image {tuple(shape)}")
    if m.dtype == bool:
        return m
    if np.issubdtype(m.dtype, np.integer):
        return m > 0
    return m > threshold


def _upscale(mask: np.ndarray, scale: int) -> np.ndarray:
    if scale == 1:
        return mask
    return np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    return mask & ~ndi.binary_erosion(mask, iterations=width, border_value=0)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def _label_text(name: str, score: float | None) -> str:
    return name if score is None else f"{name} {score:.2f}"


def draw_overlay(
    image,
    prediction: Mapping | None = None,
    class_names: Sequence[str] = ("lesion",),
    score_threshold: float = 0.5,
    target: Mapping | None = None,
    mask_threshold: float = 0.5,
    title: str | None = None,
) -> Image.Image:
    """Draw predictions (and optionally ground truth) over a grey CT slice.

    Args:
        image: ``[1,H,W]`` or ``[H,W]`` tensor / array in ``[0, 1]`` (already windowed).
        prediction: torchvision detector output: ``boxes`` ``[K,4]`` (x1, y1, x2, y2 px),
            ``labels`` ``[K]`` 1-based into ``class_names``, ``scores`` ``[K]`` (optional:
            all drawn, no score shown), ``masks`` ``[K,1,H,W]`` or ``[K,H,W]``
            probabilities (optional). Instances with ``score < score_threshold`` are
            not drawn at all.
        class_names: detector class names; class id ``i`` is ``class_names[i - 1]``.
        target: optional ground truth (``masks``, else ``boxes``) drawn as dashed
            white/black outlines for comparison.
        mask_threshold: probability above which a mask pixel counts as inside.
        title: optional caption, drawn in a black strip *above* the image.

    Returns:
        An RGB image. Images whose longer side is under 256 px are enlarged by the
        integer factor ``ceil(256 / longer side)`` (nearest neighbour), so the result is
        ``(W * f, H * f)``, plus the title strip when ``title`` is given. Each kept
        instance gets a translucent fill and an outline in its class colour, a box, and a
        ``"<class> <score>"`` label; a legend of the class colours sits in the top-left
        corner.
    """
    rgb = _grey_rgb(image)
    height, width = rgb.shape[:2]
    scale = max(1, math.ceil(_MIN_SIDE / max(height, width)))
    if scale > 1:
        rgb = _upscale(rgb, scale)
    big_h, big_w = rgb.shape[:2]
    line = max(1, round(min(big_h, big_w) / 256))  # outline / box width in output px
    canvas = rgb.astype(np.float32)

    # Kept instances, lowest score first so the most confident ends on top.
    instances = []
    if prediction is not None:
        boxes = _numpy(prediction.get("boxes"))
        labels = _numpy(prediction.get("labels"))
        scores = _numpy(prediction.get("scores"))
        masks = _masks(prediction.get("masks"), mask_threshold, (height, width))
        count = len(labels) if labels is not None else (len(boxes) if boxes is not None else len(masks))
        for k in range(count):
            score = None if scores is None else float(scores[k])
            if score is not None and score < score_threshold:
                continue
            cls = int(labels[k]) if labels is not None else 1
            name = class_names[cls - 1] if 1 <= cls <= len(class_names) else f"class {cls}"
            mask = masks[k] if k < len(masks) else None
            box = None if boxes is None or k >= len(boxes) else [float(b) for b in boxes[k]]
            if box is None and mask is not None and mask.any():
                rows, cols = np.nonzero(mask)
                box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            instances.append((score if score is not None else math.inf, name, cls, mask, box, score))
        instances.sort(key=lambda item: item[0])

    # Translucent fills and solid outlines (numpy, per pixel).
    for _, name, cls, mask, _, _ in instances:
        if mask is None or not mask.any():
            continue
        colour = np.array(class_colour(name, cls), np.float32)
        big = _upscale(mask, scale)
        alpha = _FILL_ALPHA.get(name, _DEFAULT_ALPHA)
        canvas[big] = (1.0 - alpha) * canvas[big] + alpha * colour
        canvas[_outline(big, line)] = colour

    # Ground truth: white/black dashed outlines (visible on lung and on dense lesions),
    # on top of the fills so both stay visible.
    gt_drawn = False
    if target is not None:
        gt_masks = _masks(target.get("masks"), 0.5, (height, width))
        if len(gt_masks):
            rr, cc = np.mgrid[0:big_h, 0:big_w]
            dash = ((rr + cc) // max(3, 3 * line)) % 2 == 0
            for mask in gt_masks:
                if mask.any():
                    edge = _outline(_upscale(mask, scale), line)
                    canvas[edge & dash] = GROUND_TRUTH_COLOUR
                    canvas[edge & ~dash] = 0.0
                    gt_drawn = True

    out = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    font = _font(int(np.clip(round(min(big_h, big_w) / 36), 11, 28)))

    if target is not None and not gt_drawn and target.get("boxes") is not None:
        for box in _numpy(target["boxes"]):
            x1, y1, x2, y2 = (float(b) * scale for b in box)
            _dashed_rectangle(draw, (x1, y1, x2 - 1, y2 - 1), GROUND_TRUTH_COLOUR, line, 4 * line)
            gt_drawn = True

    # Boxes and labels (text on a filled tag in the class colour, kept inside the image).
    for _, name, cls, _, box, score in instances:
        if box is None:
            continue
        colour = class_colour(name, cls)
        x1, y1, x2, y2 = (b * scale for b in box)
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=line)
        text = _label_text(name, score)
        tw, th = _text_size(draw, text, font)
        pad = max(1, line)
        ty = y1 - th - 3 * pad if y1 - th - 3 * pad >= 0 else y2 + pad
        ty = min(max(0, ty), big_h - th - 2 * pad)
        tx = min(max(0, x1), big_w - tw - 2 * pad)
        draw.rectangle((tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad), fill=colour)
        text_fill = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
        draw.text((tx + pad, ty + pad), text, fill=text_fill, font=font, anchor="la")

    # Legend: every class name (plus unnamed ids drawn), and ground truth when shown.
    shown = [(name, i + 1) for i, name in enumerate(class_names)]
    shown += [item for item in dict.fromkeys((name, cls) for _, name, cls, *_ in instances) if item not in shown]
    entries = [(name, class_colour(name, cls), False) for name, cls in shown]
    if gt_drawn:
        entries.append(("ground truth", GROUND_TRUTH_COLOUR, True))
    _legend(draw, entries, font, line)

    if title:
        strip_h = _text_size(draw, title, font)[1] + 8 * line
        titled = Image.new("RGB", (big_w, big_h + strip_h), (0, 0, 0))
        titled.paste(out, (0, strip_h))
        tdraw = ImageDraw.Draw(titled)
        tw = _text_size(tdraw, title, font)[0]
        tdraw.text((max(0, (big_w - tw) // 2), 4 * line), title, fill=(255, 255, 255), font=font, anchor="la")
        out = titled
    return out


def _dashed_rectangle(draw, xyxy, colour, width, dash):
    x1, y1, x2, y2 = xyxy
    for a, b, horizontal, fixed in ((x1, x2, True, y1), (x1, x2, True, y2), (y1, y2, False, x1), (y1, y2, False, x2)):
        start = a
        while start < b:
            end = min(start + dash, b)
            pts = (start, fixed, end, fixed) if horizontal else (fixed, start, fixed, end)
            draw.line(pts, fill=colour, width=width)
            start += 2 * dash


def _legend(draw, entries, font, line):
    if not entries:
        return
    sizes = [_text_size(draw, name, font) for name, _, _ in entries]
    row_h = max(h for _, h in sizes) + 4 * line
    swatch = row_h - 4 * line
    pad = 3 * line
    box_w = pad * 3 + swatch + max(w for w, _ in sizes)
    box_h = pad * 2 + row_h * len(entries)
    draw.rectangle((0, 0, box_w, box_h), fill=(20, 20, 20), outline=(90, 90, 90))
    for i, (name, colour, dashed) in enumerate(entries):
        y = pad + i * row_h + 2 * line
        if dashed:
            _dashed_rectangle(draw, (pad, y, pad + swatch, y + swatch), colour, line, max(2, swatch // 4))
        else:
            draw.rectangle((pad, y, pad + swatch, y + swatch), fill=colour)
        draw.text((2 * pad + swatch, y), name, fill=(255, 255, 255), font=font, anchor="la")


def save_overlay(path: str | Path, image, prediction=None, **kwargs) -> Path:
    """:func:`draw_overlay` written to ``path`` as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_overlay(image, prediction, **kwargs).save(path, format="PNG")
    return path


def contact_sheet(
    images: Sequence[Image.Image],
    columns: int = 4,
    padding: int = 4,
    background: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """Tile images row by row, ``columns`` per row, in equal cells (each image centred
    in a cell as large as the largest image) with ``padding`` px between cells."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    columns = max(1, min(int(columns), len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    sheet = Image.new(
        "RGB",
        (columns * cell_w + (columns + 1) * padding, rows * cell_h + (rows + 1) * padding),
        background,
    )
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        x = padding + c * (cell_w + padding) + (cell_w - im.width) // 2
        y = padding + r * (cell_h + padding) + (cell_h - im.height) // 2
        sheet.paste(im.convert("RGB"), (x, y))
    return sheet


def plot_confusion_matrix(
    cm,
    class_names: Sequence[str],
    path: str | Path,
    normalize: bool = False,
    title: str | None = None,
) -> Path:
    """Write a confusion matrix PNG (rows true, columns predicted).

    Every cell shows the count and its row-normalised percentage (the per-class recall
    on the diagonal). ``normalize`` colours cells by the row fraction and shows the
    percentage first; otherwise colours follow raw counts. Returns ``path``.
    """
    # Bare Figure + its own Agg canvas: no pyplot, so no global backend change.
    from matplotlib.figure import Figure

    cm = np.asarray(_numpy(cm), dtype=np.float64)
    n = len(class_names)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {n} class names")
    row_sum = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, row_sum, out=np.zeros_like(cm), where=row_sum > 0)
    shade = frac if normalize else cm
    vmax = 1.0 if normalize else max(float(cm.max()), 1.0)

    side = 1.2 + 1.1 * n
    fig = Figure(figsize=(side + 1.2, side), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shade, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=list(class_names), rotation=30, ha="right")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or ("confusion matrix (row-normalised)" if normalize else "confusion matrix"))
    for i in range(n):
        for j in range(n):
            count = f"{int(round(cm[i, j]))}" if float(cm[i, j]).is_integer() else f"{cm[i, j]:.2f}"
            pct = f"{100.0 * frac[i, j]:.1f}%"
            text = f"{pct}\n({count})" if normalize else f"{count}\n({pct})"
            dark = shade[i, j] > 0.55 * vmax
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def draw_roi_weights(image, boxes, weights, title: str | None = None, top: int = 8) -> Image.Image:
    """Draw the RoIs a mask-feature head read, each with the weight it received.

    ``boxes`` ``[n, 4]`` (x1, y1, x2, y2 px in the image's frame); ``weights`` ``[n]``
    (attention weights, or Affinity's per-RoI ``W v``, which may be negative). Boxes are
    drawn heaviest last, with line width and opacity growing with ``|weight|``; the
    ``top`` heaviest get a rank and weight label. Repeated (padding) boxes are drawn once.
    Magenta marks a positive weight, cyan a negative one.
    """
    rgb = _grey_rgb(image)
    h, w = rgb.shape[:2]
    scale = max(1, -(-_MIN_SIDE // max(h, w)))
    base = Image.fromarray(rgb).resize((w * scale, h * scale), Image.NEAREST).convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    boxes_np = _numpy(boxes).reshape(-1, 4).astype(np.float64)
    weights_np = _numpy(weights).reshape(-1).astype(np.float64)
    if len(boxes_np) != len(weights_np):
        raise ValueError(f"{len(boxes_np)} boxes but {len(weights_np)} weights")
    # Padding repeats a box; keep its first (highest-ranked) occurrence with summed weight.
    unique: dict[tuple, float] = {}
    for box, weight in zip(map(tuple, np.round(boxes_np, 2)), weights_np):
        unique[box] = unique.get(box, 0.0) + weight
    items = sorted(unique.items(), key=lambda kv: abs(kv[1]))
    peak = max((abs(v) for _, v in items), default=0.0) or 1.0
    font = _font(max(10, 4 * scale + 6))
    labelled = {box for box, _ in items[-top:]}
    rank = {box: i + 1 for i, (box, _) in enumerate(reversed(items))}
    for box, weight in items:
        strength = abs(weight) / peak
        colour = (255, 0, 255) if weight >= 0 else (0, 220, 255)
        alpha = int(70 + 185 * strength)
        xyxy = [c * scale for c in box]
        draw.rectangle(xyxy, outline=(*colour, alpha), width=max(1, int(round(1 + 3 * strength))))
        if box in labelled:
            text = f"#{rank[box]} {weight:+.2f}"
            tw, th = _text_size(draw, text, font)
            x, y = xyxy[0], max(0, xyxy[1] - th - 2)
            draw.rectangle([x, y, x + tw + 2, y + th + 2], fill=(0, 0, 0, 170))
            draw.text((x + 1, y), text, fill=(*colour, 255), font=font)
    out = Image.alpha_composite(base, layer).convert("RGB")
    if title:
        tw, th = _text_size(ImageDraw.Draw(out), title, font)
        canvas = Image.new("RGB", (out.width, out.height + th + 8), (0, 0, 0))
        canvas.paste(out, (0, th + 8))
        ImageDraw.Draw(canvas).text((4, 3), title, fill=(255, 255, 255), font=font)
        out = canvas
    return out
