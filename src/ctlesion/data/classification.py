"""Slice classification data: whole-slice labels (0 Normal, 1 CP, 2 COVID-19), patient ids,
and patient-level splits.

* :class:`ClassificationFolderDataset`: 8-bit slices labelled by a COVIDx-CT split file
  (``covidx``), by the class prefix of their names (``classfirst``, the COVID-CT-Mask-Net
  author's convention, also iCTCF), or by class subfolders (``class_folders``).
* :class:`CovidCtMdDataset`: COVID-CT-MD DICOM volumes (HU) with the patient class and the
  radiologists' slice-level infection labels.
* :func:`patient_split` / :func:`split_indices`: whole patients to train/val/test, so that
  no patient's slices end up on both sides of an evaluation.

Every sample is a :class:`~ctlesion.data.sample.Sample` with ``target=None``, ``label`` the
model class index and ``meta["patient"]`` the patient id. ``labels`` and ``patient_ids``
are known at construction, without decoding any pixels. The class order is the papers'
(spec §1.2): **0 normal, 1 cp, 2 covid**. ``class_map`` remaps it (source index -> model
index, ``-1`` drops the slice), e.g. iCTCF ``[0, -1, 1]`` (spec §1.3).
"""

from __future__ import annotations

import csv
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..errors import DataError
from .discovery import count_slices, folder_has_dicom, natural_key, split_lines
from .labels import CLASS_FOLDER_ALIASES, CLASS_NAMES, resolve_class_map
from .readers import IMAGE_SUFFIXES, PillowReader, Volume, is_image, make_sample, path_stem, read_volume
from .sample import Sample
from .windowing import resolve_window

__all__ = [
    "CLASS_NAMES", "CLASSIFICATION_LAYOUTS", "CLASS_FOLDER_ALIASES", "DEFAULT_FRACTIONS",
    "ClassificationFolderDataset", "CovidCtMdDataset", "covidx_patient_id", "ctmd_label_row",
    "patient_labels", "patient_split", "split_indices",
]

CLASSIFICATION_LAYOUTS = ("covidx", "classfirst", "class_folders")

# CNCB class folder prefix per class index, as in COVIDx names and metadata.csv patient ids.
_CNCB_PREFIX = {0: "Normal", 1: "CP", 2: "NCP"}


_LIST_MAX = 5  # names listed in an error before "..."


def _listing(items: Sequence[str]) -> str:
    return ", ".join(items[:_LIST_MAX]) + (" ..." if len(items) > _LIST_MAX else "")


# --------------------------------------------------------------------------- class maps


def _patient_set(patients: Iterable[str] | None) -> set[str] | None:
    if patients is None:
        return None
    if isinstance(patients, str):  # a bare string would be split into characters
        raise DataError(f"patients must be a list of patient ids, got the string {patients!r}")
    return {str(p) for p in patients}


def _warn_absent_patients(wanted: set[str] | None, present: Iterable[str], where: str) -> None:
    if wanted is None:
        return
    absent = sorted(wanted - set(present), key=natural_key)
    if absent:
        warnings.warn(
            f"{where}: {len(absent)} of the {len(wanted)} requested patient(s) are not in this "
            f"dataset: {_listing(absent)}", stacklevel=3,
        )


# --------------------------------------------------------------------------- patient ids

# (pattern, group) rules for COVIDx-CT file stems, first match wins. The ids equal the
# `patient id` column of COVIDNet-CT's metadata.csv.
_COVIDX_PATIENT_RULES = (
    re.compile(r"^((?:NCP|CP|Normal)_\d+)_\d+_\d+$"),          # CNCB: <CLS>_<pid>_<scan>_<slice>
    re.compile(r"^(COVIDCTMD-[^-]+)-IM\d+$"),                  # COVID-CT-MD
    re.compile(r"^(LIDC-IDRI-\d+)-"),                          # LIDC-IDRI-<n>-<series uid>-<slice>
    re.compile(r"^(volume-.+)_ct-\d+$"),                       # TCIA: volume-covid19-A-<n>[_<k>]_ct-<slice>
    re.compile(r"^[A-Za-z0-9]*_(patient\d+)_SR_"),             # COVID-CTset: <folder>_patient<n>_SR_<s>_IM<k>
    re.compile(r"^(radiopaedia_\d+_\d+)_"),                    # COVID-19-CT-Seg radiopaedia_<a>_<b>_<s>-<k>
)


def covidx_patient_id(name: str) -> str:
    """The patient a COVIDx-CT slice file belongs to.

    * CNCB ``<CLS>_<pid>_<scan>_<slice>.png`` -> ``<CLS>_<pid>`` (e.g. ``NCP_96``; CNCB
      patient ids repeat across classes, so the class stays in the id).
    * ``COVIDCTMD-<pid>-IMnnnn.png`` -> ``COVIDCTMD-<pid>``.
    * The other CT-2/CT-3 sources with known patterns (LIDC-IDRI, TCIA ``volume-*``,
      COVID-CTset ``*_patient<n>_SR_*``, ``radiopaedia_<a>_<b>_*``) -> the id that
      COVIDNet-CT's ``metadata.csv`` uses.
    * Fallback: the stem without its last ``_``/``-`` separated token
      (``coronacases_010-0075`` -> ``coronacases_010``), or the whole stem when it has no
      separator. A coarse id only merges patients (safe for splits), never splits one.
    """
    stem = path_stem(Path(name).name)
    for rule in _COVIDX_PATIENT_RULES:
        match = rule.match(stem)
        if match:
            return match.group(1)
    head = re.split(r"[_-][^_-]*$", stem, maxsplit=1)[0]
    return head or stem


def _classfirst_patient_id(stem: str, cls: int) -> str:
    """``<c>_<pid>_<scan>_<slice>`` -> the CNCB patient ``<CLS>_<pid>``; other names -> stem."""
    parts = stem.split("_")
    if len(parts) == 4 and all(p.isdigit() for p in parts) and cls in _CNCB_PREFIX:
        return f"{_CNCB_PREFIX[cls]}_{int(parts[1])}"
    return stem


# --------------------------------------------------------------------------- folder dataset


class ClassificationFolderDataset(Dataset):
    """8-bit slices (PNG/JPG...) with one class label each.

    Layouts:

    * ``"covidx"``: a COVIDx-CT split file (``split``, required), one slice per line:
      ``<filename> <class> <xmin> <ymin> <xmax> <ymax>`` (the 4 box numbers may be left
      out), class 0 normal / 1 cp / 2 covid, images in ``root``. The lung box is read but
      not used: the models never crop (spec §1.2). Patient ids: :func:`covidx_patient_id`.
    * ``"classfirst"``: the author's names ``<class>_<patientId>_<scanId>_<slice>.png``
      (and iCTCF ``<class>_<nCT|pCT><n>.jpg``); the class is the first ``_`` token.
      ``split`` (optional) lists file names, one per line (e.g.
      ``train_split_classification.txt``); without it, every image in ``root``.
      Patient id: for ``c_p_s_n`` names the CNCB patient ``<CLS>_<p>`` (``2_96_1328_0032``
      -> ``NCP_96``, the same id as the COVIDx name); other names (iCTCF) carry no
      patient, so the id is the stem: each slice is its own "patient" and
      :func:`patient_split` cannot keep a patient's slices together.
    * ``"class_folders"``: ``root/<class name>/*.png|jpg|...``. Classes are the sorted
      subfolder names (torchvision's ImageFolder rule) unless ``class_names`` is given:
      then every subfolder must be one of those names (class folders that are absent are
      allowed). ``split`` is not used. Sample and patient id: ``<class folder>/<stem>``
      (no patient is known; the folder keeps ids unique across classes).

    Split files: blank lines and lines starting with ``#`` are skipped. A name is looked
    up in ``root`` as given, then with another image suffix (``x.png`` finds ``x.jpg``).
    Labels and patient ids come from the names, so ``labels``/``patient_ids`` need no
    pixel decoding. Images are read with :class:`~ctlesion.data.readers.PillowReader`
    (colour is converted to grey; 16-bit is rejected), windowed (``auto`` =
    ``as_stored``, the only window 8-bit data allows) and optionally resized to
    ``size x size`` (bilinear).

    Args:
        root: image folder (``covidx``/``classfirst``) or folder of class folders.
        layout: one of :data:`CLASSIFICATION_LAYOUTS`.
        split: split file (see above).
        class_map: source class index -> model class index, ``-1`` drops the slice; one
            entry per source class (3 for ``covidx``/``classfirst``).
        window: window spec for 8-bit data (``auto`` or ``as_stored``).
        size: resize every slice to ``size x size``.
        patients: keep only these patient ids (see :func:`patient_split`); ids not in the
            data are announced by one warning.
        class_names: ``class_folders`` only: the class folder names in class index order.

    Attributes:
        labels: model class index per sample.
        patient_ids: patient id per sample.
        sample_ids, paths: per sample.
        class_names: model class names (the source names, renamed by ``class_map``).
        source_class_names: the source's classes before ``class_map``.

    Sample: ``image`` ``[1, H, W]`` in [0, 1], ``target=None``, ``sample_id`` = file stem
    (``<class folder>/<stem>`` for ``class_folders``), ``source`` = file path, ``label``,
    ``meta["patient"]``.

    Raises:
        FileNotFoundError: ``root``, the split file, or images named in the split are
            missing (split file, line numbers and names; up to 5 listed, with the count).
        ValueError: unknown layout, malformed split line (``file:line``), unknown class
            index (named with its file), bad ``class_map``, unfit window, class folders not
            matching ``class_names``, or no sample left.
    """

    def __init__(
        self,
        root: str | Path,
        layout: str,
        split: str | Path | None = None,
        class_map: Sequence[int] | None = None,
        window: str = "auto",
        size: int | None = None,
        patients: Iterable[str] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if layout not in CLASSIFICATION_LAYOUTS:
            raise DataError(
                f"unknown classification layout {layout!r}; choose one of {list(CLASSIFICATION_LAYOUTS)}"
            )
        self.root = Path(root)
        self.layout = layout
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root not found: {self.root}")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise DataError(f"size must be a positive integer, got {size!r}")
        # Fail at construction on a window that cannot fit 8-bit data.
        resolve_window(window, "stored", str(self.root))
        self.window, self.size = window, size
        self.split = None if split is None else Path(split)
        if class_names is not None and layout != "class_folders":
            raise DataError(f"class_names applies to the 'class_folders' layout only, not {layout!r}")

        # entries: (path, source class, sample id, patient id)
        if layout == "covidx":
            if self.split is None:
                raise DataError(f"{self.root}: the 'covidx' layout needs a split file (split=...)")
            self.source_class_names = CLASS_NAMES
            entries = self._covidx_entries()
        elif layout == "classfirst":
            self.source_class_names = CLASS_NAMES
            entries = self._classfirst_entries()
        else:
            if self.split is not None:
                raise DataError(
                    f"{self.root}: the 'class_folders' layout takes its samples from the folders and "
                    "does not use a split file; select patients with patients= or split_indices()"
                )
            entries = self._folder_entries(class_names)

        cmap, self.class_names = resolve_class_map(class_map, self.source_class_names)
        self.slice_class_names = self.class_names  # the name the training engine checks
        self.class_map = None if class_map is None else cmap
        wanted = _patient_set(patients)
        _warn_absent_patients(wanted, (e[3] for e in entries), str(self.split or self.root))
        kept = [
            (path, cmap[cls], sid, pid) for path, cls, sid, pid in entries
            if cmap[cls] >= 0 and (wanted is None or pid in wanted)
        ]
        if not kept:
            why = []
            if class_map is not None:
                why.append(f"class_map {list(class_map)}")
            if wanted is not None:
                why.append(f"patients ({len(wanted)} given)")
            raise DataError(
                f"{self.split or self.root}: no sample left out of {len(entries)}"
                + (f" after {' and '.join(why)}" if why else "")
            )
        self.paths: list[Path] = [e[0] for e in kept]
        self.labels: list[int] = [e[1] for e in kept]
        self.sample_ids: list[str] = [e[2] for e in kept]
        self.patient_ids: list[str] = [e[3] for e in kept]
        self._reader = PillowReader()

    # -- discovery
    def _locate(self, named: list[tuple[int, str]]) -> list[Path]:
        """Image path per (line, name); every missing one reported in one error."""
        found, missing = [], []
        for lineno, name in named:
            path = self.root / name
            if not path.is_file():
                # The same stem with another image suffix (CNCB mixes .png and .jpg).
                alternatives = [path.with_name(path_stem(path) + s) for s in IMAGE_SUFFIXES]
                path = next((p for p in alternatives if p.is_file()), None)
            if path is None:
                missing.append(f"line {lineno}: {name}")
            found.append(path)
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) named in split {self.split} are not in {self.root}: "
                f"{_listing(missing)}"
            )
        return found

    def _check_unique(self, named: list[tuple[int, str]]) -> None:
        first: dict[str, int] = {}
        for lineno, name in named:
            stem = path_stem(name)
            if stem in first:
                raise DataError(
                    f"{self.split}:{lineno}: {name} is named again (first on line {first[stem]}); "
                    "each slice may appear once"
                )
            first[stem] = lineno

    def _check_class(self, cls: int, where: str, name: str) -> None:
        if not 0 <= cls < len(self.source_class_names):
            known = ", ".join(f"{i} {n}" for i, n in enumerate(self.source_class_names))
            raise DataError(f"{where}: {name}: unknown class index {cls} (known: {known})")

    def _covidx_entries(self) -> list[tuple[Path, int, str, str]]:
        named, classes = [], []
        for lineno, tokens in split_lines(self.split):
            where = f"{self.split}:{lineno}"
            malformed = ValueError(
                f"{where}: expected '<filename> <class> [<xmin> <ymin> <xmax> <ymax>]', "
                f"got {' '.join(tokens)!r}"
            )
            if len(tokens) not in (2, 6):
                raise malformed
            try:
                cls = int(tokens[1])
                [float(v) for v in tokens[2:]]  # the box: checked, not used (no cropping)
            except ValueError:
                raise malformed from None
            self._check_class(cls, where, tokens[0])
            named.append((lineno, tokens[0]))
            classes.append(cls)
        self._check_unique(named)
        paths = self._locate(named)
        return [
            (path, cls, path_stem(name), covidx_patient_id(name))
            for path, cls, (_, name) in zip(paths, classes, named)
        ]

    def _classfirst_class(self, name: str, where: str) -> int:
        head = path_stem(Path(name).name).split("_", 1)[0]
        if not head.isdigit():
            hint = ""
            if head in _CNCB_PREFIX.values():
                hint = "; this looks like a COVIDx name: use the 'covidx' layout with the COVIDx split file"
            raise DataError(
                f"{where}: {name}: the 'classfirst' layout needs names '<class>_...' with an integer "
                f"class first (e.g. 2_96_1328_0032.png){hint}"
            )
        cls = int(head)
        self._check_class(cls, where, name)
        return cls

    def _classfirst_entries(self) -> list[tuple[Path, int, str, str]]:
        if self.split is not None:
            named, classes = [], []
            for lineno, tokens in split_lines(self.split):
                where = f"{self.split}:{lineno}"
                if len(tokens) != 1:
                    raise DataError(f"{where}: expected one file name per line, got {' '.join(tokens)!r}")
                classes.append(self._classfirst_class(tokens[0], where))
                named.append((lineno, tokens[0]))
            self._check_unique(named)
            paths = self._locate(named)
        else:
            paths = sorted(
                (f for f in self.root.iterdir() if f.is_file() and is_image(f)),
                key=lambda p: natural_key(p.name),
            )
            if not paths:
                raise DataError(f"{self.root}: no image files ({'/'.join(IMAGE_SUFFIXES)})")
            classes = [self._classfirst_class(p.name, str(p)) for p in paths]
        return [
            (path, cls, path_stem(path), _classfirst_patient_id(path_stem(path), cls))
            for path, cls in zip(paths, classes)
        ]

    def _folder_entries(self, class_names: Sequence[str] | None) -> list[tuple[Path, int, str, str]]:
        folders = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not folders:
            raise DataError(
                f"{self.root}: the 'class_folders' layout needs one subfolder per class; found none"
            )
        if class_names is None:
            names = tuple(folders)
        else:
            names = tuple(str(n) for n in class_names)
            if len(set(names)) != len(names):
                raise DataError(f"class_names {list(names)} repeats a name")
            unknown = [f for f in folders if f not in names]
            if unknown:
                raise DataError(
                    f"{self.root}: subfolder(s) {unknown} are not among class_names {list(names)}; "
                    f"found subfolders {folders}"
                )
        self.source_class_names = names
        entries = []
        for cls, name in enumerate(names):
            folder = self.root / name
            if not folder.is_dir():
                continue  # a class without examples here (e.g. a test set without CP)
            files = [f for f in folder.iterdir() if f.is_file() and is_image(f)]
            for f in sorted(files, key=lambda p: natural_key(p.name)):
                sid = f"{name}/{path_stem(f)}"
                entries.append((f, cls, sid, sid))
        if not entries:
            raise DataError(
                f"{self.root}: class folders {folders} hold no image ({'/'.join(IMAGE_SUFFIXES)})"
            )
        return entries

    # -- access
    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        path = self.paths[index]
        volume = self._reader.read(path)
        sample = make_sample(
            volume.array[0], volume.units, window=self.window, labelled=False, size=self.size,
            sample_id=self.sample_ids[index], source=str(path), meta={"patient": self.patient_ids[index]},
        )
        sample.label = self.labels[index]
        return sample


# --------------------------------------------------------------------------- COVID-CT-MD


_CTMD_CLASS_KEYWORDS = (("covid", 2), ("cap", 1), ("normal", 0))
_CTMD_DIAGNOSIS = {"covid-19": 2, "covid": 2, "cap": 1, "normal": 0}
_CTMD_LABEL_FILES = {"updated": "Slice-level-labels-updated-1.npy", "original": "Slice-level-labels.npy"}
_CTMD_INDEX = "Index.csv"


def _ctmd_class(folder: Path) -> int:
    name = folder.name.lower()
    hits = [cls for key, cls in _CTMD_CLASS_KEYWORDS if key in name]
    if len(hits) != 1:
        raise DataError(
            f"{folder}: cannot tell the COVID-CT-MD class from the folder name {folder.name!r}: it must "
            "contain exactly one of 'covid' (COVID-19), 'cap' (CAP) or 'normal' (e.g. 'COVID-19 Cases', "
            "'Cap subjects')"
        )
    return hits[0]


def ctmd_label_row(label_index: int) -> int:
    """Row of the slice-label arrays for an ``Index.csv`` ``Label Index``: the index column
    skips 43, so indices 44.. are rows 43.. (COVIDNet-CT's construction code does the same)."""
    return label_index if label_index <= 42 else label_index - 1


class CovidCtMdDataset(Dataset):
    """COVID-CT-MD chest CT volumes as classified slices (spec §1.2 class order).

    Layout (``root`` is the folder holding ``Index.csv``)::

        Index.csv                            Label Index,Diagnosis,Relative Path,Folder/ID
        Slice-level-labels-updated-1.npy     ("updated", the default) [rows, 200] of 0/1
        Slice-level-labels.npy               ("original")
        <...>/<class folder>/<patient>/*.dcm one DICOM series per patient folder

    Any folder below ``root`` that holds DICOM files is a patient, named by the folder
    (``P001``, ``cap001``, ``normal001``). Its class comes from the name of the folder
    above it, case-insensitively: containing ``covid`` -> 2, ``cap`` -> 1, ``normal`` -> 0
    (``COVID-19 subjects``/``Cap subjects``/``Normal subjects`` of the GitHub sample,
    ``COVID-19 Cases``/``CAP Cases``/``Normal Cases`` of the Figshare release).

    Slice labels: ``Index.csv`` gives a COVID-19/CAP patient's ``Label Index``, and the
    array row is :func:`ctmd_label_row` of it. Column ``j`` labels the ``j``-th slice in
    head-first order (descending position), which is
    :class:`~ctlesion.data.readers.DicomReader`'s order, so slice ``j`` of the read volume
    is column ``j``. Columns past the slice count are padding and must be 0 (else the
    folder holds other slices than the labelled release: an error).

    * ``exclude_uninfected=True`` (COVIDx-CT's choice): COVID-19/CAP slices labelled 0
      are left out; Normal patients keep every slice.
    * A COVID-19/CAP patient not in ``Index.csv`` (the full release labels 54 of 169
      COVID-19 and 25 of 60 CAP patients) keeps **all** its slices, with
      ``meta["infected"] = None``, announced by one warning; ``unlabelled_patients``
      lists them, so ``patients=`` can leave them out.
    * ``meta["infected"]``: the radiologists' 0/1 for labelled patients, 0 for Normal
      patients (no infection by diagnosis), ``None`` when unknown.

    Construction counts the slices of each series (DICOM preambles only) and needs no
    pixel decoding; ``labels``/``patient_ids`` are ready at once. A volume is decoded when
    one of its slices is first asked for and kept until a slice of another patient is
    asked for, so reading in order decodes each volume once (shuffled access re-reads).

    Args:
        root: the COVID-CT-MD folder.
        slice_labels: ``"updated"`` or ``"original"`` slice labels.
        exclude_uninfected: drop COVID-19/CAP slices without visible infection.
        window: HU window (``lung`` W1500/L-600 by default; ``auto`` is the same).
        size: resize every slice to ``size x size`` (bilinear).
        patients: keep only these patient folder names.
        class_map: source class index -> model class index, ``-1`` drops (3 entries).

    Sample: ``sample_id = "<patient>#<j:04d>"`` (as :class:`~.datasets.VolumeDataset`),
    ``slice_index = j``, ``spacing`` from the DICOM, ``label``, ``meta`` with
    ``patient``, ``infected``, ``slice_position`` (mm, when known).

    Raises:
        FileNotFoundError: ``root``, ``Index.csv`` or the label array is missing (the last
            two only when COVID-19/CAP patients are present).
        ValueError: unknown ``slice_labels``, class folder not recognised, duplicate patient
            folders, malformed ``Index.csv``, diagnosis contradicting the folder, labels past
            the slice count, or no sample left.
    """

    # Decodes a whole series at a time (one held): read slices in order (CachedDataset does).
    reads_in_order = True

    def __init__(
        self,
        root: str | Path,
        slice_labels: str = "updated",
        exclude_uninfected: bool = True,
        window: str = "lung",
        size: int | None = None,
        patients: Iterable[str] | None = None,
        class_map: Sequence[int] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"COVID-CT-MD root not found: {self.root}")
        if slice_labels not in _CTMD_LABEL_FILES:
            raise DataError(f"slice_labels must be one of {list(_CTMD_LABEL_FILES)}, got {slice_labels!r}")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise DataError(f"size must be a positive integer, got {size!r}")
        self._window = resolve_window(window, "HU", str(self.root))  # fail early, e.g. on as_stored
        self.window, self.size = window, size
        self.slice_labels, self.exclude_uninfected = slice_labels, exclude_uninfected
        self.source_class_names = CLASS_NAMES
        cmap, self.class_names = resolve_class_map(class_map, CLASS_NAMES)
        self.slice_class_names = self.class_names  # the name the training engine checks
        self.class_map = None if class_map is None else cmap

        found = self._find_patients()
        wanted = _patient_set(patients)
        _warn_absent_patients(wanted, found, str(self.root))
        if wanted is not None:
            found = {pid: v for pid, v in found.items() if pid in wanted}
        labelled = self._read_labels(found) if any(cls > 0 for _, cls in found.values()) else {}

        self.patient_folders: dict[str, Path] = {}
        self.unlabelled_patients: list[str] = []
        self._num_slices: dict[str, int] = {}
        index: list[tuple[str, int, int | None]] = []  # (patient, slice, infected)
        labels: list[int] = []
        for pid, (folder, cls) in found.items():
            if cmap[cls] < 0:
                continue
            n = count_slices(folder)
            infected: list[int | None]
            if cls == 0:
                infected = [0] * n
            elif pid in labelled:
                row = labelled[pid]
                if n > row.size:
                    raise DataError(
                        f"{folder}: {n} DICOM slices, but the {slice_labels} slice labels have only "
                        f"{row.size} columns"
                    )
                if row[n:].any():
                    raise DataError(
                        f"{folder}: {n} DICOM slices, but the {slice_labels} slice labels mark slice "
                        f"{int(np.nonzero(row)[0][-1])} as infected: this folder does not hold the slices "
                        "that were labelled"
                    )
                infected = [int(v) for v in row[:n]]
            else:
                self.unlabelled_patients.append(pid)
                infected = [None] * n
            self.patient_folders[pid] = folder
            self._num_slices[pid] = n
            for j, inf in enumerate(infected):
                if self.exclude_uninfected and inf == 0 and cls > 0:
                    continue
                index.append((pid, j, inf))
                labels.append(cmap[cls])
        if self.unlabelled_patients:
            warnings.warn(
                f"{self.root}: {len(self.unlabelled_patients)} COVID-19/CAP patient(s) have no slice "
                f"labels in {_CTMD_INDEX}; all their slices are kept with the patient's class "
                f"(meta['infected'] is None): {_listing(self.unlabelled_patients)}", stacklevel=2,
            )
        if not index:
            raise DataError(f"{self.root}: no slice left (patients={sorted(wanted) if wanted else None}, "
                             f"class_map={class_map}, exclude_uninfected={exclude_uninfected})")
        self._index = index
        self.labels: list[int] = labels
        self.patient_ids: list[str] = [pid for pid, _, _ in index]
        self.sample_ids: list[str] = [f"{pid}#{j:04d}" for pid, j, _ in index]
        self.infected: list[int | None] = [inf for _, _, inf in index]
        self._cache: tuple[str, Volume] | None = None

    # -- discovery
    def _find_patients(self) -> dict[str, tuple[Path, int]]:
        """Patient folder name -> (folder, source class), in sorted walk order."""
        found: dict[str, tuple[Path, int]] = {}
        # followlinks: data trees are often assembled from symlinked patient folders.
        for dirpath, dirnames, _ in os.walk(self.root, followlinks=True):
            dirnames[:] = sorted((d for d in dirnames if not d.startswith(".")), key=natural_key)
            folder = Path(dirpath)
            if folder == self.root or not folder_has_dicom(folder):
                continue
            dirnames[:] = []  # a patient folder: do not look further down
            if folder.parent == self.root:
                raise DataError(
                    f"{folder}: patient folder directly under the root; COVID-CT-MD keeps patients in "
                    "class folders ('COVID-19 Cases/P001', 'Normal subjects/normal001', ...)"
                )
            cls = _ctmd_class(folder.parent)
            if folder.name in found:
                raise DataError(
                    f"two patient folders are named {folder.name!r}: {found[folder.name][0]} and {folder}"
                )
            found[folder.name] = (folder, cls)
        if not found:
            raise DataError(f"{self.root}: no folder holding DICOM files (patient series) found")
        return found

    def _read_labels(self, found: dict[str, tuple[Path, int]]) -> dict[str, np.ndarray]:
        """Patient -> its row of the slice-label array, for patients in ``Index.csv``."""
        index_path = self.root / _CTMD_INDEX
        labels_path = self.root / _CTMD_LABEL_FILES[self.slice_labels]
        for path in (index_path, labels_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: COVID-CT-MD's {_CTMD_INDEX} and {labels_path.name} must be in the "
                    f"dataset root {self.root}, next to the class folders"
                )
        try:
            array = np.load(labels_path)
        except Exception as exc:  # ValueError/OSError/pickle errors all mean unreadable
            raise DataError(f"{labels_path}: not a readable .npy array ({exc})") from None
        if array.ndim != 2:
            raise DataError(f"{labels_path}: expected a [patients, slices] array, got shape {array.shape}")
        rows: dict[str, np.ndarray] = {}
        with index_path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            need = {"Label Index", "Diagnosis", "Folder/ID"}
            if not need <= set(reader.fieldnames or ()):
                raise DataError(f"{index_path}: needs the columns {sorted(need)}, found {reader.fieldnames}")
            for lineno, rec in enumerate(reader, start=2):
                where = f"{index_path}:{lineno}"
                pid = (rec["Folder/ID"] or "").strip()
                try:
                    label_index = int(rec["Label Index"])
                except (TypeError, ValueError):
                    raise DataError(
                        f"{where}: Label Index {rec['Label Index']!r} is not an integer"
                    ) from None
                if pid in rows:
                    raise DataError(f"{where}: patient {pid!r} is listed twice")
                row = ctmd_label_row(label_index)
                if not 0 <= row < array.shape[0]:
                    raise DataError(
                        f"{where}: Label Index {label_index} -> row {row}, outside {labels_path.name}'s "
                        f"{array.shape[0]} rows"
                    )
                rows[pid] = array[row]
                if pid in found:
                    diagnosis = _CTMD_DIAGNOSIS.get((rec["Diagnosis"] or "").strip().lower())
                    folder, cls = found[pid]
                    if diagnosis is not None and diagnosis != cls:
                        raise DataError(
                            f"{where}: {pid} has diagnosis {rec['Diagnosis']!r} but its folder "
                            f"{folder.parent.name!r} says {CLASS_NAMES[cls]}"
                        )
        return rows

    # -- access
    def __len__(self) -> int:
        return len(self._index)

    def num_slices(self, patient: str) -> int:
        """All slices of ``patient``'s series (before exclusion), counted from the files."""
        return self._num_slices[patient]

    def volume(self, patient: str) -> Volume:
        """``patient``'s series in HU (cached while consecutive slices are read)."""
        if self._cache is None or self._cache[0] != patient:
            volume = read_volume(self.patient_folders[patient])
            if volume.num_slices != self._num_slices[patient]:
                # Labels are matched by slice rank: a different count would shift them.
                raise DataError(
                    f"{volume.source}: {volume.num_slices} slices read, but {self._num_slices[patient]} "
                    "DICOM files were counted (unreadable files skipped?); slice labels would be misaligned"
                )
            self._cache = (patient, volume)
        return self._cache[1]

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        pid, j, infected = self._index[index]
        volume = self.volume(pid)
        meta = {"patient": pid, "infected": infected}
        positions = volume.meta.get("slice_positions")
        if positions is not None:
            meta["slice_position"] = positions[j]
        sample = make_sample(
            volume.array[j], volume.units, window=self._window, labelled=False, size=self.size,
            sample_id=self.sample_ids[index], source=volume.slice_sources[j], spacing=volume.spacing,
            slice_index=j, meta=meta,
        )
        sample.label = self.labels[index]
        return sample


# --------------------------------------------------------------------------- splits


DEFAULT_FRACTIONS = (("train", 0.7), ("val", 0.15), ("test", 0.15))


def _fraction_items(fractions) -> list[tuple[str, float]]:
    items = list(fractions.items()) if isinstance(fractions, Mapping) else [tuple(f) for f in fractions]
    if not items or any(len(item) != 2 for item in items):
        raise DataError(f"fractions must be (name, fraction) pairs or a mapping, got {fractions!r}")
    names = [str(name) for name, _ in items]
    values = [float(v) for _, v in items]
    if len(set(names)) != len(names):
        raise DataError(f"fractions name a split twice: {names}")
    if any(not math.isfinite(v) or v < 0 for v in values) or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise DataError(f"fractions must be >= 0 and sum to 1, got {dict(zip(names, values))}")
    return list(zip(names, values))


def _split_counts(n: int, fractions: list[float]) -> list[int]:
    """Largest-remainder counts; then every split with a positive fraction gets at least one
    patient, taken from the largest split, while some split has more than one."""
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))[: n - sum(counts)]:
        counts[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda d: (counts[d], -d))
            if counts[donor] <= 1:
                break
            counts[donor] -= 1
            counts[i] += 1
    return counts


def patient_labels(patient_ids: Sequence[str], labels: Sequence[int]) -> dict[str, int]:
    """Each patient's class: the majority label of its slices; a tie goes to the smaller
    class index. Keys in first-appearance order."""
    ids = [str(p) for p in patient_ids]
    labels = list(labels)
    if len(labels) != len(ids):
        raise DataError(f"{len(labels)} labels for {len(ids)} patient ids; give one label per slice")
    if any(lab is None for lab in labels):
        raise DataError("labels contain None; give a class index per slice (or labels=None)")
    per_patient: dict[str, Counter] = {}
    for pid, lab in zip(ids, labels):
        per_patient.setdefault(pid, Counter())[int(lab)] += 1
    result = {}
    for pid, counts in per_patient.items():
        top = max(counts.values())
        result[pid] = min(c for c, k in counts.items() if k == top)
    return result


def patient_split(
    patient_ids: Sequence[str],
    labels: Sequence[int] | None = None,
    fractions: Sequence[tuple[str, float]] | Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Assign whole patients to splits, so no patient has slices in two splits.

    Args:
        patient_ids: patient id per slice (e.g. ``dataset.patient_ids``); repeats expected.
        labels: class per slice (``dataset.labels``), parallel to ``patient_ids``. When
            given, the split is stratified by patient class (:func:`patient_labels`).
        fractions: ``(name, fraction)`` pairs or a mapping, fractions >= 0 summing to 1.
        seed: the split is a function of the set of (patient, class) pairs and the seed
            only (patients are sorted first, so slice order does not matter).

    Returns:
        ``{split name: sorted patient ids}`` for every split name, each patient exactly once.

    Split sizes are ``n * fraction`` rounded by largest remainder, so they add up to
    ``n``; then every split with a positive fraction gets at least one patient while
    another split has more than one to spare. With fewer patients than such splits,
    the splits are filled one patient each in the given order and the last ones stay
    empty (a warning names them). Stratification is systematic: each class's patients
    are shuffled and spread evenly (random offset) over one ordering that is then cut
    into the splits, so every split holds each class within one patient of its share.
    """
    ids = [str(p) for p in patient_ids]
    items = _fraction_items(fractions)
    if labels is not None:
        patient_class = patient_labels(ids, labels)
    else:
        patient_class = {pid: 0 for pid in ids}
    if not patient_class:
        raise DataError("patient_split: no patient ids given")

    rng = np.random.default_rng(seed)
    groups: dict[int, list[str]] = {}
    for pid in sorted(patient_class, key=natural_key):
        groups.setdefault(patient_class[pid], []).append(pid)
    keyed = []
    for c in sorted(groups):
        members = groups[c]
        order = rng.permutation(len(members))
        offset = rng.random()
        keyed.extend(((rank + offset) / len(members), c, members[i]) for rank, i in enumerate(order))
    keyed.sort(key=lambda t: (t[0], t[1]))
    ordered = [pid for _, _, pid in keyed]

    counts = _split_counts(len(ordered), [f for _, f in items])
    empty = [name for (name, f), k in zip(items, counts) if f > 0 and k == 0]
    if empty:
        warnings.warn(
            f"patient_split: {len(ordered)} patient(s) for {sum(f > 0 for _, f in items)} splits; "
            f"split(s) {empty} stay empty", stacklevel=2,
        )
    result, start = {}, 0
    for (name, _), k in zip(items, counts):
        result[name] = sorted(ordered[start : start + k], key=natural_key)
        start += k
    return result


def split_indices(dataset_patient_ids: Sequence[str], split_patients: Iterable[str]) -> list[int]:
    """Indices of the samples whose patient is in ``split_patients`` (in dataset order),
    e.g. ``Subset(ds, split_indices(ds.patient_ids, splits["val"]))``. May be empty."""
    wanted = _patient_set(split_patients)
    return [i for i, pid in enumerate(dataset_patient_ids) if str(pid) in wanted]
