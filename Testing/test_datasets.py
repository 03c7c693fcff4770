"""Datasets on tiny fake copies of the published layouts, built from phantom studies in tmp_path."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from EchoFMEngine.data import build_dataset
from EchoFMEngine.data.tracings import ed_es_frames, rasterise_tracing, read_volume_tracings, tracing_volume

T, S = 16, 64  # clip frames and side used throughout (small: fast tests)


# ----------------------------------------------------------------------------- helpers
def _study(seed, view="A4C", n_frames=48, size=(112, 112), hr=75.0, **kw):
    from EchoFMEngine.clinical.phantoms import make_study

    return make_study(view=view, n_frames=n_frames, size=size, fps=30.0, heart_rate_bpm=hr,
                      seed=seed, with_ecg=False, **kw)


def _write_csv(path: Path, rows: list[dict], fields=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields or list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def tracing_rows(cavity: np.ndarray, n_chords: int = 20) -> list[tuple]:
    """EchoNet-style rows (X1, Y1, X2, Y2) for a cavity whose long axis runs top to bottom."""
    rows = np.flatnonzero(cavity.any(axis=1))
    top, bot = rows[0], rows[-1]
    mid = lambda r: float(np.flatnonzero(cavity[r]).mean())  # noqa: E731
    out = [(mid(top), float(top), mid(bot), float(bot) + 1.0)]  # long axis
    for r in np.linspace(top, bot, n_chords).round().astype(int):
        cols = np.flatnonzero(cavity[r])
        out.append((float(cols[0]), float(r), float(cols[-1] + 1), float(r)))
    return out


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def _grey(video: torch.Tensor) -> torch.Tensor:
    return video.mean(dim=0)  # [T, H, W]


# ----------------------------------------------------------------------------- EchoNet
@pytest.fixture(scope="module")
def echonet(tmp_path_factory):
    from EchoFMEngine.clinical.phantoms import write_avi

    root = tmp_path_factory.mktemp("EchoNet-Dynamic")
    (root / "Videos").mkdir()
    files, traces, studies = [], [], {}
    for i, split in enumerate(["TRAIN", "TRAIN", "VAL"]):
        st = _study(10 + i, ef=40.0 + 10 * i)
        name = f"0X{i:04X}ABCD"
        write_avi(st, root / "Videos" / f"{name}.avi")
        ed, es = int(st.ed_frames[0]), int(st.es_frames[0])
        files.append({"FileName": name if i else name + ".avi", "EF": f"{st.ef:.4f}", "ESV": f"{st.esv_ml:.3f}",
                      "EDV": f"{st.edv_ml:.3f}", "FrameHeight": 112, "FrameWidth": 112, "FPS": 30,
                      "NumberOfFrames": st.cine.num_frames, "Split": split})
        for frame in (es, ed):  # ES first: ED must be found by volume, not by order
            for x1, y1, x2, y2 in tracing_rows(st.masks[frame] == 1):
                traces.append({"FileName": name + ".avi", "X1": x1, "Y1": y1, "X2": x2, "Y2": y2, "Frame": frame})
        studies[name] = st
    _write_csv(root / "FileList.csv", files)
    _write_csv(root / "VolumeTracings.csv", traces)
    return root, studies


def test_echonet_tracings_rasterise_to_the_true_cavity(echonet):
    root, studies = echonet
    tr = read_volume_tracings(root / "VolumeTracings.csv")
    assert set(tr) == set(studies)
    for name, st in studies.items():
        ed, es = ed_es_frames(tr[name])
        assert (ed, es) == (int(st.ed_frames[0]), int(st.es_frames[0]))
        assert tracing_volume(tr[name][ed]) > tracing_volume(tr[name][es])
        for f in (ed, es):
            m = rasterise_tracing(tr[name][f], (112, 112))
            assert dice(m, st.masks[f] == 1) > 0.9


def test_echonet_items(echonet):
    root, studies = echonet
    ds = build_dataset("echonet", root, split="train", frames=T, size=S)
    assert len(ds) == 2
    item = ds[0]
    assert item["video"].shape == (3, T, S, S) and item["video"].dtype == torch.float32
    assert 0.0 <= item["video"].min() and item["video"].max() <= 1.0
    assert item["masks"].shape == (T, S, S) and item["masks"].dtype == torch.long
    assert item["mask_valid"].shape == (T,) and item["mask_valid"].dtype == torch.bool
    name = item["meta"]["path"].split("/")[-1][:-4]
    st = studies[name]
    assert item["meta"]["path"] == f"Videos/{name}.avi"
    assert item["ef"] == pytest.approx(st.ef, abs=1e-3) and item["edv"] == pytest.approx(st.edv_ml, abs=1e-2)
    valid = item["mask_valid"].nonzero().flatten()
    assert len(valid) == 2  # ED and ES both inside the chosen window
    src = np.asarray(item["meta"]["frames"])[valid.numpy()]
    assert set(src.tolist()) == {int(st.ed_frames[0]), int(st.es_frames[0])}
    grey = _grey(item["video"])
    for t in valid:
        m = item["masks"][t] == 1
        assert m.sum() > 20
        ring = torch.nn.functional.max_pool2d(m[None, None].float(), 7, 1, 3)[0, 0].bool() & ~m
        assert grey[t][m].mean() < grey[t][ring].mean() - 0.1  # the mask sits on the dark cavity
    assert not item["masks"][~item["mask_valid"]].any()
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["video"].shape == (2, 3, T, S, S) and batch["ef"].shape == (2,)


def test_echonet_errors(echonet, tmp_path):
    root, _ = echonet
    with pytest.raises(ValueError, match=r"no samples for split 'test'") as exc:
        build_dataset("echonet", root, split="test", frames=T, size=S)
    assert str(root) in str(exc.value)
    bad = tmp_path / "bad"
    (bad / "Videos").mkdir(parents=True)
    (bad / "Videos" / "A.avi").write_bytes((root / "Videos" / "0X0000ABCD.avi").read_bytes())
    _write_csv(bad / "FileList.csv", [{"FileName": "A", "EF": "55", "Split": "TRAIN"},
                                      {"FileName": "A", "EF": "high", "Split": "TRAIN"}])
    with pytest.raises(ValueError, match=r"FileList.csv: row 3: EF 'high'"):
        build_dataset("echonet", bad, frames=T, size=S)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("echonet2", root)


# ----------------------------------------------------------------------------- CAMUS
def _write_image(path: Path, arr: np.ndarray, spacing=(0.3, 0.3)):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(spacing) + ((1.0,) if arr.ndim == 3 else ()))
    sitk.WriteImage(img, str(path))


@pytest.fixture(scope="module")
def camus(tmp_path_factory):
    root = tmp_path_factory.mktemp("CAMUS_public")
    base = root / "database_nifti"
    splits = {"train": [], "val": [], "test": []}
    truth = {}
    for k, split in enumerate(["train", "train", "test"], start=1):
        pid = f"patient{k:04d}"
        folder = base / pid
        folder.mkdir(parents=True)
        splits[split].append(pid)
        for j, view in enumerate(("2CH", "4CH")):
            st = _study(40 + 2 * k + j, view="A2C" if view == "2CH" else "A4C", n_frames=40, size=(96, 80))
            ed = int(st.ed_frames[0])
            es = int(st.es_frames[st.es_frames > ed][0])
            grey = st.cine.frames[ed:es + 1, :, :, 0]
            gts = st.masks[ed:es + 1]
            stem = folder / f"{pid}_{view}"
            _write_image(Path(f"{stem}_half_sequence.nii.gz"), grey)
            _write_image(Path(f"{stem}_ED.nii.gz"), grey[0])
            _write_image(Path(f"{stem}_ES.nii.gz"), grey[-1])
            _write_image(Path(f"{stem}_ED_gt.nii.gz"), gts[0])
            _write_image(Path(f"{stem}_ES_gt.nii.gz"), gts[-1])
            if split == "test":  # the 2023 release also labels every frame of the half sequence
                _write_image(Path(f"{stem}_half_sequence_gt.nii.gz"), gts)
            (folder / f"Info_{view}.cfg").write_text(
                f"ED: 1\nES: {len(grey)}\nNbFrame: {len(grey)}\nSex: F\nAge: 60\nImageQuality: Good\n"
                f"EF: {st.ef:.2f}\nFrameRate: 30\n")
            truth[(pid, view)] = (len(grey), st.ef)
    (root / "database_split").mkdir()
    for split, name in (("train", "training"), ("val", "validation"), ("test", "testing")):
        (root / "database_split" / f"subgroup_{name}.txt").write_text("\n".join(splits[split]) + "\n")
    return root, truth


def test_camus_items_are_full_cycles_with_ed_es_masks(camus):
    root, truth = camus
    ds = build_dataset("camus", root, split="train", frames=T, size=S)
    assert len(ds) == 4  # two patients x two views
    for i in range(len(ds)):
        item = ds[i]
        assert item["video"].shape == (3, T, S, S) and item["masks"].shape == (T, S, S)
        meta = item["meta"]
        n_half, ef = truth[(meta["path"].split("/")[1], meta["view"])]
        assert meta["full_cycle"] is True and "Age" not in str(meta)
        assert item["ef"] == pytest.approx(ef, abs=0.01)
        frames = np.asarray(meta["frames"])
        # Reverse padding: ED -> ES -> back towards ED.
        assert frames[0] == 0 and frames.max() == n_half - 1
        peak = int(np.argmax(frames))
        assert (np.diff(frames[:peak + 1]) >= 0).all() and (np.diff(frames[peak:]) <= 0).all()
        valid = item["mask_valid"].nonzero().flatten().tolist()
        assert set(frames[valid].tolist()) == {0, n_half - 1} and 0 in valid
        labels = set(item["masks"][item["mask_valid"]].unique().tolist())
        assert labels == {0, 1, 2, 3}
        grey = _grey(item["video"])
        for t in valid:
            assert grey[t][item["masks"][t] == 1].mean() < grey[t][item["masks"][t] == 2].mean() - 0.2
    test = build_dataset("camus", root, split="test", frames=T, size=S, views=("4CH",))
    assert len(test) == 1 and bool(test[0]["mask_valid"].all())
    ed_only = build_dataset("camus", root, split="test", frames=T, size=S, sequence_masks=False)
    assert int(ed_only[0]["mask_valid"].sum()) == 2
    with pytest.raises(ValueError, match="no samples for split 'val'"):
        build_dataset("camus", root, split="val", frames=T, size=S)


def test_camus_mask_size_mismatch_names_the_file(camus, tmp_path):
    import shutil

    root, _ = camus
    copy = tmp_path / "camus"
    shutil.copytree(root, copy)
    bad = copy / "database_nifti" / "patient0001" / "patient0001_4CH_ES_gt.nii.gz"
    _write_image(bad, np.zeros((50, 40), np.uint8))
    ds = build_dataset("camus", copy, split="train", frames=T, size=S)
    idx = [i for i, s in enumerate(ds.samples) if s["rel"].endswith("patient0001_4CH")][0]
    with pytest.raises(ValueError, match=r"patient0001_4CH_ES_gt.nii.gz: mask of size \(50, 40\)"):
        ds[idx]


# ----------------------------------------------------------------------------- TMED-2
TMED_ROWS = [  # query_key, view_label, diagnosis_label, view split, diagnosis split
    ("1s1_0.png", "PLAX", "no_AS", "train", "train"),
    ("1s1_1.png", "A4C", "no_AS", "train", "train"),
    ("2s1_0.png", "A4CorA2CorOther", "mild_AS", "train", "train"),
    ("2s1_1.png", "PSAX", "mild_AS", "val", "train"),
    ("3s1_0.png", "A2C", "severe_AS", "train", "train"),
    ("3s1_1.png", "A2C", "severe_AS", "test", "test"),
]


def _tmed(root: Path, rows=TMED_ROWS):
    import cv2

    img_dir = root / "view_and_diagnosis_labeled_set" / "labeled"
    img_dir.mkdir(parents=True, exist_ok=True)
    st = _study(70, n_frames=4, size=(112, 112))
    out = []
    for i, (key, view, diag, vsplit, dsplit) in enumerate(rows):
        cv2.imwrite(str(img_dir / key), st.cine.frames[i % 4, :, :, 0])
        out.append({"query_key": key, "view_label": view, "diagnosis_label": diag,
                    "SourceFolder": "view_and_diagnosis_labeled_set/labeled",
                    "diagnosis_classifier_split": dsplit, "view_classifier_split": vsplit})
    _write_csv(root / "DEV479" / "TMED2_fold0_labeledpart.csv", out)
    return root


def test_tmed2_views_and_as_tasks(tmp_path):
    root = _tmed(tmp_path / "TMED2")
    ds = build_dataset("tmed2", root, split="train", task="view", frames=T, size=S)
    assert len(ds) == 4
    names = [ds[i]["meta"]["class_name"] for i in range(len(ds))]
    assert names == ["PLAX", "A4C", "other", "A2C"]
    item = ds[0]
    assert item["label"] == 2 and item["video"].shape == (3, T, S, S)
    assert torch.equal(item["video"][:, 0], item["video"][:, -1])  # a still repeated along time
    assert item["meta"]["full_cycle"] is False
    presence = build_dataset("tmed2", root, split="train", task="as_presence", frames=T, size=S)
    assert [s["label"] for s in presence.samples] == [0, 0, 1, 1, 1]
    early = build_dataset("tmed2", root, split="train", task="as_early_vs_significant", frames=T, size=S)
    assert [s["label"] for s in early.samples] == [0, 0, 1]  # no_AS is not part of this task
    assert len(build_dataset("tmed2", root, split="test", task="as_significant", frames=T, size=S)) == 1


def test_tmed2_unknown_view_names_file_row_and_value(tmp_path):
    rows = TMED_ROWS[:2] + [("9s9_0.png", "A3C", "no_AS", "train", "train")]
    root = _tmed(tmp_path / "TMED2", rows)
    with pytest.raises(ValueError, match=r"TMED2_fold0_labeledpart.csv: row 4: unknown view_label 'A3C'"):
        build_dataset("tmed2", root, task="view", frames=T, size=S)


# ----------------------------------------------------------------------------- AR multi-view
def _ar(root: Path, rows: list[dict]):
    from EchoFMEngine.clinical.phantoms import write_avi

    (root / "clips").mkdir(parents=True, exist_ok=True)
    for r in rows:
        p = root / r["path"]
        if not p.exists():
            write_avi(_study(abs(hash(r["path"])) % 1000, n_frames=40, size=(80, 80)), p)
    _write_csv(root / "ar_labels.csv", rows)
    return root


def test_ar_multiview_groups_views_of_a_study(tmp_path):
    rows = [{"study_id": "s1", "view": "A3C", "path": "clips/s1_a3c.avi", "severity": "3.0", "split": "train"},
            {"study_id": "s1", "view": "PLAX", "path": "clips/s1_plax.avi", "severity": "3.0", "split": "train"},
            {"study_id": "s2", "view": "A5C", "path": "clips/s2_a5c.avi", "severity": "1.5", "split": "train"},
            {"study_id": "s3", "view": "PSAX", "path": "clips/s3_psax.avi", "severity": "0.0", "split": "test"}]
    root = _ar(tmp_path / "ar", rows)
    ds = build_dataset("ar_multiview", root, split="train", frames=T, size=S)
    assert len(ds) == 2
    item = ds[0]
    assert item["video"].shape == (4, 3, T, S, S)
    assert item["view_valid"].tolist() == [True, False, False, True]  # A3C, A5C, PSAX, PLAX
    assert item["video"][1].abs().sum() == 0 and item["video"][0].max() > 0.5
    assert item["severity"] == 3.0 and item["label"] == 1 and item["severity_class"] == 6
    assert ds[1]["label"] == 0 and ds[1]["meta"]["paths"] == ["", "clips/s2_a5c.avi", "", ""]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["video"].shape == (2, 4, 3, T, S, S)


def test_ar_multiview_rejects_bad_severity(tmp_path):
    rows = [{"study_id": "s1", "view": "A3C", "path": "clips/a.avi", "severity": "1.3", "split": "train"}]
    root = _ar(tmp_path / "ar", rows)
    with pytest.raises(ValueError, match=r"ar_labels.csv: row 2: severity '1.3'"):
        build_dataset("ar_multiview", root, frames=T, size=S)


# ----------------------------------------------------------------------------- generic CSV and folder
@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    from EchoFMEngine.clinical.phantoms import write_avi, write_dicom

    root = tmp_path_factory.mktemp("own")
    sts = {}
    for i, (name, view) in enumerate([("a/one.avi", "A4C"), ("b/two.avi", "A2C"), ("b/three.dcm", "A4C")]):
        st = _study(80 + i, view=view, n_frames=48, size=(96, 96), hr=120.0)  # 15-frame cycles
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (write_dicom if name.endswith(".dcm") else write_avi)(st, root / name)
        sts[name] = st
    st = sts["a/one.avi"]
    ed, es = int(st.ed_frames[0]), int(st.es_frames[0])
    np.save(root / "a" / "one_masks.npy", st.masks[[ed, es]])
    rows = [{"path": "a/one.avi", "split": "train", "view": "A4C", "ef": f"{st.ef:.3f}",
             "mask_path": "a/one_masks.npy", "mask_frames": f"{ed};{es}"},
            {"path": "b/two.avi", "split": "train", "view": "A2C", "ef": "", "mask_path": "", "mask_frames": ""},
            {"path": "b/three.dcm", "split": "val", "view": "", "ef": "50", "mask_path": "", "mask_frames": ""}]
    _write_csv(root / "labels.csv", rows)
    (root / "a" / "one_gt.nii.gz").write_bytes(b"not an image")  # label files are not cines
    return root, sts


def test_csv_dataset_targets_and_masks(own_data):
    root, sts = own_data
    ds = build_dataset("csv", root, split="train", classes={"view": ["A2C", "A4C"]}, regression=["ef"],
                       frames=T, size=S)
    assert len(ds) == 2
    a, b = ds[0], ds[1]
    assert a["view"] == 1 and a["label"] == 1 and b["label"] == 0
    assert a["ef"] == pytest.approx(sts["a/one.avi"].ef, abs=1e-3) and np.isnan(b["ef"])
    assert int(a["mask_valid"].sum()) == 2 and int(b["mask_valid"].sum()) == 0
    val = build_dataset("csv", root, split="val", classes={"view": ["A2C", "A4C"]}, frames=T, size=S)
    assert val[0]["view"] == -1 and val[0]["meta"]["path"] == "b/three.dcm"


def test_csv_dataset_errors(own_data, tmp_path):
    root, _ = own_data
    with pytest.raises(ValueError, match=r"labels.csv: row 3: unknown view 'A2C'"):
        build_dataset("csv", root, split="all", classes={"view": ["A4C", "PLAX"]}, frames=T, size=S)
    import shutil

    copy = tmp_path / "own"
    shutil.copytree(root, copy)
    np.save(copy / "a" / "one_masks.npy", np.zeros((2, 90, 96), np.uint8))
    ds = build_dataset("csv", copy, split="train", classes={"view": ["A2C", "A4C"]}, frames=T, size=S)
    with pytest.raises(ValueError, match=r"one_masks.npy: mask of size \(90, 96\) does not match"):
        ds[0]


def test_folder_dataset_skips_unreadable_files(own_data, tmp_path):
    import shutil

    root, _ = own_data
    copy = tmp_path / "tree"
    shutil.copytree(root, copy)
    (copy / "a" / "broken.avi").write_bytes(b"RIFF....garbage")
    ds = build_dataset("folder", copy, split="all", frames=T, size=S, window="best")
    assert sorted(ds.samples) == ["a/broken.avi", "a/one.avi", "b/three.dcm", "b/two.avi"]
    i = ds.samples.index("a/broken.avi")
    with pytest.warns(RuntimeWarning, match="a/broken.avi"):
        item = ds[i]
    assert item["meta"]["path"] == ds.samples[i + 1] and item["video"].shape == (3, T, S, S)
    assert ds.skipped and ds.skipped[0][0] == "a/broken.avi" and str(tmp_path) not in ds.skipped[0][1]
    assert item["meta"]["full_cycle"] is True
