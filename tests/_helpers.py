"""Helpers several test modules share (imported directly: pytest puts this folder on
``sys.path``): small synthetic CT files and an in-memory dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def write_ct_series(folder: Path, slices_hu: list[np.ndarray], spacing: float = 0.8) -> Path:
    """A CT DICOM series, one file per slice, HU stored as value + 1024 (12-bit), head first
    in ``slices_hu`` order (ImagePositionPatient z = 0, -2, -4, ...)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    series, study, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    for i, hu in enumerate(slices_hu):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"s{i}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.PatientID = "CT", series, "anon"
        ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.PatientName = study, frame_of_reference, "Anon^Patient"
        ds.StudyID, ds.SeriesNumber, ds.AccessionNumber, ds.StudyDate, ds.StudyTime = "1", 1, "", "20200101", "120000"
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName, ds.SliceThickness = "", "O", "", 2.0
        ds.Rows, ds.Columns = hu.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelSpacing = [spacing, spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, -2.0 * i]
        ds.InstanceNumber = i + 1
        ds.PixelData = np.clip(np.asarray(hu) + 1024, 0, 4095).astype(np.uint16).tobytes()
        ds.save_as(str(folder / f"s{i}.dcm"), enforce_file_format=True)
    return folder


class ListDataset(torch.utils.data.Dataset):
    """A dataset over samples already in memory."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def square_sample(i: int, size: int = 48, lesion: bool = True, nan: bool = False):
    """A dim ``size``-px slice with one bright 16x14 lesion whose place depends on ``i``
    (lesion-free with ``lesion=False``; one NaN pixel with ``nan=True``)."""
    from ctlesion.data.sample import Sample, empty_target

    gen = torch.Generator().manual_seed(i)
    image = 0.2 * torch.rand(1, size, size, generator=gen)
    target = empty_target(size, size)
    if lesion:
        x, y = 6 + 3 * (i % 5), 8 + 2 * (i % 7)
        image[:, y:y + 14, x:x + 16] += 0.6
        mask = torch.zeros(1, size, size, dtype=torch.uint8)
        mask[0, y:y + 14, x:x + 16] = 1
        target = {"boxes": torch.tensor([[x, y, x + 16, y + 14]], dtype=torch.float32),
                  "labels": torch.tensor([1]), "masks": mask}
    if nan:
        image[0, 0, 0] = float("nan")
    return Sample(image=image, target=target, sample_id=f"sq-{i}", source="synthetic")


def small_detector_overrides(size: int) -> list[str]:
    """``--set`` items for a small, quick ``maskrcnn-r18-s2`` run on ``size``-px slices
    (batch 2, lr 1e-3, lesion-free slices trained on)."""
    return [
        "model.name=maskrcnn-r18-s2", f"model.detector.min_size={size}", f"model.detector.max_size={size}",
        "model.detector.rpn_pre_nms_top_n_train=200", "model.detector.rpn_post_nms_top_n_train=100",
        "model.detector.box_batch_size_per_image=32", "train.lr=1e-3", "train.batch_size=2",
        "train.skip_negatives=false",
    ]
