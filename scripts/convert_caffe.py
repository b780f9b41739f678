"""Convert a Caffe model (.caffemodel, V0/V1/V2 format; Caffe not needed) to sppdet weights.

    python scripts/convert_caffe.py MODEL.caffemodel [--prototxt DEPLOY.prototxt]
        [--arch auto|zf5|caffenet|alexnet|vgg16|raw] [--spp-order 1,2,3,6] [--mean B,G,R] --out weights.pth

Writes torch.save({"state_dict": ..., "meta": ...}): the trunk's conv layers under sppdet's
names (zf5, caffenet: conv1..conv5; alexnet/vgg16: torchvision's features.<i>), plus fc6/fc7
when the model has them, in the file `model.weights` reads. Prints each mapped layer with its
shape and the layers skipped. --arch auto recognises ZF-5 (SPP_net), R-CNN's CaffeNet (grouped
96-256-384-384-256 convs: sppdet's caffenet trunk) and VGG16 (Fast R-CNN) by their layer names
and shapes; other nets (or --arch raw) are written as <layer>.weight / .bias. --arch alexnet
means torchvision's AlexNet layout.
The prototxt, when given, tells the order in which a ZF-5's fc6 sees its pyramid levels
(default: 1, 2, 3, 6 as in the released Zeiler_conv5.prototxt); --spp-order overrides it.
"""
from __future__ import annotations

import argparse

from sppdet.utils import SppdetError, run_cli


def _numbers(text: str, what: str, kind=float) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SppdetError(f"{what} {text!r}: expected comma-separated numbers") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("caffemodel", help="the .caffemodel (binary NetParameter)")
    parser.add_argument("--prototxt", help="deploy/test prototxt of the same net (optional)")
    parser.add_argument("--arch", default="auto", choices=["auto", "zf5", "caffenet", "alexnet", "vgg16", "raw"],
                        help="target trunk (default: auto, by layer names and shapes)")
    parser.add_argument("--spp-order",
                        help="ZF-5: the pyramid levels in the order Caffe's fc6 sees them, e.g. 1,2,3,6")
    parser.add_argument("--mean", help="BGR pixel mean to record in meta (0..255), e.g. 104,117,123")
    parser.add_argument("--out", required=True, help="output .pth file")
    args = parser.parse_args(argv)

    from sppdet.caffe import convert_file

    spp_order = _numbers(args.spp_order, "--spp-order", int) if args.spp_order else None
    mean = _numbers(args.mean, "--mean") if args.mean else None
    if mean is not None and len(mean) != 3:
        raise SppdetError(f"--mean {args.mean!r}: expected three values B,G,R")
    convert_file(args.caffemodel, args.out, args.prototxt, args.arch, spp_order, mean)
    return 0


if __name__ == "__main__":
    run_cli(main)
