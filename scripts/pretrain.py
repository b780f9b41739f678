"""Pretrain the SPP classification network (the paper's first half) on an ImageFolder dataset.

    python scripts/pretrain.py --config demo_pretrain.yaml [key.sub=value ...] [--resume]
    python scripts/pretrain.py --config demo_pretrain.yaml data.root=DIR pretrain.epochs=1 run.name=NAME
    torchrun --nproc_per_node=N scripts/pretrain.py --config imagenet_zf5.yaml   # DistributedDataParallel

data.root holds train/<class>/*.jpg and val/<class>/*.jpg (ImageNet's layout as torchvision
reads it); with data.synthetic the embedded classification set is generated there on first use.
Writes runs/<name>/: config.yaml, train.log, metrics.json (top-1/top-5 error of the centre,
10-view and full-image views), history.csv and weights.pth, which `model.weights=runs/<name>/weights.pth`
(or `model.weights=pretrain:<config>`) gives to detection.
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
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run of runs/<name>")
    parser.add_argument("--overwrite", action="store_true", help="replace another config's outputs in runs/<name>")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, list(args.set) + list(args.overrides))
    from sppdet.pretrain import run_pretraining
    run_pretraining(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    run_cli(main)
