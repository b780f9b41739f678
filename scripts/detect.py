"""Detect objects in images with a trained checkpoint.

    python scripts/detect.py image.jpg [more.jpg | folder ...] [--checkpoint PATH [--checkpoint PATH2]]
        [--score-thresh T] [--out DIR] [--device auto|cpu|cuda]

Prints each detection (class, score, box as 0-based x1 y1 x2 y2) and the time spent on proposals
and on the network; writes <out>/<name>.jpg with the boxes drawn, <out>/<name>.json, and
<out>/results.json for all images (COCO results style, with image sizes). Folders are searched
recursively; what is not an image is skipped and listed in one note. Output names follow the
inputs' paths below their common folder, so two inputs never share an output.

Scores are the checkpoint's scorer: SVM margins by default (> 0: the class's SVM says object).
The default --score-thresh is the checkpoint's test.draw_thresh (null: 0 for SVM margins, 0.5
for softmax probabilities), the same as `sppdet.Predictor`'s.
Without --checkpoint the newest runs/*/model.pt is used; --checkpoint takes a model.pt, a run
folder (runs/demo) or a folder of runs. A missing or unreadable image is reported in one `error:`
line and the other images are still processed; the exit status is then 1.
"""
from __future__ import annotations

import argparse

from sppdet.utils import run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files and/or folders")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="model.pt, a run folder or a folder of runs (default: the newest runs/*/model.pt); "
                             "give it twice or more to combine detectors (NMS on the union of their detections)")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help="report and draw detections scoring at least this (default: the checkpoint's "
                             "test.draw_thresh)")
    parser.add_argument("--out", default="detections", help="output folder (default: detections/)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    args = parser.parse_args(argv)
    from sppdet.inference import detect_images
    return detect_images(args.images, args.checkpoint, args.out, args.score_thresh, args.device)


if __name__ == "__main__":
    run_cli(main)
