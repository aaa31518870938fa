"""DICOM-SEG (highdicom) for DICOM input: one segment per class, referencing the source series."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine.io import atomic_write
from ..errors import DataError
from .assemble import LUNG_CLASS

__all__ = ["write_dicom_seg"]

_CLASS_DESCRIPTIONS = {"GGO": "ground-glass opacity", "C": "consolidation", "lesion": "lesion (GGO or consolidation)",
                       LUNG_CLASS: "lung"}


def _segment(number: int, name: str, algorithm):
    from highdicom.seg import SegmentAlgorithmTypeValues, SegmentDescription
    from pydicom.sr.codedict import codes

    if name == LUNG_CLASS:
        category, kind = codes.SCT.AnatomicalStructure, codes.SCT.Lung
    else:  # SNOMED "Lesion" for GGO and consolidation; the label says which
        category, kind = codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion
    description = SegmentDescription(
        segment_number=number, segment_label=name[:64], segmented_property_category=category,
        segmented_property_type=kind, algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    description.SegmentDescription = _CLASS_DESCRIPTIONS.get(name, name)[:64]
    return description


# Type 2 patient/study attributes a SEG copies from its source: they may be empty, but
# anonymised series (COVID-CT-MD) leave some out entirely, which highdicom refuses.
_TYPE2_COPIED = ("PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")


def _with_type2_patient_study(ds):
    """``ds`` (an in-memory header; the file is not touched) with absent Type 2 attributes empty."""
    for keyword in _TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def write_dicom_seg(path: str | Path, labels: np.ndarray, slice_files, class_names, *,
                    model_name: str, version: str) -> Path:
    """Write a BINARY DICOM-SEG of ``labels`` ``[S, H, W]`` (class ids, slice ``s`` from
    ``slice_files[s]``), one segment per class, atomically. Source headers are read
    without pixel data. Empty segments are kept (their frames omitted)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [_with_type2_patient_study(pydicom.dcmread(str(f), stop_before_pixels=True)) for f in slice_files]
    if len(sources) != labels.shape[0]:
        raise DataError(f"{path}: {len(sources)} source files for {labels.shape[0]} slices")
    pixel = np.stack([labels == c for c in range(1, len(class_names) + 1)], axis=-1).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name[:64], version=version, family=codes.cid7162.ArtificialIntelligence)
    segments = [_segment(i + 1, name, algorithm) for i, name in enumerate(class_names)]
    try:
        seg = _segmentation(hd, sources, pixel, segments, model_name, version)
    except (AttributeError, KeyError) as exc:  # a source lacks a Type 1 attribute SEG must copy
        raise DataError(f"{slice_files[0]}: cannot reference this series in a DICOM-SEG ({exc})") from None
    atomic_write(path, lambda tmp: seg.save_as(tmp))
    return Path(path)


def _segmentation(hd, sources, pixel, segments, model_name: str, version: str):
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    return hd.seg.Segmentation(
        source_images=sources, pixel_array=pixel, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=generate_uid(), series_number=900,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="ctlesion",
        manufacturer_model_name=model_name[:64], software_versions=version, device_serial_number="none",
        content_description="ctlesion lesion segmentation (research software, not a medical device)"[:64],
        content_label="CTLESION", transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=bool(pixel.any()),  # an all-empty SEG keeps its frames (highdicom needs one)
    )
