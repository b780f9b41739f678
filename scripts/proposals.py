"""Compute (or load from the cache) selective search proposals for a VOC-format split and report
their recall at IoU 0.5 and 0.7, mean best overlap, boxes per image and seconds per image.

    python scripts/proposals.py --voc-root data/VOCdevkit --year 2007 --split test [--mode fast]
        [--max-boxes 2000] [--min-size 20] [--resize 500] [--workers N] [--cache-dir DIR]
        [--config NAME | --classes a,b,c] [--compare-stock] [--rebuild-cache] [--json OUT]

Seconds per image is the wall-clock time of each image's search in the process that ran it (one
of --workers), stored with the cache, so the figure means the same on a rerun. --compare-stock
also times ours and OpenCV's stock switchToSelectiveSearchFast side by side, one image at a time,
on the same resized images. The defaults are the pipeline's (`ProposalConfig`, or the --config's
proposals section): the search runs with the image's short side at 500 px, boxes mapped back;
`--resize 0` searches at the original size, as the paper. The classes are --classes, the
--config's data.classes, or else whatever the annotations name (any VOC-format dataset reads).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from sppdet.config import ProposalConfig, load_config, resolve
from sppdet.proposals import MODES, report_split
from sppdet.utils import SppdetError, run_cli, write_json_atomic

JSON_KEYS = ("recall@0.5", "recall@0.7", "mabo", "boxes_per_image", "seconds_per_image",
             "num_gt", "num_images")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voc-root", required=True, help="VOCdevkit folder (or the VOC<year> folder)")
    p.add_argument("--year", default="2007")
    p.add_argument("--split", default="test")
    p.add_argument("--config", default=None, help="take the classes and proposal settings from this config")
    p.add_argument("--classes", default=None, help="comma-separated class names (default: the annotations')")
    p.add_argument("--mode", default=None, choices=MODES)
    p.add_argument("--max-boxes", type=int, default=None, help="keep the best-ranked N per image")
    p.add_argument("--min-size", type=int, default=None, help="drop boxes narrower/shorter (px)")
    p.add_argument("--resize", type=int, default=None,
                   help="short side the search runs at (0: the original size, as the paper)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (0/1: in-process)")
    p.add_argument("--cache-dir", default=None, help="proposal cache (default: the config's, cache/proposals)")
    p.add_argument("--compare-stock", action="store_true",
                   help="also time OpenCV's stock fast mode on the same resized images, side by side")
    p.add_argument("--rebuild-cache", action="store_true", help="recompute even cached images")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.config and args.classes:
        raise SppdetError("give --config or --classes, not both")
    cfg = load_config(args.config) if args.config else None
    p = cfg.proposals if cfg else ProposalConfig()
    mode = args.mode or p.mode
    max_boxes = p.max_boxes if args.max_boxes is None else args.max_boxes
    min_size = p.min_size if args.min_size is None else args.min_size
    resize = p.resize if args.resize is None else (args.resize or None)  # 0: the original size
    if max_boxes < 1 or min_size < 0 or (args.resize or 0) < 0:
        raise SppdetError("--max-boxes must be >= 1, --min-size and --resize >= 0")
    classes = cfg.data.classes if cfg else (tuple(c.strip() for c in args.classes.split(",")) if args.classes else None)
    stats = report_split(args.voc_root, args.year, args.split, classes, mode, max_boxes, min_size, resize,
                         p.max_side, resolve(args.cache_dir or p.cache_dir), args.workers, args.rebuild_cache,
                         args.compare_stock)
    run = stats["run"]
    print(f"cache: {run.cache_dir} ({run.cached} of {stats['images']} images read from it)")
    if run.failures:
        print(f"warning: {len(run.failures)} image(s) failed and count as having no proposals: "
              f"{', '.join(list(run.failures)[:10])}", file=sys.stderr)
    print(f"{args.split} ({stats['images']} images, {stats['num_gt']} non-difficult objects of "
          f"{len(stats['classes'])} classes), mode {mode}, max {max_boxes} boxes, min size {min_size}, "
          f"resize {resize or 'none (original size)'}:")
    print(f"  recall@0.5 {stats['recall@0.5']:.3f}  recall@0.7 {stats['recall@0.7']:.3f}  "
          f"MABO {stats['mabo']:.3f} (class-averaged {stats['mabo_class']:.3f})  "
          f"boxes/image {stats['boxes_per_image']:.0f}")
    print(f"  search time {stats['seconds_per_image']:.2f} s per image (wall clock of each image's search in "
          f"the process that ran it, 1 of {max(1, args.workers)})")
    if "stock" in stats:
        s = stats["stock"]
        print(f"  side by side on the same resized images, one at a time: ours {s['ours_per_image']:.2f} s, "
              f"OpenCV's stock fast mode {s['stock_per_image']:.2f} s per image (ratio {s['ratio']:.3f}; "
              f"CPU time ratio {s['cpu_ratio']:.3f})")
    if args.json:
        # NaN (no ground truth, no images) is not JSON: write null.
        out = {k: (None if isinstance(stats[k], float) and math.isnan(stats[k]) else stats[k]) for k in JSON_KEYS}
        if "stock" in stats:
            out["stock"] = {k: v for k, v in stats["stock"].items() if not isinstance(v, list)}
        write_json_atomic(args.json, out)
    return 0


if __name__ == "__main__":
    run_cli(main)
