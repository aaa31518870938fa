"""``ctlesion verify-data``: check a dataset before a long training run (like nnU-Net's
``verify_dataset_integrity``).

:func:`verify_data` returns a :class:`VerifyReport`: one :class:`Check` per row of the table
that :func:`format_verify_report` prints. A check is ``ok``, ``FAIL`` (a problem: the exit
status is 1) or ``info`` (counts, and facts that are not errors, such as instances under the
minimum area, which training drops by design). Every problem names its file.

What is checked depends on the input:

* lesion-mask folders (``cncb``, ``semiseg``): files readable; image/mask pairs complete;
  image and mask sizes equal; mask values inside the format's table; NaN or constant images;
  slices and lesions per class; instances under ``min_area``; duplicate images (pixel hash);
* split files (``.txt``, one or more): lines parse, names repeated inside a split, names and
  patients in more than one split;
* any other format ``--data`` accepts (DICOM series, NIfTI, images, COVID-CT-MD,
  classification folders): the dataset builds; every slice reads; NaN or constant slices;
  slices per class; duplicate slices.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .masks import CONSOLIDATION, GGO, LUNG

__all__ = ["Check", "VerifyReport", "verify_data", "format_verify_report", "split_patient_id"]

_LIST = 8  # problems listed per check before "... and N more"
_CODE_NAMES = {LUNG: "lung", GGO: "GGO", CONSOLIDATION: "C"}


@dataclass
class Check:
    name: str
    status: str = "ok"  # "ok", "FAIL" or "info"
    detail: str = ""
    problems: list[str] = field(default_factory=list)

    def fail(self, problem: str) -> None:
        self.status = "FAIL"
        self.problems.append(problem)


@dataclass
class VerifyReport:
    path: str
    format: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.status != "FAIL" for c in self.checks)

    def as_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "ok": self.ok,
                "checks": [{"name": c.name, "status": c.status, "detail": c.detail, "problems": c.problems}
                           for c in self.checks]}


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes() + str(array.shape).encode()).hexdigest()


def _duplicates(check: Check, hashes: dict[str, list[str]]) -> None:
    groups = [names for names in hashes.values() if len(names) > 1]
    check.detail = f"{len(groups)} group(s) of identical images" if groups else "none"
    for names in groups:
        check.fail(" = ".join(names[:5]) + (" ..." if len(names) > 5 else ""))


def _image_values(check: Check, name: str, pixels: np.ndarray) -> None:
    if not np.isfinite(pixels).all():
        check.fail(f"{name}: NaN or infinite values")
    elif pixels.size and pixels.min() == pixels.max():
        check.fail(f"{name}: constant image (every pixel {float(pixels.flat[0]):g})")


# --------------------------------------------------------------------------- mask folders


def _verify_mask_folder(root: Path, layout: str, min_area: int, progress: bool) -> list[Check]:
    from PIL import Image

    from .datasets import LAYOUTS
    from .discovery import natural_key
    from .readers import PillowReader

    img_name, mask_name, lut = LAYOUTS[layout]
    readable, pairs, sizes, values = (Check("files readable"), Check("image/mask pairs complete"),
                                      Check("image/mask sizes equal"), Check(f"mask values in the {layout} table"))
    content, small, dups = Check("NaN or constant images"), Check(f"instances under min area {min_area} px"), \
        Check("duplicate images")
    per_class_slices, per_class_lesions = Counter(), Counter()
    img_dir, mask_dir = root / img_name, root / mask_name
    for folder in (img_dir, mask_dir):
        if not folder.is_dir():
            readable.fail(f"{folder}: folder missing (the {layout} layout has {img_name}/ and {mask_name}/)")
    if readable.status == "FAIL":
        return [readable]
    suffixes = (".jpg", ".jpeg", ".png")
    images = {f.stem: f for f in img_dir.iterdir() if f.is_file() and f.suffix.lower() in suffixes}
    masks = {f.stem: f for f in mask_dir.iterdir() if f.is_file() and f.suffix.lower() == ".png"}
    for stem in sorted(set(images) - set(masks), key=natural_key):
        pairs.fail(f"{images[stem]}: no mask {mask_dir / (stem + '.png')}")
    for stem in sorted(set(masks) - set(images), key=natural_key):
        pairs.fail(f"{masks[stem]}: no image in {img_dir}")
    pairs.detail = f"{len(images)} images, {len(masks)} masks"
    reader, hashes = PillowReader(), defaultdict(list)
    seen_values: set[int] = set()
    tiny = 0
    for stem in tqdm(sorted(images, key=natural_key), disable=not progress, desc="verify", unit="image"):
        try:
            pixels = reader.read(images[stem]).array[0]
        except Exception as exc:  # noqa: BLE001 - reporting unreadable files is this command's job
            readable.fail(f"{images[stem]}: {exc}" if str(images[stem]) not in str(exc) else str(exc))
            continue
        _image_values(content, images[stem].name, pixels)
        hashes[_digest(pixels)].append(images[stem].name)
        if stem not in masks:
            continue
        try:
            with Image.open(masks[stem]) as img:
                raw = np.array(img)
        except Exception as exc:  # noqa: BLE001
            readable.fail(f"{masks[stem]}: not a readable image ({exc})")
            continue
        if raw.ndim != 2:
            values.fail(f"{masks[stem]}: mask has {raw.ndim} dimensions (shape {raw.shape}); a label PNG is 2-D")
            continue
        if raw.shape != pixels.shape:
            sizes.fail(f"{masks[stem]}: {raw.shape[0]}x{raw.shape[1]} but image {images[stem].name} is "
                       f"{pixels.shape[0]}x{pixels.shape[1]}")
        present = {int(v) for v in np.unique(raw)}
        seen_values |= present
        bad = sorted(present - set(lut))
        if bad:
            values.fail(f"{masks[stem]}: values {bad} outside {sorted(lut)}")
            continue
        codes = np.zeros(raw.shape, np.uint8)
        for value, code in lut.items():
            codes[raw == value] = code
        tiny += _count_instances(codes, min_area, per_class_slices, per_class_lesions, small, masks[stem].name)
    small.status = "info"
    small.detail = f"{tiny} instance(s) in {len(small.problems)} mask row(s); training drops them"
    readable.detail = f"{len(images)} images, {len(masks)} masks"
    values.detail = f"values seen {sorted(seen_values)}"
    _duplicates(dups, hashes)
    return [readable, pairs, sizes, values, content, _counts("slices per class", per_class_slices),
            _counts("lesions per class (8-connected, any size)", per_class_lesions), small, dups]


def _count_instances(codes, min_area, slices: Counter, lesions: Counter, small: Check, name: str) -> int:
    """Count slices and 8-connected lesions per class; list (and return) those <= ``min_area``."""
    from skimage.measure import label as cc_label

    total = 0
    for code, cls in _CODE_NAMES.items():
        binary = codes == code
        if not binary.any():
            continue
        slices[cls] += 1
        if code == LUNG:
            continue
        components = cc_label(binary, connectivity=2)
        areas = np.bincount(components.ravel())[1:]
        lesions[cls] += len(areas)
        tiny = int((areas <= min_area).sum())
        if tiny:
            small.problems.append(f"{name}: {tiny} {cls} instance(s) of <= {min_area} px")
            total += tiny
    return total


def _counts(name: str, counter: Counter) -> Check:
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"
    return Check(name, "info", detail)


# --------------------------------------------------------------------------- split files


def split_patient_id(name: str) -> str | None:
    """The patient of a split-file name: COVIDx-CT rules (:func:`.classification.covidx_patient_id`),
    the CNCB class-first names ``<c>_<pid>_<scan>_<slice>`` of the author's split files, and
    ``None`` for names that carry no patient (iCTCF ``<label>_<nCT|pCT><n>``: a slice number)."""
    from .classification import _classfirst_patient_id, covidx_patient_id

    stem = Path(name).stem
    if re.fullmatch(r"\d_[np]CT\d+", stem):
        return None
    if re.fullmatch(r"\d+_\d+_\d+_\d+", stem):
        return _classfirst_patient_id(stem, int(stem.split("_")[0]))
    return covidx_patient_id(name)


def _verify_splits(files: list[Path]) -> list[Check]:
    readable, repeated = Check("split files readable"), Check("names repeated inside a split")
    names_across, patients_across = Check("names in more than one split"), Check("patients in more than one split")
    names: dict[str, dict[str, int]] = {}
    for f in files:
        try:
            lines = f.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            readable.fail(f"{f}: not readable as text ({exc})")
            continue
        entries = [line.split()[0] for line in lines if line.strip() and not line.startswith("#")]
        if not entries:
            readable.fail(f"{f}: names no image")
        counts = Counter(entries)
        for name, n in counts.items():
            if n > 1:
                repeated.fail(f"{f.name}: {name} appears {n} times")
        names[str(f)] = counts
    readable.detail = ", ".join(f"{Path(k).name} {sum(v.values())} lines" for k, v in names.items())
    by_name, by_patient, unknown = defaultdict(set), defaultdict(set), 0
    for split, counts in names.items():
        for name in counts:
            by_name[name].add(Path(split).name)
            pid = split_patient_id(name)
            if pid is None:
                unknown += 1
            else:
                by_patient[pid].add(Path(split).name)
    for name, splits in sorted(by_name.items()):
        if len(splits) > 1:
            names_across.fail(f"{name} in {', '.join(sorted(splits))}")
    for pid, splits in sorted(by_patient.items()):
        if len(splits) > 1:
            patients_across.fail(f"patient {pid} in {', '.join(sorted(splits))}")
    if len(files) < 2:
        patients_across.status, patients_across.detail = "info", "one split file: nothing to compare"
    else:
        patients_across.detail = f"{len(by_patient)} patients over {len(files)} splits"
    if unknown:
        if patients_across.status == "ok":
            patients_across.status = "info"
        patients_across.detail += f"; {unknown} name(s) carry no patient id (iCTCF slice names): not checked"
    return [readable, repeated, names_across, patients_across]


# --------------------------------------------------------------------------- any dataset


def _verify_dataset(cfg, progress: bool) -> list[Check]:
    from .factory import build_dataset

    builds = Check("dataset builds")
    try:
        dataset = build_dataset(cfg, "both")
    except Exception as exc:  # noqa: BLE001 - a dataset that does not build is a finding, not a crash
        builds.fail(str(exc))
        return [builds]
    builds.detail = f"{len(dataset)} slices ({cfg.format})"
    readable, content, dups = Check("slices readable"), Check("NaN or constant slices"), Check("duplicate slices")
    classes, lesions, infected, hashes = Counter(), Counter(), Counter(), defaultdict(list)
    names = getattr(dataset, "class_names", None)
    for i in tqdm(range(len(dataset)), disable=not progress, desc="verify", unit="slice"):
        try:
            sample = dataset[i]
        except Exception as exc:  # noqa: BLE001
            readable.fail(f"slice {i}: {exc}")
            continue
        image = sample.image.numpy()
        _image_values(content, sample.sample_id, image)
        hashes[_digest(image)].append(sample.sample_id)
        if sample.label is not None:
            classes[names[sample.label] if names and sample.label < len(names) else str(sample.label)] += 1
        if sample.meta.get("infected") is not None:
            infected[f"{names[sample.label] if names else sample.label} "
                     f"{'infected' if sample.meta['infected'] else 'clear'}"] += 1
        if sample.target is not None:
            for label in sample.target["labels"].tolist():
                lesions[("GGO", "C")[label - 1]] += 1
    readable.detail = f"{len(dataset)} slices"
    _duplicates(dups, hashes)
    checks = [builds, readable, content, dups]
    if classes:
        checks.append(_counts("slices per class", classes))
    if infected:
        checks.append(_counts("slices by infection label", infected))
    if lesions:
        checks.append(_counts("lesions per class", lesions))
    return checks


# --------------------------------------------------------------------------- entry point


def verify_data(paths, fmt: str | None = None, min_area: int = 100, progress: bool = True) -> VerifyReport:
    """Check a dataset folder, a data spec or split files; never raises for bad data.

    Args:
        paths: one path (folder, file, ``FORMAT:PATH``) or several split files.
        fmt: force a format (one of :data:`~.datasets.FORMATS`, or ``split``).
        min_area: the instance area filter to report against (training's ``min_area``).
    """
    from .datasets import LAYOUTS
    from .factory import parse_data_spec

    paths = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    shown = " ".join(paths)
    missing = [p for p in paths if ":" not in p and not Path(p).exists()]
    if missing:
        check = Check("files readable")
        for p in missing:
            check.fail(f"{p}: not found")
        return VerifyReport(shown, fmt or "unknown", [check])
    if fmt == "split" or (fmt is None and all(Path(p).is_file() and Path(p).suffix.lower() in (".txt", ".csv")
                                               for p in paths)):
        return VerifyReport(shown, "split", _verify_splits([Path(p) for p in paths]))
    if len(paths) > 1:
        check = Check("input")
        check.fail("several paths are verified together only as split files (.txt); give one dataset folder")
        return VerifyReport(shown, fmt or "unknown", [check])
    spec = f"{fmt}:{paths[0]}" if fmt else paths[0]
    try:
        cfg = parse_data_spec(spec)
    except (ValueError, FileNotFoundError) as exc:
        check = Check("format detected")
        check.fail(str(exc))
        return VerifyReport(shown, fmt or "unknown", [check])
    cfg.min_area = min_area
    cfg.exclude_uninfected = False  # COVID-CT-MD: check every slice, not only those training keeps
    if cfg.format in LAYOUTS:
        return VerifyReport(shown, cfg.format, _verify_mask_folder(Path(cfg.root), cfg.format, min_area, progress))
    return VerifyReport(shown, cfg.format, _verify_dataset(cfg, progress))


def format_verify_report(report: VerifyReport) -> str:
    """The table ``verify-data`` prints, problems listed under each failing check."""
    width = max(len(c.name) for c in report.checks)
    lines = [f"{report.path} ({report.format})", f"{'check':<{width}}  result  details"]
    for c in report.checks:
        lines.append(f"{c.name:<{width}}  {c.status:<6}  {c.detail}")
        for problem in c.problems[:_LIST]:
            lines.append(f"{'':<{width}}    - {problem}")
        if len(c.problems) > _LIST:
            lines.append(f"{'':<{width}}    ... and {len(c.problems) - _LIST} more")
    lines.append("clean" if report.ok else
                 f"{sum(c.status == 'FAIL' for c in report.checks)} check(s) failed")
    return "\n".join(lines)
