"""Image readers behind one interface (MONAI style): files in, a :class:`Volume` out.

A :class:`Volume` is a stack of axial slices ``[S, H, W]`` with explicit *units*
(``"HU"`` or ``"stored"``, see :mod:`.windowing`), pixel spacing, the file each slice
came from, optional canonical label maps and metadata. :func:`volume_to_samples` turns a
volume into :class:`~ctlesion.data.sample.Sample` objects, one per slice.

Readers:

* :class:`PillowReader`: one 8-bit PNG/JPG/BMP/TIFF slice (units ``"stored"``).
* :class:`DicomReader`: one DICOM file or a series folder, in HU, sorted head first.
* :class:`NiftiReader`: a NIfTI volume in HU, with an optional label volume.

:func:`read_volume` picks the reader from the path. Every error names the file.

Each reader also *opens* a volume lazily (:func:`open_volume`, ``reader.open(path)``): a
:class:`LazyVolume` holds the headers, geometry and metadata and decodes one slice when it
is asked for, so prediction over a long series holds one slice at a time, not the volume.
A DICOM series reads every header once (pixel data deferred) and one file per slice; a
NIfTI volume slices nibabel's array proxy (``dataobj[..., k]``), which for ``.nii.gz``
decompresses up to the slice (cheap when read in order, a re-read from the start for
every backward jump). ``read`` is ``open(...).load()``: the same values either way.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .masks import BACKGROUND, CONSOLIDATION, extract_instances
from .sample import Sample, empty_target
from .windowing import apply_window, describe_window, resolve_window

PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")  # what holds an image

__all__ = [
    "Volume", "LazyVolume", "open_volume", "ImageReader", "PillowReader", "DicomReader", "NiftiReader", "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES", "read_volume", "volume_to_samples", "make_sample", "path_stem",
    "is_nifti", "is_image", "looks_like_dicom",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_PILLOW_8BIT_MODES = {"L", "P", "RGB", "RGBA", "LA", "1", "CMYK", "YCbCr"}


@dataclass
class Volume:
    """A stack of axial slices with everything needed to window and label it.

    Attributes:
        array: ``[S, H, W]``; float32 HU when ``units == "HU"``, the stored 8-bit values
            (uint8) when ``units == "stored"``.
        units: ``"HU"`` or ``"stored"``.
        spacing: pixel spacing ``(row_mm, col_mm)`` when the file states it, else ``None``.
        source: the file or series folder that was read.
        slice_sources: one file per slice (the series folder's files for DICOM, the
            volume file repeated for NIfTI).
        labels: canonical label maps ``[S, H, W]`` uint8 (codes 0..3, see
            :mod:`.masks`) or ``None``.
        meta: reader-specific facts (``modality``, ``patient_id``, ``slice_positions``...).
    """

    array: np.ndarray
    units: str
    spacing: tuple[float, float] | None
    source: str
    slice_sources: list[str]
    labels: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise DataError(f"{self.source}: volume array must be [S, H, W], got shape {self.array.shape}")
        if len(self.slice_sources) != self.array.shape[0]:
            raise DataError(
                f"{self.source}: {len(self.slice_sources)} slice sources for {self.array.shape[0]} slices"
            )
        if self.labels is not None and self.labels.shape != self.array.shape:
            raise DataError(
                f"{self.source}: labels shape {self.labels.shape} differs from image shape {self.array.shape}"
            )

    @property
    def num_slices(self) -> int:
        return int(self.array.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)

    def slice(self, i: int) -> np.ndarray:
        """Slice ``i`` ``[H, W]`` (the :class:`LazyVolume` interface)."""
        return self.array[i]

    def label_slice(self, i: int) -> np.ndarray | None:
        return None if self.labels is None else self.labels[i]


@dataclass
class LazyVolume:
    """A volume whose slices are decoded one at a time, when asked for.

    Same attributes as :class:`Volume` except ``array``/``labels``: ``shape`` is
    ``(S, H, W)``, :meth:`slice` decodes one slice (float32 HU or uint8 stored values, as
    ``Volume.array``), :meth:`label_slice` one label map (or ``None``), :meth:`load` the
    whole :class:`Volume`. ``close`` releases an open file (NIfTI).
    """

    shape: tuple[int, int, int]
    units: str
    spacing: tuple[float, float] | None
    source: str
    slice_sources: list[str]
    read_slice: Callable[[int], np.ndarray]
    read_label_slice: Callable[[int], np.ndarray] | None = None
    meta: dict = field(default_factory=dict)
    closer: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if len(self.slice_sources) != self.shape[0]:
            raise DataError(f"{self.source}: {len(self.slice_sources)} slice sources for {self.shape[0]} slices")

    @classmethod
    def of(cls, volume: Volume) -> "LazyVolume":
        """A volume already in memory behind the lazy interface."""
        return cls(shape=volume.shape, units=volume.units, spacing=volume.spacing, source=volume.source,
                   slice_sources=volume.slice_sources, read_slice=volume.slice,
                   read_label_slice=None if volume.labels is None else volume.label_slice, meta=volume.meta)

    @property
    def num_slices(self) -> int:
        return int(self.shape[0])

    @property
    def has_labels(self) -> bool:
        return self.read_label_slice is not None

    def _check(self, i: int) -> None:
        if not 0 <= i < self.num_slices:
            raise IndexError(f"{self.source}: slice {i} out of range for {self.num_slices} slices")

    def slice(self, i: int) -> np.ndarray:
        self._check(i)
        out = self.read_slice(i)
        if tuple(out.shape) != tuple(self.shape[1:]):
            raise DataError(f"{self.slice_sources[i]}: slice {i} is {out.shape} but the volume's slices are "
                            f"{tuple(self.shape[1:])}")
        return out

    def label_slice(self, i: int) -> np.ndarray | None:
        self._check(i)
        return None if self.read_label_slice is None else self.read_label_slice(i)

    def load(self) -> Volume:
        """Every slice decoded into a :class:`Volume`."""
        n, h, w = self.shape
        dtype = np.float32 if self.units == "HU" else np.uint8
        array = np.empty((n, h, w), dtype=dtype)
        for i in range(n):
            array[i] = self.slice(i)
        labels = None
        if self.has_labels:
            labels = np.stack([self.label_slice(i) for i in range(n)]) if n else np.zeros((0, h, w), np.uint8)
        return Volume(array=array, units=self.units, spacing=self.spacing, source=self.source,
                      slice_sources=list(self.slice_sources), labels=labels, meta=self.meta)

    def close(self) -> None:
        if self.closer is not None:
            self.closer()
            self.closer = None


# --------------------------------------------------------------------------- helpers


def path_stem(path: str | Path) -> str:
    """File name without its (double, for ``.nii.gz``) suffix; a folder's own name."""
    name = Path(path).name
    for suffix in (".nii.gz", *NIFTI_SUFFIXES, *IMAGE_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def looks_like_dicom(path: str | Path) -> bool:
    """A ``.dcm`` name or a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".dcm":
        return True
    from pydicom.misc import is_dicom

    try:
        return bool(is_dicom(path))
    except OSError:
        return False


# --------------------------------------------------------------------------- readers


class ImageReader(ABC):
    """One file format. ``can_read`` looks at the path only (cheap); ``read`` loads it."""

    @abstractmethod
    def can_read(self, path: str | Path) -> bool:
        """Whether this reader handles ``path`` (by suffix, folder or file signature)."""

    @abstractmethod
    def read(self, path: str | Path) -> Volume:
        """Read ``path`` into a :class:`Volume`.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file cannot be read as this format; the message names it.
        """

    def open(self, path: str | Path) -> LazyVolume:
        """``path`` as a :class:`LazyVolume` (readers of one-slice files read it whole)."""
        return LazyVolume.of(self.read(path))


class PillowReader(ImageReader):
    """Single 8-bit slices: PNG, JPEG, BMP, TIFF, read as one-slice ``"stored"`` volumes.

    Colour images are converted to 8-bit grey (PIL mode ``'L'``). 16-bit and float
    images (modes ``I;16``, ``I``, ``F``) are rejected: whether they hold HU, HU + 1024
    or raw detector values is not stated, and rescaling them silently would give the
    model inputs unlike anything it was trained on. Spacing is ``None`` (PNG/JPG do not
    carry a trustworthy pixel spacing).
    """

    def can_read(self, path: str | Path) -> bool:
        return is_image(path)

    def read(self, path: str | Path) -> Volume:
        from PIL import Image, UnidentifiedImageError

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as img:
                mode = img.mode
                if mode not in _PILLOW_8BIT_MODES:
                    raise DataError(
                        f"{path}: PIL mode {mode!r} is a 16-bit or float image whose intensity units "
                        "are unknown (HU? HU+1024? raw?); refusing to rescale it. Save CT volumes as "
                        "DICOM or NIfTI (read in HU), or as 8-bit windowed PNG/JPG"
                    )
                grey = img.convert("L") if mode != "L" else img
                array = np.array(grey, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path}: not a readable image ({exc})") from None
        return Volume(
            array=array[None],
            units="stored",
            spacing=None,
            source=str(path),
            slice_sources=[str(path)],
            meta={"mode": mode},
        )


def _ds_float(ds, keyword: str, default: float | None = None) -> float | None:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _ds_floats(ds, keyword: str, n: int) -> list[float] | None:
    """A multi-valued numeric tag as ``n`` floats, or ``None`` when absent or malformed."""
    value = ds.get(keyword, None)
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n else None


def _all_positions(datasets) -> list[list[float]] | None:
    """``ImagePositionPatient`` of every slice, or ``None`` when any slice lacks it."""
    positions = [_ds_floats(ds, "ImagePositionPatient", 3) for ds in datasets]
    return None if any(p is None for p in positions) else positions


class DicomReader(ImageReader):
    """One DICOM file or a folder holding one series, returned in Hounsfield units.

    * Files in a folder that are not DICOM (no ``DICM`` preamble, or failing to parse)
      are skipped with a warning naming them; hidden files (``.DS_Store``) are skipped
      silently. A folder without any DICOM file is an error.
    * ``Modality`` must be ``CT`` unless ``allow_non_ct=True`` (an MR or X-ray series
      would be windowed as HU and give meaningless predictions).
    * HU = stored value * ``RescaleSlope`` + ``RescaleIntercept`` (defaults 1 and 0), float32.
    * Slices are ordered by **descending position along the slice normal**
      (``ImagePositionPatient`` projected on ``row x col`` of ``ImageOrientationPatient``);
      fallbacks: the z of ``ImagePositionPatient``, then ``SliceLocation`` (descending),
      then ascending ``InstanceNumber``. For standard axial CT (normal +z = superior)
      this is head first, i.e. descending ``SliceLocation``: COVID-CT-MD's convention,
      in which label column ``j`` is the ``j``-th slice in that order.
    * Slices of different sizes, or several series in one folder, are errors; duplicate
      positions, uneven slice spacing and differing pixel spacing are warnings.
    * Compressed transfer syntaxes (COVID-CT-MD uses JPEG Lossless) need
      ``pylibjpeg`` + ``pylibjpeg-libjpeg``; a decode failure says so and names the file.

    ``meta`` holds ``modality``, ``patient_id``, ``patient_sex``/``patient_age`` (when
    present), ``series_uid``, ``slice_positions`` (mm, in returned order, ``None`` when
    no position tag exists), ``sort_key`` (which tag ordered the slices),
    ``instance_numbers``, ``slice_spacing_mm`` (median gap, when known),
    ``image_orientation`` (the first slice's ``ImageOrientationPatient``) and
    ``image_positions`` (each slice's ``ImagePositionPatient``, returned order).
    """

    def __init__(self, allow_non_ct: bool = False) -> None:
        self.allow_non_ct = allow_non_ct

    def can_read(self, path: str | Path) -> bool:
        path = Path(path)
        return path.is_dir() or looks_like_dicom(path)

    # -- file discovery
    def _series_files(self, folder: Path) -> list[Path]:
        from pydicom.misc import is_dicom

        files, skipped = [], []
        for item in sorted(folder.iterdir()):
            if item.name.startswith(".") or not item.is_file():
                continue
            if is_dicom(item):
                files.append(item)
            else:
                skipped.append(item.name)
        if skipped:
            warnings.warn(
                f"{folder}: skipping {len(skipped)} non-DICOM file(s) (no DICM preamble): "
                f"{', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}",
                stacklevel=3,
            )
        if not files:
            hint = ""
            if any(is_image(f) or is_nifti(f) for f in folder.iterdir()):
                hint = "; it holds images/NIfTI files: read them one by one (VolumeDataset does)"
            raise DataError(f"{folder}: folder holds no DICOM file (checked for the DICM preamble){hint}")
        return files

    def _load(self, files: list[Path], skip_bad: bool) -> list[tuple[Path, object]]:
        import pydicom

        loaded, bad = [], []
        for f in files:
            try:  # values over 1 KB (the pixel data) stay on disk until asked for
                loaded.append((f, pydicom.dcmread(f, defer_size=1024)))
            except Exception as exc:  # InvalidDicomError, EOFError, struct.error... all mean unreadable
                if not skip_bad:
                    raise DataError(f"{f}: not a readable DICOM file ({exc})") from None
                bad.append(f"{f.name} ({exc})")
        if bad:
            warnings.warn(f"skipping {len(bad)} unreadable DICOM file(s): {'; '.join(bad[:5])}", stacklevel=3)
        if not loaded:
            raise DataError(f"{files[0].parent}: no readable DICOM file")
        return loaded

    @staticmethod
    def _without_pixel_less(folder: Path, loaded) -> list:
        """Drop objects that hold no image (a structured report, a presentation state, a
        localizer stub without pixels) from a series folder, with a warning naming them."""
        kept = [(f, ds) for f, ds in loaded if any(tag in ds for tag in PIXEL_TAGS)]
        dropped = [f"{f.name} ({str(ds.get('Modality', '') or '?')})" for f, ds in loaded
                   if not any(tag in ds for tag in PIXEL_TAGS)]
        if dropped:
            warnings.warn(f"{folder}: skipping {len(dropped)} DICOM object(s) without pixel data: "
                          f"{', '.join(dropped[:10])}{' ...' if len(dropped) > 10 else ''}", stacklevel=3)
        if not kept:
            raise DataError(f"{folder}: no DICOM file in the folder holds pixel data")
        return kept

    def _check_modality(self, loaded) -> str:
        modalities = set()
        for f, ds in loaded:
            modality = str(ds.get("Modality", "") or "").strip()
            modalities.add(modality)
            if modality != "CT" and not self.allow_non_ct:
                what = f"modality {modality!r}" if modality else "no Modality tag (0008,0060)"
                raise DataError(
                    f"{f}: {what}, but CT is required (HU windows and the models assume CT); "
                    "pass allow_non_ct=True to read it anyway"
                )
        return "/".join(sorted(modalities))

    @staticmethod
    def _positions(loaded) -> tuple[list[float] | None, str]:
        """Scalar position per slice (larger = first) and the tag used."""

        def all_have(keyword: str) -> bool:
            return all(ds.get(keyword, None) not in (None, "") for _, ds in loaded)

        if all_have("ImagePositionPatient"):
            if all_have("ImageOrientationPatient"):
                pos = []
                for _, ds in loaded:
                    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
                    normal = np.cross(iop[:3], iop[3:6])
                    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
                    pos.append(float(ipp @ normal))
                return pos, "ImagePositionPatient.normal"
            return [float(ds.ImagePositionPatient[2]) for _, ds in loaded], "ImagePositionPatient.z"
        if all_have("SliceLocation"):
            return [float(ds.SliceLocation) for _, ds in loaded], "SliceLocation"
        if all_have("InstanceNumber"):
            # Ascending instance number == descending position in COVID-CT-MD; no
            # physical position is known, so slice_positions stays None.
            return [-float(ds.InstanceNumber) for _, ds in loaded], "InstanceNumber"
    def read(self, path: str | Path) -> Volume:
        return self.open(path).load()

    def open(self, path: str | Path) -> LazyVolume:
        """The series' headers, sorted and checked (pixel data deferred, not decoded); each
        slice is decoded from its own file when asked for. A single file is decoded at once
        (it may be multi-frame)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"DICOM path not found: {path}")
        if path.is_dir():
            loaded = self._without_pixel_less(path, self._load(self._series_files(path), skip_bad=True))
        else:
            loaded = self._load([path], skip_bad=False)
        modality = self._check_modality(loaded)

        series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in loaded}
        if len(series) > 1:
            raise DataError(
                f"{path}: folder mixes {len(series)} series ({', '.join(sorted(series)[:4])}); "
                "put each series in its own folder"
            )

        positions, sort_key = self._positions(loaded)
        if len(loaded) > 1:
            if positions is None:
                raise DataError(
                    f"{path}: slices carry neither ImagePositionPatient, SliceLocation nor "
                    "InstanceNumber, so their order cannot be known"
                )
            inst = [_ds_float(ds, "InstanceNumber", 0.0) for _, ds in loaded]
            order = sorted(range(len(loaded)), key=lambda i: (-positions[i], inst[i], loaded[i][0].name))
            loaded = [loaded[i] for i in order]
            positions = [positions[i] for i in order]

        ref_file, ref_ds = loaded[0]
        ref_shape = (int(ref_ds.get("Rows", 0)), int(ref_ds.get("Columns", 0)))
        ref_spacing = ref_ds.get("PixelSpacing", None)
        for f, ds in loaded[1:]:
            shape = (int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))
            if shape != ref_shape:
                raise DataError(
                    f"{f}: slice is {shape[0]}x{shape[1]} but {ref_file.name} is "
                    f"{ref_shape[0]}x{ref_shape[1]}; one series must have one slice size"
                )
            spacing = ds.get("PixelSpacing", None)
            if ref_spacing is not None and spacing is not None and not np.allclose(
                [float(v) for v in spacing], [float(v) for v in ref_spacing], atol=1e-4
            ):
                warnings.warn(
                    f"{f}: PixelSpacing {list(spacing)} differs from {ref_file.name} "
                    f"{list(ref_spacing)}; using the first", stacklevel=2,
                )

        slice_spacing = None
        if positions is not None and len(positions) > 1 and sort_key != "InstanceNumber":
            gaps = -np.diff(np.asarray(positions))
            dup = [loaded[i + 1][0].name for i in np.nonzero(np.abs(gaps) < 1e-3)[0]]
            if dup:
                warnings.warn(
                    f"{path}: {len(dup)} slice(s) share a position with a neighbour "
                    f"(duplicates?): {', '.join(dup[:5])}", stacklevel=2,
                )
            nonzero = gaps[np.abs(gaps) >= 1e-3]
            if nonzero.size:
                slice_spacing = float(np.median(nonzero))
                if np.ptp(nonzero) > max(1e-2, 0.01 * abs(slice_spacing)):
                    warnings.warn(
                        f"{path}: uneven slice spacing ({nonzero.min():g}..{nonzero.max():g} mm); "
                        "slices may be missing", stacklevel=2,
                    )

        frames = None
        if len(loaded) == 1:  # one file, perhaps multi-frame: decoded now, frames in stored order
            frames = self._hu(*loaded[0])
            frames = frames if frames.ndim == 3 else frames[None]
        single_image = frames is None or frames.shape[0] == 1
        if frames is not None and not single_image:
            slice_sources = [str(loaded[0][0])] * frames.shape[0]
            positions = None
        else:
            slice_sources = [str(f) for f, _ in loaded]

        spacing = None
        if ref_spacing is not None and len(ref_spacing) == 2:
            spacing = (float(ref_spacing[0]), float(ref_spacing[1]))
        meta = {
            "modality": modality,
            "patient_id": str(ref_ds.get("PatientID", "") or "") or None,
            "series_uid": str(ref_ds.get("SeriesInstanceUID", "") or "") or None,
            "slice_positions": positions if sort_key != "InstanceNumber" else None,
            "sort_key": sort_key,
            "instance_numbers": [
                int(v) if (v := _ds_float(ds, "InstanceNumber")) is not None else None for _, ds in loaded
            ],
            "slice_spacing_mm": slice_spacing,
            "slice_thickness_mm": _ds_float(ref_ds, "SliceThickness"),
            # Geometry for volume outputs (label NIfTI, DICOM-SEG): the first slice's
            # orientation and every slice's position, in the returned order (DICOM LPS).
            "image_orientation": _ds_floats(ref_ds, "ImageOrientationPatient", 6),
            "image_positions": _all_positions([ds for _, ds in loaded]) if single_image else None,
            "transfer_syntax": str(getattr(ref_ds, "file_meta", {}).get("TransferSyntaxUID", "")) or None,
        }
        for keyword, key in (("PatientSex", "patient_sex"), ("PatientAge", "patient_age")):
            value = str(ref_ds.get(keyword, "") or "").strip()
            if value:
                meta[key] = value
        if frames is not None:
            return LazyVolume.of(Volume(array=frames, units="HU", spacing=spacing, source=str(path),
                                        slice_sources=slice_sources, labels=None, meta=meta))
        files = [f for f, _ in loaded]
        loaded = None  # the headers are not kept: one file is read again per slice

        def read_slice(i: int) -> np.ndarray:
            import pydicom

            f = files[i]
            try:
                ds = pydicom.dcmread(f)
            except Exception as exc:  # changed or truncated since the headers were read
                raise DataError(f"{f}: not a readable DICOM file ({exc})") from None
            hu = self._hu(f, ds)
            if hu.ndim != 2:
                raise DataError(f"{f}: multi-frame file inside a series folder is not supported")
            return hu

        return LazyVolume(shape=(len(files), *ref_shape), units="HU", spacing=spacing, source=str(path),
                          slice_sources=slice_sources, read_slice=read_slice, meta=meta)

    @classmethod
    def _hu(cls, f: Path, ds) -> np.ndarray:
        """Pixels of one file in HU (``RescaleSlope`` and ``RescaleIntercept``), float32."""
        stored = cls._pixels(f, ds)
        slope = _ds_float(ds, "RescaleSlope", 1.0)
        intercept = _ds_float(ds, "RescaleIntercept", 0.0)
        return (stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32, copy=False)

    def _pixels(f: Path, ds) -> np.ndarray:
        if "PixelData" not in ds:
            raise DataError(f"{f}: DICOM file has no pixel data")
        try:
            return np.asarray(ds.pixel_array)
        except Exception as exc:  # decoder plugins raise assorted types
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            ts_name = getattr(ts, "name", str(ts))
            detail = " ".join(str(exc).split())
            raise DataError(
                f"{f}: cannot decode pixel data (transfer syntax {ts_name}): {detail}. Compressed "
                "DICOM such as JPEG Lossless needs the decoders: pip install pylibjpeg "
                "pylibjpeg-libjpeg (or python-gdcm); if they are installed, the pixel data is corrupt"
            ) from exc


class NiftiReader(ImageReader):
    """NIfTI volumes (``.nii``/``.nii.gz``) via nibabel, assumed to hold CT in HU.

    Axes: nibabel returns voxel axes ``(X, Y, Z)`` (``i, j, k``); the volume is transposed
    to ``(Z, Y, X)`` so that a slice is axial, rows run along ``j`` (Y) and columns along
    ``i`` (X). No reorientation to RAS/LPS is done: slices keep the file's voxel order
    (``meta["axcodes"]`` says what the affine means). 2-D files become one slice; 4-D
    files need a singleton 4th axis.

    Units: ``"HU"`` is an assumption, true of CT NIfTI exported from DICOM;
    ``scl_slope``/``scl_inter`` are applied (nibabel's array proxy). Spacing is
    ``(row, col) = (Y zoom, X zoom)``.

    :meth:`open` decodes nothing: each slice is read through the proxy,
    ``dataobj[..., k]``, from one file handle kept open (for ``.nii.gz`` the gzip stream
    is decompressed up to slice ``k``: reading in order costs one pass over the file, a
    backward jump starts again from the beginning). A slice holding NaN or infinity is an
    error naming the file when it is read.

    Args:
        labels: optional label volume path with canonical codes 0..3 (see :mod:`.masks`),
            same voxel grid as the image; other values or another shape are errors naming
            both files (checked when the volume is opened, one slice at a time).
    """

    def __init__(self, labels: str | Path | None = None) -> None:
        self.labels = labels

    def can_read(self, path: str | Path) -> bool:
        return is_nifti(path)

    @staticmethod
    def _open(path: Path, what: str):
        """``(slice reader, (X, Y, Z) shape, image, close)`` of one NIfTI file, nothing decoded."""
        import gzip

        import nibabel as nib

        if not path.is_file():
            raise FileNotFoundError(f"NIfTI {what} not found: {path}")
        try:
            klass = type(nib.load(str(path)))  # the header only: Nifti1 or Nifti2
            fh = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
        except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib errors...
            raise DataError(f"{path}: not a readable NIfTI file ({exc})") from None
        try:
            img = klass.from_file_map({"header": nib.FileHolder(fileobj=fh), "image": nib.FileHolder(fileobj=fh)})
        except Exception as exc:
            fh.close()
            raise DataError(f"{path}: not a readable NIfTI file ({exc})") from None
        shape = tuple(int(n) for n in img.shape)
        if len(shape) == 4 and shape[3] == 1:
            index = lambda k: (slice(None), slice(None), k, 0)  # noqa: E731
        elif len(shape) == 3:
            index = lambda k: (slice(None), slice(None), k)  # noqa: E731
        elif len(shape) == 2:
            index = lambda k: (slice(None), slice(None))  # noqa: E731
        else:
            fh.close()
            raise DataError(f"{path}: expected a 2-D or 3-D NIfTI {what}, got shape {shape}")
        xyz = (shape[0], shape[1], shape[2] if len(shape) > 2 else 1)

        def read_slice(k: int) -> np.ndarray:
            try:
                data = np.asarray(img.dataobj[index(k)])
            except Exception as exc:  # truncated or corrupt data
                raise DataError(f"{path}: not a readable NIfTI file (slice {k}: {exc})") from None
            return np.ascontiguousarray(data.T, dtype=np.float32)  # (X, Y) -> rows Y, columns X

        return read_slice, xyz, img, fh.close

    def open(self, path: str | Path) -> LazyVolume:
        import nibabel as nib

        path = Path(path)
        read_image, xyz, img, close = self._open(path, "image")
        closers = [close]
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3]) + (1.0, 1.0, 1.0)
        spacing = (zooms[1], zooms[0])

        def read_slice(k: int) -> np.ndarray:
            out = read_image(k)
            if not np.isfinite(out).all():
                raise DataError(f"{path}: image holds NaN or infinite values (slice {k})")
            return out

        read_labels = None
        if self.labels is not None:
            label_path = Path(self.labels)
            read_raw, label_xyz, _, close_labels = self._open(label_path, "label volume")
            closers.append(close_labels)
            try:
                if label_xyz != xyz:
                    raise DataError(
                        f"label volume {label_path} has shape {label_xyz} (X,Y,Z) but image "
                        f"{path} has {xyz}; they must share one voxel grid"
                    )
                values = set()
                for k in range(xyz[2]):  # checked now, one slice at a time
                    values.update(np.unique(read_raw(k)).tolist())
                bad = [f"{v:g}" for v in sorted(values) if v != round(v) or not BACKGROUND <= v <= CONSOLIDATION]
                if bad:
                    raise DataError(
                        f"label volume {label_path} (for image {path}) has values [{', '.join(bad[:10])}] "
                        "outside the canonical codes 0 bg / 1 lung / 2 GGO / 3 consolidation"
                    )
            except BaseException:
                for c in closers:
                    c()
                raise
            read_labels = lambda k: read_raw(k).astype(np.uint8)  # noqa: E731
        try:
            axcodes = "".join(nib.aff2axcodes(img.affine))
        except Exception:  # a degenerate affine: metadata only, do not fail the read
            axcodes = None
        meta = {
            "modality": "CT (assumed)",
            "axcodes": axcodes,
            "slice_thickness_mm": zooms[2],
            "labels_source": str(self.labels) if self.labels is not None else None,
            "affine": np.asarray(img.affine, dtype=np.float64).tolist(),  # voxel (i, j, k) -> RAS mm
        }
        return LazyVolume(
            shape=(xyz[2], xyz[1], xyz[0]), units="HU", spacing=spacing, source=str(path),
            slice_sources=[str(path)] * xyz[2], read_slice=read_slice, read_label_slice=read_labels,
            meta=meta, closer=lambda: _close_all(closers),
        )

    def read(self, path: str | Path) -> Volume:
        lazy = self.open(path)
        try:
            return lazy.load()
        finally:
            lazy.close()


def _close_all(closers) -> None:
    for close in closers:
        close()


# --------------------------------------------------------------------------- dispatch


def _pick_reader(path: Path, **kw) -> ImageReader:
    if path.is_dir():
        cls = DicomReader
    elif is_nifti(path):
        cls = NiftiReader
    elif looks_like_dicom(path):
        cls = DicomReader
    elif is_image(path):
        cls = PillowReader
    else:
        raise DataError(
            f"{path}: cannot tell the format: not a folder, not DICOM (no DICM preamble), and the "
            f"suffix is none of {', '.join(NIFTI_SUFFIXES + IMAGE_SUFFIXES + ('.dcm',))}"
        )
    try:
        return cls(**kw)
    except TypeError:
        raise DataError(
            f"{path}: option(s) {sorted(kw)} do not apply to {cls.__name__}"
        ) from None


def read_volume(path: str | Path, reader: ImageReader | None = None, **kw) -> Volume:
    """Read any supported input into a :class:`Volume`.

    Args:
        path: a folder (DICOM series), ``.nii``/``.nii.gz``, ``.dcm`` or any file with a
            DICOM preamble, or an 8-bit image (``.png``, ``.jpg``, ...).
        reader: use this reader instead of choosing by path.
        **kw: reader options (``labels=`` for NIfTI, ``allow_non_ct=`` for DICOM).

    Raises:
        FileNotFoundError: ``path`` does not exist (named).
        ValueError: the format cannot be told or the file cannot be read (named).
    """
    path = Path(path)
    return _reader_for(path, reader, kw).read(path)


def open_volume(path: str | Path, reader: ImageReader | None = None, **kw) -> LazyVolume:
    """:func:`read_volume`, lazily: headers and geometry now, each slice when asked for
    (see :class:`LazyVolume`; close it when done)."""
    path = Path(path)
    return _reader_for(path, reader, kw).open(path)


def _reader_for(path: Path, reader: ImageReader | None, kw: dict) -> ImageReader:
    """The reader for an existing ``path``: ``reader`` as given (without options), else chosen by the path."""
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if reader is None:
        return _pick_reader(path, **kw)
    if kw:
        raise DataError(f"{path}: pass options to the reader's constructor, not with reader= ({sorted(kw)})")
    return reader


# --------------------------------------------------------------------------- samples


def _resize(image: np.ndarray, codes: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    # antialias=True: downscaling then matches PIL's bilinear resize (the papers' resize).
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    out = img[0, 0].clamp_(0.0, 1.0).numpy()
    if codes is None:
        return out, None
    lab = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8))[None, None]
    lab = F.interpolate(lab.float(), size=(size, size), mode="nearest-exact")
    return out, lab[0, 0].to(torch.uint8).numpy()


def make_sample(
    pixels: np.ndarray,
    units: str,
    *,
    window: str | tuple[float, float] = "auto",
    codes: np.ndarray | None = None,
    labelled: bool = True,
    mask_type: str = "merge",
    min_area: int = 100,
    size: int | None = None,
    sample_id: str,
    source: str,
    spacing: tuple[float, float] | None = None,
    slice_index: int = 0,
    meta: dict | None = None,
) -> Sample:
    """One 2-D slice to a :class:`Sample`: window, optional resize, instance targets.

    Args:
        pixels: ``[H, W]`` intensities in ``units``.
        units: ``"HU"`` or ``"stored"``.
        window: window spec for :func:`~.windowing.apply_window`.
        codes: canonical label map ``[H, W]`` (0..3) or ``None``.
        labelled: when ``codes`` is ``None``: ``True`` gives an empty (negative) target,
            ``False`` gives ``target=None`` (unlabelled input).
        mask_type, min_area: passed to :func:`~.masks.extract_instances`.
        size: resize to ``size x size`` (bilinear image, nearest labels); spacing is
            scaled to stay physical.
    """
    if pixels.ndim != 2:
        raise DataError(f"{source}: slice must be 2-D, got shape {pixels.shape}")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise DataError(f"size must be a positive integer, got {size!r}")
    image = apply_window(pixels, window, units, source)
    height, width = image.shape
    if size is not None and (height, width) != (size, size):
        image, codes = _resize(image, codes, size)
        if spacing is not None:
            spacing = (spacing[0] * height / size, spacing[1] * width / size)
    if codes is not None:
        target = extract_instances(codes, mask_type, min_area)
    elif labelled:
        target = empty_target(*image.shape)
    else:
        target = None
    info = {"units": units, "window": describe_window(
        window if isinstance(window, tuple) else resolve_window(window, units, source)
    )}
    info.update(meta or {})
    return Sample(
        image=torch.from_numpy(np.ascontiguousarray(image))[None],
        target=target,
        sample_id=sample_id,
        source=source,
        spacing=spacing,
        slice_index=slice_index,
        meta=info,
    )


def volume_to_samples(
    volume: Volume,
    window: str = "auto",
    mask_type: str = "merge",
    min_area: int = 100,
    size: int | None = None,
) -> Iterator[Sample]:
    """Yield one :class:`Sample` per slice of ``volume``, in volume order.

    ``image`` is the windowed slice ``[1, H, W]`` float32; ``target`` comes from
    :func:`~.masks.extract_instances` when the volume has labels, else ``None``;
    ``sample_id`` is ``<stem>#<i:04d>`` for multi-slice volumes and ``<stem>`` for a
    single slice; ``source`` is the slice's own file. The window is checked against
    the volume's units before the first slice (a mismatch raises ``ValueError``).
    """
    resolved = resolve_window(window, volume.units, volume.source)
    stem = path_stem(volume.source)
    positions = volume.meta.get("slice_positions")
    for i in range(volume.num_slices):
        meta = {}
        if positions is not None and i < len(positions):
            meta["slice_position"] = positions[i]
        yield make_sample(
            volume.array[i],
            volume.units,
            window=resolved,
            codes=None if volume.labels is None else volume.labels[i],
            labelled=False,
            mask_type=mask_type,
            min_area=min_area,
            size=size,
            sample_id=f"{stem}#{i:04d}" if volume.num_slices > 1 else stem,
            source=volume.slice_sources[i],
            spacing=volume.spacing,
            slice_index=i,
            meta=meta,
        )
