"""Score detections on a VOC split and print the per-class AP table.

    python scripts/evaluate.py --results-dir DIR --voc-root ROOT --year 2007 --split test \
        [--metric voc07|voc10|coco] [--classes a,b,c] [--json OUT]

--results-dir reads the official results files comp4_det_<split>_<class>.txt
(`image_id score x1 y1 x2 y2`, 1-based); a class without a file has no detections.
--json writes {"metric": ..., "ap": {class: fraction}, "map": fraction}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sppdet.evaluation import (coco_evaluate, evaluate_detections, format_ap_table,  # noqa: E402
                               missing_results_files, read_results_files)
from sppdet.utils import SppdetError, run_cli, write_json_atomic  # noqa: E402
from sppdet.voc import VOC_CLASSES, VOCDataset  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # where the detections come from: one source per run
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--results-dir", type=Path,
                        help="folder with comp4_det_<split>_<class>.txt results files")
    p.add_argument("--voc-root", type=Path, required=True,
                   help="VOCdevkit folder (or its VOC<year> folder) with the ground truth")
    p.add_argument("--year", default="2007")
    p.add_argument("--split", default="test")
    p.add_argument("--metric", default="voc07", choices=["voc07", "voc10", "coco"],
                   help="voc07: 11-point AP (default); voc10: area under the curve; "
                        "coco: AP@[.5:.95] with pycocotools")
    p.add_argument("--classes", default=None,
                   help="comma-separated class names (default: the 20 VOC classes)")
    p.add_argument("--json", type=Path, default=None,
                   help="also write {metric, ap, map} (AP as fractions) to this file")
    return p.parse_args(argv)


def parse_classes(text: str | None) -> tuple[str, ...]:
    if text is None:
        return VOC_CLASSES
    classes = tuple(c.strip() for c in text.split(","))
    if not all(classes):
        raise SppdetError(f"--classes {text!r}: empty class name")
    return classes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    classes = parse_classes(args.classes)
    # strict=False: coordinates exactly as written and other classes skipped, as the devkit
    # scores; the images themselves are not needed
    dataset = VOCDataset(args.voc_root, args.year, args.split, classes, strict=False,
                         check_images=False)
    notes = []
    if args.results_dir is not None:
        detections = read_results_files(args.results_dir, args.split, classes, dataset.image_ids)
        missing = missing_results_files(args.results_dir, args.split, classes)
        if missing:
            notes.append(f"note: no results file (no detections) for {', '.join(missing)} "
                         f"in {args.results_dir}")
    else:  # pragma: no cover - argparse requires one source
        raise SppdetError("no detections source given")

    if args.metric == "coco":
        result = coco_evaluate(dataset.records, detections, classes)
    else:
        result = evaluate_detections(dataset.records, detections, classes, args.metric)
    context = f"VOC{dataset.year} {args.split}, {len(dataset)} images"
    print("\n".join([format_ap_table(result, context=context)] + notes))
    if args.json is not None:
        write_json_atomic(args.json, {"metric": result["metric"], "ap": result["ap"],
                                      "map": result["map"]})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
