"""Score detections on a VOC split and print the per-class AP table.

    python scripts/evaluate.py --checkpoint runs/voc07_zf5/model.pt [--split test] [--out DIR] \
        [--metric voc07|voc10|coco] [--voc-root ROOT] [--year 2007] [--device auto] [--json OUT]
    python scripts/evaluate.py --results-dir DIR --voc-root ROOT [--year 2007] [--split test] \
        [--metric voc07|voc10|coco] [--classes a,b,c] [--out DIR] [--json OUT]

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
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from sppdet.evaluation import (coco_evaluate, evaluate_class, evaluate_detections,  # noqa: E402
                               format_ap_table, missing_results_files, read_results_files,
                               to_coco_ground_truth, to_coco_results)
from sppdet.utils import SppdetError, run_cli, write_json_atomic  # noqa: E402
from sppdet.vis import draw_pr_curve, write_image  # noqa: E402
from sppdet.voc import VOC_CLASSES, VOCDataset  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # where the detections come from: one source per run
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path,
                        help="trained model.pt: detect the split with it, then score")
    source.add_argument("--results-dir", type=Path,
                        help="folder with comp4_det_<split>_<class>.txt results files")
    p.add_argument("--voc-root", type=Path, default=None,
                   help="VOCdevkit folder (or its VOC<year> folder) with the ground truth; required "
                        "with --results-dir, with --checkpoint it replaces the config's data.root")
    p.add_argument("--year", default=None,
                   help="VOC year (default: 2007, or the checkpoint config's data.year)")
    p.add_argument("--split", default="test")
    p.add_argument("--metric", default=None, choices=["voc07", "voc10", "coco"],
                   help="voc07: 11-point AP (default with --results-dir); voc10: area under the "
                        "curve; coco: AP@[.5:.95] with pycocotools (default with --checkpoint: "
                        "its config's test.metric)")
    p.add_argument("--classes", default=None,
                   help="--results-dir: comma-separated class names (default: the 20 VOC classes)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for results files, COCO json and curves (--checkpoint default: "
                        "<checkpoint folder>/eval_<split>; --results-dir: none unless given)")
    p.add_argument("--device", default="auto", help="--checkpoint: auto | cpu | cuda")
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


# ----------------------------------------------------------------------------- the two sources

def from_results_dir(args) -> tuple[VOCDataset, dict, list[str]]:
    """(ground truth, detections by class, notes) of `--results-dir`."""
    if args.voc_root is None:
        raise SppdetError("--results-dir needs --voc-root (the devkit with the ground truth)")
    classes = parse_classes(args.classes)
    # strict=False: coordinates exactly as written and other classes skipped, as the devkit
    # scores; the images themselves are not needed
    dataset = VOCDataset(args.voc_root, args.year or "2007", args.split, classes, strict=False,
                         check_images=False)
    detections = read_results_files(args.results_dir, args.split, classes, dataset.image_ids)
    missing = missing_results_files(args.results_dir, args.split, classes)
    notes = [f"note: no results file (no detections) for {', '.join(missing)} in {args.results_dir}"] \
        if missing else []
    return dataset, detections, notes


def from_checkpoint(args, out_dir: Path):
    """Detect the split with `--checkpoint`, write its results files into `out_dir`
    -> (dataset, detections by class, notes, the checkpoint's config)."""
    # torch and the engine (torchvision, sklearn: seconds to import) only in this mode
    import torch

    from sppdet.checkpoint import load_checkpoint
    from sppdet.utils import pick_device

    if args.classes is not None:
        raise SppdetError("--classes applies to --results-dir only: a checkpoint names its own classes")
    detector, cfg, classes = load_checkpoint(args.checkpoint, pick_device(args.device))
    from sppdet.engine import detect_to_results, load_datasets, proposals_for  # loaded by load_checkpoint

    data = {"classes": tuple(classes)}  # the detector's labels index these
    if args.voc_root is not None:  # another devkit: never generate the synthetic set into it
        data.update(root=str(args.voc_root.expanduser().resolve()), synthetic=False)
    if args.year is not None:
        data["year"] = args.year
    cfg = replace(cfg, data=replace(cfg.data, **data))
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    [dataset] = load_datasets(cfg, [args.split])
    dataset.check_not_empty()
    proposals = proposals_for(cfg, dataset)
    detections, times = detect_to_results(detector, dataset, proposals, cfg, out_dir, desc=f"detect {args.split}")
    parts = ", ".join(f"{k[:-2]} {v:.3f}" for k, v in times.items() if k != "total_s")
    notes = [f"{type(detector).__name__} from {args.checkpoint} on {detector.device}: "
             f"{np.mean([len(p) for p in proposals.values()]):.0f} proposals per image; network "
             f"{times['total_s']:.3f} s per image ({parts})",
             f"results files: {out_dir}/comp4_det_{args.split}_<class>.txt"]
    return dataset, detections, notes, cfg


# ----------------------------------------------------------------------------- shared outputs

def score(dataset: VOCDataset, detections: dict, metric: str) -> dict:
    if metric == "coco":
        return coco_evaluate(dataset.records, detections, dataset.classes)
    return evaluate_detections(dataset.records, detections, dataset.classes, metric)


def write_reports(out_dir: Path, dataset: VOCDataset, detections: dict, result: dict) -> None:
    """COCO results + ground truth json, and one precision/recall curve PNG per class."""
    split, classes, records = dataset.split, dataset.classes, dataset.records
    write_json_atomic(out_dir / f"coco_results_{split}.json",
                      to_coco_results(detections, classes, dataset.image_ids), indent=None)
    write_json_atomic(out_dir / f"coco_gt_{split}.json", to_coco_ground_truth(records, classes), indent=None)
    metric = result["metric"]
    for k, cls in enumerate(classes, 1):
        # the curve of the VOC matching (IoU >= 0.5) whatever the metric: only AP differs
        gt = {r.image_id: (r.boxes[r.labels == k], r.difficult[r.labels == k]) for r in records}
        curve = evaluate_class(gt, detections.get(cls))
        title = f"{cls}: AP {100 * result['ap'][cls]:.1f} ({metric}), {curve.num_detections} dets"
        write_image(out_dir / f"pr_{cls}.png", draw_pr_curve(curve.recall, curve.precision, title))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.checkpoint is not None:
        out_dir = args.out or args.checkpoint.parent / f"eval_{args.split}"
        dataset, detections, notes, cfg = from_checkpoint(args, out_dir)
        metric = args.metric or cfg.test.metric
    else:
        out_dir = args.out
        dataset, detections, notes = from_results_dir(args)
        metric = args.metric or "voc07"

    result = score(dataset, detections, metric)
    context = f"VOC{dataset.year} {args.split}, {len(dataset)} images"
    print("\n".join([format_ap_table(result, context=context)] + notes))
    if out_dir is not None:
        write_reports(out_dir, dataset, detections, result)
        print(f"wrote {out_dir}/coco_results_{args.split}.json, coco_gt_{args.split}.json and "
              f"pr_<class>.png")
    if args.json is not None:
        write_json_atomic(args.json, {"metric": result["metric"], "ap": result["ap"], "map": result["map"]})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
