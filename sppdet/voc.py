"""Pascal VOC devkit reader.

Layout (``root`` is ``VOCdevkit`` or the ``VOC<year>`` folder itself)::

    VOC2007/ImageSets/Main/<split>.txt   one image id per line (ids are strings: "000005")
    VOC2007/Annotations/<id>.xml         objects: name, difficult, truncated, bndbox (1-based)
    VOC2007/JPEGImages/<id>.jpg

Boxes come out as float32 ``[x1, y1, x2, y2]``, 0-based, x2/y2 inclusive (XML value - 1).
Labels are 1..K in the order of ``classes`` (0 is background).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .utils import SppdetError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


@dataclass
class ImageRecord:
    """One annotated image. Arrays have one row per object, in XML order."""

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray      # (N, 4) float32 [x1, y1, x2, y2], 0-based inclusive (float64 if lenient)
    labels: np.ndarray     # (N,) int64 in 1..K
    difficult: np.ndarray  # (N,) bool
    truncated: np.ndarray  # (N,) bool


def find_devkit_folder(root: str | Path, year: str = "2007") -> Path:
    """`root` may be the VOCdevkit folder or the VOC<year> folder itself."""
    root = Path(root)
    for cand in (root / f"VOC{year}", root):
        if (cand / "ImageSets" / "Main").is_dir() and (cand / "Annotations").is_dir():
            return cand
    raise SppdetError(
        f"{root}: not a VOC devkit (expected {root}/VOC{year}/ImageSets/Main and Annotations; "
        f"see data/README.md)")


def read_split(folder: Path, split: str) -> list[str]:
    """Image ids listed in ImageSets/Main/<split>.txt (first token of each non-empty line)."""
    path = folder / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        found = sorted(p.stem for p in (folder / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        raise SppdetError(f"{path}: split file not found (splits here: {', '.join(found) or 'none'})")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if len(set(ids)) != len(ids):
        raise SppdetError(f"{path}: duplicate image ids")
    return ids


def annotation_classes(root: str | Path, year: str = "2007", split: str = "trainval") -> tuple[str, ...]:
    """The class names the annotations of a split use, sorted: what to read a VOC-format dataset
    of unknown classes with."""
    folder = find_devkit_folder(root, year)
    names = set()
    for image_id in read_split(folder, split):
        xml_path = folder / "Annotations" / f"{image_id}.xml"
        try:
            names.update(n.text.strip() for n in ET.parse(xml_path).getroot().iterfind("object/name") if n.text)
        except (ET.ParseError, OSError) as e:
            raise SppdetError(f"{xml_path}: malformed annotation XML ({e})") from None
    return tuple(sorted(names))


def _text(elem: ET.Element, tag: str, where: str) -> str:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise SppdetError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _flag(obj: ET.Element, tag: str, where: str) -> bool:
    child = obj.find(tag)  # a missing tag reads as 0, as the devkit does
    if child is None or child.text is None or not child.text.strip():
        return False
    try:
        return bool(int(float(child.text)))
    except ValueError:
        raise SppdetError(f"{where}: <{tag}> is {child.text.strip()!r}, expected 0 or 1") from None


def parse_annotation(xml_path: str | Path, classes: Sequence[str], strict: bool = True,
                     other_classes: str = "error") -> dict:
    """Parse one VOC XML into a dict of width, height, boxes, labels, difficult, truncated and
    ignored (names of objects of other classes, skipped).

    Only the <bndbox> directly under each <object> is read (never person <part> boxes).
    strict=True: an inverted box or one outside the image is an error, and so is an object of a
    class not in `classes` unless other_classes="ignore" (training on a subset of a dataset's
    classes). strict=False (the evaluator): coordinates are kept exactly as written and objects
    of other classes are skipped, as the devkit's per-class evaluation does.
    """
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as e:
        raise SppdetError(f"{xml_path}: malformed annotation XML ({e})") from None
    size = root.find("size")
    if size is None:
        raise SppdetError(f"{xml_path}: missing <size>")
    try:
        width = int(float(_text(size, "width", str(xml_path))))
        height = int(float(_text(size, "height", str(xml_path))))
    except ValueError:
        raise SppdetError(f"{xml_path}: <size> is not numeric") from None
    class_index = {name: i + 1 for i, name in enumerate(classes)}
    boxes, labels, difficult, truncated, ignored = [], [], [], [], []
    for n, obj in enumerate(root.findall("object")):
        where = f"{xml_path}: object {n}"
        name = _text(obj, "name", where)
        where = f"{xml_path}: object {n} ({name})"
        if name not in class_index:
            if strict and other_classes == "error":
                raise SppdetError(f"{where}: unknown class {name!r} (classes: {', '.join(classes)}; "
                                  f"a data.classes list other than VOC's may name a subset)")
            ignored.append(name)
            continue
        bb = obj.find("bndbox")
        if bb is None:
            raise SppdetError(f"{where}: missing <bndbox>")
        try:
            x1, y1, x2, y2 = (float(_text(bb, t, where)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise SppdetError(f"{where}: <bndbox> coordinates are not numeric") from None
        if strict:
            if x2 < x1 or y2 < y1:
                raise SppdetError(f"{where}: inverted box ({x1:g}, {y1:g}, {x2:g}, {y2:g})")
            if x1 < 1 or y1 < 1 or x2 > width or y2 > height:
                raise SppdetError(
                    f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) outside the "
                    f"{width}x{height} image (VOC boxes are 1-based)")
        boxes.append((x1 - 1, y1 - 1, x2 - 1, y2 - 1))
        labels.append(class_index[name])
        difficult.append(_flag(obj, "difficult", where))
        truncated.append(_flag(obj, "truncated", where))
    return dict(
        width=width, height=height,
        # float64 in lenient mode keeps fractional coordinates exactly as written
        boxes=np.asarray(boxes, dtype=np.float32 if strict else np.float64).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool),
        truncated=np.asarray(truncated, dtype=bool),
        ignored=ignored,
    )


class VOCDataset:
    """The images of one split of a VOC-format devkit, with annotations parsed up front.

    `records[i]` is an ImageRecord; images are loaded lazily by `load_image`.
    Images without objects are kept (free negatives for the SVMs). `ignored_classes` counts
    the skipped objects of classes not in `classes`, by name (see `parse_annotation`).
    """

    def __init__(self, root: str | Path, year: str = "2007", split: str = "trainval",
                 classes: Sequence[str] = VOC_CLASSES, strict: bool = True,
                 check_images: bool = True, other_classes: str = "error"):
        if len(set(classes)) != len(classes) or not classes:
            raise SppdetError(f"data.classes must be a non-empty list of distinct names, got {list(classes)}")
        self.folder = find_devkit_folder(root, year)
        self.year, self.split, self.classes = str(year), split, tuple(classes)
        self.records: list[ImageRecord] = []
        self.ignored_classes: dict[str, int] = {}
        for image_id in read_split(self.folder, split):
            xml_path = self.folder / "Annotations" / f"{image_id}.xml"
            if not xml_path.is_file():
                raise SppdetError(f"{xml_path}: annotation file not found (listed in {split}.txt)")
            ann = parse_annotation(xml_path, self.classes, strict=strict, other_classes=other_classes)
            for name in ann.pop("ignored"):
                self.ignored_classes[name] = self.ignored_classes.get(name, 0) + 1
            path = self.folder / "JPEGImages" / f"{image_id}.jpg"
            if check_images and not path.is_file():
                raise SppdetError(f"{path}: image file not found (listed in {split}.txt)")
            self.records.append(ImageRecord(image_id=image_id, path=path, **ann))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    @property
    def image_ids(self) -> list[str]:
        return [r.image_id for r in self.records]

    def positives_per_class(self) -> dict[str, int]:
        """Number of objects of each class (difficult included, as the official code trains)."""
        counts = np.zeros(len(self.classes) + 1, dtype=np.int64)
        for r in self.records:
            np.add.at(counts, r.labels, 1)
        return {name: int(counts[i + 1]) for i, name in enumerate(self.classes)}

    def check_not_empty(self) -> None:
        """Raise if the split lists no images (nothing to train on, detect or score)."""
        if not self.records:
            raise SppdetError(f"{self.folder}/ImageSets/Main/{self.split}.txt: the split is empty")

    def check_trainable(self) -> None:
        """Raise if the split is empty or a class has no training positives."""
        self.check_not_empty()
        missing = [c for c, n in self.positives_per_class().items() if n == 0]
        if missing:
            raise SppdetError(
                f"{self.folder} ({self.split}): class(es) {', '.join(missing)} have no training "
                f"positives; remove them from data.classes or add annotations")


def image_damage(path: str | Path) -> str | None:
    """Why a JPEG or PNG file looks cut short, or None: a JPEG must end with its end-of-image
    marker (FF D9; a few trailing bytes allowed), a PNG with its IEND chunk. libjpeg decodes a
    truncated JPEG anyway (grey below the cut) and says only "Premature end of JPEG file",
    naming no file; this check is what names it. Reads the file's last 1 KiB."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(max(0, path.stat().st_size - 1024))
        tail = f.read()
    if head[:3] == b"\xff\xd8\xff" and b"\xff\xd9" not in tail[-64:]:
        return "truncated JPEG (no end-of-image marker)"
    if head == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail[-64:]:
        return "truncated PNG (no IEND chunk)"
    return None


_REPORTED: set[str] = set()  # damaged files already named in a warning (each is named once)


def find_damaged(paths) -> dict[Path, str]:
    """{path: why} of the damaged files among `paths` (`image_damage`); the caller names them,
    so `load_image` will not name them again."""
    found = {Path(p): why for p in paths for why in [image_damage(p)] if why}
    _REPORTED.update(str(p) for p in found)
    return found


def load_image(path: str | Path) -> np.ndarray:
    """Read an image as BGR uint8 (H, W, 3); an unreadable file is a SppdetError naming it, and a
    damaged one that still decodes (`image_damage`) gets one warning naming it (once per file)."""
    path = Path(path)
    if not path.is_file():
        raise SppdetError(f"{path}: image file not found")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise SppdetError(f"{path}: not a readable image (JPEG/PNG expected)")
    if str(path) not in _REPORTED:
        damage = image_damage(path)
        if damage:
            _REPORTED.add(str(path))
            from .utils import get_logger
            get_logger().warning(f"{path}: {damage}; using what decodes")
    return image
