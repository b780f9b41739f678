"""Shared fixtures: the genuine VOC2007 photographs beside the checkout, and tiny devkits."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see sppdet/__init__.py

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOC07_MINI = REPO.parent / "shared" / "data" / "voc07-mini"

# Two cores, shared: keep torch from oversubscribing them in tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def voc07_mini() -> Path:
    if not (VOC07_MINI / "VOC2007").is_dir():
        pytest.skip(f"{VOC07_MINI} not present")
    return VOC07_MINI


def write_devkit(root: Path, images: dict[str, list[tuple]], split: str = "trainval",
                 size: tuple[int, int] = (64, 48)) -> Path:
    """Write a tiny VOC devkit: `images` maps id -> [(name, x1, y1, x2, y2, difficult), ...]
    with 1-based XML coordinates; each image is a random `size` (w, h) JPEG."""
    folder = root / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(0)
    for image_id, objects in images.items():
        cv2.imwrite(str(folder / "JPEGImages" / f"{image_id}.jpg"),
                    rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        objs = "".join(
            f"<object><name>{n}</name><truncated>0</truncated><difficult>{int(d)}</difficult>"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>"
            f"</object>" for n, x1, y1, x2, y2, d in objects)
        (folder / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size>{objs}</annotation>")
    (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
    return root


@pytest.fixture()
def sppdet_log():
    """The messages the "sppdet" logger emits during the test (its handlers print to stderr and
    do not propagate, so caplog does not see them)."""
    import logging

    messages: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = ListHandler()
    logger = logging.getLogger("sppdet")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def tiny(out: Path, *extra: str, shared: Path | None = None):
    """demo.yaml made tiny (12 trainval + 6 test images, a width-1/8 ZF-5, 20 fine-tuning
    iterations), writing runs under `out`; `shared` holds the synthetic data and the proposal
    cache, so the tests of a module generate them once."""
    from sppdet.config import load_config

    speed = ["model.width=0.125", "model.fc_dim=64", "model.scales=[200]", "model.rcnn_input_size=64",
             "model.weights=none", "finetune.iterations=20",
             "finetune.checkpoint_every=10", "finetune.batch_size=32", "proposals.max_boxes=60",
             "proposals.workers=0", f"run.output_dir={out}",
             # tiny nets gain nothing from threads, and on busy shared cores torch's pool thrashes
             "run.threads=1"]
    data = [] if shared is None else [f"data.root={shared / 'data'}", "data.synthetic_trainval=12",
                                      "data.synthetic_test=6", f"proposals.cache_dir={shared / 'proposals'}"]
    return load_config("demo", data + speed + list(extra))


@pytest.fixture()
def one_thread():
    """Tiny networks on two busy shared cores: OpenMP barriers in every small op cost more than
    the arithmetic, so these tests run torch on one thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def keep_torch_threads():
    """run.threads sets torch's threads process-wide: give the next module its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """A folder the tests of a module share (synthetic data, proposal cache)."""
    return tmp_path_factory.mktemp("shared")
