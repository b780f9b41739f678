"""Train an SPP-net detector (and, with run.compare_rcnn, the R-CNN baseline) and evaluate it.

    python scripts/train.py --config voc07_zf5.yaml [key.sub=value ...] [--resume]
    python scripts/train.py --config demo.yaml          # the embedded offline demo

Writes runs/<name>/: config.yaml, train.log, metrics.json, metrics.csv, model.pt, results/
(and rcnn/, comparison.md, comparison.json when comparing).
"""
from __future__ import annotations

import argparse

from sppdet.config import load_config
from sppdet.utils import run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/NAME[.yaml] or a path")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished stages of runs/<name> and continue an interrupted one "
                             "(with a changed config: the stages whose inputs did not change)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of another config in runs/<name>")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, list(args.set) + list(args.overrides))
    from sppdet.engine import run_training  # after the config is known good: torch, sklearn load here
    run_training(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    run_cli(main)
