"""Read an image-classification dataset in any of the three layouts people keep one in.

- class folders:      root/<class>/<image>
- labels.txt:         root/images/<image> + root/labels.txt ("file label" per line;
                      label = class index or class name; several labels = multi-label)
- one file per image: root/images/<stem>.<ext> + root/labels/<stem>.txt (one label, or
                      several for a multi-label dataset)

For the two label-file layouts an optional root/classes.txt (one name per line) fixes the
class names and their order; labels may then be indices into it or names from it, or a
multi-hot row: one 0 or 1 per class of classes.txt, in its order ("1 0 1" = the first and
the third class). `label_format` "auto" reads a row of 0s and 1s as multi-hot when every
row of the dataset is one with exactly as many values as classes.txt has names; a file
that could be read both ways, or rows of 0s and 1s that cannot be class indices (a value
repeated) without such a classes.txt, are refused with a line that says how to write them.

Separators, the same rule in both label layouts: a line that holds a tab is split on tabs;
else one that holds a comma or semicolon is split on those; else it is split on whitespace.
So a class name with spaces is written after a tab or a comma ("img.png<TAB>big cat",
"img.png,big cat"), or listed in classes.txt: a label text that is a classes.txt name is
taken whole ("img.png big cat").
Every problem is a `DatasetError` whose message names the file or folder at fault.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from model_defs.preprocessing import IMAGE_EXTENSIONS, load_image

LAYOUTS = ("auto", "folders", "labels_txt", "label_files")
LABEL_FORMATS = ("auto", "indices", "multi-hot")


class DatasetError(ValueError):
    """Bad dataset input; the message names the file or folder."""


@dataclass
class Skipped:
    """What a dataset yields for an image it cannot read: training goes on, and the run's
    record names the file."""

    path: Path


@dataclass
class Sample:
    path: Path
    labels: list[int]  # one class index, or several for a multi-label sample


@dataclass
class DatasetSpec:
    root: Path
    layout: str
    classes: list[str]
    samples: list[Sample] = field(default_factory=list)
    label_format: str = ""  # how the label files were read: "indices" (names or indices) or "multi-hot"

    @property
    def multi_label(self) -> bool:
        return any(len(s.labels) != 1 for s in self.samples)

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for s in self.samples:
            for label in s.labels:
                counts[label] += 1
        return counts

    def fingerprint(self) -> str:
        """sha256 over each file's relative path, content and labels, in sorted order."""
        labels = {s.path: ",".join(self.classes[i] for i in s.labels) for s in self.samples}
        return fingerprint(self.root, list(labels), labels)


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def detect_layout(root: Path) -> str:
    if (root / "labels.txt").is_file():
        return "labels_txt"
    if (root / "labels").is_dir() and (root / "images").is_dir():
        return "label_files"
    return "folders"


def read_dataset(
    root: str | Path, layout: str = "auto", classes: list[str] | None = None, label_format: str = "auto"
) -> DatasetSpec:
    """Read a dataset; `classes` (from the training set) fixes the names for a validation set;
    `label_format` says how the label layouts' rows are read (module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    if label_format not in LABEL_FORMATS:
        raise DatasetError(f"unknown label format {label_format!r}; choose one of {', '.join(LABEL_FORMATS)}")
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "folders":
        spec = _read_folders(root, classes)
    elif layout in ("labels_txt", "label_files"):
        read = _read_labels_txt if layout == "labels_txt" else _read_label_files
        spec = read(root, classes, label_format)
    else:
        raise DatasetError(f"unknown dataset layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not spec.samples:
        raise DatasetError(f"no images found under {root} (layout: {layout}; extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return spec


def _read_folders(root: Path, classes: list[str] | None) -> DatasetSpec:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"no class folders under {root} (expected {root}/<class>/<image>)")
    names = [p.name for p in folders]
    if classes is not None:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise DatasetError(
                f"class folder {root / unknown[0]} is not one of the training classes: {', '.join(classes)}"
            )
    spec = DatasetSpec(root, "folders", list(classes) if classes is not None else names)
    for folder in folders:
        images = sorted(p for p in folder.rglob("*") if is_image(p))
        if not images and classes is None:
            raise DatasetError(f"class folder {folder} holds no images")
        label = spec.classes.index(folder.name)
        spec.samples += [Sample(p, [label]) for p in images]
    return spec


def _split_fields(line: str, known: list[str] | None = None, skip: int = 0) -> list[str]:
    """The fields of a label line (rule in the module docstring); after the first `skip`
    fields, whitespace-separated words that together are a known class name stay whole."""
    line = line.strip()
    sep = "\t" if "\t" in line else "[,;]" if re.search("[,;]", line) else r"\s+"
    fields = [t.strip() for t in re.split(sep, line) if t.strip()]
    if sep == r"\s+" and known and " ".join(fields[skip:]) in known:
        fields = fields[:skip] + [" ".join(fields[skip:])]
    return fields


def fingerprint(root: str | Path, paths: list[Path], labels: dict[Path, str] | None = None) -> str:
    """The dataset fingerprint every trainer records: sha256 over each file's path (relative to
    `root` when inside it), its content and, when given, its labels, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(set(paths), key=str):
        h.update(str(path.relative_to(root) if path.is_relative_to(root) else path).encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
        if labels is not None:
            h.update(labels[path].encode())
    return h.hexdigest()


def read_class_names(path: Path) -> list[str] | None:
    """A classes.txt: one name per line (index = line number), or None when there is none."""
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise DatasetError(f"{path} lists a class name twice")
    if not names:
        raise DatasetError(f"{path} is empty")
    return names


def _is_binary_row(tokens: list[str]) -> bool:
    return len(tokens) >= 2 and all(t in ("0", "1") for t in tokens)


def _label_format(raw: list[tuple[Path, list[str], str]], classes: list[str] | None, asked: str, root: Path) -> str:
    """How to read these rows, "multi-hot" or "indices" (rule in the module docstring); a
    DatasetError for rows that fit neither or could be either."""
    n = len(classes) if classes else 0
    shaped = [r for r in raw if n >= 2 and len(r[1]) == n and _is_binary_row(r[1])]
    if asked == "multi-hot":
        if not classes:
            raise DatasetError(
                f"label format multi-hot needs {root / 'classes.txt'} naming the columns, one class per line"
            )
        for _, toks, where in raw:
            if len(toks) != n or not all(t in ("0", "1") for t in toks):
                raise DatasetError(
                    f"{where}: a multi-hot row is {n} values of 0 or 1, one per class of classes.txt in its order; "
                    f"got {' '.join(toks)!r}"
                )
        return "multi-hot"
    if asked == "indices":
        return "indices"
    if raw and len(shaped) == len(raw):
        if n >= 3:  # n values of 0/1 as indices would repeat one: only multi-hot fits
            return "multi-hot"
        _, toks, where = raw[0]
        raise DatasetError(
            f"{where}: {' '.join(toks)!r} reads both as class indices and as a multi-hot row of the {n} classes of "
            "classes.txt; give --label-format multi-hot or indices, or write class names"
        )
    for _, toks, where in raw:
        if _is_binary_row(toks) and len(set(toks)) < len(toks):
            row, ones = " ".join(toks), " ".join(str(i) for i, t in enumerate(toks) if t == "1") or "none"
            if len(toks) == n:
                other = next(w for _, t, w in raw if not (len(t) == n and _is_binary_row(t)))
                raise DatasetError(
                    f"{where} holds a multi-hot row ({row!r}) but {other} does not; write every label the same way: "
                    f"{n} values of 0 or 1 in classes.txt's order, or class names or indices"
                )
            multi_hot = (
                f"a multi-hot row needs {n} values of 0 or 1, one per class of classes.txt"
                if n
                else f"as a multi-hot row it needs {root / 'classes.txt'} naming its {len(toks)} columns, one per line"
            )
            raise DatasetError(
                f"{where}: {row!r} repeats a class index; {multi_hot}; as class indices write each once ({ones})"
            )
    return "indices"


def _resolve_labels(
    raw: list[tuple[Path, list[str], str]], classes: list[str] | None, classes_file: str, fmt: str = "indices"
) -> tuple[list[str], list[Sample]]:
    """Turn label tokens into class indices. `raw` holds (image, tokens, where-for-errors);
    `fmt` is `_label_format`'s answer."""
    if fmt == "multi-hot":
        assert classes is not None
        return classes, [Sample(path, [i for i, t in enumerate(toks) if t == "1"]) for path, toks, _ in raw]
    if classes is None:
        tokens = {t for _, toks, _ in raw for t in toks}
        if tokens and all(t.isdigit() for t in tokens):
            classes = [str(i) for i in range(max(int(t) for t in tokens) + 1)]
        else:
            classes = sorted(tokens)
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for path, toks, where in raw:
        labels = []
        for t in toks:
            if t in index:
                labels.append(index[t])
            elif t.isdigit() and int(t) < len(classes):
                labels.append(int(t))
            else:
                raise DatasetError(f"{where}: label {t!r} is not one of the {len(classes)} classes ({classes_file})")
        samples.append(Sample(path, sorted(set(labels))))
    return classes, samples


def _check_no_empty_class(spec: DatasetSpec, source: Path) -> None:
    empty = [c for c, n in zip(spec.classes, spec.class_counts()) if n == 0]
    if empty:
        raise DatasetError(f"class {empty[0]!r} has no images in {source}")


def _read_labels_txt(root: Path, classes: list[str] | None, label_format: str = "auto") -> DatasetSpec:
    labels_file = root / "labels.txt"
    if not labels_file.is_file():
        raise DatasetError(f"{labels_file} does not exist")
    images_dir = root / "images" if (root / "images").is_dir() else root
    fixed = classes or read_class_names(root / "classes.txt")
    raw = []
    for n, line in enumerate(labels_file.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = _split_fields(line, fixed, skip=1)
        where = f"{labels_file} line {n}"
        if len(parts) < 2:
            raise DatasetError(f"{where}: expected 'file label', got {line.strip()!r}")
        path = images_dir / parts[0]
        if not path.is_file():
            raise DatasetError(f"{where}: image {path} does not exist")
        raw.append((path, parts[1:], where))
    fmt = _label_format(raw, fixed, label_format, root)
    names, samples = _resolve_labels(raw, fixed, "classes.txt" if fixed else "from labels.txt", fmt)
    spec = DatasetSpec(root, "labels_txt", names, samples, fmt)
    if classes is None and samples:
        _check_no_empty_class(spec, labels_file)
    return spec


def _read_label_files(root: Path, classes: list[str] | None, label_format: str = "auto") -> DatasetSpec:
    images_dir, labels_dir = root / "images", root / "labels"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise DatasetError(f"folder {d} does not exist (layout: images/ + labels/)")
    fixed = classes or read_class_names(root / "classes.txt")
    raw = []
    for path in sorted(p for p in images_dir.rglob("*") if is_image(p)):
        label_file = labels_dir / path.relative_to(images_dir).with_suffix(".txt")
        if not label_file.is_file():
            raise DatasetError(f"image {path} has no label file {label_file}")
        tokens = [t for line in label_file.read_text().splitlines() for t in _split_fields(line, fixed)]
        if not tokens:
            raise DatasetError(f"label file {label_file} is empty")
        raw.append((path, tokens, str(label_file)))
    fmt = _label_format(raw, fixed, label_format, root)
    names, samples = _resolve_labels(raw, fixed, "classes.txt" if fixed else "from labels/", fmt)
    spec = DatasetSpec(root, "label_files", names, samples, fmt)
    if classes is None and samples:
        _check_no_empty_class(spec, labels_dir)
    return spec


def stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split keeping each class's share (by first label); at least one of each class trains."""
    if not 0 < fraction < 1:
        raise DatasetError(f"validation fraction must be between 0 and 1, got {fraction}")
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.labels[0] if s.labels else -1, []).append(s)
    rng = random.Random(seed)
    train, val = [], []
    for key in sorted(by_class):
        group = sorted(by_class[key], key=lambda s: str(s.path))
        rng.shuffle(group)
        n_val = min(len(group) - 1, round(len(group) * fraction))
        val += group[:n_val]
        train += group[n_val:]
    if not val:
        raise DatasetError(
            f"validation fraction {fraction} leaves no validation images; give --val-data or a larger fraction"
        )
    return train, val


def random_split(samples: list, fraction: float, seed: int, name: str) -> tuple[list, list]:
    """Seeded (train, val) split of samples with no class to stratify by (detection, masks);
    `name` is the dataset named in the error when too few images are left."""
    shuffled = sorted(samples, key=str)
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * fraction))
    if n_val >= len(shuffled):
        raise DatasetError(f"{name} has {len(shuffled)} image(s): too few to hold out a validation share")
    return shuffled[n_val:], shuffled[:n_val]


def split_source(fraction: float, seed: int, kind: str = "stratified", of: str = "--data") -> str:
    """How model.json records a seeded split of `of` (`val_source`, SimCLR's `eval_val_data`),
    stratified by class or random (detection, masks), so that it can be rebuilt later."""
    return f"{kind} {fraction} of {of} (seed {seed})"


def parse_split_source(text: str) -> tuple[float, int] | None:
    """(fraction, seed) of a `split_source` record; None for a separate validation folder."""
    match = re.fullmatch(r"(?:stratified|random) ([0-9.]+) of --(?:eval-)?data \(seed (-?\d+)\)", text)
    return (float(match[1]), int(match[2])) if match else None


class ImageDataset(Dataset):
    """Samples → (tensor, target). `load(path, channels)` gives the image (a PIL image, or a
    uint8 tensor from training.cache's loader); an unreadable one yields Skipped (dropped and
    named)."""

    def __init__(
        self, samples: list[Sample], num_classes: int, multi_label: bool, channels: int, transform, load=load_image
    ):
        self.samples, self.num_classes, self.multi_label = samples, num_classes, multi_label
        self.channels, self.transform, self.load = channels, transform, load

    def __len__(self) -> int:
        return len(self.samples)

    def target(self, sample: Sample):
        if self.multi_label:
            t = torch.zeros(self.num_classes)
            t[sample.labels] = 1.0
            return t
        return sample.labels[0]

    def read(self, i: int):
        return self.load(self.samples[i].path, self.channels)

    def __getitem__(self, i: int):
        try:
            image = self.read(i)
        except (ValueError, OSError):
            return Skipped(self.samples[i].path)
        return self.transform(image), self.target(self.samples[i])


class SkipCollate:
    """Collation that drops what a dataset could not read (`Skipped`) and names it:
    returns (batch or None, [paths skipped])."""

    def __init__(self, collate=default_collate):
        self.collate = collate

    def __call__(self, items: list):
        good = [x for x in items if not isinstance(x, Skipped)]
        return (self.collate(good) if good else None), [str(x.path) for x in items if isinstance(x, Skipped)]
