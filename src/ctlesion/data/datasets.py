"""Torch datasets that yield :class:`~ctlesion.data.sample.Sample` objects.

* :class:`LesionFolderDataset`: 2-D slices with lesion masks in two folder layouts,
  ``cncb`` (CNCB-NCOV, the papers' data) and ``semiseg`` (COVID-SemiSeg / Inf-Net).
* :class:`VolumeDataset`: DICOM series, NIfTI volumes and image files flattened into
  slices (prediction inputs, or labelled NIfTI).

:func:`~ctlesion.data.factory.build_dataset` builds these (and the classification
datasets) from a :class:`~ctlesion.config.DataConfig`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..errors import DataError
from .masks import CONSOLIDATION, GGO, get_mask_type
from .readers import (
    LazyVolume,
    PillowReader,
    is_nifti,
    make_sample,
    open_volume,
    path_stem,
)
from .discovery import count_slices, discover_inputs, natural_key, read_split
from .sample import Sample
from .windowing import resolve_window

__all__ = ["LAYOUTS", "LesionFolderDataset", "VolumeDataset"]


# Layout -> (image folder, mask folder, value -> canonical code lookup).
LAYOUTS: dict[str, tuple[str, str, dict[int, int]]] = {
    # CNCB-NCOV: values are the canonical codes already (0 bg, 1 lung, 2 GGO, 3 C).
    "cncb": ("imgs", "masks", {0: 0, 1: 1, 2: 2, 3: 3}),
    # COVID-SemiSeg MultiClassInfection: 0 bg, 1 GGO, 2 C; no lung class.
    "semiseg": ("Imgs", "GT", {0: 0, 1: GGO, 2: CONSOLIDATION}),
}


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
            raise DataError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
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
                    raise DataError(
                        f"{img_dir}: two images share the stem {stem!r}: {images[stem].name}, {f.name}"
                    )
                images[stem] = f
        if split is not None:
            stems = read_split(split)
            missing = [s for s in stems if s not in images]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} image(s) named in split {split} are not in {img_dir}: "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
                )
        else:
            stems = sorted(images, key=natural_key)
        if not stems:
            raise DataError(f"{img_dir}: no .jpg/.png images")
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
                    raise DataError(
                        f"{path}: mask has PIL mode {mode!r}; expected a palette ('P') or grey ('L') "
                        "label PNG holding class values"
                    )
                # 'P' arrays are palette indices: the class values, never the colours.
                raw = np.array(img)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path}: not a readable mask image ({exc})") from None
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
            raise DataError(f"{path}: mask values {bad} outside the {self.layout} codes {allowed}{hint}")
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
                raise DataError(
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


class VolumeDataset(Dataset):
    """DICOM series, NIfTI volumes and image files, flattened into slices.

    The slice count of every input is read from headers at construction (no pixel
    decoding). A volume is *opened* (:class:`~.readers.LazyVolume`: its headers, sorted
    and checked, and its geometry) when one of its slices is first asked for, and kept
    open until a slice of another volume is asked for; each ``__getitem__`` then decodes
    that one slice (one DICOM file, one NIfTI slice through nibabel's proxy). Memory is
    one slice and the headers' small per-slice facts, not the volume. Access in order
    (inference): shuffled access re-opens volumes, and a ``.nii.gz`` re-decompresses from
    its start at every backward jump.

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
                raise DataError(
                    f"labels={labels} needs exactly one NIfTI input, got {len(self.inputs)} input(s)"
                )
            self.labels = [Path(labels)]
        else:
            if len(labels) != len(self.inputs):
                raise DataError(f"{len(labels)} label paths for {len(self.inputs)} inputs")
            self.labels = [None if lab is None else Path(lab) for lab in labels]
        for inp, lab in zip(self.inputs, self.labels):
            if lab is not None and not is_nifti(inp):
                raise DataError(
                    f"labels {lab} given for {inp}, but label volumes apply to NIfTI inputs only"
                )
            if lab is not None and not lab.is_file():
                raise FileNotFoundError(f"label volume not found: {lab}")
        self._index: list[tuple[int, int]] = []
        for v, path in enumerate(self.inputs):
            self._index.extend((v, s) for s in range(count_slices(path)))
        self._cache: tuple[int, LazyVolume] | None = None

    def __len__(self) -> int:
        return len(self._index)

    def volume(self, v: int) -> LazyVolume:
        """Input ``v`` opened lazily (kept open while consecutive slices are read)."""
        if self._cache is None or self._cache[0] != v:
            self.close()
            self._cache = (v, self.open_volume(v))
        return self._cache[1]

    def open_volume(self, v: int) -> LazyVolume:
        """Input ``v`` opened anew (not the one kept for ``__getitem__``); the caller closes it."""
        kw = {"labels": self.labels[v]} if self.labels[v] is not None else {}
        return open_volume(self.inputs[v], **kw)

    def indices_of(self, inputs) -> list[int]:
        """The dataset indices of the slices of the inputs numbered in ``inputs``, in order."""
        wanted = set(inputs)
        return [i for i, (v, _) in enumerate(self._index) if v in wanted]

    def close(self) -> None:
        """Close the volume kept open (a NIfTI file handle), if any."""
        if self._cache is not None:
            self._cache[1].close()
            self._cache = None

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self._index):
            raise IndexError(f"index {index} out of range for {len(self._index)} slices")
        v, s = self._index[index]
        volume = self.volume(v)
        if s >= volume.num_slices:
            raise DataError(
                f"{volume.source}: has {volume.num_slices} slices when read, but its headers counted more"
            )
        # The id and source rules of volume_to_samples, for one slice.
        window = resolve_window(self.window, volume.units, volume.source)
        meta = {"volume": str(volume.source)}  # a series' slices come from separate files
        positions = volume.meta.get("slice_positions")
        if positions is not None:
            meta["slice_position"] = positions[s]
        stem = path_stem(volume.source)
        return make_sample(
            volume.slice(s), volume.units, window=window, codes=volume.label_slice(s), labelled=False,
            mask_type=self.mask_type, min_area=self.min_area, size=self.size,
            sample_id=f"{stem}#{s:04d}" if volume.num_slices > 1 else stem,
            source=volume.slice_sources[s], spacing=volume.spacing, slice_index=s, meta=meta,
        )


# --------------------------------------------------------------------------- config


