"""Data sets for the trainer, all held in memory as tensors.

- ``digits``: scikit-learn's 1,797 8×8 handwritten digits, shipped inside scikit-learn (the default, offline).
- ``mnist1d``: the MNIST-1D generator (Greydanus, 2020), 4,000 + 1,000 signals of length 40, generated offline.
- ``mnist`` / ``fashion-mnist``: the four standard IDX files (``.gz`` or raw) read from ``--data-dir``.
- ``cifar10``: the binary version (``data_batch_1..5.bin``, ``test_batch.bin``) — never the pickled one.
- ``folder:PATH``: one sub-folder per class of PNG/JPEG images, read with Pillow.

Every split is made with seeded generators: the same configuration gives the same data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch

from xent.train.config import ConfigError, TrainConfig, data_kind, parse_classes

DIGITS_TEST_FRACTION = 0.2
FOLDER_TEST_FRACTION = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(ConfigError):
    """A missing or malformed data file; the message names the file and where it comes from."""


@dataclass
class Split:
    x: torch.Tensor  # (N, C, L) signals or (N, C, H, W) images, float32 in [0, 1] (uint8 for large image sets)
    y: torch.Tensor  # (N,) int64 class indices

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.x[index], self.y[index])


@dataclass
class DataBundle:
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    input_shape: tuple[int, ...]  # (C, L) or (C, H, W)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.train.y, minlength=self.num_classes)


# --- the standard files -----------------------------------------------------------------------------------------

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# SHA-256 of the gzipped files as distributed.
DOWNLOADS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
            "train-labels-idx1-ubyte.gz": "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
            "t10k-images-idx3-ubyte.gz": "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
            "t10k-labels-idx1-ubyte.gz": "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
        },
    ),
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/",
        {"cifar-10-binary.tar.gz": "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"},
    ),
}
SOURCES = {
    "mnist": "the MNIST database (LeCun et al.), e.g. https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "Fashion-MNIST (Xiao et al.), https://github.com/zalandoresearch/fashion-mnist",
    "cifar10": "the CIFAR-10 binary version, https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]  # fmt: skip
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_RECORD = 1 + 3 * 32 * 32


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (``.gz`` or raw), as an array of the shape its header gives."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:  # zlib.error: damaged compressed data in a .gz
        raise DataError(f"{path} cannot be read as an IDX file: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number {data[:4].hex() or 'none'})")
    dims = data[3]
    header = 4 + 4 * dims
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(f"{path} is truncated or too long: {len(data)} bytes, the header says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(directory: Path, stem: str, dataset: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{directory / stem}[.gz] not found: --data {dataset} needs the four IDX files of {SOURCES[dataset]} in "
        "--data-dir (or pass --download)"
    )


def load_idx_dataset(directory: Path, dataset: str) -> tuple[Split, Split]:
    arrays = {key: read_idx(_find(directory, stem, dataset)) for key, stem in MNIST_FILES.items()}
    splits = []
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{directory}: {part} images of shape {images.shape} do not match labels of shape {labels.shape}"
            )
        x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
        splits.append(Split(x, torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1]


def read_cifar_batch(path: Path) -> Split:
    data = path.read_bytes()
    if len(data) == 0 or len(data) % CIFAR_RECORD:
        raise DataError(f"{path} is not a CIFAR-10 binary batch: {len(data)} bytes is not a multiple of {CIFAR_RECORD}")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path} holds label {labels.max()}; CIFAR-10 labels are 0-9")
    images = records[:, 1:].reshape(-1, 3, 32, 32)
    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels))


def load_cifar10(directory: Path) -> tuple[Split, Split]:
    root = directory / "cifar-10-batches-bin" if (directory / "cifar-10-batches-bin").is_dir() else directory
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise DataError(
            f"{root / missing[0]} not found: --data cifar10 needs data_batch_1..5.bin and test_batch.bin from "
            f"{SOURCES['cifar10']} in --data-dir (or pass --download)"
        )
    batches = [read_cifar_batch(root / name) for name in names]
    train = Split(torch.cat([b.x for b in batches[:5]]), torch.cat([b.y for b in batches[:5]]))
    return train, batches[5]


def load_folder(path: Path) -> tuple[Split, list[str]]:
    from PIL import Image

    if not path.is_dir():
        problem = "is not a directory" if path.exists() else "does not exist"
        raise DataError(f"--data folder:{path}: {path} {problem} (expected one sub-folder of images per class)")
    class_dirs = sorted(p for p in path.iterdir() if p.is_dir())
    if len(class_dirs) < 2:
        raise DataError(f"--data folder:{path} needs at least two sub-folders (one per class) of PNG/JPEG images")
    files = []
    for label, directory in enumerate(class_dirs):
        found = [f for f in sorted(directory.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not found:  # a class with no example would train and be scored as if it were one
            raise DataError(
                f"--data folder:{path}: class folder {directory} holds no PNG/JPEG image; add images or remove it"
            )
        files += [(f, label) for f in found]
    images, labels, size, mode = [], [], None, None
    for file, label in files:
        try:
            with Image.open(file) as image:
                image.load()
                if mode is None:  # the first image fixes the size; grey sets stay one channel
                    size, mode = image.size, "L" if image.mode in ("L", "1", "I;16") else "RGB"
                array = np.asarray(image.convert(mode).resize(size), dtype=np.uint8)
        except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, zlib.error… for damaged files
            reason = str(error) or type(error).__name__
            raise DataError(f"{file} is not a readable PNG/JPEG image: {reason}") from None
        images.append(array[None] if mode == "L" else array.transpose(2, 0, 1))
        labels.append(label)
    return Split(torch.from_numpy(np.stack(images)), torch.tensor(labels)), [d.name for d in class_dirs]


# --- downloads --------------------------------------------------------------------------------------------------


def cache_directory(dataset: str) -> Path:
    """Where a data set's files are kept without --data-dir: ``$XDG_CACHE_HOME/xent/DATASET``, by default
    ``~/.cache/xent/DATASET`` (the XDG base directory convention)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "xent" / dataset


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, destination: Path, sha256: str, *, timeout: float = 60.0) -> None:
    """Fetch ``url`` to ``destination`` atomically: into a temporary file beside it, checked, then renamed.

    A failed, truncated or corrupted download raises :class:`DataError` and leaves nothing behind.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            expected_length = response.headers.get("Content-Length")
            written = 0
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                written += len(block)
        if expected_length is not None and written != int(expected_length):
            raise DataError(f"download of {url} is truncated: {written} of {expected_length} bytes")
        actual = sha256_of(Path(temporary))
        if actual != sha256:
            raise DataError(f"download of {url} is corrupted: SHA-256 {actual}, expected {sha256}")
        os.replace(temporary, destination)
    except OSError as error:
        raise DataError(f"download of {url} failed: {error}") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def download(dataset: str, directory: Path, base_url: str | None = None) -> None:
    """Fetch the standard files of ``dataset`` that ``directory`` lacks, verifying each SHA-256."""
    default_url, files = DOWNLOADS[dataset]
    for name, sha256 in files.items():
        target = directory / name
        if target.is_file() and sha256_of(target) == sha256:
            continue
        download_file((base_url or default_url) + name, target, sha256)
        if name.endswith(".tar.gz"):
            with tarfile.open(target) as archive:
                archive.extractall(directory, filter="data")


# --- assembling the splits --------------------------------------------------------------------------------------


def _generator(seed: int, purpose: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1009 + purpose)


def _split_off(split: Split, fraction: float, generator: torch.Generator) -> tuple[Split, Split]:
    """A seeded stratified split: ``fraction`` of every class goes to the second part."""
    first, second = [], []
    for label in torch.unique(split.y):
        index = torch.nonzero(split.y == label).squeeze(1)
        index = index[torch.randperm(len(index), generator=generator)]
        cut = round(len(index) * fraction)
        second.append(index[:cut])
        first.append(index[cut:])
    first_index, second_index = torch.sort(torch.cat(first)).values, torch.sort(torch.cat(second)).values
    return split.subset(first_index), split.subset(second_index)


_MADE: dict[str, tuple[Split, Split, list[str]]] = {}  # the offline data sets once made, by kind (see _raw)


def _digits() -> tuple[Split, Split, list[str]]:
    array = digits_array()
    images = torch.tensor(array[:, :-1], dtype=torch.float32).view(-1, 1, 8, 8) / 16.0  # (N, 1, 8, 8)
    full = Split(images, torch.tensor(array[:, -1], dtype=torch.long))
    train, test = _split_off(full, DIGITS_TEST_FRACTION, _generator(0, 1))  # one test set for every seed
    return train, test, [str(d) for d in range(10)]


def digits_array() -> npt.NDArray[np.float64]:
    """scikit-learn's digits as its ``load_digits`` reads them: ``datasets/data/digits.csv.gz``, one row per image,
    64 pixel values (0-16) then the label. The file is read where scikit-learn is installed without importing
    scikit-learn, whose import (it brings scipy) took 0.3-2 s of every run on digits; ``load_digits`` is the fallback
    when the file is not where it has always been."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package; runs none of it
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return np.loadtxt(path, delimiter=",")
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.concatenate([digits.data, digits.target[:, None]], axis=1)


def _mnist1d() -> tuple[Split, Split, list[str]]:
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())  # generated here, never downloaded

    def split(x: npt.NDArray[Any], y: npt.NDArray[Any]) -> Split:
        return Split(torch.tensor(x, dtype=torch.float32).unsqueeze(1), torch.tensor(y, dtype=torch.long))

    return split(data["x"], data["y"]), split(data["x_test"], data["y_test"]), [str(d) for d in range(10)]


def _raw(config: TrainConfig) -> tuple[Split, Split, list[str]]:
    kind = data_kind(config.data)
    if kind in ("digits", "mnist1d"):  # generated or read in memory: kept for the next run of this process
        if kind not in _MADE:
            _MADE[kind] = _digits() if kind == "digits" else _mnist1d()
        train, test, names = _MADE[kind]
        # copies: a run may change its splits in place, and the next run of this process must get them as made
        return Split(train.x.clone(), train.y.clone()), Split(test.x.clone(), test.y.clone()), list(names)
    if kind == "folder":
        full, names = load_folder(Path(config.data[len("folder:") :]))
        train, test = _split_off(full, FOLDER_TEST_FRACTION, _generator(0, 1))
        return train, test, names
    directory = Path(config.data_dir) if config.data_dir is not None else cache_directory(kind)
    if config.data_dir is None and not config.download and not directory.is_dir():
        raise DataError(f"--data {kind} reads its files from --data-dir DIR; none was given, and {directory} does "
                        f"not exist: pass --download to fetch them there ({SOURCES[kind]})")  # fmt: skip
    if config.download:
        download(kind, directory)
    if kind == "cifar10":
        train, test = load_cifar10(directory)
        return train, test, CIFAR_CLASSES
    train, test = load_idx_dataset(directory, kind)
    return train, test, FASHION_CLASSES if kind == "fashion-mnist" else [str(d) for d in range(10)]


def _keep_classes(split: Split, classes: list[int]) -> Split:
    """Rows of the chosen classes, relabelled 0..k-1 in the order given."""
    mapping = torch.full((int(split.y.max()) + 1,), -1, dtype=torch.long)
    mapping[torch.tensor(classes)] = torch.arange(len(classes))
    kept = split.subset(torch.nonzero(mapping[split.y] >= 0).squeeze(1))
    return Split(kept.x, mapping[kept.y])


def long_tailed(split: Split, ratio: float, num_classes: int, generator: torch.Generator) -> Split:
    """Keep n_i = n_max · ratio^(-i/(C-1)) examples of class i (Cao et al., 2019's exponential profile)."""
    n_max = int(torch.bincount(split.y, minlength=num_classes).max())
    keep = []
    for label in range(num_classes):
        index = torch.nonzero(split.y == label).squeeze(1)
        count = max(1, int(n_max * ratio ** (-label / max(1, num_classes - 1))))
        keep.append(index[torch.randperm(len(index), generator=generator)[:count]])
    return split.subset(torch.sort(torch.cat(keep)).values)


def symmetric_noise(split: Split, fraction: float, num_classes: int, generator: torch.Generator) -> Split:
    """Replace ``fraction`` of the labels by a class drawn uniformly among the *other* classes."""
    y = split.y.clone()
    noisy = torch.rand(len(y), generator=generator) < fraction
    shift = torch.randint(1, num_classes, (len(y),), generator=generator)
    y[noisy] = (y[noisy] + shift[noisy]) % num_classes
    return Split(split.x, y)


def load_data(config: TrainConfig) -> DataBundle:
    """The splits a (resolved) configuration describes: train (long-tailed and noisy if asked), val, test."""
    train, test, names = _raw(config)
    classes = parse_classes(config.classes)
    if classes is not None:
        bad = [c for c in classes if not 0 <= c < len(names)]
        if bad:
            raise ConfigError(f"--classes {bad[0]} out of range: --data {config.data} has classes 0-{len(names) - 1}")
        train, test = _keep_classes(train, classes), _keep_classes(test, classes)
        names = [names[c] for c in classes]
    train, val = _split_off(train, cast(float, config.val_fraction), _generator(config.seed, 2))  # set by resolve()
    if config.imbalance_ratio > 1:
        train = long_tailed(train, config.imbalance_ratio, len(names), _generator(config.seed, 3))
    if config.label_noise > 0:
        train = symmetric_noise(train, config.label_noise, len(names), _generator(config.seed, 4))
    return DataBundle(train, val, test, names, tuple(train.x.shape[1:]))


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Inputs in [0, 1] as float32 (image sets are stored as bytes to save memory)."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x
