"""Compute (or load from the cache) selective search proposals for a VOC split and report their
recall at IoU 0.5 and 0.7, mean best overlap, boxes per image and seconds per image.

    python scripts/proposals.py --voc-root data/VOCdevkit --year 2007 --split test [--mode fast]
        [--max-boxes 2000] [--min-size 20] [--resize 500] [--workers N] [--cache-dir DIR]
        [--rebuild-cache] [--json OUT]

Seconds per image is the search time measured when each image was computed; cached images
report the time stored with them, so the figure means the same on a rerun. The defaults are the
pipeline's (`ProposalConfig`): the search runs with the image's short side at 500 px, boxes mapped
back; `--resize 0` searches at the original size, as the paper.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from sppdet.config import ProposalConfig, resolve
from sppdet.proposals import MODES, compute_proposals_with_stats, proposal_recall
from sppdet.utils import SppdetError, run_cli, write_json_atomic
from sppdet.voc import VOCDataset
JSON_KEYS = ("recall@0.5", "recall@0.7", "mabo", "boxes_per_image", "seconds_per_image",
             "num_gt", "num_images")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voc-root", required=True, help="VOCdevkit folder (or the VOC<year> folder)")
    p.add_argument("--year", default="2007")
    p.add_argument("--split", default="test")
    defaults = ProposalConfig()
    p.add_argument("--mode", default=defaults.mode, choices=MODES)
    p.add_argument("--max-boxes", type=int, default=defaults.max_boxes,
                   help="keep the best-ranked N per image")
    p.add_argument("--min-size", type=int, default=defaults.min_size,
                   help="drop boxes narrower/shorter (px)")
    p.add_argument("--resize", type=int, default=defaults.resize or 0,
                   help="short side the search runs at (0: the original size, as the paper)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (0/1: in-process)")
    p.add_argument("--cache-dir", default=str(resolve(defaults.cache_dir)))
    p.add_argument("--rebuild-cache", action="store_true", help="recompute even cached images")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.max_boxes < 1 or args.min_size < 0 or args.resize < 0:
        raise SppdetError("--max-boxes must be >= 1, --min-size and --resize >= 0")
    resize = args.resize or None  # 0: the original size
    dataset = VOCDataset(args.voc_root, args.year, args.split)
    dataset.check_not_empty()
    run = compute_proposals_with_stats(
        dataset.records, mode=args.mode, max_boxes=args.max_boxes, min_size=args.min_size,
        resize=resize, cache_dir=args.cache_dir, workers=args.workers,
        rebuild=args.rebuild_cache)
    stats = proposal_recall(dataset.records, run.boxes)
    seconds = list(run.seconds.values())
    stats["seconds_per_image"] = sum(seconds) / len(seconds) if seconds else float("nan")

    print(f"cache: {run.cache_dir} ({run.cached} of {len(dataset)} images read from it)")
    if run.failures:
        print(f"warning: {len(run.failures)} image(s) failed and count as having no proposals: "
              f"{', '.join(list(run.failures)[:10])}", file=sys.stderr)
    print(f"{args.split} ({len(dataset)} images, {stats['num_gt']} non-difficult objects), "
          f"mode {args.mode}, max {args.max_boxes} boxes, min size {args.min_size}, "
          f"resize {resize or 'none (original size)'}:")
    print(f"  recall@0.5 {stats['recall@0.5']:.3f}  recall@0.7 {stats['recall@0.7']:.3f}  "
          f"MABO {stats['mabo']:.3f} (class-averaged {stats['mabo_class']:.3f})  "
          f"boxes/image {stats['boxes_per_image']:.0f}  s/image {stats['seconds_per_image']:.2f}")
    if args.json:
        # NaN (no ground truth, no images) is not JSON: write null.
        out = {k: (None if isinstance(stats[k], float) and math.isnan(stats[k]) else stats[k])
               for k in JSON_KEYS}
        write_json_atomic(args.json, out)
    return 0


if __name__ == "__main__":
    run_cli(main)
