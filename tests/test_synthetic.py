"""The synthetic VOC dataset: devkit layout, XML contents, flags, determinism, caching."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest

from sppdet import synthetic
from sppdet.synthetic import (MARKER_NAME, SYNTHETIC_CLASSES, ensure_dataset, generate,
                              render_image)
from sppdet.utils import SppdetError
from sppdet.voc import VOCDataset

SMALL = dict(num_trainval=10, num_test=6)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=3, progress=False, **SMALL)
    return root


def test_layout_and_splits(small):
    folder = small / "VOC2007"
    main = folder / "ImageSets" / "Main"
    split = {s: (main / f"{s}.txt").read_text().split() for s in ("trainval", "train", "val", "test")}
    assert split["trainval"] == [f"{i:06d}" for i in range(1, 11)]
    assert split["test"] == [f"{i:06d}" for i in range(11, 17)]
    assert sorted(split["train"] + split["val"]) == split["trainval"]
    assert len(split["train"]) == 5 and not set(split["train"]) & set(split["val"])
    for image_id in split["trainval"] + split["test"]:
        assert (folder / "JPEGImages" / f"{image_id}.jpg").is_file()
        assert (folder / "Annotations" / f"{image_id}.xml").is_file()
    marker = json.loads((small / MARKER_NAME).read_text())
    assert marker["format_version"] == synthetic.FORMAT_VERSION
    assert marker["params"]["seed"] == 3 and marker["params"]["num_test"] == 6


def test_xml_fields_boxes_and_images(small):
    folder = small / "VOC2007"
    n_objects = 0
    for xml_path in sorted((folder / "Annotations").glob("*.xml")):
        root = ET.parse(xml_path).getroot()
        assert root.tag == "annotation"
        assert root.findtext("folder") == "VOC2007"
        assert root.findtext("filename") == xml_path.stem + ".jpg"
        assert root.findtext("source/database") == "sppdet synthetic"
        assert root.findtext("segmented") == "0"
        w, h = int(root.findtext("size/width")), int(root.findtext("size/height"))
        assert root.findtext("size/depth") == "3"
        assert 160 <= min(w, h) <= 240 and 0.74 <= w / h <= 1.34
        image = cv2.imread(str(folder / "JPEGImages" / root.findtext("filename")))
        assert image.shape == (h, w, 3)
        for obj in root.findall("object"):
            n_objects += 1
            assert obj.findtext("name") in SYNTHETIC_CLASSES
            assert obj.findtext("pose") == "Unspecified"
            assert obj.findtext("truncated") in ("0", "1") and obj.findtext("difficult") in ("0", "1")
            x1, y1, x2, y2 = (int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= x1 <= x2 <= w and 1 <= y1 <= y2 <= h
            if obj.findtext("truncated") == "1":  # cut by the border: the box touches it
                assert x1 == 1 or y1 == 1 or x2 == w or y2 == h
    assert n_objects >= 10


def test_readable_by_voc_reader_and_class_files(small):
    main = small / "VOC2007" / "ImageSets" / "Main"
    for split in ("trainval", "test"):
        ds = VOCDataset(small, split=split, classes=SYNTHETIC_CLASSES)  # strict: boxes in image
        for c, name in enumerate(SYNTHETIC_CLASSES, start=1):
            lines = dict(line.split() for line in (main / f"{name}_{split}.txt").read_text().splitlines())
            assert list(lines) == ds.image_ids
            for r in ds.records:
                mine = r.labels == c
                want = 1 if (mine & ~r.difficult).any() else 0 if mine.any() else -1
                assert int(lines[r.image_id]) == want


def test_polygon_mask_hand_worked():
    square = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], float)
    # OpenCV fills polygon vertices inclusively: corners 40..60 cover pixels 40..60
    alpha, x0, y0 = synthetic._polygon_mask([(synthetic._transform(square, 20, 1.0, 0.0, (50, 40)), 255)])
    ys, xs = np.nonzero(alpha >= 0.5)
    assert (xs.min() + x0, ys.min() + y0, xs.max() + x0, ys.max() + y0) == (40, 30, 60, 50)
    # aspect 4 stretches x by 2 and y by 1/2 (half-sides 20, 5); a quarter turn swaps them
    placed = synthetic._transform(square, 20, 4.0, math.pi / 2, (50, 40))
    alpha, x0, y0 = synthetic._polygon_mask([(placed, 255)])
    ys, xs = np.nonzero(alpha >= 0.5)
    assert (xs.min() + x0, ys.min() + y0, xs.max() + x0, ys.max() + y0) == (45, 20, 55, 60)
    # a hole cut by a second polygon
    alpha, x0, y0 = synthetic._polygon_mask([
        (synthetic._transform(square, 20, 1.0, 0.0, (50, 40)), 255),
        (synthetic._transform(square, 10, 1.0, 0.0, (50, 40)), 0)])
    assert alpha[40 - y0, 50 - x0] == 0 and alpha[32 - y0, 42 - x0] == 1


def test_flags_and_statistics_over_a_sample():
    objects, counts = [], []
    for i in range(80):
        image, objs = render_image(np.random.Generator(np.random.PCG64([7, i])))
        h, w = image.shape[:2]
        for o in objs:
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 <= x2 < w and 0 <= y1 <= y2 < h
        objects += objs
        counts.append(len(objs))
    difficult = np.mean([o["difficult"] for o in objects])
    truncated = np.mean([o["truncated"] for o in objects])
    assert 0.02 < difficult < 0.3 and 0.03 < truncated < 0.35
    assert all(o["difficult"] for o in objects if o["visible"] < 0.45)
    assert 1.5 < np.mean(counts) < 3.5
    assert set(o["label"] for o in objects) == set(range(len(SYNTHETIC_CLASSES)))
    sides = np.array([(o["box"][2] - o["box"][0] + 1, o["box"][3] - o["box"][1] + 1) for o in objects])
    assert sides.min() < 24 and sides.max() > 80  # small and large objects both occur


def test_deterministic_bytes(tmp_path):
    a = tree_bytes(generate(tmp_path / "a", seed=5, progress=False, num_trainval=3, num_test=2).parent)
    b = tree_bytes(generate(tmp_path / "b", seed=5, progress=False, num_trainval=3, num_test=2).parent)
    assert a == b and len(a) > 5
    c = tree_bytes(generate(tmp_path / "c", seed=6, progress=False, num_trainval=3, num_test=2).parent)
    assert c["VOC2007/JPEGImages/000001.jpg"] != a["VOC2007/JPEGImages/000001.jpg"]


def test_ensure_reuses_then_regenerates_on_change(tmp_path):
    root = tmp_path / "data" / "synthetic"
    folder = ensure_dataset(root, progress=False, **SMALL)
    assert folder == root / "VOC2007"
    marker, image = root / MARKER_NAME, folder / "JPEGImages" / "000001.jpg"
    stamps = (marker.stat().st_mtime_ns, image.stat().st_mtime_ns)
    old_bytes = image.read_bytes()
    assert ensure_dataset(root, progress=False, **SMALL) == folder
    assert (marker.stat().st_mtime_ns, image.stat().st_mtime_ns) == stamps
    ensure_dataset(root, seed=1, progress=False, **SMALL)
    assert json.loads(marker.read_text())["params"]["seed"] == 1
    assert image.read_bytes() != old_bytes
    ensure_dataset(root, seed=1, progress=False, num_trainval=4, num_test=2)
    assert len((folder / "ImageSets/Main/trainval.txt").read_text().split()) == 4
    assert not (folder / "JPEGImages" / "000016.jpg").exists()  # the old dataset is gone, not merged
    assert sorted(p.name for p in root.parent.iterdir()) == ["synthetic"]  # no temporaries left


def test_interrupted_generation_is_not_complete(tmp_path, monkeypatch):
    root = tmp_path / "synthetic"
    real_generate = synthetic.generate

    def interrupted(out, **kw):
        real_generate(out, **kw)
        (Path(out) / MARKER_NAME).unlink()  # as if stopped just before the marker was written
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_dataset(root, progress=False, **SMALL)
    assert not root.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "generate", real_generate)

    # a temporary left by a killed process is neither used nor kept
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".synthetic.tmp-{dead}-abc"
    real_generate(stale, progress=False, **SMALL)
    (stale / MARKER_NAME).unlink()
    folder = ensure_dataset(root, progress=False, **SMALL)
    assert (root / MARKER_NAME).is_file() and (folder / "ImageSets/Main/test.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]


def test_ensure_refuses_foreign_folder(tmp_path):
    root = tmp_path / "VOCdevkit"
    (root / "VOC2007" / "Annotations").mkdir(parents=True)
    (root / "VOC2007" / "Annotations" / "000005.xml").write_text("<annotation/>")
    with pytest.raises(SppdetError, match="not an sppdet synthetic dataset"):
        ensure_dataset(root, progress=False, **SMALL)
    assert (root / "VOC2007" / "Annotations" / "000005.xml").read_text() == "<annotation/>"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (ensure_dataset(empty, progress=False, num_trainval=2, num_test=1) / "JPEGImages").is_dir()


def test_custom_class_names(tmp_path):
    fruit = ("apple", "pear", "plum")
    generate(tmp_path, classes=fruit, progress=False, num_trainval=12, num_test=0)
    names = {obj.findtext("name") for p in (tmp_path / "VOC2007" / "Annotations").glob("*.xml")
             for obj in ET.parse(p).getroot().findall("object")}
    assert names == set(fruit)
    assert (tmp_path / "VOC2007" / "ImageSets" / "Main" / "pear_trainval.txt").is_file()
    assert VOCDataset(tmp_path, split="trainval", classes=fruit).positives_per_class()["plum"] > 0
    params = json.loads((tmp_path / MARKER_NAME).read_text())["params"]
    assert params["classes"] == [["apple", "disk"], ["pear", "ring"], ["plum", "triangle"]]


def test_class_resolution_and_bad_parameters():
    assert synthetic._resolve_classes(("star", "disk")) == [("star", "star"), ("disk", "disk")]
    assert synthetic._resolve_classes({"sun": "star"}) == [("sun", "star")]
    for bad in (("apple", "disk"), ("a", "b", "c", "d", "e", "f"), {"sun": "moon"}, ("two words",),
                ("a", "a"), ()):
        with pytest.raises(SppdetError, match="synthetic classes"):
            synthetic._resolve_classes(bad)
    with pytest.raises(SppdetError, match="num_test"):
        generate("/nonexistent-never-written", num_test=-1)
    with pytest.raises(SppdetError, match="min_size"):
        ensure_dataset("/nonexistent-never-written", min_size=50, max_size=20)
