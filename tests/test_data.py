"""Offline loaders and user-data conversion: sizes, values, and the errors for bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from efrap_plugin import DataError, LabeledData, as_calibration, as_labeled, load_npz
from efrap_plugin.redteam import load_cifar10, load_digits
from efrap_plugin.redteam.datasets import load_fashion_mnist


def test_digits_split_is_seeded_stratified_and_scaled():
    a, b = load_digits(seed=0), load_digits(seed=0)
    assert (len(a.train), len(a.test)) == (1257, 540)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(load_digits(seed=1).train.y, a.train.y)
    assert a.train.x.shape[1:] == (1, 8, 8)
    assert float(a.train.x.min()) == 0.0 and float(a.train.x.max()) == 1.0
    assert torch.bincount(a.test.y).tolist() == [54, 55, 53, 55, 54, 55, 54, 54, 52, 54]


def test_fashion_mnist_from_the_debian_idx_files():
    splits = load_fashion_mnist()
    assert (len(splits.train), len(splits.test)) == (60000, 10000)
    assert splits.train.x.shape[1:] == (1, 28, 28) and splits.train.x.dtype == torch.float32
    assert torch.bincount(splits.test.y).tolist() == [1000] * 10
    assert float(splits.train.x.max()) == 1.0


def test_fashion_mnist_missing_names_the_package(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def _write_cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    batch = {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": list(rng.integers(0, 10, n)),
    }
    batch[b"labels"] = [int(v) for v in batch[b"labels"]]
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=2)
    return batch


def test_cifar10_python_batches(tmp_path):
    b1 = _write_cifar_batch(tmp_path / "data_batch_1", 5, 0)
    _write_cifar_batch(tmp_path / "data_batch_2", 3, 1)
    test = _write_cifar_batch(tmp_path / "test_batch", 4, 2)
    splits = load_cifar10(tmp_path)
    assert (len(splits.train), len(splits.test)) == (8, 4)
    assert splits.train.x.shape[1:] == (3, 32, 32)
    # channel-major layout: the first 1024 bytes are the red plane
    assert float(splits.train.x[0, 0, 0, 1]) == pytest.approx(b1[b"data"][0, 1] / 255.0)
    assert float(splits.train.x[0, 1, 0, 0]) == pytest.approx(b1[b"data"][0, 1024] / 255.0)
    assert splits.test.y.tolist() == test[b"labels"]


def test_cifar10_refuses_a_pickle_that_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(tmp_path / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": [0]}, fh)
    _write_cifar_batch(tmp_path / "test_batch", 2, 0)
    with pytest.raises(DataError, match=r"refers to builtins\.print: refused"):
        load_cifar10(tmp_path)


def test_cifar10_missing_folder_is_explained(tmp_path):
    with pytest.raises(DataError, match=r"expected data_batch_1\.\.5 and test_batch"):
        load_cifar10(tmp_path)


def test_npz_with_and_without_labels(tmp_path):
    x = np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    np.savez(tmp_path / "eval.npz", x=x, y=np.arange(6) % 3)
    assert torch.equal(load_npz(tmp_path / "calib.npz"), torch.from_numpy(x))
    labeled = load_npz(tmp_path / "eval.npz")
    assert isinstance(labeled, LabeledData) and labeled.y.tolist() == [0, 1, 2, 0, 1, 2]
    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(DataError, match=r"expected an array named 'x'.*found \['images'\]"):
        load_npz(tmp_path / "bad.npz")


def test_calibration_from_batches_loader_and_tuples():
    x = torch.rand(10, 1, 8, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(10)), batch_size=4)
    assert torch.equal(as_calibration(loader), x)
    assert torch.equal(as_calibration([x[:3], x[3:]]), x)
    assert as_calibration(x, n=4).shape[0] == 4


@pytest.mark.parametrize(
    "data,message",
    [
        (torch.rand(5), r"expected a batch of inputs, N x ... .* got shape \(5,\)"),
        (torch.zeros(0, 1, 8, 8), r"empty \(0 images\)"),
        (
            torch.randint(0, 255, (2, 1, 8, 8)),
            r"expected float images scaled to \[0, 1\], got dtype torch.int64",
        ),
        (torch.full((2, 1, 8, 8), float("nan")), r"contains NaN or Inf"),
        ([], r"the iterable yielded no batches"),
        ("nothere.npz", r"no such file"),
        ([torch.rand(2, 1, 8, 8), torch.rand(2, 1, 6, 6)], r"batches must share one sample shape"),
        (42, r"expected a tensor / array .* got int"),
    ],
)
def test_bad_calibration_data_is_a_clear_error(data, message):
    with pytest.raises(DataError, match=message):
        as_calibration(data)


def test_calibration_shape_must_match_the_model():
    with pytest.raises(
        DataError, match=r"images of shape \(1, 8, 8\) do not match the model input \(3, 32, 32\)"
    ):
        as_calibration(torch.rand(2, 1, 8, 8), sample_shape=(3, 32, 32))


def test_labels_outside_the_classes_are_rejected():
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.9 \(the model's classes\), got 0\.\.12"):
        as_labeled((torch.rand(3, 1, 8, 8), np.array([0, 5, 12])), num_classes=10)
    with pytest.raises(DataError, match=r"expected 3 labels \(one per image\)"):
        LabeledData(torch.rand(3, 1, 8, 8), torch.zeros(2, dtype=torch.long), 10)


def test_token_ids_are_calibration_inputs_as_they_are():
    """A model with an embedding takes integer ids: N x T int64 (or int32) pass unchanged, while a 4-D
    integer batch is still taken for raw images and refused with the fix."""
    ids = torch.randint(0, 50, (8, 5))
    out = as_calibration(ids)
    assert out.dtype == torch.int64 and torch.equal(out, ids)
    assert as_calibration(ids.numpy().astype(np.int32)).dtype == torch.int32
    with pytest.raises(DataError, match=r"expected float images scaled to \[0, 1\], got dtype torch.int64"):
        as_calibration(torch.randint(0, 255, (2, 1, 8, 8)))
