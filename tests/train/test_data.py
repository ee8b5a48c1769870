"""Every data format read from small files the tests write, the splits, and --download against loopback."""

import gzip
import hashlib
import http.server
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xent.train import data
from xent.train.config import ConfigError, TrainConfig, resolve


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def make_mnist(directory: Path, *, compress: bool, train: int = 60, test: int = 20, seed: int = 0) -> None:
    """Tiny MNIST-format files: class c is an image whose row c is bright, so a model can learn it."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 60, (count, 28, 28))
        images[np.arange(count), labels * 2] = 255
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, compress=compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, compress=compress)


def make_cifar(directory: Path, per_batch: int = 20) -> None:
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = np.arange(per_batch) % 10
        pixels = rng.integers(0, 256, (per_batch, 3 * 32 * 32))
        records = np.concatenate([labels[:, None], pixels], axis=1).astype(np.uint8)
        (directory / name).write_bytes(records.tobytes())


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_round_trip(tmp_path, compress):
    make_mnist(tmp_path, compress=compress)
    train, test = data.load_idx_dataset(tmp_path, "mnist")
    assert train.x.shape == (60, 1, 28, 28) and train.x.dtype == torch.uint8
    assert test.y.tolist() == [i % 10 for i in range(20)]
    assert int(train.x[3, 0, 6, 0]) == 255  # class 3: row 6 bright


def test_malformed_and_missing_idx_files_name_the_file(tmp_path):
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte\[.gz\] not found: --data mnist needs"):
        data.load_idx_dataset(tmp_path, "mnist")
    make_mnist(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte is truncated or too long"):
        data.load_idx_dataset(tmp_path, "mnist")
    path.write_bytes(b"\x12\x34\x56\x78" + b"\x00" * 20)
    with pytest.raises(data.DataError, match=r"is not an IDX file of unsigned bytes \(bad magic number 12345678\)"):
        data.load_idx_dataset(tmp_path, "mnist")


def test_cifar_binary_batches(tmp_path):
    make_cifar(tmp_path / "cifar-10-batches-bin")
    train, test = data.load_cifar10(tmp_path)
    assert train.x.shape == (100, 3, 32, 32) and test.x.shape == (20, 3, 32, 32)
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(data.DataError, match=r"test_batch.bin is not a CIFAR-10 binary batch: 100 bytes"):
        data.load_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin").unlink()
    with pytest.raises(data.DataError, match=r"data_batch_3.bin not found: --data cifar10 needs"):
        data.load_cifar10(tmp_path)


def make_folder(directory: Path, counts: dict[str, int]) -> None:
    """An image folder with ``counts[name]`` 8×8 grey PNGs in the sub-folder of each class, one shade per class."""
    for shade, (name, count) in enumerate(counts.items()):
        (directory / name).mkdir(parents=True)
        for i in range(count):
            Image.new("L", (8, 8), 60 * shade + i).save(directory / name / f"{i}.png")


def test_image_folder(tmp_path):
    for label, color in (("cats", 30), ("dogs", 220)):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.new("L", (12, 10), color + i).save(tmp_path / label / f"{i}.png")
    Image.new("L", (20, 20), 0).save(tmp_path / "dogs" / "big.jpg")  # resized to the first image's size
    split, names = data.load_folder(tmp_path)
    assert names == ["cats", "dogs"] and split.x.shape == (11, 1, 10, 12)
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(data.DataError, match=r"broken.png is not a readable PNG/JPEG image"):
        data.load_folder(tmp_path)


def test_image_folder_that_is_missing_a_file_or_has_an_empty_class_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(data.DataError, match=re.escape(f"--data folder:{missing}: {missing} does not exist")):
        data.load_folder(missing)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"file.png is not a directory \(expected one sub-folder of images"):
        data.load_folder(tmp_path / "file.png")
    make_folder(tmp_path / "images", {"a": 3, "b": 3})
    (tmp_path / "images" / "empty").mkdir()
    (tmp_path / "images" / "empty" / "notes.txt").write_text("no image here")
    empty = tmp_path / "images" / "empty"
    with pytest.raises(data.DataError, match=re.escape(f"class folder {empty} holds no PNG/JPEG image")):
        data.load_folder(tmp_path / "images")


def test_splits_classes_imbalance_and_noise_are_seeded():
    long_tail = data.load_data(resolve(TrainConfig(classes="0,1", imbalance_ratio=10.0, seed=3)))
    assert long_tail.class_names == ["0", "1"] and long_tail.num_classes == 2
    counts = long_tail.class_counts().tolist()
    balanced = data.load_data(resolve(TrainConfig(classes="0,1", seed=3))).class_counts()
    assert counts[1] == int(int(balanced.max()) / 10)  # n_1 = n_max · R^-1
    config = resolve(TrainConfig(classes="0,1", imbalance_ratio=10.0, label_noise=0.2, seed=3))
    bundle = data.load_data(config)
    assert bundle.class_counts().tolist() != counts  # noise moved labels between the two classes
    again = data.load_data(config)
    assert torch.equal(bundle.train.y, again.train.y) and torch.equal(bundle.train.x, again.train.x)
    assert set(bundle.test.y.tolist()) == {0, 1}


def test_long_tailed_profile_and_symmetric_noise():
    y = torch.arange(1000) % 5
    split = data.Split(torch.zeros(1000, 1, 2), y)
    tail = data.long_tailed(split, 100.0, 5, torch.Generator().manual_seed(0))
    assert torch.bincount(tail.y).tolist() == [200, 63, 20, 6, 2]
    noisy = data.symmetric_noise(split, 0.3, 5, torch.Generator().manual_seed(0))
    changed = (noisy.y != y).float().mean().item()
    assert 0.25 < changed < 0.35  # a flipped label always changes class


def test_config_errors_name_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # an empty cache, whatever this machine holds
    with pytest.raises(ConfigError, match=r"--classes 12 out of range: --data digits has classes 0-9"):
        data.load_data(resolve(TrainConfig(classes="0,12")))
    with pytest.raises(ConfigError, match=r"--data mnist reads its files from --data-dir DIR"):
        data.load_data(resolve(TrainConfig(data="mnist")))


@pytest.mark.parametrize("xdg", [True, False])
def test_download_without_data_dir_uses_the_cache_folder(tmp_path, monkeypatch, xdg):
    """$XDG_CACHE_HOME/xent/DATA, else ~/.cache/xent/DATA; a later run without --download finds the files there."""
    if xdg:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        cache = tmp_path / "xdg" / "xent" / "mnist"
    else:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        cache = tmp_path / "home" / ".cache" / "xent" / "mnist"
    fetched = []

    def fake_download(dataset: str, directory: Path, base_url: str | None = None) -> None:  # no network in tests
        fetched.append((dataset, directory))
        make_mnist(directory, compress=True)

    monkeypatch.setattr(data, "download", fake_download)
    bundle = data.load_data(resolve(TrainConfig(data="mnist", download=True)))
    assert fetched == [("mnist", cache)] and bundle.num_classes == 10
    again = data.load_data(resolve(TrainConfig(data="mnist")))
    assert fetched == [("mnist", cache)] and len(again.train) == len(bundle.train)


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *args, **kwargs: _Files(*args, directory=str(served), **kwargs)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_verifies_sha256_and_writes_atomically(file_server, tmp_path, monkeypatch):
    served, base_url = file_server
    make_mnist(served, compress=True)
    names = list(data.DOWNLOADS["mnist"][1])  # the order downloads run in: t10k-labels last
    checksums = {name: hashlib.sha256((served / name).read_bytes()).hexdigest() for name in names}
    monkeypatch.setitem(data.DOWNLOADS, "mnist", (base_url, checksums))
    target = tmp_path / "mnist"
    data.download("mnist", target)
    assert sorted(p.name for p in target.iterdir()) == sorted(checksums)
    train, _ = data.load_idx_dataset(target, "mnist")
    assert len(train) == 60

    # A corrupted file on the server: rejected, and nothing half-written stays.
    corrupted = tmp_path / "corrupted"
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte.gz is corrupted: SHA-256"):
        data.download("mnist", corrupted)
    assert sorted(p.name for p in corrupted.iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
    ]  # fmt: skip

    # A file missing on the server: the error names the URL, no partial file.
    (served / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match=r"download of http://127.0.0.1:\d+/t10k-labels-idx1-ubyte.gz failed"):
        data.download("mnist", corrupted)
    assert not any(p.name.endswith(".part") for p in corrupted.iterdir())
