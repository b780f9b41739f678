"""sppdet: SPP-net object detection (He et al., ECCV 2014 / TPAMI 2015) with an R-CNN baseline.

    from sppdet import Predictor
    predictor = Predictor.from_checkpoint("runs/demo/model.pt")
    result = predictor("photo.jpg")      # .boxes .scores .labels .class_names

`import sppdet` stays light: the Predictor (torch, torchvision, OpenCV) loads on first use.
"""
import os

__version__ = "0.2.0"

# OpenMP threads that spin while they wait for work triple a small network's time on a CPU
# shared with other processes (measured on 2 busy cores: 52 ms against 178-391 ms per demo
# image). Sleeping waits cost next to nothing when the machine is quiet. Set before torch
# loads (scripts import sppdet first); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["Predictor", "load_config", "__version__"]


def __getattr__(name: str):
    if name == "Predictor":
        from .inference import Predictor
        return Predictor
    if name == "load_config":
        from .config import load_config
        return load_config
    raise AttributeError(f"module 'sppdet' has no attribute {name!r}")
