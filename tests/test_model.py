"""model: detectors built from configs; fc6/fc7 start from pretrained weights when they fit the
pyramid (an sppdet weights file, a torchvision classifier), else random with one log line."""
from __future__ import annotations

import logging

import pytest
import torch
import torchvision

from sppdet.config import load_config
from sppdet.model import build_detector


def zf5_config(weights, *extra):
    return load_config(None, ["model.width=0.125", "model.fc_dim=32", f"model.weights={weights}", *extra])


def test_sppdet_weights_file_starts_fc6_fc7_and_fc8_is_new(tmp_path, caplog):
    torch.manual_seed(0)
    base = build_detector(zf5_config("none"), 3)
    fc = {f"fc{n}.{p}": torch.randn_like(getattr(getattr(base.head, f"fc{n}"), p)) for n in (6, 7)
          for p in ("weight", "bias")}
    torch.save({"state_dict": {**base.backbone.state_dict(), **fc}, "meta": {"levels": [6, 3, 2, 1]}},
               tmp_path / "pre.pth")
    with caplog.at_level(logging.INFO, logger="test"):
        det = build_detector(zf5_config(tmp_path / "pre.pth", "finetune.fc8_std=0.5"), 3,
                             logger=logging.getLogger("test"))
    assert torch.equal(det.head.fc6.weight, fc["fc6.weight"]) and torch.equal(det.head.fc7.bias, fc["fc7.bias"])
    assert "fc6/fc7 start from" in caplog.text
    # fc8 is new, N(0, finetune.fc8_std): the key reaches the layer
    assert det.head.cls_score.weight.std().item() == pytest.approx(0.5, rel=0.1)
    assert not det.head.cls_score.bias.any()


def test_fc_layers_that_do_not_fit_start_random_with_the_reason(tmp_path, caplog):
    torch.manual_seed(0)
    base = build_detector(zf5_config("none"), 3)
    fc = {f"fc{n}.{p}": getattr(getattr(base.head, f"fc{n}"), p).detach() for n in (6, 7) for p in ("weight", "bias")}
    torch.save({"state_dict": {**base.backbone.state_dict(), **fc}}, tmp_path / "pre.pth")
    log = logging.getLogger("test")
    with caplog.at_level(logging.INFO, logger="test"):
        det = build_detector(zf5_config(tmp_path / "pre.pth", "model.levels=[4,2,1]"), 3, logger=log)
    assert "fc6/fc7 start random" in caplog.text and "fc6 input" in caplog.text
    assert det.head.fc6.weight.shape[1] != fc["fc6.weight"].shape[1]
    caplog.clear()
    torch.save({"state_dict": base.backbone.state_dict()}, tmp_path / "conv.pth")
    with caplog.at_level(logging.INFO, logger="test"):
        build_detector(zf5_config(tmp_path / "conv.pth"), 3, logger=log)
    assert "conv layers only" in caplog.text
    caplog.clear()  # the pyramid fc6 saw is named in the meta and differs: random, said so
    torch.save({"state_dict": {**base.backbone.state_dict(), **fc}, "meta": {"levels": [1, 2, 3, 6]}},
               tmp_path / "order.pth")
    with caplog.at_level(logging.INFO, logger="test"):
        det = build_detector(zf5_config(tmp_path / "order.pth"), 3, logger=log)
    assert "trained on pyramid levels [1, 2, 3, 6]" in caplog.text
    assert not torch.equal(det.head.fc6.weight, fc["fc6.weight"])


@pytest.mark.parametrize("arch, levels, fc6, fc7", [("alexnet", "[6]", "classifier.1", "classifier.4"),
                                                     ("vgg16", "[7]", "classifier.0", "classifier.3")])
def test_torchvision_classifier_fc_layers_fit_a_one_level_pyramid(tmp_path, caplog, arch, levels, fc6, fc7):
    """fc6 of torchvision's AlexNet sees 256x6x6 (the pyramid {6}); VGG16's 512x7x7 ({7})."""
    torch.manual_seed(1)
    state = getattr(torchvision.models, arch)(weights=None).state_dict()
    torch.save(state, tmp_path / f"{arch}.pth")
    cfg = load_config(None, [f"model.backbone={arch}", f"model.weights={tmp_path / f'{arch}.pth'}",
                             f"model.levels={levels}"])
    with caplog.at_level(logging.INFO, logger="test"):
        det = build_detector(cfg, 20, logger=logging.getLogger("test"))
    assert torch.equal(det.head.fc6.weight, state[f"{fc6}.weight"])
    assert torch.equal(det.head.fc7.bias, state[f"{fc7}.bias"])
    assert "fc6/fc7 start from" in caplog.text
