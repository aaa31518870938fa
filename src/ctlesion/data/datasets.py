"""Torch datasets that yield :class:`~ctlesion.data.sample.Sample` objects.

* :class:`LesionFolderDataset`: 2-D slices with lesion masks in two folder layouts,
  ``cncb`` (CNCB-NCOV, the papers' data) and ``semiseg`` (COVID-SemiSeg / Inf-Net).
* :class:`VolumeDataset`: DICOM series, NIfTI volumes and image files flattened into
  slices (prediction inputs, or labelled NIfTI).
* :func:`build_dataset` builds these, or the classification datasets of
  :mod:`.classification`, from a :class:`~ctlesion.config.DataConfig`;
  :func:`parse_data_spec` turns the CLI's ``--data`` string into one.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..config import DataConfig
from .masks import CONSOLIDATION, GGO, get_mask_type
from .readers import (
    IMAGE_SUFFIXES,
    PillowReader,
    Volume,
    is_image,
    is_nifti,
    looks_like_dicom,
    make_sample,
    path_stem,
    read_volume,
    volume_to_samples,
)
from .sample import Sample
from .windowing import resolve_window

__all__ = [
    "LAYOUTS", "FORMATS", "LesionFolderDataset", "VolumeDataset", "CachedDataset", "build_dataset",
    "parse_data_spec", "discover_inputs",
]


def _natural_key(text: str) -> list:
    """Sort ``2`` before ``10`` (``0_2`` before ``0_10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# Layout -> (image folder, mask folder, value -> canonical code lookup).
LAYOUTS: dict[str, tuple[str, str, dict[int, int]]] = {
    # CNCB-NCOV: values are the canonical codes already (0 bg, 1 lung, 2 GGO, 3 C).
    "cncb": ("imgs", "masks", {0: 0, 1: 1, 2: 2, 3: 3}),
    # COVID-SemiSeg MultiClassInfection: 0 bg, 1 GGO, 2 C; no lung class.
    "semiseg": ("Imgs", "GT", {0: 0, 1: GGO, 2: CONSOLIDATION}),
}

FORMATS = (
    "phantom", "cncb", "semiseg", "images", "dicom", "nifti",
    # Slice classification (see .classification): labels per slice, no lesion targets.
    "covidx", "classfirst", "class_folders", "covid-ct-md",
)


def _read_split(split: str | Path) -> list[str]:
    """Stems named in a split file: one name or stem per line (first token used)."""
    split = Path(split)
    if not split.is_file():
        raise FileNotFoundError(f"split file not found: {split}")
    stems = []
    for line in split.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # COVIDx-style lines carry class and box after the name; only the name matters.
        name = line.split()[0]
        stems.append(path_stem(name) if is_image(name) else name)
    if not stems:
        raise ValueError(f"{split}: split file names no image")
    return stems


class LesionFolderDataset(Dataset):
    """2-D slices with lesion masks, paired by file stem.

    Layouts:

    * ``"cncb"``: ``root/imgs/<stem>.jpg|.png`` and ``root/masks/<stem>.png``; mask values
      0 bg / 1 lung / 2 GGO / 3 consolidation (already canonical).
    * ``"semiseg"``: ``root/Imgs/<n>.jpg`` and ``root/GT/<n>.png``; palette (``'P'``) or
      grey (``'L'``) masks with values 0 bg / 1 GGO / 2 consolidation, mapped to the
      canonical 2 and 3. ``root`` is the folder holding ``Imgs/`` and ``GT/``, e.g.
      ``covid-semiseg/Dataset/TrainingSet/MultiClassInfection-Train``. The binary
      ``Doctor-label`` GT (values 0/255) is rejected with a hint.

    Images are 8-bit (units ``"stored"``), so ``window`` must be ``"auto"`` or
    ``"as_stored"``; this is checked here, not at the first ``__getitem__``.
    An image without a mask file is a negative slice (empty target), announced by one
    warning with the count; a mask without an image is ignored.

    Args:
        root: dataset folder.
        layout: ``"cncb"`` or ``"semiseg"``.
        mask_type: a name from :data:`~ctlesion.data.masks.MASK_TYPES`.
        min_area: instance area filter (strictly greater is kept).
        window: window spec (see :mod:`.windowing`).
        split: optional text file, one image name or stem per line; keeps that order.
        size: resize every slice to ``size x size`` (bilinear image, nearest mask).

    Raises:
        FileNotFoundError: ``root``, its image folder, the split file, or images named
            in the split are missing (up to 5 named).
        ValueError: unknown layout, bad window, duplicate stems.
    """

    def __init__(
        self,
        root: str | Path,
        layout: str,
        mask_type: str = "merge",
        min_area: int = 100,
        window: str = "auto",
        split: str | Path | None = None,
        size: int | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
        self.root = Path(root)
        self.layout = layout
        self.mask_type = get_mask_type(mask_type).name
        self.min_area = min_area
        self.size = size
        img_name, mask_name, lut = LAYOUTS[layout]
        self._lut = lut
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root not found: {self.root}")
        # Fail at construction on a window that cannot fit 8-bit data.
        self.window = window
        resolve_window(window, "stored", str(self.root))
        img_dir, self.mask_dir = self.root / img_name, self.root / mask_name
        if not img_dir.is_dir():
            raise FileNotFoundError(
                f"{img_dir} not found: the {layout!r} layout expects {img_name}/ and {mask_name}/ "
                f"under {self.root}"
            )
        images: dict[str, Path] = {}
        for f in img_dir.iterdir():
            if f.is_file() and f.suffix.lower() in (".jpg", ".jpeg", ".png"):
                stem = f.stem
                if stem in images:
                    raise ValueError(
                        f"{img_dir}: two images share the stem {stem!r}: {images[stem].name}, {f.name}"
                    )
                images[stem] = f
        if split is not None:
            stems = _read_split(split)
            missing = [s for s in stems if s not in images]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} image(s) named in split {split} are not in {img_dir}: "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
                )
        else:
            stems = sorted(images, key=_natural_key)
        if not stems:
            raise ValueError(f"{img_dir}: no .jpg/.png images")
        self.stems: list[str] = stems
        self._images = {s: images[s] for s in stems}
        self._masks: dict[str, Path | None] = {}
        for s in stems:
            mask = self.mask_dir / f"{s}.png"
            self._masks[s] = mask if mask.is_file() else None
        unmasked = [s for s in stems if self._masks[s] is None]
        if unmasked:
            warnings.warn(
                f"{self.root}: {len(unmasked)} of {len(stems)} image(s) have no mask in {self.mask_dir} "
                f"and are used as negative (lesion-free) slices: {', '.join(unmasked[:5])}"
                f"{' ...' if len(unmasked) > 5 else ''}",
                stacklevel=2,
            )
        self._reader = PillowReader()

    def __len__(self) -> int:
        return len(self.stems)

    def image_path(self, index: int) -> Path:
        return self._images[self.stems[index]]

    def mask_path(self, index: int) -> Path | None:
        return self._masks[self.stems[index]]

    def _read_mask(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                mode = img.mode
                if mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
                    raise ValueError(
                        f"{path}: mask has PIL mode {mode!r}; expected a palette ('P') or grey ('L') "
                        "label PNG holding class values"
                    )
                # 'P' arrays are palette indices: the class values, never the colours.
                raw = np.array(img)
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{path}: not a readable mask image ({exc})") from None
        values = np.unique(raw)
        bad = [int(v) for v in values if int(v) not in self._lut]
        if bad:
            allowed = sorted(self._lut)
            hint = ""
            if self.layout == "semiseg" and 255 in bad:
                hint = (
                    "; 255 marks a binary infection mask (the Doctor-label GT or Prior), but this "
                    "layout needs the 3-class MultiClassInfection GT (0 bg / 1 GGO / 2 C)"
                )
            raise ValueError(f"{path}: mask values {bad} outside the {self.layout} codes {allowed}{hint}")
        lut = np.zeros(256 if raw.dtype == np.uint8 else int(values.max()) + 1, dtype=np.uint8)
        for value, code in self._lut.items():
            if value < lut.size:
                lut[value] = code
        return lut[raw]

    def __getitem__(self, index: int) -> Sample:
        stem = self.stems[index]
        image_path, mask_path = self._images[stem], self._masks[stem]
        volume = self._reader.read(image_path)
        pixels = volume.array[0]
        codes = None
        if mask_path is not None:
            codes = self._read_mask(mask_path)
            if codes.shape != pixels.shape:
                raise ValueError(
                    f"image {image_path} is {pixels.shape[0]}x{pixels.shape[1]} but mask {mask_path} is "
                    f"{codes.shape[0]}x{codes.shape[1]}; they must match"
                )
        return make_sample(
            pixels, volume.units, window=self.window, codes=codes, labelled=True,
            mask_type=self.mask_type, min_area=self.min_area, size=self.size,
            sample_id=stem, source=str(image_path), spacing=None, slice_index=0,
            meta={"mask": str(mask_path) if mask_path is not None else None},
        )


# --------------------------------------------------------------------------- volumes


def _folder_has_dicom(folder: Path) -> bool:
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
        if _folder_has_dicom(folder):
            found.append(folder)
            return
        entries = sorted(folder.iterdir(), key=lambda p: _natural_key(p.name))
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
                raise ValueError(
                    f"{path}: no DICOM series, NIfTI ({'/'.join(('.nii', '.nii.gz'))}) or image "
                    f"({'/'.join(IMAGE_SUFFIXES)}) files found"
                )
        else:
            found.append(path)
    return found


def _count_slices(path: Path) -> int:
    """Slices in one input without decoding pixels."""
    if path.is_dir():
        from pydicom.misc import is_dicom

        return sum(1 for f in path.iterdir() if f.is_file() and not f.name.startswith(".") and is_dicom(f))
    if is_nifti(path):
        import nibabel as nib

        try:
            shape = nib.load(str(path)).shape
        except Exception as exc:
            raise ValueError(f"{path}: not a readable NIfTI file ({exc})") from None
        return 1 if len(shape) == 2 else int(shape[2])
    if looks_like_dicom(path):
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable DICOM file ({exc})") from None
        return int(ds.get("NumberOfFrames", 1) or 1)
    return 1


class VolumeDataset(Dataset):
    """DICOM series, NIfTI volumes and image files, flattened into slices.

    The slice count of every input is read from headers at construction (no pixel
    decoding); a volume is read when one of its slices is first asked for and kept
    until a slice of another volume is asked for, so sequential access reads each
    volume once (shuffled access re-reads; use it for inference, in order).

    Args:
        paths: one path or a list: DICOM files/folders, ``.nii``/``.nii.gz``,
            PNG/JPG slices, or folders of those (see :func:`discover_inputs`).
        window: window spec; ``auto`` is the lung window for HU inputs and
            ``as_stored`` for 8-bit images.
        mask_type, min_area: instance extraction for labelled inputs.
        size: resize every slice to ``size x size``.
        labels: NIfTI label volume(s): one path (exactly one NIfTI input) or a list
            parallel to the inputs (``None`` entries allowed).

    Samples of unlabelled inputs have ``target=None``.
    """

    def __init__(
        self,
        paths: str | Path | list[str | Path],
        window: str = "auto",
        mask_type: str = "merge",
        min_area: int = 100,
        size: int | None = None,
        labels: str | Path | list[str | Path | None] | None = None,
    ) -> None:
        self.inputs = discover_inputs(paths)
        self.window = window
        self.mask_type = get_mask_type(mask_type).name
        self.min_area = min_area
        self.size = size
        if labels is None:
            self.labels: list[Path | None] = [None] * len(self.inputs)
        elif isinstance(labels, (str, Path)):
            if len(self.inputs) != 1 or not is_nifti(self.inputs[0]):
                raise ValueError(
                    f"labels={labels} needs exactly one NIfTI input, got {len(self.inputs)} input(s)"
                )
            self.labels = [Path(labels)]
        else:
            if len(labels) != len(self.inputs):
                raise ValueError(f"{len(labels)} label paths for {len(self.inputs)} inputs")
            self.labels = [None if lab is None else Path(lab) for lab in labels]
        for inp, lab in zip(self.inputs, self.labels):
            if lab is not None and not is_nifti(inp):
                raise ValueError(
                    f"labels {lab} given for {inp}, but label volumes apply to NIfTI inputs only"
                )
            if lab is not None and not lab.is_file():
                raise FileNotFoundError(f"label volume not found: {lab}")
        self._index: list[tuple[int, int]] = []
        for v, path in enumerate(self.inputs):
            self._index.extend((v, s) for s in range(_count_slices(path)))
        self._cache: tuple[int, Volume] | None = None

    def __len__(self) -> int:
        return len(self._index)

    def volume(self, v: int) -> Volume:
        """Input ``v`` as a :class:`Volume` (cached while consecutive slices are read)."""
        if self._cache is None or self._cache[0] != v:
            kw = {"labels": self.labels[v]} if self.labels[v] is not None else {}
            self._cache = (v, read_volume(self.inputs[v], **kw))
        return self._cache[1]

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self._index):
            raise IndexError(f"index {index} out of range for {len(self._index)} slices")
        v, s = self._index[index]
        volume = self.volume(v)
        if s >= volume.num_slices:
            raise ValueError(
                f"{volume.source}: has {volume.num_slices} slices when read, but its headers counted more"
            )
        # A one-slice view keeps the id and source rules of volume_to_samples.
        view = Volume(
            array=volume.array[s : s + 1], units=volume.units, spacing=volume.spacing,
            source=volume.source, slice_sources=volume.slice_sources[s : s + 1],
            labels=None if volume.labels is None else volume.labels[s : s + 1], meta={},
        )
        sample = next(volume_to_samples(view, self.window, self.mask_type, self.min_area, self.size))
        sample.slice_index = s
        sample.meta["volume"] = str(volume.source)  # a series' slices come from separate files
        if volume.num_slices > 1:
            sample.sample_id = f"{path_stem(volume.source)}#{s:04d}"
        positions = volume.meta.get("slice_positions")
        if positions is not None:
            sample.meta["slice_position"] = positions[s]
        return sample


# --------------------------------------------------------------------------- config


class ClassMappedDataset(Dataset):
    """Relabels a dataset's slices with ``class_map`` (source index -> model index, -1
    drops the slice), e.g. phantoms for a two-class model: ``[0, -1, 1]`` keeps Normal and
    COVID as classes 0 and 1 and leaves CP slices out."""

    def __init__(self, dataset: Dataset, class_map) -> None:
        from .classification import _resolve_class_map

        source = getattr(dataset, "slice_class_names", None)
        if source is None:
            raise ValueError(f"{type(dataset).__name__} has no slice classes to map with class_map")
        self.dataset = dataset
        self.map, self.slice_class_names = _resolve_class_map(class_map, source)
        labels = getattr(dataset, "labels", None)
        if labels is None:
            labels = [dataset[i].label for i in range(len(dataset))]
        self.indices = [i for i, lab in enumerate(labels) if lab is not None and self.map[lab] >= 0]
        if not self.indices:
            raise ValueError(f"class_map {list(class_map)} leaves no slice")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample:
        sample = self.dataset[self.indices[index]]
        sample.label = self.map[sample.label]
        return sample


class CachedDataset(Dataset):
    """Remembers each sample after its first read: decoding or drawing happens once per
    run instead of once per epoch. Holds every sample in memory, so use it for small sets."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._cache: dict[int, Sample] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        if index not in self._cache:
            self._cache[index] = self.dataset[index]
        return self._cache[index]

    def __getattr__(self, name: str):
        # Descriptive attributes (class names, labels, patient ids) come from the wrapped set.
        if name in ("dataset", "_cache"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


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
        raise ValueError(f"unknown data format {cfg.format!r}; choose one of {list(FORMATS)}")
    if cfg.format == "phantom":
        from .phantom import PhantomDataset  # late: optional module, heavy to build

        phantoms = PhantomDataset(
            cfg.num_samples, cfg.phantom_size, cfg.seed, cfg.phantom_classes, mask_type, cfg.min_area,
            window=cfg.window,
        )
        return phantoms if cfg.class_map is None else ClassMappedDataset(phantoms, cfg.class_map)
    if not cfg.root:
        raise ValueError(f"data.root is required for format {cfg.format!r}")
    if not Path(cfg.root).exists():
        raise FileNotFoundError(f"data.root not found: {cfg.root}")
    split = cfg.split
    # A relative split path that does not exist as given is read relative to the data
    # root, so presets can say `split: train_split_segmentation.txt`.
    if split and not Path(split).is_absolute() and not Path(split).exists():
        split = Path(cfg.root) / split
    if cfg.format in ("covidx", "classfirst", "class_folders"):
        from .classification import ClassificationFolderDataset  # late: it imports this module

        if cfg.format == "covidx" and not split:
            raise ValueError("data.split is required for format 'covidx' (the COVIDx-CT split file)")
        return ClassificationFolderDataset(
            cfg.root, cfg.format, split=split or None, class_map=cfg.class_map, window=cfg.window,
            size=cfg.size, patients=cfg.patients,
        )
    if cfg.format == "covid-ct-md":
        from .classification import CovidCtMdDataset

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
            raise ValueError(f"--data {spec!r}: phantom option {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in _PHANTOM_KEYS:
            raise ValueError(
                f"--data {spec!r}: unknown phantom option {key!r}; known: {sorted(_PHANTOM_KEYS)}"
            )
        name = _PHANTOM_KEYS[key]
        if name == "phantom_classes":
            classes = [c.strip() for c in value.split("+") if c.strip()]
            if not classes:
                raise ValueError(f"--data {spec!r}: classes needs names joined by '+', e.g. normal+covid")
            cfg.phantom_classes = classes
        else:
            try:
                number = int(value)
            except ValueError:
                raise ValueError(f"--data {spec!r}: {key} must be an integer, got {value!r}") from None
            if name != "seed" and number < 1:
                raise ValueError(f"--data {spec!r}: {key} must be >= 1, got {number}")
            setattr(cfg, name, number)
    return cfg


def _is_covid_ct_md_root(path: Path) -> bool:
    return (path / "Index.csv").is_file() and any(path.glob("Slice-level-labels*.npy"))


def _is_class_folders_root(path: Path) -> bool:
    """Only unambiguous cases: no loose files to read at the top, two or more subfolders,
    every one named like a class (see ``CLASS_FOLDER_ALIASES``) and holding images only."""
    from .classification import CLASS_FOLDER_ALIASES

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
    raise ValueError(
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
        raise ValueError("--data is empty; give a path, 'format:path' or 'phantom[:n=...,size=...]'")
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
