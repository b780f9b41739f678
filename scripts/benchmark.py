"""Time SPP-net (1 scale and 5 scales) against R-CNN on the same images, proposals and network
weights, and print the paper's Table 10 layout (He et al., TPAMI 2015) for this machine.

    python scripts/benchmark.py [--voc-root ROOT] [--year 2007] [--split test] [--images 3]
        [--max-proposals 2000] [--config NAME] [--set KEY=VALUE ...] [--rcnn-images 1]
        [--rcnn-windows N] [--device auto|cpu|cuda] [--threads N] [--proposal-cache DIR]
        [--json OUT]
    python scripts/benchmark.py --heads runs/demo/model.pt [--split test] [--json OUT]

Without --voc-root it times the embedded synthetic dataset (generated into data/synthetic on
first use); the README's figures use the genuine photographs: --voc-root ../shared/data/voc07-mini.

What is timed, in seconds per image, for each method on each image (after one untimed warm-up):
- conv: SPP: resize + preprocess + conv1..conv5, once per scale used; R-CNN: preprocess +
  crop/warp of every window to 224 x 224 (16 px context) + conv1..conv5 on each;
- pooling: window projection + pyramid pooling (R-CNN: pooling of each window's own conv5);
- fc: fc6, fc7 and the linear SVMs;
- total: the detector's whole time per image (the above plus window bookkeeping), without NMS,
  which is reported on its own line; selective search is not in any time and is reported
  separately (seconds per image measured when the cached proposals were computed).
R-CNN is slow (one ZF-5 pass per window), so it is timed on the first --rcnn-images images
(all their windows by default); --rcnn-windows N times only the first N windows of each and
scales its times linearly to all windows, which the output then says.

Weights do not change the timings: by default the network is random (model.weights=none; pass
`--set model.weights=PATH` for real ones), the three methods share it, and the SVMs are random.
"""
from __future__ import annotations

import argparse

from sppdet.utils import run_cli, write_json_atomic


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc-root", default=None,
                   help="VOCdevkit folder or its VOC<year> folder (default: the embedded synthetic set)")
    p.add_argument("--year", default="2007")
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=3, help="first N images of the split (default 3)")
    p.add_argument("--max-proposals", type=int, default=2000, help="selective search boxes per image")
    p.add_argument("--config", default=None, help="configs/NAME[.yaml] or a path (default: built-in defaults)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. model.width=0.25 model.fc_dim=256")
    p.add_argument("--rcnn-images", type=int, default=1, help="time R-CNN on the first N images (default 1)")
    p.add_argument("--rcnn-windows", type=int, default=None,
                   help="time R-CNN on the first N windows of each image and extrapolate linearly")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: the config's run.device, auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the config's run.threads, else torch's default)")
    p.add_argument("--proposal-cache", default=None,
                   help="selective search cache folder (default: the config's proposals.cache_dir)")
    p.add_argument("--heads", default=None, metavar="CHECKPOINT",
                   help="instead: every fc head variant of this trained checkpoint on its test split "
                        "(mAP, seconds per image, largest score difference against the exact head)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.heads:
        from sppdet.report import compare_heads, format_heads
        result = compare_heads(args.heads, args.split, args.device or "auto")
        print(format_heads(result))
        if args.json:
            write_json_atomic(args.json, result)
        return 0
    from sppdet.report import format_benchmark, run_benchmark
    result = run_benchmark(args.voc_root, args.year, args.split, args.images, args.max_proposals, args.config,
                           args.set, args.rcnn_images, args.rcnn_windows, args.device, args.threads,
                           args.proposal_cache)
    print(format_benchmark(result))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    run_cli(main)
