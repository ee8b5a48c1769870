"""The file readers of ``xent train`` fed well-formed files, random bytes and well-formed files with bytes flipped,
cut off or inserted: each returns what the file holds or raises its one-line error naming the file — never another
exception, never a silently different checkpoint."""

import gzip
import io
import shutil
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from xent.train import checkpoint, data
from xent.train.config import ConfigError, TrainConfig, run_identity

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def damaged(draw, valid: bytes) -> bytes:
    """``valid`` with one to four flips, cuts and insertions — or, one time in eight, random bytes instead."""
    if draw(st.integers(0, 7)) == 0:
        return draw(st.binary(max_size=300))
    content = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, len(content)))
        if kind == "flip" and at < len(content):
            content[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del content[at : at + draw(st.integers(1, 64))]
        else:
            content[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(content)


def assert_names(error: Exception, path) -> None:
    message = str(error)
    assert str(path) in message and "\n" not in message, message


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# --- IDX and CIFAR-10 binary ------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()


@FUZZ
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    compress=st.booleans(),
    seed=st.integers(0, 2**16),
    data_=st.data(),
)
def test_idx(workdir, shape, compress, seed, data_):
    array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    path = workdir / ("train-images.gz" if compress else "train-images")
    valid = gzip.compress(idx_bytes(array)) if compress else idx_bytes(array)
    path.write_bytes(valid)
    np.testing.assert_array_equal(data.read_idx(path), array)
    path.write_bytes(data_.draw(damaged(valid)))
    try:
        parsed = data.read_idx(path)
    except data.DataError as error:
        assert_names(error, path)
    else:
        assert parsed.dtype == np.uint8 and parsed.ndim >= 0


@FUZZ
@given(records=st.integers(1, 4), seed=st.integers(0, 2**16), data_=st.data())
def test_cifar_batch(workdir, records, seed, data_):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, (records, 1), dtype=np.uint8)
    valid = np.concatenate([labels, rng.integers(0, 256, (records, 3 * 32 * 32), dtype=np.uint8)], 1).tobytes()
    path = workdir / "data_batch_1.bin"
    path.write_bytes(valid)
    assert data.read_cifar_batch(path).y.tolist() == labels[:, 0].tolist()
    path.write_bytes(data_.draw(damaged(valid)))
    try:
        split = data.read_cifar_batch(path)
    except data.DataError as error:
        assert_names(error, path)
    else:
        assert split.x.shape[1:] == (3, 32, 32) and len(split.x) == len(split.y)
        assert split.y.min() >= 0 and split.y.max() <= 9


# --- image folders ----------------------------------------------------------------------------------------------


@FUZZ
@given(
    image_format=st.sampled_from(["PNG", "JPEG"]),
    mode=st.sampled_from(["L", "RGB", "P", "RGBA", "1"]),
    seed=st.integers(0, 2**16),
    data_=st.data(),
)
def test_image_folder(workdir, image_format, mode, seed, data_):
    if image_format == "JPEG" and mode in ("P", "RGBA"):
        mode = "RGB"
    root = workdir / "folder"
    shutil.rmtree(root, ignore_errors=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, image_format)
    suffix = ".png" if image_format == "PNG" else ".jpg"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / f"0{suffix}").write_bytes(buffer.getvalue())
    split, names = data.load_folder(root)
    assert names == ["a", "b"] and split.x.shape[0] == 2 and split.x.shape[2:] == (6, 5)
    broken = root / "b" / f"0{suffix}"
    broken.write_bytes(data_.draw(damaged(buffer.getvalue())))
    try:
        split, _ = data.load_folder(root)
    except data.DataError as error:
        assert_names(error, broken)
    else:  # a damaged image that still decodes is resized to the first image's size
        assert split.x.shape[0] == 2 and split.x.shape[2:] == (6, 5) and split.x.dtype == torch.uint8


# --- checkpoints ------------------------------------------------------------------------------------------------


def _training_state(seed: int) -> dict:
    """A checkpoint's content as ``xent train`` writes it: a stepped model and optimizer, RNGs, a history."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)
    model(torch.randn(5, 4)).logsumexp(1).sum().backward()
    optimizer.step()
    scheduler.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "epoch": 3,
        "best_val": [0.25, 0.9],
        "train_seconds": 12.5,
        "history": [{"epoch": 1, "val_loss": 0.5}, {"epoch": 2, "val_loss": float("nan")}],
        "rng": checkpoint.rng_state(),
    }


@pytest.fixture(scope="module")
def saved_checkpoint(workdir):
    state = _training_state(seed=0)
    path = workdir / "saved.pt"
    checkpoint.save_atomic(state, path, run=run_identity(TrainConfig()))
    return state, path.read_bytes()


@FUZZ
@given(data_=st.data())
def test_checkpoint(workdir, saved_checkpoint, data_):
    state, valid = saved_checkpoint
    path = workdir / checkpoint.LAST
    path.write_bytes(data_.draw(damaged(valid)))
    try:
        loaded = checkpoint.load(path)
    except checkpoint.CheckpointError as error:
        assert_names(error, path)
    else:  # the damage hit bytes the content does not depend on (zip padding, an unused header field)
        assert checkpoint.digest({key: loaded[key] for key in state}) == checkpoint.digest(state)


def test_a_flipped_weight_that_still_unpickles_is_caught(tmp_path, saved_checkpoint):
    """The zip format stores tensors raw and torch.load checks no CRC: without the digest this loaded a different
    weight silently."""
    state, valid = saved_checkpoint
    path = tmp_path / checkpoint.LAST
    path.write_bytes(valid)
    torch.testing.assert_close(checkpoint.load(path)["model"], state["model"], rtol=0, atol=0)
    with zipfile.ZipFile(io.BytesIO(valid)) as archive:
        first_tensor = next(info for info in archive.infolist() if "/data/" in info.filename)
        # the record's data follow its 30-byte local header, the name and the extra field
        header = valid[first_tensor.header_offset : first_tensor.header_offset + 30]
        start = first_tensor.header_offset + 30 + int.from_bytes(header[26:28], "little")
        start += int.from_bytes(header[28:30], "little")
    content = bytearray(valid)
    content[start + 1] ^= 0x40
    path.write_bytes(bytes(content))
    loaded = torch.load(path, weights_only=True)  # what an unchecked reader gets: a different weight, no error
    assert not torch.equal(loaded["model"]["0.weight"], state["model"]["0.weight"])
    with pytest.raises(checkpoint.CheckpointError, match=r"corrupted: its content does not match the SHA-256"):
        checkpoint.load(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (torch.zeros(3), r"is not a checkpoint of xent train \(no model, optimizer"),
        ({"model": {}, "epoch": 1}, r"is not a checkpoint of xent train \(no optimizer, scheduler"),
    ],
)
def test_a_torch_file_that_is_not_a_checkpoint(tmp_path, content, message):
    path = tmp_path / checkpoint.BEST
    torch.save(content, path)
    with pytest.raises(checkpoint.CheckpointError, match=message) as error:
        checkpoint.load(path)
    assert_names(error.value, path)


def test_a_checkpoint_without_a_digest_still_loads(tmp_path):
    """Checkpoints written before the digest existed resume as before."""
    state = _training_state(seed=1)
    torch.save(state, tmp_path / checkpoint.LAST)
    assert checkpoint.digest(checkpoint.load(tmp_path / checkpoint.LAST)) == checkpoint.digest(state)


@FUZZ
@given(content=st.one_of(st.binary(max_size=64), st.sampled_from([b"[1, 2]", b'{"lr": 0.1', b"\xff\xfe{}", b"null"])))
def test_run_configuration(workdir, content):
    path = workdir / "config.json"
    path.write_bytes(content)
    try:
        saved = TrainConfig.saved(workdir, "--resume")
    except ConfigError as error:
        assert_names(error, path)
    else:
        assert isinstance(saved, dict)
