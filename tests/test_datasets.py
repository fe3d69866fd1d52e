"""Dataset readers: the three layouts, their errors, the stratified split and the fingerprint.

Every image is a real PNG (a crop of scikit-image's cat photograph) written to tmp_path.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from training.datasets import DatasetError, Sample, read_dataset, stratified_split

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea())  # 451x300 RGB


def write_png(cat: Image.Image, path: Path, i: int = 0) -> Path:
    """A real 16x16 PNG: crop number `i` of the cat photo (different i → different pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x, y = (i * 23) % 400, (i * 37) % 250
    cat.crop((x, y, x + 48, y + 48)).resize((16, 16)).save(path)
    return path


def make_folders(cat, root: Path, counts: dict[str, int]) -> Path:
    i = 0
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            write_png(cat, root / name / f"img_{i:03d}.png", i)
            i += 1
    return root


def make_labels_txt(cat, root: Path, lines: list[str], classes: list[str] | None = None) -> Path:
    """root/images/<file> for every file named in `lines`, root/labels.txt, optional classes.txt."""
    for i, line in enumerate(lines):
        if not line.strip() or line.startswith("#"):
            continue
        name = re.split(r"[\s,;]+", line.strip())[0]
        write_png(cat, root / "images" / name, i)
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def make_label_files(cat, root: Path, labels: dict[str, str], classes: list[str] | None = None) -> Path:
    """root/images/<stem>.png + root/labels/<stem>.txt holding the given text."""
    for i, (stem, text) in enumerate(labels.items()):
        write_png(cat, root / "images" / f"{stem}.png", i)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"{stem}.txt").write_text(text)
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def by_name(spec) -> dict[str, list[str]]:
    """image file name → its class names."""
    return {s.path.name: [spec.classes[i] for i in s.labels] for s in spec.samples}


# -- class folders ------------------------------------------------------------------------


def test_class_folders(cat, tmp_path):
    root = make_folders(cat, tmp_path / "ds", {"zebra": 2, "ant": 3, "moth": 1})
    (tmp_path / "ds" / "ant" / "notes.txt").write_text("not an image")
    spec = read_dataset(root)
    assert spec.layout == "folders"
    assert spec.classes == ["ant", "moth", "zebra"]
    assert not spec.multi_label
    assert spec.class_counts() == [3, 1, 2]
    for s in spec.samples:
        assert spec.classes[s.labels[0]] == s.path.parent.name
    assert all(s.path.suffix == ".png" for s in spec.samples)


# -- images/ + labels.txt -----------------------------------------------------------------


@pytest.mark.parametrize("sep", [" ", ",", ", ", "\t"])
def test_labels_txt_separators_and_names(cat, tmp_path, sep):
    lines = [f"a.png{sep}dog", f"b.png{sep}cat", f"c.png{sep}dog", "# a comment", ""]
    spec = read_dataset(make_labels_txt(cat, tmp_path / "ds", lines))
    assert spec.layout == "labels_txt"
    assert spec.classes == ["cat", "dog"]  # sorted names when no classes.txt
    assert by_name(spec) == {"a.png": ["dog"], "b.png": ["cat"], "c.png": ["dog"]}


def test_labels_txt_index_labels(cat, tmp_path):
    spec = read_dataset(make_labels_txt(cat, tmp_path / "ds", ["a.png 2", "b.png 0", "c.png 1", "d.png 2"]))
    assert spec.classes == ["0", "1", "2"]
    assert {s.path.name: s.labels for s in spec.samples} == {"a.png": [2], "b.png": [0], "c.png": [1], "d.png": [2]}


def test_labels_txt_classes_txt_fixes_order_names_and_indices(cat, tmp_path):
    # Names and indices mixed; classes.txt order is not alphabetical and must be kept.
    lines = ["a.png zebra", "b.png,0", "c.png 1", "d.png ant"]
    spec = read_dataset(make_labels_txt(cat, tmp_path / "ds", lines, classes=["zebra", "ant"]))
    assert spec.classes == ["zebra", "ant"]
    assert {s.path.name: s.labels for s in spec.samples} == {"a.png": [0], "b.png": [0], "c.png": [1], "d.png": [1]}


# -- images/ + labels/<stem>.txt ----------------------------------------------------------


def test_label_files_single_label(cat, tmp_path):
    root = make_label_files(cat, tmp_path / "ds", {"a": "bird\n", "b": "fish", "c": "bird"})
    spec = read_dataset(root)
    assert spec.layout == "label_files"
    assert spec.classes == ["bird", "fish"]
    assert not spec.multi_label
    assert by_name(spec) == {"a.png": ["bird"], "b.png": ["fish"], "c.png": ["bird"]}


def test_label_files_multi_label_sorted(cat, tmp_path):
    root = make_label_files(cat, tmp_path / "ds", {"a": "2\n0\n", "b": "1", "c": "2 1"}, classes=["sky", "tree", "car"])
    spec = read_dataset(root)
    assert spec.multi_label
    assert spec.classes == ["sky", "tree", "car"]
    assert {s.path.name: s.labels for s in spec.samples} == {"a.png": [0, 2], "b.png": [1], "c.png": [1, 2]}
    assert spec.class_counts() == [1, 2, 2]


def test_label_files_multi_label_names(cat, tmp_path):
    root = make_label_files(cat, tmp_path / "ds", {"a": "tree, sky", "b": "sky"})
    spec = read_dataset(root)
    assert spec.multi_label
    assert spec.classes == ["sky", "tree"]
    assert {s.path.name: s.labels for s in spec.samples} == {"a.png": [0, 1], "b.png": [0]}


# -- multi-hot rows: one 0/1 per class of classes.txt ---------------------------------------


def test_label_files_multi_hot_rows(cat, tmp_path):
    """The layout of images/001.jpg + labels/001.txt holding '1 0 1', classes.txt naming the columns."""
    labels = {"a": "1 0 1\n", "b": "0 1 0", "c": "1,1,0", "d": "0 0 0"}
    spec = read_dataset(make_label_files(cat, tmp_path / "ds", labels, classes=["sky", "tree", "car"]))
    assert spec.label_format == "multi-hot"
    assert spec.classes == ["sky", "tree", "car"]
    assert by_name(spec) == {"a.png": ["sky", "car"], "b.png": ["tree"], "c.png": ["sky", "tree"], "d.png": []}
    assert spec.multi_label


def test_labels_txt_multi_hot_rows(cat, tmp_path):
    lines = ["a.png 1 0 1", "b.png\t0\t1\t1", "c.png,1,0,0"]
    spec = read_dataset(make_labels_txt(cat, tmp_path / "ds", lines, classes=["sky", "tree", "car"]))
    assert spec.label_format == "multi-hot"
    assert by_name(spec) == {"a.png": ["sky", "car"], "b.png": ["tree", "car"], "c.png": ["sky"]}


def test_one_hot_rows_are_a_single_label_dataset(cat, tmp_path):
    labels = {"a": "1 0 0", "b": "0 1 0", "c": "0 0 1"}
    spec = read_dataset(make_label_files(cat, tmp_path / "ds", labels, classes=["sky", "tree", "car"]))
    assert spec.label_format == "multi-hot" and not spec.multi_label
    assert by_name(spec) == {"a.png": ["sky"], "b.png": ["tree"], "c.png": ["car"]}


def test_index_rows_stay_indices(cat, tmp_path):
    # Indices, even of 0s and 1s, when a row is not as long as classes.txt.
    labels = {"a": "0 1", "b": "2", "c": "1"}
    spec = read_dataset(make_label_files(cat, tmp_path / "ds", labels, classes=["sky", "tree", "car"]))
    assert spec.label_format == "indices"
    assert by_name(spec) == {"a.png": ["sky", "tree"], "b.png": ["car"], "c.png": ["tree"]}


def test_two_classes_rows_of_two_bits_are_ambiguous(cat, tmp_path):
    root = make_label_files(cat, tmp_path / "ds", {"a": "0 1", "b": "1 0", "c": "1 1"}, classes=["sky", "tree"])
    with pytest.raises(DatasetError) as e:
        read_dataset(root)
    msg = str(e.value)
    assert str(root / "labels" / "a.txt") in msg and "--label-format multi-hot or indices" in msg
    hot = read_dataset(root, label_format="multi-hot")
    assert by_name(hot) == {"a.png": ["tree"], "b.png": ["sky"], "c.png": ["sky", "tree"]}
    indices = read_dataset(root, label_format="indices")
    assert indices.label_format == "indices"
    assert by_name(indices) == {"a.png": ["sky", "tree"], "b.png": ["sky", "tree"], "c.png": ["tree"]}


def test_multi_hot_row_without_classes_txt_is_refused(cat, tmp_path):
    root = make_label_files(cat, tmp_path / "ds", {"a": "1 0 1", "b": "0 1 1"})
    with pytest.raises(DatasetError) as e:
        read_dataset(root)
    msg = str(e.value)
    assert str(root / "labels" / "a.txt") in msg and str(root / "classes.txt") in msg
    assert "naming its 3 columns" in msg and "write each once (0 2)" in msg


def test_multi_hot_rows_mixed_with_indices_are_refused(cat, tmp_path):
    root = make_label_files(cat, tmp_path / "ds", {"a": "1 0 1", "b": "2"}, classes=["sky", "tree", "car"])
    with pytest.raises(DatasetError) as e:
        read_dataset(root)
    msg = str(e.value)
    assert str(root / "labels" / "a.txt") in msg and str(root / "labels" / "b.txt") in msg


def test_multi_hot_row_of_the_wrong_length_is_refused(cat, tmp_path):
    root = make_label_files(cat, tmp_path / "ds", {"a": "1 0 1 0", "b": "0 1 1 0"}, classes=["sky", "tree", "car"])
    with pytest.raises(DatasetError, match="needs 3 values of 0 or 1"):
        read_dataset(root)
    with pytest.raises(DatasetError, match=re.escape(f"{root / 'labels' / 'a.txt'}: a multi-hot row is 3 values")):
        read_dataset(root, label_format="multi-hot")


def test_label_format_multi_hot_needs_classes_txt(cat, tmp_path):
    root = make_label_files(cat, tmp_path / "ds", {"a": "1 0", "b": "0 1"})
    with pytest.raises(DatasetError, match=re.escape(f"needs {root / 'classes.txt'}")):
        read_dataset(root, label_format="multi-hot")
    with pytest.raises(DatasetError, match="unknown label format 'one-hot'"):
        read_dataset(root, label_format="one-hot")


def test_validation_set_read_as_multi_hot_with_the_training_classes(cat, tmp_path):
    classes = ["sky", "tree", "car"]
    train = read_dataset(make_label_files(cat, tmp_path / "train", {"a": "1 0 1", "b": "0 1 0"}, classes=classes))
    val = read_dataset(make_label_files(cat, tmp_path / "val", {"c": "0 1 1"}), classes=train.classes)
    assert val.label_format == "multi-hot" and by_name(val) == {"c.png": ["tree", "car"]}


# -- auto-detection -----------------------------------------------------------------------


def test_auto_detects_each_layout(cat, tmp_path):
    folders = make_folders(cat, tmp_path / "f", {"x": 1, "y": 1})
    labels_txt = make_labels_txt(cat, tmp_path / "t", ["a.png x", "b.png y"])
    label_files = make_label_files(cat, tmp_path / "l", {"a": "x", "b": "y"})
    assert read_dataset(folders).layout == "folders"
    assert read_dataset(labels_txt).layout == "labels_txt"
    assert read_dataset(label_files).layout == "label_files"
    for root in (folders, labels_txt, label_files):
        spec = read_dataset(root)
        assert spec.classes == ["x", "y"] and len(spec.samples) == 2
    # An explicit layout that does not fit is reported, naming the missing file.
    with pytest.raises(DatasetError, match=re.escape(str(folders / "labels.txt"))):
        read_dataset(folders, layout="labels_txt")


# -- bad input ----------------------------------------------------------------------------


def test_missing_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match=re.escape(str(missing))):
        read_dataset(missing)


def test_labels_txt_label_not_in_classes_txt(cat, tmp_path):
    root = make_labels_txt(cat, tmp_path / "ds", ["a.png cat", "b.png dog", "c.png wolf"], classes=["cat", "dog"])
    with pytest.raises(DatasetError) as e:
        read_dataset(root)
    msg = str(e.value)
    assert str(root / "labels.txt") in msg and "line 3" in msg and "'wolf'" in msg


def test_labels_txt_index_out_of_range(cat, tmp_path):
    root = make_labels_txt(cat, tmp_path / "ds", ["a.png 0", "b.png 5"], classes=["cat", "dog"])
    with pytest.raises(DatasetError, match=re.escape(f"{root / 'labels.txt'} line 2")):
        read_dataset(root)


def test_labels_txt_missing_image(cat, tmp_path):
    root = make_labels_txt(cat, tmp_path / "ds", ["a.png cat", "b.png dog"])
    (root / "labels.txt").write_text("a.png cat\nb.png dog\ngone.png dog\n")
    with pytest.raises(DatasetError) as e:
        read_dataset(root)
    msg = str(e.value)
    assert str(root / "labels.txt") in msg and "line 3" in msg and str(root / "images" / "gone.png") in msg


def test_empty_class_folder(cat, tmp_path):
    root = make_folders(cat, tmp_path / "ds", {"a": 2, "b": 2})
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match=re.escape(str(root / "empty"))):
        read_dataset(root)


def test_folder_without_images(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "readme.txt").write_text("nothing here")
    with pytest.raises(DatasetError, match=re.escape(str(root))):
        read_dataset(root)
    # images/ + labels/ with no image files at all
    other = tmp_path / "ds2"
    (other / "images").mkdir(parents=True)
    (other / "labels").mkdir()
    (other / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=rf"no images found under {re.escape(str(other))}"):
        read_dataset(other)


def test_image_without_label_file(cat, tmp_path):
    root = make_label_files(cat, tmp_path / "ds", {"a": "x", "b": "y"})
    write_png(cat, root / "images" / "orphan.png", 7)
    with pytest.raises(DatasetError) as e:
        read_dataset(root)
    assert str(root / "images" / "orphan.png") in str(e.value)
    assert str(root / "labels" / "orphan.txt") in str(e.value)


def test_empty_label_file(cat, tmp_path):
    root = make_label_files(cat, tmp_path / "ds", {"a": "x", "b": "  \n\n"})
    with pytest.raises(DatasetError, match=re.escape(str(root / "labels" / "b.txt"))):
        read_dataset(root)


def test_validation_folder_with_unknown_class(cat, tmp_path):
    train = make_folders(cat, tmp_path / "train", {"cat": 2, "dog": 2})
    val = make_folders(cat, tmp_path / "val", {"cat": 1, "wolf": 1})
    classes = read_dataset(train).classes
    with pytest.raises(DatasetError, match=re.escape(str(val / "wolf"))):
        read_dataset(val, classes=classes)


def test_validation_folder_uses_training_class_order(cat, tmp_path):
    # A validation set may lack a class; its labels still index the training classes.
    val = make_folders(cat, tmp_path / "val", {"dog": 2})
    spec = read_dataset(val, classes=["cat", "dog"])
    assert spec.classes == ["cat", "dog"]
    assert all(s.labels == [1] for s in spec.samples)


# -- stratified_split ---------------------------------------------------------------------


def synthetic_samples(counts: dict[int, int]) -> list[Sample]:
    return [Sample(Path(f"c{label}/{i:03d}.png"), [label]) for label, n in counts.items() for i in range(n)]


def test_stratified_split_seeded():
    samples = synthetic_samples({0: 40, 1: 20, 2: 10})
    paths = lambda part: [str(s.path) for s in part]  # noqa: E731
    tr1, va1 = stratified_split(samples, 0.2, seed=1)
    tr2, va2 = stratified_split(list(reversed(samples)), 0.2, seed=1)  # input order does not matter
    tr3, va3 = stratified_split(samples, 0.2, seed=2)
    assert paths(va1) == paths(va2) and paths(tr1) == paths(tr2)
    assert set(paths(va1)) != set(paths(va3))


def test_stratified_split_keeps_class_shares():
    counts = {0: 50, 1: 20, 2: 5}
    samples = synthetic_samples(counts)
    train, val = stratified_split(samples, 0.2, seed=0)
    assert len(train) + len(val) == len(samples)
    assert not {str(s.path) for s in train} & {str(s.path) for s in val}
    n_train = Counter(s.labels[0] for s in train)
    n_val = Counter(s.labels[0] for s in val)
    for label, n in counts.items():
        assert n_train[label] > 0 and n_val[label] > 0
        assert abs(n_val[label] - 0.2 * n) <= 1
    assert n_val == {0: 10, 1: 4, 2: 1}


def test_stratified_split_nothing_for_validation():
    # One image per class: each must train, so nothing is left to validate on.
    with pytest.raises(DatasetError, match="no validation images"):
        stratified_split(synthetic_samples({0: 1, 1: 1, 2: 1}), 0.3, seed=0)
    with pytest.raises(DatasetError, match="between 0 and 1"):
        stratified_split(synthetic_samples({0: 10}), 1.0, seed=0)


# -- fingerprint --------------------------------------------------------------------------


def test_fingerprint(cat, tmp_path):
    root = make_folders(cat, tmp_path / "ds", {"a": 3, "b": 3})
    first = read_dataset(root).fingerprint()
    assert first == read_dataset(root).fingerprint()  # stable
    target = root / "b" / "img_004.png"
    original = target.read_bytes()
    # Same file name, different pixels (one pixel changed) → different fingerprint.
    img = Image.open(target).convert("RGB")
    img.putpixel((0, 0), tuple(255 - v for v in img.getpixel((0, 0))))
    img.save(target)
    assert target.read_bytes() != original
    changed = read_dataset(root).fingerprint()
    assert changed != first
    target.write_bytes(original)
    assert read_dataset(root).fingerprint() == first
