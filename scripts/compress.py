"""Compress a trained detector's fc6/fc7 by truncated SVD (Fast R-CNN, section 3.1) once, so that
loading the checkpoint need not compute it (a 4096 x 12800 fc6 takes about a minute on 2 cores).

    python scripts/compress.py runs/voc07_zf5/model.pt [--svd-fc6 0.25] [--svd-fc7 0.0625] [--out PATH]

The ranks are test.svd_fc6 / test.svd_fc7 values: an absolute rank (>= 1), a fraction of
min(in, out) (0.25 and 0.0625 give Fast R-CNN's 1024 and 256 for 4096-wide layers), or 0 (off);
by default the checkpoint's own. The exact head stays in the file (test.exact=true uses it); the
checkpoint's test.svd_* become the values given. Written atomically, in place unless --out.
"""
from __future__ import annotations

import argparse

from sppdet.utils import run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a model.pt")
    p.add_argument("--svd-fc6", type=float, default=None, help="rank or fraction for fc6 (default: the checkpoint's)")
    p.add_argument("--svd-fc7", type=float, default=None, help="rank or fraction for fc7 (default: the checkpoint's)")
    p.add_argument("--out", default=None, help="write here instead of replacing the checkpoint")
    args = p.parse_args(argv)
    from sppdet.inference import compress_checkpoint
    compress_checkpoint(args.checkpoint, args.svd_fc6, args.svd_fc7, args.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
