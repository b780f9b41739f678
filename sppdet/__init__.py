"""sppdet: SPP-net object detection (He et al., ECCV 2014 / TPAMI 2015) with an R-CNN baseline.

    from sppdet import Predictor
    predictor = Predictor.from_checkpoint("runs/demo/model.pt")
    result = predictor("photo.jpg")      # .boxes .scores .labels .class_names

`import sppdet` stays light: the Predictor (torch, torchvision, OpenCV) loads on first use.
"""
__version__ = "0.2.0"

__all__ = ["Predictor", "load_config", "__version__"]


def __getattr__(name: str):
    if name == "Predictor":
        from .inference import Predictor
        return Predictor
    if name == "load_config":
        from .config import load_config
        return load_config
    raise AttributeError(f"module 'sppdet' has no attribute {name!r}")
