"""features.TrainingFeatures: what the training stages read equals the detection path (up to the
fp16 storage), for SPP (conv5 maps kept per scale and flip) and R-CNN (pooled windows kept), in
memory and on disk; a damaged disk file is recomputed; the disk key follows the network."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from sppdet.backbones import build_backbone
from sppdet.features import SPPFeatures, TrainingFeatures, flip_boxes
from sppdet.rcnn import RCNNFeatures

BOXES = np.array([[0, 0, 63, 47], [5, 5, 30, 30], [20, 10, 50, 40], [40, 20, 63, 47]], np.float32)


@pytest.fixture()
def image_paths(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for i in range(2):
        paths[f"im{i}"] = tmp_path / f"im{i}.png"
        cv2.imwrite(str(paths[f"im{i}"]), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    return paths


def feature_path(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    backbone = build_backbone("zf5", width=0.125)
    if kind == "spp":
        return SPPFeatures(backbone, levels=(3, 1), scales=(80, 160)).eval()
    return RCNNFeatures(backbone, levels=(3, 1), input_size=48, context=4).eval()


def live(features, path, boxes, flip=False):
    image = cv2.imread(str(path))
    if flip:
        image, boxes = np.ascontiguousarray(image[:, ::-1]), flip_boxes(boxes, image.shape[1])
    with torch.no_grad():
        return features(image, torch.from_numpy(boxes))


@pytest.mark.parametrize("kind", ["spp", "rcnn"])
@pytest.mark.parametrize("cache", ["memory", "disk", "none"])
def test_kept_features_equal_the_detection_path(tmp_path, image_paths, kind, cache):
    features = feature_path(kind)
    windows = {i: BOXES for i in image_paths}
    source = TrainingFeatures(features, image_paths, windows, cache=cache, folder=tmp_path / "cache")
    rows = np.array([3, 0, 2])
    for flip in (False, True):
        got = source("im1", rows, flip=flip)
        want = live(features, image_paths["im1"], BOXES[rows], flip)
        torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0) if kind == "spp" and cache != "none" \
            else torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
        # a second read is the same tensor values (fp16-rounded when kept), not recomputed anew
        assert torch.equal(source("im1", rows, flip=flip), got)
    if cache == "disk":
        assert list((tmp_path / "cache").rglob("*.pt")), "kept on disk"


def test_a_damaged_disk_file_is_recomputed_with_a_warning(tmp_path, image_paths, sppdet_log):
    features = feature_path("spp")
    windows = {i: BOXES for i in image_paths}
    first = TrainingFeatures(features, image_paths, windows, cache="disk", folder=tmp_path)("im0", [0, 1])
    files = sorted(tmp_path.rglob("*.pt"))
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    again = TrainingFeatures(features, image_paths, windows, cache="disk", folder=tmp_path)("im0", [0, 1])
    assert torch.equal(first, again)
    err = "\n".join(sppdet_log)
    assert "feature cache" in err and "unreadable" in err and "recomputing it" in err
    # garbled bytes with the archive intact are caught by the digest as well
    from test_checkpoint import garble_largest_member
    for f in files:
        garble_largest_member(f, f, nbytes=40)
    again = TrainingFeatures(features, image_paths, windows, cache="disk", folder=tmp_path)("im0", [0, 1])
    assert torch.equal(first, again) and "does not match its digest" in sppdet_log[-1]


def test_disk_key_changes_with_the_weights_and_settings(tmp_path, image_paths):
    windows = {i: BOXES for i in image_paths}
    folders = set()
    for seed, scales in ((0, (80, 160)), (1, (80, 160)), (0, (80, 200))):
        features = feature_path("spp", seed)
        features.scales = scales
        folders.add(TrainingFeatures(features, image_paths, windows, cache="disk", folder=tmp_path).folder)
    features = feature_path("spp")
    features.backbone.set_preprocessing(std=64.0)
    folders.add(TrainingFeatures(features, image_paths, windows, cache="disk", folder=tmp_path).folder)
    assert len(folders) == 4


def test_train_conv_reads_live_with_gradients(image_paths):
    features = feature_path("spp")
    source = TrainingFeatures(features, image_paths, {i: BOXES for i in image_paths}, cache="memory",
                              train_conv=True)
    out = source("im0", [0, 2])
    out.sum().backward()
    assert features.backbone.conv1.weight.grad is not None and not source.memory


def test_scale_target_aims_the_per_window_scale_rule():
    """model.scale_target replaces the paper's 224 (ImageNet's crop) in choosing each window's
    scale, and is part of the feature settings that key the caches. On a 64x48 image at scales
    (80, 160): 26-px and 64-px windows resize to ~43/87 and ~92/185 px on a side."""
    backbone = build_backbone("zf5", width=0.125)
    paper = SPPFeatures(backbone, levels=(3, 1), scales=(80, 160))
    small = SPPFeatures(backbone, levels=(3, 1), scales=(80, 160), scale_target=40)
    boxes = torch.from_numpy(BOXES[:2])
    assert paper.window_scales((48, 64, 3), boxes).tolist() == [1, 1]  # both closer to 224 at 160
    assert small.window_scales((48, 64, 3), boxes).tolist() == [0, 0]  # both closer to 40 at 80
    assert paper.settings()["scale_target"] is None and small.settings()["scale_target"] == 40
