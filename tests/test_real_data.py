"""Readers on the real data in ``shared/data`` (skipped when it is absent).

COVID-CT-MD P001 is read once per session (148 JPEG-lossless slices, a few seconds).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctlesion.data.datasets import LesionFolderDataset, VolumeDataset
from ctlesion.data.factory import parse_data_spec
from ctlesion.data.readers import Volume, read_volume, volume_to_samples

P001 = Path("covid-ct-md") / "Sample data" / "COVID-19 subjects" / "P001"
SEMISEG = Path("covid-semiseg") / "Dataset" / "TrainingSet"
COVIDX_VAL = Path("splits") / "COVIDNet-CT" / "splits" / "v3" / "val_COVIDx_CT-3A.txt"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="module")
def p001(shared_data) -> Volume:
    return read_volume(need(shared_data / P001))


@pytest.fixture(scope="module")
def p001_infected(shared_data) -> np.ndarray:
    labels = np.load(need(shared_data / "covid-ct-md" / "Slice-level-labels-updated-1.npy"))
    return np.nonzero(labels[0])[0]  # P001: Label Index 0 -> row 0


def body_top_row(hu_slice: np.ndarray) -> int:
    """First image row crossing the body (>= 20 pixels above -500 HU): the anterior skin."""
    rows = np.nonzero((hu_slice > -500).sum(axis=1) >= 20)[0]
    return int(rows[0])


def test_p001_volume_facts(p001):
    assert p001.array.shape == (148, 512, 512) and p001.array.dtype == np.float32
    assert p001.units == "HU"
    assert p001.array.min() == -1024.0  # stored 0 (outside the scan circle) + intercept -1024
    assert 1000 < p001.array.max() < 4000  # bone, not raw detector values
    assert p001.spacing == pytest.approx((0.748046875, 0.748046875))
    meta = p001.meta
    assert meta["modality"] == "CT" and meta["patient_sex"] == "M" and meta["patient_age"] == "039Y"
    assert meta["sort_key"] == "ImagePositionPatient.normal"
    assert meta["slice_spacing_mm"] == pytest.approx(2.0)
    positions = np.asarray(meta["slice_positions"])
    assert np.all(np.diff(positions) < 0)  # descending: head first
    assert positions[0] == pytest.approx(-52.1) and positions[-1] == pytest.approx(-346.1)
    # In this sample, ascending InstanceNumber is exactly descending position.
    assert meta["instance_numbers"] == list(range(1, 149))
    assert all(Path(s).parent.name == "P001" for s in p001.slice_sources)


def test_p001_file_names_are_not_in_anatomical_order(p001):
    """The ``_<k>`` suffixes are the string-sort rank of the instance number (1, 10, 100...)."""
    ks = [int(Path(s).stem.rsplit("_", 1)[1]) for s in p001.slice_sources]
    assert ks[:4] == [1, 61, 72, 83]
    ranks = {n: r + 1 for r, n in enumerate(sorted(map(str, range(1, 149))))}
    assert ks == [ranks[str(n)] for n in range(1, 149)]


def test_p001_slice_labels_fall_inside_the_lungs(p001, p001_infected):
    assert p001_infected.min() == 26 and p001_infected.max() == 124 and p001_infected.size == 80
    # Fraction of aerated-lung pixels (-950..-500 HU) per slice.
    lung = ((p001.array > -950) & (p001.array < -500)).mean(axis=(1, 2))
    infected = np.zeros(len(lung), bool)
    infected[p001_infected] = True
    assert lung[infected].min() > 0.15
    assert lung[infected].mean() > 1.5 * lung[~infected].mean()


def test_p001_order_matches_covidx_boxes(shared_data, p001):
    """COVIDx CT-3A names P001 slices IM{j+1:04d} with a body box; the box top (ymin)
    tracks our slice j within a few pixels, and would not in the reversed order."""
    lines = [
        line.split() for line in need(shared_data / COVIDX_VAL).read_text().splitlines()
        if line.startswith("COVIDCTMD-P001-IM")
    ]
    assert len(lines) == 39
    js = np.array([int(parts[0][-8:-4]) - 1 for parts in lines])
    ymin = np.array([int(parts[3]) for parts in lines])
    ours = np.array([body_top_row(p001.array[j]) for j in js])
    reversed_order = np.array([body_top_row(p001.array[147 - j]) for j in js])
    assert np.abs(ours - ymin).max() <= 6
    assert np.abs(reversed_order - ymin).mean() > 20
    # the COVIDx slices are the original-label infected ones: inside our infected range
    assert js.min() >= 26 and js.max() <= 124


def test_p001_samples_windowed(p001):
    view = Volume(
        array=p001.array[60:62], units="HU", spacing=p001.spacing, source=p001.source,
        slice_sources=p001.slice_sources[60:62], meta={},
    )
    samples = list(volume_to_samples(view, window="auto"))
    assert [s.sample_id for s in samples] == ["P001#0000", "P001#0001"]
    image = samples[0].image
    assert image.shape == (1, 512, 512) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # Corner = outside the scan circle, -1024 HU; lung window W1500/L-600 puts it at 326/1500.
    assert float(image[0, 0, 0]) == pytest.approx((-1024 + 1350) / 1500, abs=1e-6)
    assert samples[0].meta["window"] == "W1500:L-600"


def test_covid_ct_md_slice_counts_from_headers(shared_data):
    root = need(shared_data / "covid-ct-md" / "Sample data")
    ds = VolumeDataset(root)
    assert [p.name for p in ds.inputs] == ["P001", "cap001", "normal001"]
    assert len(ds) == 148 + 168 + 154
    assert parse_data_spec(str(root / "COVID-19 subjects" / "P001")).format == "dicom"


def test_semiseg_multiclass_train(shared_data):
    root = need(shared_data / SEMISEG / "MultiClassInfection-Train")
    assert parse_data_spec(str(root)).format == "semiseg"
    ds = LesionFolderDataset(root, "semiseg", mask_type="both", min_area=0)
    assert len(ds) == 50 and ds.stems[:3] == ["0", "1", "2"] and ds.stems[-1] == "67"
    binary = root.parent / "LungInfection-Train" / "Doctor-label" / "GT"
    heights, widths, with_ggo, with_c = [], [], 0, 0
    for i in range(len(ds)):
        sample = ds[i]
        _, h, w = sample.image.shape
        heights.append(h)
        widths.append(w)
        labels = set(sample.target["labels"].tolist())
        assert labels <= {1, 2} and labels  # README: no lesion-free slice
        with_ggo += 1 in labels
        with_c += 2 in labels
        if i % 10 == 0:  # GGO + C union equals the binary Doctor-label GT (README)
            union = sample.target["masks"].sum(0).numpy() > 0
            with Image.open(binary / f"{ds.stems[i]}.png") as img:
                np.testing.assert_array_equal(union, np.array(img) > 0)
    assert (with_ggo, with_c) == (48, 39)
    assert (min(heights), max(heights)) == (221, 487)
    assert (min(widths), max(widths)) == (153, 456)


def test_semiseg_binary_gt_is_rejected(shared_data):
    root = need(shared_data / SEMISEG / "LungInfection-Train" / "Doctor-label")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every image has its GT: no warning expected
        ds = LesionFolderDataset(root, "semiseg")
    with pytest.raises(ValueError, match=r"GT/0\.png.*255.*MultiClassInfection"):
        ds[0]
