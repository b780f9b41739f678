import numpy as np
import pytest

from sppdet.voc import VOC_CLASSES, VOCDataset, load_image, parse_annotation
from sppdet.utils import SppdetError
from conftest import write_devkit


def test_reads_genuine_voc07(voc07_mini):
    ds = VOCDataset(voc07_mini, split="test")
    assert len(ds) == 42
    rec = {r.image_id: r for r in ds}["000001"]
    # 000001.xml: dog (48, 240, 195, 371), person (8, 12, 352, 498), both truncated, 353x500.
    assert (rec.width, rec.height) == (353, 500)
    np.testing.assert_array_equal(rec.boxes, np.array([[47, 239, 194, 370], [7, 11, 351, 497]], np.float32))
    assert [VOC_CLASSES[l - 1] for l in rec.labels] == ["dog", "person"]
    assert rec.truncated.tolist() == [True, True] and rec.difficult.tolist() == [False, False]
    assert rec.boxes.dtype == np.float32 and rec.labels.dtype == np.int64
    assert all(isinstance(r.image_id, str) for r in ds)
    # every box lies inside its image, 0-based
    for r in ds:
        assert (r.boxes[:, :2] >= 0).all() and (r.boxes[:, 2] < r.width).all() and (r.boxes[:, 3] < r.height).all()
    image = load_image(rec.path)
    assert image.shape == (500, 353, 3) and image.dtype == np.uint8


def test_difficult_flags_counted(voc07_mini):
    ds = VOCDataset(voc07_mini, split="test")
    assert sum(int(r.difficult.sum()) for r in ds) > 0
    assert sum(len(r.boxes) for r in VOCDataset(voc07_mini, split="trainval")) + \
        sum(len(r.boxes) for r in ds) == 295  # SOURCES.md: 295 objects in all


def test_part_boxes_are_not_objects(tmp_path):
    root = write_devkit(tmp_path, {"a": []})
    xml = root / "VOC2007/Annotations/a.xml"
    xml.write_text(
        "<annotation><size><width>64</width><height>48</height></size><object><name>person</name>"
        "<bndbox><xmin>2</xmin><ymin>3</ymin><xmax>40</xmax><ymax>45</ymax></bndbox>"
        "<part><name>head</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></part>"
        "</object></annotation>")
    ann = parse_annotation(xml, VOC_CLASSES)
    np.testing.assert_array_equal(ann["boxes"], [[1, 2, 39, 44]])
    assert ann["difficult"].tolist() == [False]  # missing tag reads as 0


def test_images_without_objects_are_kept(tmp_path):
    root = write_devkit(tmp_path, {"000001": [("dog", 1, 1, 10, 10, 0)], "000002": []})
    ds = VOCDataset(root)
    assert ds.image_ids == ["000001", "000002"]
    assert ds[1].boxes.shape == (0, 4)


@pytest.mark.parametrize("objects, needle", [
    ([("unicorn", 1, 1, 10, 10, 0)], "unknown class 'unicorn'"),
    ([("dog", 10, 1, 5, 10, 0)], "inverted box"),
    ([("dog", 1, 1, 65, 10, 0)], "outside the 64x48 image"),
    ([("dog", 0, 1, 10, 10, 0)], "outside"),
])
def test_bad_boxes_name_file_and_object(tmp_path, objects, needle):
    root = write_devkit(tmp_path, {"000007": objects})
    with pytest.raises(SppdetError, match=needle) as e:
        VOCDataset(root)
    assert "000007.xml: object 0" in str(e.value)


def test_malformed_xml_and_missing_files(tmp_path):
    root = write_devkit(tmp_path, {"x": [("dog", 1, 1, 10, 10, 0)]})
    (root / "VOC2007/Annotations/x.xml").write_text("<annotation><size>")
    with pytest.raises(SppdetError, match="x.xml: malformed"):
        VOCDataset(root)
    root = write_devkit(tmp_path / "b", {"y": [("dog", 1, 1, 10, 10, 0)]})
    (root / "VOC2007/JPEGImages/y.jpg").unlink()
    with pytest.raises(SppdetError, match="y.jpg: image file not found"):
        VOCDataset(root)
    with pytest.raises(SppdetError, match="split file not found"):
        VOCDataset(root, split="test")
    with pytest.raises(SppdetError, match="not a VOC devkit"):
        VOCDataset(tmp_path / "nowhere")
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(SppdetError, match="bad.jpg: not a readable image"):
        load_image(bad)


def test_lenient_parse_keeps_coordinates_as_written(tmp_path):
    root = write_devkit(tmp_path, {"z": [("dog", 10, 1, 5, 70, 1), ("unicorn", 1, 1, 2, 2, 0)]})
    ann = parse_annotation(root / "VOC2007/Annotations/z.xml", VOC_CLASSES, strict=False)
    np.testing.assert_array_equal(ann["boxes"], [[9, 0, 4, 69]])
    assert ann["difficult"].tolist() == [True]


def test_custom_classes_and_missing_positives(tmp_path):
    root = write_devkit(tmp_path, {"a": [("apple", 1, 1, 10, 10, 0)], "b": []})
    ds = VOCDataset(root, classes=("apple", "pear"))
    assert ds.positives_per_class() == {"apple": 1, "pear": 0}
    with pytest.raises(SppdetError, match="pear have no training positives"):
        ds.check_trainable()
    (root / "VOC2007/ImageSets/Main/empty.txt").write_text("")
    with pytest.raises(SppdetError, match="the split is empty"):
        VOCDataset(root, split="empty", classes=("apple",)).check_trainable()


def test_a_subset_of_the_classes_ignores_the_others_and_counts_them(tmp_path, sppdet_log):
    from conftest import write_devkit
    from sppdet.config import load_config
    from sppdet.inference import load_datasets

    write_devkit(tmp_path, {"a": [("cat", 3, 3, 30, 30, 0), ("dog", 5, 5, 20, 20, 0)],
                            "b": [("dog", 10, 5, 60, 40, 1), ("bird", 1, 1, 9, 9, 0)]})
    ds = VOCDataset(tmp_path, classes=("cat",), other_classes="ignore")
    assert [r.labels.tolist() for r in ds] == [[1], []] and ds.ignored_classes == {"dog": 2, "bird": 1}
    with pytest.raises(SppdetError, match="unknown class 'dog'"):
        VOCDataset(tmp_path, classes=("cat",))
    # through a config: a list other than VOC's 20 may be a subset, said once per split
    [ds] = load_datasets(load_config(None, [f"data.root={tmp_path}", "data.classes=[cat, dog]"]), ["trainval"])
    assert ds.ignored_classes == {"bird": 1}
    assert sppdet_log == ["data: trainval: ignoring objects of classes not in data.classes (1 bird)"]
    # VOC's full default list: an unknown name is still an error
    with pytest.raises(SppdetError, match="unknown class 'unicorn'"):
        write_devkit(tmp_path / "odd", {"a": [("cat", 3, 3, 30, 30, 0), ("unicorn", 1, 1, 9, 9, 0)]})
        load_datasets(load_config(None, [f"data.root={tmp_path / 'odd'}"]), ["trainval"])
