"""Cine readers: real files, written-then-read round trips for every format, bad input, privacy."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from EchoFMEngine.cine import CineReadError
from EchoFMEngine.io import load_cine, load_dicom_series

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.tag import Tag  # noqa: E402
from pydicom.uid import (ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless,  # noqa: E402
                         UltrasoundMultiFrameImageStorage, generate_uid)

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-778899", "PatientBirthDate": "19700101",
           "StudyDate": "20240102", "AccessionNumber": "ACC-4455"}


def red_blue_clip(t=8, h=48, w=64) -> np.ndarray:
    """Left half red, right half blue, a grey square whose brightness encodes the frame index."""
    f = np.zeros((t, h, w, 3), np.uint8)
    f[:, :, : w // 2, 0] = 230
    f[:, :, w // 2:, 2] = 230
    for i in range(t):
        f[i, 4:12, 4:12] = 20 + 25 * i
    return f


def ecg_channels(n: int, fs: float) -> tuple[np.ndarray, np.ndarray]:
    """Lead I and lead II test traces in mV (lead II: 1.2 mV spikes at 75 bpm)."""
    t = np.arange(n) / fs
    lead2 = 1.2 * np.exp(-(((t % 0.8) - 0.2) / 0.01) ** 2) - 0.1
    lead1 = 0.3 * np.sin(2 * np.pi * 1.3 * t)
    return lead1, lead2


def us_dataset(frames: np.ndarray, *, fps=50.0, encoding="raw", regions=True, ecg=None, patient=True,
               series_uid=None, extra=None) -> Dataset:
    """A US multi-frame dataset as a scanner writes it (RGB frames; raw, rle, jpeg or ybr)."""
    t, h, w, _ = frames.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    if patient:
        for k, v in PATIENT.items():
            setattr(ds, k, v)
    ds.Modality = "US"
    ds.Manufacturer, ds.ManufacturerModelName = "TestVendor", "EchoTest 1"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesDescription = "A4C test"
    ds.Rows, ds.Columns, ds.NumberOfFrames = h, w, t
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.FrameTime = 1000.0 / fps
    ds.FrameIncrementPointer = Tag(0x0018, 0x1063)
    if regions:
        doppler = Dataset()  # a spectral region listed first: must not be picked
        doppler.RegionDataType, doppler.PhysicalUnitsXDirection, doppler.PhysicalUnitsYDirection = 3, 4, 7
        doppler.PhysicalDeltaX, doppler.PhysicalDeltaY = 0.01, 0.5
        tissue = Dataset()
        tissue.RegionSpatialFormat, tissue.RegionDataType, tissue.RegionFlags = 1, 1, 0
        tissue.RegionLocationMinX0, tissue.RegionLocationMinY0 = 0, 0
        tissue.RegionLocationMaxX1, tissue.RegionLocationMaxY1 = w - 1, h - 1
        tissue.PhysicalUnitsXDirection, tissue.PhysicalUnitsYDirection = 3, 3
        tissue.PhysicalDeltaX, tissue.PhysicalDeltaY = 0.03, 0.025
        ds.SequenceOfUltrasoundRegions = [doppler, tissue]
    if ecg is not None:
        ds.WaveformSequence = [ecg]
    if encoding == "jpeg":
        from PIL import Image

        parts = []
        for f in frames:
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, format="JPEG", quality=95, subsampling=1)
            parts.append(buf.getvalue())
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate(parts)
        ds["PixelData"].VR = "OB"
    elif encoding == "ybr":
        from pydicom.pixels import convert_color_space

        ds.PhotometricInterpretation = "YBR_FULL"
        ds.PixelData = convert_color_space(frames, "RGB", "YBR_FULL").tobytes()
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.PixelData = np.ascontiguousarray(frames).tobytes()
        if encoding == "rle":
            ds.compress(RLELossless)
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    return ds


def waveform_item(fs=500.0, seconds=2.0, offset_ms=100.0, sensitivity=0.005) -> Dataset:
    """A two-channel (Lead I, Lead II) ECG multiplex group, int16 with a channel sensitivity in mV."""
    n = int(fs * seconds)
    lead1, lead2 = ecg_channels(n, fs)
    raw = np.stack([np.round(lead1 / sensitivity), np.round(lead2 / sensitivity)], axis=1).astype("<i2")
    item = Dataset()
    item.MultiplexGroupTimeOffset = offset_ms
    item.WaveformOriginality = "ORIGINAL"
    item.NumberOfWaveformChannels, item.NumberOfWaveformSamples = 2, n
    item.SamplingFrequency = fs
    item.MultiplexGroupLabel = "ECG"
    chans = []
    for value, meaning in (("5.6.3-9-1", "Lead I (Einthoven)"), ("5.6.3-9-2", "Lead II")):
        src = Dataset()
        src.CodeValue, src.CodingSchemeDesignator, src.CodeMeaning = value, "SCPECG", meaning
        unit = Dataset()
        unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "mV", "UCUM", "millivolt"
        ch = Dataset()
        ch.ChannelSourceSequence = [src]
        ch.ChannelSensitivity = sensitivity
        ch.ChannelSensitivityUnitsSequence = [unit]
        ch.ChannelSensitivityCorrectionFactor = 1
        ch.ChannelBaseline = 0
        ch.WaveformBitsStored = 16
        chans.append(ch)
    item.ChannelDefinitionSequence = chans
    item.WaveformBitsAllocated, item.WaveformSampleInterpretation = 16, "SS"
    item.WaveformData = raw.tobytes()
    return item


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def clip() -> np.ndarray:
    return red_blue_clip()


@pytest.fixture(scope="session")
def ecg_dicom(tmp_path_factory, clip) -> Path:
    """Synthetic RGB multi-frame US with FrameTime 20 ms, a tissue region and an ECG waveform."""
    path = tmp_path_factory.mktemp("dcm") / "synthetic_ecg.dcm"
    return save(us_dataset(clip, ecg=waveform_item()), path)


# --- real files -------------------------------------------------------------------------------

REAL = {
    "dicom/US-PAL-8-10x-echo.dcm": dict(shape=(10, 430, 600), fps=1000 / 76, colour=True),
    "dicom/ATL-cardiac-YBR-jpeg.dcm": dict(shape=(1, 480, 640), fps=None, colour=True),
    "dicom/US-RGB-8-esopecho-TEE.dcm": dict(shape=(1, 120, 256), fps=None, colour=True),
    "dicom/US1-UNCR-noncardiac.dcm": dict(shape=(1, 480, 640), fps=None, colour=False),
    "echo/a4c_sequence.nii.gz": dict(shape=(20, 480, 560), fps=None, colour=False, spacing=0.4),
    "echo/segmentation_reference.nii.gz": dict(shape=(25, 416, 513), fps=None, colour=False, spacing=0.4556),
}


@pytest.mark.parametrize("rel", list(REAL))
def test_real_files(shared_data, rel):
    exp = REAL[rel]
    c = load_cine(shared_data / rel)
    assert c.frames.dtype == np.uint8 and c.frames.ndim == 4 and c.frames.shape[-1] == 3
    assert c.shape == exp["shape"]
    assert c.source.file_name == Path(rel).name
    if exp["fps"] is not None:
        assert c.fps == pytest.approx(exp["fps"])
        np.testing.assert_allclose(np.diff(c.frame_times_s), 0.076, atol=1e-9)
        assert "fps_assumed" not in c.source.extra
    else:
        assert c.source.extra.get("fps_assumed") is True
    if "spacing" in exp:
        assert c.spacing_mm == pytest.approx((exp["spacing"], exp["spacing"]), abs=1e-3)
    f = c.frames.astype(int)
    sat = f.max(-1) - f.min(-1)
    if exp["colour"]:
        assert (sat > 60).mean() > 0.002, "colour content (Doppler / ECG trace) lost"
    assert (sat <= 6).mean() > 0.6, "grey tissue must stay grey (R≈G≈B)"


def test_palette_is_applied(shared_data):
    c = load_cine(shared_data / "dicom/US-PAL-8-10x-echo.dcm")
    ds = pydicom.dcmread(shared_data / "dicom/US-PAL-8-10x-echo.dcm")
    from pydicom.pixels import apply_color_lut

    ref = apply_color_lut(ds.pixel_array, ds)
    ref = (ref >> 8).astype(np.uint8) if ref.max() > 255 else ref.astype(np.uint8)
    np.testing.assert_array_equal(c.frames, ref)
    assert c.source.photometric == "PALETTE COLOR" and c.source.transfer_syntax == "RLE Lossless"


def test_ybr_jpeg_is_true_rgb(shared_data):
    c = load_cine(shared_data / "dicom/ATL-cardiac-YBR-jpeg.dcm")
    f = c.frames[0].astype(int)
    bright = f.mean(-1) > 60
    grey = (f.max(-1) - f.min(-1)) <= 8
    assert (grey & bright).sum() > 2000, "bright B-mode tissue must be grey"
    # the burned-in ECG trace is green (about 90, 255, 178): G well above R and B in the lower strip
    strip = f[400:470, 20:350]
    assert ((strip[..., 1] - np.maximum(strip[..., 0], strip[..., 2])) > 60).sum() > 200
    assert c.source.photometric == "YBR_FULL_422" and c.source.scanner_model == "HDI5000/DVS"


def test_nifti_time_axis(shared_data):
    import SimpleITK as sitk

    im = sitk.ReadImage(str(shared_data / "echo/a4c_sequence.nii.gz"))
    c = load_cine(shared_data / "echo/a4c_sequence.nii.gz")
    arr = sitk.GetArrayFromImage(im)  # (t, y, x)
    assert im.GetSize() == (560, 480, 20)
    np.testing.assert_array_equal(c.frames[7, ..., 0], np.clip(np.rint(arr[7]), 0, 255).astype(np.uint8))


# --- DICOM round trips ------------------------------------------------------------------------

def test_dicom_round_trip_frames_timing_spacing_ecg(ecg_dicom, clip):
    c = load_cine(ecg_dicom)
    np.testing.assert_array_equal(c.frames, clip)
    assert c.fps == pytest.approx(50.0)
    np.testing.assert_allclose(c.frame_times_s, np.arange(8) * 0.02)
    assert c.spacing_mm == pytest.approx((0.25, 0.30))
    assert c.source.extra["spacing_source"] == "SequenceOfUltrasoundRegions"
    assert c.ecg is not None and c.ecg.lead == "Lead II"
    assert c.ecg.fs == 500.0 and c.ecg.t0_s == pytest.approx(0.1)
    _, lead2 = ecg_channels(1000, 500.0)
    np.testing.assert_allclose(c.ecg.signal, lead2, atol=0.0026)  # sensitivity applied (5 uV steps)
    assert c.source.format == "dicom"
    assert c.source.sop_class == "Ultrasound Multi-frame Image Storage"
    assert c.source.transfer_syntax == "Explicit VR Little Endian"
    assert c.source.scanner_model == "EchoTest 1" and c.source.series_description == "A4C test"


@pytest.mark.parametrize("encoding,tol", [("rle", 0), ("ybr", 1), ("jpeg", 12)])
def test_dicom_encodings_keep_rgb(tmp_path, clip, encoding, tol):
    c = load_cine(save(us_dataset(clip, encoding=encoding), tmp_path / f"{encoding}.dcm"))
    assert c.shape == clip.shape[:3]
    err = np.abs(c.frames.astype(int) - clip)
    assert np.median(err) <= max(tol / 4, 0) + 1e-9 and err[:, 16:40, 8:24].max() <= tol  # red interior
    assert c.frames[0, 30, 10].argmax() == 0 and c.frames[0, 30, 50].argmax() == 2  # red left, blue right


def test_dicom_h264_transfer_syntax(tmp_path, clip):
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    with av.open(buf, "w", format="h264") as out:
        s = out.add_stream("libx264", rate=50)
        s.width, s.height, s.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        for f in clip:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    ds = us_dataset(clip)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    c = load_cine(save(ds, tmp_path / "h264.dcm"))
    assert c.shape == clip.shape[:3]
    assert c.frames[0, 30, 10].argmax() == 0 and c.frames[0, 30, 50].argmax() == 2


def test_dicom_monochrome1_16bit_window_and_pixel_spacing(tmp_path):
    t, h, w = 3, 20, 30
    ramp = np.tile(np.linspace(0, 4000, w).astype(np.uint16), (t, h, 1))
    ds = us_dataset(red_blue_clip(t, h, w), regions=False)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    del ds.PlanarConfiguration
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelSpacing = [0.2, 0.3]
    ds.PixelData = ramp.tobytes()
    c = load_cine(save(ds, tmp_path / "mono1.dcm"))
    g = c.frames[0, 5, :, 0].astype(int)
    assert np.all(np.diff(g) <= 0), "MONOCHROME1: larger values must be darker"
    assert g[0] > 240 and g[-1] < 20
    assert np.all(c.frames[..., 0] == c.frames[..., 2])
    assert c.spacing_mm == (0.2, 0.3) and c.source.extra["spacing_source"] == "PixelSpacing"


@pytest.mark.parametrize("timing,fps,times", [
    ({"FrameTimeVector": [0, 20, 20, 40], "FrameIncrementPointer": Tag(0x0018, 0x1065)}, 50.0, [0, .02, .04, .08]),
    ({"CineRate": 25}, 25.0, None),
    ({"RecommendedDisplayFrameRate": 60}, 60.0, None),
])
def test_dicom_frame_timing_sources(tmp_path, timing, fps, times):
    ds = us_dataset(red_blue_clip(4, 16, 16))
    del ds.FrameTime, ds.FrameIncrementPointer
    for k, v in timing.items():
        setattr(ds, k, v)
    c = load_cine(save(ds, tmp_path / "timing.dcm"))
    assert c.fps == pytest.approx(fps)
    if times is not None:
        np.testing.assert_allclose(c.frame_times_s, times)
    assert "fps_assumed" not in c.source.extra


def test_dicom_folder_series(tmp_path):
    clip_a, clip_b = red_blue_clip(4, 16, 16), red_blue_clip(6, 20, 24)
    one = tmp_path / "one"
    one.mkdir()
    save(us_dataset(clip_a), one / "IM0001")  # extension-less, as on a DICOM CD
    (one / "notes.txt").write_text("not dicom")
    assert load_cine(one).shape == (4, 16, 16)

    two = tmp_path / "two"
    (two / "sub").mkdir(parents=True)
    save(us_dataset(clip_a), two / "a.dcm")
    save(us_dataset(clip_b), two / "sub" / "b.dcm")
    with pytest.raises(CineReadError, match="2 clips"):
        load_cine(two)
    assert sorted(c.num_frames for c in load_dicom_series(two)) == [4, 6]

    stacked = tmp_path / "singles"
    stacked.mkdir()
    uid = generate_uid()
    for i in range(3):
        ds = us_dataset(clip_a[i:i + 1], series_uid=uid, extra={"InstanceNumber": 3 - i})
        del ds.NumberOfFrames
        save(ds, stacked / f"f{i}.dcm")
    c = load_cine(stacked)
    assert c.num_frames == 3
    np.testing.assert_array_equal(c.frames, clip_a[[2, 1, 0]])  # ordered by InstanceNumber


# --- video, volumes, arrays ---------------------------------------------------------------------

@pytest.mark.parametrize("ext,fps", [(".avi", 50.0), (".mp4", 30000 / 1001)])
def test_video_round_trip(tmp_path, clip, ext, fps):
    from EchoFMEngine.io.video import _read_opencv, write_video

    path = write_video(tmp_path / f"clip{ext}", clip, fps)
    c = load_cine(path)
    assert c.shape == clip.shape[:3] and c.fps == pytest.approx(fps, rel=1e-3)
    np.testing.assert_allclose(np.diff(c.frame_times_s), 1 / fps, rtol=1e-2)
    assert c.frames[0, 30, 10].argmax() == 0 and c.frames[0, 30, 50].argmax() == 2
    assert np.abs(c.frames.astype(int) - clip)[:, 16:40, 8:24].max() <= 12
    np.testing.assert_allclose(c.frames[:, 8, 8, 1].astype(int), clip[:, 8, 8, 1], atol=8)  # frame order
    cv = _read_opencv(path)  # the fallback decoder gives the same RGB order
    assert cv.num_frames == clip.shape[0] and cv.frames[0, 30, 10].argmax() == 0


def test_volume_round_trips(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    grey = np.random.default_rng(0).integers(0, 256, (5, 12, 18), dtype=np.uint8)  # (t, y, x)
    for name in ("c.nrrd", "c.nii.gz", "c.mha"):
        im = sitk.GetImageFromArray(grey)
        im.SetSpacing((0.3, 0.4, 1.0))
        sitk.WriteImage(im, str(tmp_path / name))
        c = load_cine(tmp_path / name)
        np.testing.assert_array_equal(c.frames[..., 0], grey)
        assert c.spacing_mm == pytest.approx((0.4, 0.3)) and c.source.extra["fps_assumed"]
    rgb = red_blue_clip(3, 10, 14)
    im = sitk.GetImageFromArray(rgb, isVector=True)
    sitk.WriteImage(im, str(tmp_path / "rgb.nrrd"))
    np.testing.assert_array_equal(load_cine(tmp_path / "rgb.nrrd").frames, rgb)
    f16 = (grey.astype(np.float32) * 10 - 300)  # outside 0..255: min-max scaled
    sitk.WriteImage(sitk.GetImageFromArray(f16), str(tmp_path / "f.nii"))
    c = load_cine(tmp_path / "f.nii")
    assert c.frames.min() == 0 and c.frames.max() == 255
    np.testing.assert_array_equal(np.argsort(c.frames[..., 0].ravel(), kind="stable"),
                                  np.argsort(grey.ravel(), kind="stable"))


def test_volume_4d_time_and_2d(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    a = np.random.default_rng(2).integers(0, 256, (6, 1, 10, 12), dtype=np.uint8)  # t, z, y, x
    vols = [sitk.GetImageFromArray(a[i]) for i in range(6)]
    for v in vols:
        v.SetSpacing((0.3, 0.4, 1.0))
    sitk.WriteImage(sitk.JoinSeries(vols, 0.0, 0.02), str(tmp_path / "t4.nii.gz"))  # NIfTI: time unit s
    c = load_cine(tmp_path / "t4.nii.gz")
    np.testing.assert_array_equal(c.frames[..., 0], a[:, 0])
    assert c.fps == pytest.approx(50.0, rel=1e-5) and c.source.extra["fps_source"] == "time axis spacing"
    sitk.WriteImage(sitk.GetImageFromArray(a[0, 0]), str(tmp_path / "still.nrrd"))
    assert load_cine(tmp_path / "still.nrrd").shape == (1, 10, 12)


def test_slicer_seq_nrrd(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    t, w, h = 6, 14, 10
    data = np.random.default_rng(1).integers(0, 256, (t, w, h, 1), dtype=np.uint8)  # list, I, J, K
    header = {"type": "unsigned char", "dimension": 4, "space": "left-posterior-superior",
              "kinds": ["list", "domain", "domain", "domain"], "labels": ["time", "", "", ""],
              "space directions": [[np.nan] * 3, [0.3, 0, 0], [0, 0.4, 0], [0, 0, 1.0]],
              "space origin": [0, 0, 0], "encoding": "raw",
              "axis 0 index type": "numeric", "axis 0 index values": " ".join(f"{i * 0.04:g}" for i in range(t))}
    nrrd.write(str(tmp_path / "c.seq.nrrd"), data, header,
               custom_field_map={"axis 0 index type": "string", "axis 0 index values": "string"})
    c = load_cine(tmp_path / "c.seq.nrrd")
    assert c.shape == (t, h, w) and c.source.format == "seq.nrrd"
    np.testing.assert_array_equal(c.frames[2, ..., 0], data[2, :, :, 0].T)
    assert c.fps == pytest.approx(25.0) and c.spacing_mm == pytest.approx((0.4, 0.3))
    np.testing.assert_allclose(c.frame_times_s, np.arange(t) * 0.04)

    rgb = np.random.default_rng(2).integers(0, 256, (3, w, h, 1, t), dtype=np.uint8)  # current Slicer, RGB
    header.update({"dimension": 5, "kinds": ["vector", "domain", "domain", "domain", "list"],
                   "labels": ["", "", "", "", "time"], "units": ["", "", "", "", "s"],
                   "space directions": [[np.nan] * 3, [0.3, 0, 0], [0, 0.4, 0], [0, 0, 1.0], [np.nan] * 3]})
    header["axis 3 index values"] = header.pop("axis 0 index values")
    header["axis 3 index type"] = header.pop("axis 0 index type")
    nrrd.write(str(tmp_path / "rgb.seq.nrrd"), rgb, header,
               custom_field_map={"axis 3 index type": "string", "axis 3 index values": "string"})
    c = load_cine(tmp_path / "rgb.seq.nrrd")
    assert c.shape == (t, h, w) and c.fps == pytest.approx(25.0)
    np.testing.assert_array_equal(c.frames[4], rgb[:, :, :, 0, 4].transpose(2, 1, 0))


def test_arrays_and_images(tmp_path, clip):
    np.save(tmp_path / "c.npy", clip)
    np.testing.assert_array_equal(load_cine(tmp_path / "c.npy").frames, clip)
    np.save(tmp_path / "g.npy", clip[..., 0])
    assert load_cine(tmp_path / "g.npy").shape == clip.shape[:3]
    np.savez(tmp_path / "c.npz", frames=clip, fps=np.float32(40), spacing_mm=np.array([0.5, 0.6]))
    c = load_cine(tmp_path / "c.npz")
    assert c.fps == 40.0 and c.spacing_mm == (0.5, 0.6) and "fps_assumed" not in c.source.extra
    np.testing.assert_array_equal(c.frames, clip)
    from PIL import Image

    Image.fromarray(clip[3]).save(tmp_path / "s.png")
    c = load_cine(tmp_path / "s.png")
    assert c.num_frames == 1
    np.testing.assert_array_equal(c.frames[0], clip[3])
    Image.fromarray(clip[3]).save(tmp_path / "s.jpg", quality=95)
    assert load_cine(tmp_path / "s.jpg").frames[0, 30, 10].argmax() == 0
    Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)).save(tmp_path / "g16.png")
    g = load_cine(tmp_path / "g16.png").frames[0, ..., 0]
    assert g.min() == 0 and g.max() == 255


# --- bad input ------------------------------------------------------------------------------------

def _assert_error(path, *words):
    with pytest.raises(CineReadError) as ei:
        load_cine(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


def test_bad_inputs(tmp_path, ecg_dicom):
    data = ecg_dicom.read_bytes()
    (tmp_path / "trunc.dcm").write_bytes(data[: len(data) // 2])
    _assert_error(tmp_path / "trunc.dcm", "truncated")
    (tmp_path / "head.dcm").write_bytes(data[:300])
    _assert_error(tmp_path / "head.dcm", "truncated")
    (tmp_path / "empty.dcm").write_bytes(b"")
    _assert_error(tmp_path / "empty.dcm", "empty")
    (tmp_path / "clip.xyz").write_bytes(b"abc")
    _assert_error(tmp_path / "clip.xyz", "unsupported", ".xyz")
    _assert_error(tmp_path / "missing.avi", "no such file")
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    _assert_error(tmp_path / "junk.mp4", "cannot decode video")
    (tmp_path / "junk.nii.gz").write_bytes(b"\x1f\x8b" + b"x" * 100)
    _assert_error(tmp_path / "junk.nii.gz", "SimpleITK")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    _assert_error(tmp_path / "junk.npy", "NumPy")
    np.save(tmp_path / "zero.npy", np.zeros((0, 8, 8), np.uint8))
    _assert_error(tmp_path / "zero.npy", "zero frames")
    np.savez(tmp_path / "nokey.npz", video=np.zeros((2, 8, 8), np.uint8))
    _assert_error(tmp_path / "nokey.npz", "frames")
    (tmp_path / "junk.dcm").write_bytes(b"hello, not dicom" * 10)
    _assert_error(tmp_path / "junk.dcm")
    empty_dir = tmp_path / "nodicom"
    empty_dir.mkdir()
    _assert_error(empty_dir, "no DICOM")


def test_dicom_without_pixels():
    from pydicom.data import get_testdata_file

    path = Path(get_testdata_file("waveform_ecg.dcm"))
    _assert_error(path, "no pixel data", "ECG")


def test_missing_codec_names_package(tmp_path, clip, monkeypatch):
    from pydicom.pixels import get_decoder

    path = save(us_dataset(clip, encoding="jpeg"), tmp_path / "jpeg.dcm")
    decoder = get_decoder(JPEGBaseline8Bit)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")})
    _assert_error(path, "no decoder", "JPEG Baseline", "pylibjpeg-libjpeg")


# --- privacy --------------------------------------------------------------------------------------

def test_no_patient_identifiers(ecg_dicom, tmp_path):
    ds = pydicom.dcmread(ecg_dicom)
    assert str(ds.PatientName) == "Doe^Jane"  # the file does carry them
    c = load_cine(ecg_dicom)
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "x.dcm").write_bytes(ecg_dicom.read_bytes())
    for cine in (c, load_dicom_series(folder)[0]):
        text = json.dumps(cine.source.to_dict(), default=str) + repr(cine) + (cine.ecg.lead if cine.ecg else "")
        for v in PATIENT.values():
            for part in v.split("^"):
                assert part not in text, f"{part!r} leaked into the cine"


def test_bench_io_runs(capsys):
    from EchoFMEngine.bench import io as bench_io

    rows = bench_io.run({"3x16x24": (3, 16, 24)}, repeat=1)
    assert [r for r in rows if "error" in r] == []
    assert {r["format"] for r in rows} >= {"AVI mjpeg", "MP4 h264", "DICOM raw", "DICOM RLE", "DICOM JPEG"}
    assert all(r["frames_per_s"] > 0 for r in rows)
    assert "frames/s" in bench_io.format_table(rows)
