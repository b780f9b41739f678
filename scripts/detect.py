"""Detect objects in images with a trained checkpoint.

    python scripts/detect.py image.jpg [more.jpg | folder ...] [--checkpoint PATH] [--score-thresh T] [--out DIR]

Prints each detection (class, score, box as 0-based x1 y1 x2 y2) and the time spent on
proposals and on the network; writes <out>/<name>.jpg with the boxes drawn and <out>/<name>.json.
Without --checkpoint the newest runs/*/model.pt is used; --checkpoint takes a model.pt, a run
folder (runs/demo) or a folder of runs. A missing or unreadable image is reported in one
`error:` line and the other images are still processed; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sppdet.utils import SppdetError, run_cli, write_json_atomic  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def newest_checkpoint(runs: Path) -> Path:
    found = sorted(runs.glob("*/model.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SppdetError(f"no checkpoint under {runs}/*/model.pt; train one (scripts/train.py) or pass --checkpoint")
    return found[-1]


def find_checkpoint(path: Path) -> Path:
    """A model.pt as given; a run folder -> its model.pt; a folder of runs -> the newest one."""
    if path.is_dir():
        return path / "model.pt" if (path / "model.pt").is_file() else newest_checkpoint(path)
    if not path.is_file():
        raise SppdetError(f"{path}: checkpoint not found")
    return path


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders -> every file inside (non-images get their own error line later)."""
    out = []
    for item in inputs:
        p = Path(item)
        out.extend(sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files and/or folders")
    parser.add_argument("--checkpoint", help="model.pt, a run folder or a folder of runs (default: the newest "
                                             "runs/*/model.pt)")
    parser.add_argument("--score-thresh", type=float, default=0.0, help="report and draw detections above this SVM score")
    parser.add_argument("--out", default="detections", help="output folder (default: detections/)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    args = parser.parse_args(argv)

    # found before the slow imports below, so a missing one is reported at once
    ckpt = find_checkpoint(Path(args.checkpoint)) if args.checkpoint else newest_checkpoint(REPO / "runs")

    from sppdet.checkpoint import load_checkpoint
    from sppdet.proposals import selective_search
    from sppdet.utils import pick_device
    from sppdet.vis import draw_detections, write_image
    from sppdet.voc import load_image

    detector, cfg, classes = load_checkpoint(ckpt, pick_device(args.device))
    print(f"checkpoint {ckpt} ({type(detector).__name__}, {len(classes)} classes)")
    out_dir = Path(args.out)
    failures = 0
    for path in expand_inputs(args.images):
        try:
            if not path.exists():
                raise SppdetError(f"{path}: no such file or folder")
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise SppdetError(f"{path}: not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))})")
            image = load_image(path)
        except SppdetError as e:
            print(f"error: {e}", file=sys.stderr)
            failures += 1
            continue
        t0 = time.perf_counter()
        p = cfg.proposals
        proposals = selective_search(image, mode=p.mode, max_boxes=p.max_boxes, min_size=p.min_size, resize=p.resize)
        t1 = time.perf_counter()
        det = detector.detect(image, proposals, score_thresh=min(args.score_thresh, cfg.test.score_thresh),
                              nms=cfg.test.nms, max_per_image=cfg.test.max_per_image)
        t2 = time.perf_counter()
        keep = det.scores >= args.score_thresh
        print(f"{path}: {int(keep.sum())} detections (proposals {t1 - t0:.2f} s, {len(proposals)} boxes; network {t2 - t1:.2f} s)")
        records = []
        for box, score, label in zip(det.boxes[keep], det.scores[keep], det.labels[keep]):
            name = classes[label - 1]
            print(f"  {name:<14s} {score:7.3f}  {box[0]:7.1f} {box[1]:7.1f} {box[2]:7.1f} {box[3]:7.1f}")
            records.append({"class": name, "score": float(score), "box": [float(v) for v in box]})
        out_dir.mkdir(parents=True, exist_ok=True)
        drawn = draw_detections(image, det.boxes[keep], det.scores[keep], det.labels[keep], classes)
        write_image(out_dir / f"{path.stem}.jpg", drawn)
        write_json_atomic(out_dir / f"{path.stem}.json", {
            "image": str(path), "width": image.shape[1], "height": image.shape[0],
            "box_format": "x1 y1 x2 y2, 0-based pixel indices, inclusive", "checkpoint": str(ckpt),
            "proposal_seconds": t1 - t0, "network_seconds": t2 - t1, "detections": records})
    return 1 if failures else 0


if __name__ == "__main__":
    run_cli(main)
