"""One factory: a :class:`~ctlesion.config.DataConfig` (or the CLI's ``--data`` string) -> a dataset.

Segmentation layouts and volumes come from :mod:`.datasets`, slice classification from
:mod:`.classification`, synthetic CT from :mod:`.phantom`; :mod:`.wrappers` relabel and cache.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import DataError
from .classification import ClassificationFolderDataset, CovidCtMdDataset
from .datasets import LAYOUTS, LesionFolderDataset, VolumeDataset
from .discovery import discover_inputs
from .labels import CLASS_FOLDER_ALIASES
from .phantom import PhantomDataset
from .readers import is_image, is_nifti, looks_like_dicom
from .wrappers import CachedDataset, ClassMappedDataset

__all__ = ["FORMATS", "build_dataset", "parse_data_spec"]

FORMATS = (
    "phantom", "cncb", "semiseg", "images", "dicom", "nifti",
    # Slice classification (see .classification): labels per slice, no lesion targets.
    "covidx", "classfirst", "class_folders", "covid-ct-md",
)


def build_dataset(cfg: DataConfig, mask_type: str) -> Dataset:
    """The dataset a :class:`~ctlesion.config.DataConfig` describes (cached in memory if
    ``cfg.cache``)."""
    dataset = _build_dataset(cfg, mask_type)
    return CachedDataset(dataset) if cfg.cache else dataset


def _build_dataset(cfg: DataConfig, mask_type: str) -> Dataset:
    """The dataset a :class:`~ctlesion.config.DataConfig` describes.

    Classification formats (``covidx``, ``classfirst``, ``class_folders``,
    ``covid-ct-md``; see :mod:`.classification`) use ``root``, ``split``, ``class_map``,
    ``patients``, ``window``, ``size`` and, for ``covid-ct-md``, ``slice_labels`` and
    ``exclude_uninfected``; ``mask_type`` and ``min_area`` do not apply to them. Phantoms
    and the segmentation/volume formats ignore ``patients`` and ``class_map``.

    Raises:
        ValueError: unknown ``cfg.format`` (formats listed) or ``root`` missing from the config.
        FileNotFoundError: ``cfg.root`` does not exist (named).
    """
    if cfg.format not in FORMATS:
        raise DataError(f"unknown data format {cfg.format!r}; choose one of {list(FORMATS)}")
    if cfg.format == "phantom":
        phantoms = PhantomDataset(
            cfg.num_samples, cfg.phantom_size, cfg.seed, cfg.phantom_classes, mask_type, cfg.min_area,
            window=cfg.window,
        )
        return phantoms if cfg.class_map is None else ClassMappedDataset(phantoms, cfg.class_map)
    if not cfg.root:
        raise DataError(f"data.root is required for format {cfg.format!r}")
    if not Path(cfg.root).exists():
        raise FileNotFoundError(f"data.root not found: {cfg.root}")
    split = cfg.split
    # A relative split path that does not exist as given is read relative to the data
    # root, so presets can say `split: train_split_segmentation.txt`.
    if split and not Path(split).is_absolute() and not Path(split).exists():
        split = Path(cfg.root) / split
    if cfg.format in ("covidx", "classfirst", "class_folders"):
        if cfg.format == "covidx" and not split:
            raise DataError("data.split is required for format 'covidx' (the COVIDx-CT split file)")
        return ClassificationFolderDataset(
            cfg.root, cfg.format, split=split or None, class_map=cfg.class_map, window=cfg.window,
            size=cfg.size, patients=cfg.patients,
        )
    if cfg.format == "covid-ct-md":
        return CovidCtMdDataset(
            cfg.root, slice_labels=cfg.slice_labels, exclude_uninfected=cfg.exclude_uninfected,
            window=cfg.window, size=cfg.size, patients=cfg.patients, class_map=cfg.class_map,
        )
    if cfg.format in LAYOUTS:
        return LesionFolderDataset(
            cfg.root, cfg.format, mask_type=mask_type, min_area=cfg.min_area,
            window=cfg.window, split=split, size=cfg.size,
        )
    return VolumeDataset(
        cfg.root, window=cfg.window, mask_type=mask_type, min_area=cfg.min_area,
        size=cfg.size, labels=cfg.labels,
    )


_PHANTOM_KEYS = {"n": "num_samples", "num_samples": "num_samples", "size": "phantom_size",
                 "phantom_size": "phantom_size", "seed": "seed", "classes": "phantom_classes"}


def _parse_phantom(spec: str, options: str) -> DataConfig:
    cfg = DataConfig(format="phantom")
    for item in filter(None, (part.strip() for part in options.split(","))):
        if "=" not in item:
            raise DataError(f"--data {spec!r}: phantom option {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in _PHANTOM_KEYS:
            raise DataError(
                f"--data {spec!r}: unknown phantom option {key!r}; known: {sorted(_PHANTOM_KEYS)}"
            )
        name = _PHANTOM_KEYS[key]
        if name == "phantom_classes":
            classes = [c.strip() for c in value.split("+") if c.strip()]
            if not classes:
                raise DataError(f"--data {spec!r}: classes needs names joined by '+', e.g. normal+covid")
            cfg.phantom_classes = classes
        else:
            try:
                number = int(value)
            except ValueError:
                raise DataError(f"--data {spec!r}: {key} must be an integer, got {value!r}") from None
            if name != "seed" and number < 1:
                raise DataError(f"--data {spec!r}: {key} must be >= 1, got {number}")
            setattr(cfg, name, number)
    return cfg


def _is_covid_ct_md_root(path: Path) -> bool:
    return (path / "Index.csv").is_file() and any(path.glob("Slice-level-labels*.npy"))


def _is_class_folders_root(path: Path) -> bool:
    """Only unambiguous cases: no loose files to read at the top, two or more subfolders,
    every one named like a class (see ``CLASS_FOLDER_ALIASES``) and holding images only."""
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    if any(e.is_file() and (is_image(e) or is_nifti(e) or looks_like_dicom(e)) for e in entries):
        return False
    folders = [e for e in entries if e.is_dir()]
    if len(folders) < 2 or any(f.name.lower() not in CLASS_FOLDER_ALIASES for f in folders):
        return False
    for folder in folders:
        files = [f for f in folder.iterdir() if not f.name.startswith(".")]
        # Images are told by suffix; only other files are opened to look for DICOM.
        if not any(is_image(f) for f in files) or any(
            f.is_dir() or (not is_image(f) and looks_like_dicom(f)) for f in files
        ):
            return False
    return True


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if _is_covid_ct_md_root(path):
            return "covid-ct-md"
        if (path / "imgs").is_dir() and (path / "masks").is_dir():
            return "cncb"
        if (path / "Imgs").is_dir() and (path / "GT").is_dir():
            return "semiseg"
        if _is_class_folders_root(path):
            return "class_folders"
        inputs = discover_inputs(path)  # raises ValueError when nothing readable is inside
        if any(p.is_dir() or looks_like_dicom(p) for p in inputs):
            return "dicom"
        if all(is_nifti(p) for p in inputs):
            return "nifti"
        return "images"
    if is_nifti(path):
        return "nifti"
    if looks_like_dicom(path):
        return "dicom"
    if is_image(path):
        return "images"
    raise DataError(
        f"{path}: cannot tell the data format (not DICOM, NIfTI, an image, or a known folder layout)"
    )


def parse_data_spec(spec: str) -> DataConfig:
    """The CLI's ``--data`` string as a :class:`~ctlesion.config.DataConfig`.

    Forms:

    * ``phantom`` or ``phantom:n=32,size=128,seed=7[,classes=normal+covid]``
      (``n`` -> ``num_samples``, ``size`` -> ``phantom_size``).
    * ``<format>:<path>`` forces a format, e.g. ``semiseg:/data/MultiClassInfection-Train``
      or ``covid-ct-md:/data/covid-ct-md`` (``covidx`` also needs ``split``, e.g. the
      CLI's ``--split``).
    * ``<path>``: detected: a folder with ``Index.csv`` + ``Slice-level-labels*.npy`` is
      ``covid-ct-md``; with ``imgs/`` + ``masks/`` is ``cncb``, with ``Imgs/`` + ``GT/``
      is ``semiseg``; a folder of two or more class-named subfolders of images only
      (``normal``, ``cp``, ``covid``, ... see ``CLASS_FOLDER_ALIASES``) and no loose
      images is ``class_folders``; a DICOM file or folder holding DICOM is ``dicom``;
      ``.nii``/``.nii.gz`` is ``nifti``; image files are ``images``. ``covidx`` and
      ``classfirst`` are never detected (their images look like any image folder).

    Raises:
        FileNotFoundError: the path does not exist (named).
        ValueError: malformed phantom options, or a format that cannot be detected.
    """
    spec = spec.strip()
    if not spec:
        raise DataError("--data is empty; give a path, 'format:path' or 'phantom[:n=...,size=...]'")
    head, sep, rest = spec.partition(":")
    if head == "phantom":
        return _parse_phantom(spec, rest)
    if sep and head in FORMATS and rest:
        fmt, root = head, rest
    else:
        fmt, root = None, spec
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data path not found: {path}")
    if fmt is None:
        fmt = _detect_format(path)
    return DataConfig(format=fmt, root=str(path))
