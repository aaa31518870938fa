"""Finding inputs on disk: series folders, volumes and images, split files, natural order."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import DataError
from .readers import IMAGE_SUFFIXES, PIXEL_TAGS, is_image, is_nifti, looks_like_dicom, path_stem

__all__ = ["natural_key", "split_lines", "read_split", "folder_has_dicom", "discover_inputs", "count_slices"]


def natural_key(text: str) -> list:
    """Sort ``2`` before ``10`` (``0_2`` before ``0_10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def split_lines(split: str | Path) -> list[tuple[int, list[str]]]:
    """(line number, tokens) of a split file's non-blank, non-comment lines."""
    split = Path(split)
    if not split.is_file():
        raise FileNotFoundError(f"split file not found: {split}")
    lines = []
    for lineno, line in enumerate(split.read_text().splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append((lineno, line.split()))
    if not lines:
        raise DataError(f"{split}: split file names no image")
    return lines


def read_split(split: str | Path) -> list[str]:
    """Stems named in a split file: one name or stem per line (first token used; COVIDx-style
    lines carry class and box after the name)."""
    return [path_stem(tokens[0]) if is_image(tokens[0]) else tokens[0] for _, tokens in split_lines(split)]


def folder_has_dicom(folder: Path) -> bool:
    return any(f.is_file() and not f.name.startswith(".") and looks_like_dicom(f) for f in folder.iterdir())


def discover_inputs(paths: str | Path | list[str | Path]) -> list[Path]:
    """Expand inputs into readable units: DICOM series folders, NIfTI files, images.

    A folder whose files include DICOM is one series; otherwise its NIfTI and image
    files are taken one by one (natural order) and its subfolders searched the same way.

    Raises:
        FileNotFoundError: an input does not exist (named).
        ValueError: nothing readable was found (named).
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found: list[Path] = []

    def visit(folder: Path) -> None:
        if folder_has_dicom(folder):
            found.append(folder)
            return
        entries = sorted(folder.iterdir(), key=lambda p: natural_key(p.name))
        for entry in entries:
            if entry.is_file() and (is_nifti(entry) or is_image(entry)):
                found.append(entry)
        for entry in entries:
            if entry.is_dir() and not entry.name.startswith("."):
                visit(entry)

    for item in items:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        if path.is_dir():
            before = len(found)
            visit(path)
            if len(found) == before:
                raise DataError(
                    f"{path}: no DICOM series, NIfTI ({'/'.join(('.nii', '.nii.gz'))}) or image "
                    f"({'/'.join(IMAGE_SUFFIXES)}) files found"
                )
        else:
            found.append(path)
    return found


def _holds_pixels(path: Path) -> bool:
    """Whether a DICOM file holds an image (a structured report or a stub does not); the
    pixel bytes are not read (values over 1 KB are deferred)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, defer_size=1024)
    except Exception:
        return True   # unreadable: the reader skips it, or reports it, by name
    return any(tag in ds for tag in PIXEL_TAGS)


def count_slices(path: Path) -> int:
    """Slices in one input without decoding pixels."""
    if path.is_dir():
        from pydicom.misc import is_dicom

        files = [f for f in path.iterdir() if f.is_file() and not f.name.startswith(".") and is_dicom(f)]
        return sum(1 for f in files if _holds_pixels(f))
    if is_nifti(path):
        import nibabel as nib

        try:
            shape = nib.load(str(path)).shape
        except Exception as exc:
            raise DataError(f"{path}: not a readable NIfTI file ({exc})") from None
        return 1 if len(shape) == 2 else int(shape[2])
    if looks_like_dicom(path):
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise DataError(f"{path}: not a readable DICOM file ({exc})") from None
        return int(ds.get("NumberOfFrames", 1) or 1)
    return 1
