"""Score detections on a VOC split and print the per-class AP table.

    python scripts/evaluate.py --checkpoint runs/voc07_zf5/model.pt [--split test] [--out DIR] \
        [--metric voc07|voc07_py|voc10|coco] [--voc-root ROOT] [--year 2007] [--device auto] \
        [--set key=value ...] [--json OUT]
    python scripts/evaluate.py --results-dir DIR --voc-root ROOT [--year 2007] [--split test] \
        [--metric voc07|voc07_py|voc10|coco] [--classes a,b,c] [--out DIR] [--json OUT]

--checkpoint detects every image of the split with a trained model. The dataset, proposals and
test settings come from the checkpoint's config (--voc-root / --year override its data.root /
data.year). It writes into --out (default: <checkpoint folder>/eval_<split>) the official
results files comp4_det_<split>_<class>.txt (`image_id score x1 y1 x2 y2`, 1-based), which
--results-dir can score again later.
--results-dir reads such files; a class without a file has no detections.
Both modes, into the --out folder: coco_results_<split>.json (COCO results, bbox [x, y, w, h],
image_id = 1-based position in the split), coco_gt_<split>.json (the ground truth with those
ids) and pr_<class>.png (precision/recall curve, IoU >= 0.5).
--json writes {"metric": ..., "ap": {class: fraction}, "map": fraction}.
"""
from __future__ import annotations

import argparse

from sppdet.evaluation import METRICS
from sppdet.utils import SppdetError, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # where the detections come from: one source per run
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", action="append",
                        help="trained model.pt: detect the split with it, then score; give it twice or more "
                             "to combine detectors (the paper's model combination: one set of proposals, NMS "
                             "on the union of their detections)")
    source.add_argument("--results-dir",
                        help="folder with comp4_det_<split>_<class>.txt results files")
    p.add_argument("--voc-root", default=None,
                   help="VOCdevkit folder (or its VOC<year> folder) with the ground truth; required "
                        "with --results-dir, with --checkpoint it replaces the config's data.root")
    p.add_argument("--year", default=None,
                   help="VOC year (default: 2007, or the checkpoint config's data.year)")
    p.add_argument("--split", default="test")
    p.add_argument("--metric", default=None, choices=[*METRICS, "coco"],
                   help="voc07: 11-point AP with the devkit's (MATLAB's) thresholds (default with "
                        "--results-dir); voc07_py: 11-point AP with numpy.arange thresholds, as Python "
                        "ports compute it; voc10: area under the curve; coco: AP@[.5:.95] with "
                        "pycocotools, its full summary printed (default with --checkpoint: its "
                        "config's test.metric)")
    p.add_argument("--classes", default=None,
                   help="--results-dir: comma-separated class names (default: the 20 VOC classes)")
    p.add_argument("--out", default=None,
                   help="folder for results files, COCO json and curves (--checkpoint default: "
                        "<checkpoint folder>/eval_<split>; --results-dir: none unless given)")
    p.add_argument("--device", default="auto", help="--checkpoint: auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="--checkpoint: overrides of its config, e.g. data.max_images=10 test.scorer=softmax")
    p.add_argument("--json", default=None,
                   help="also write {metric, ap, map} (AP as fractions) to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    classes = None
    if args.classes is not None:
        classes = tuple(c.strip() for c in args.classes.split(","))
        if not all(classes):
            raise SppdetError(f"--classes {args.classes!r}: empty class name")
    from sppdet.inference import evaluate_command
    return evaluate_command(checkpoint=args.checkpoint, results_dir=args.results_dir, voc_root=args.voc_root,
                            year=args.year, split=args.split, metric=args.metric, classes=classes, out=args.out,
                            device=args.device, json_path=args.json, overrides=args.set)


if __name__ == "__main__":
    run_cli(main)
