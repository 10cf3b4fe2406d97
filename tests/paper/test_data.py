"""Readers (generated IDX / CIFAR files and the shipped MNIST), checksums, preprocessing."""
import gzip
import hashlib
import io
import pickle
import struct

import numpy as np
import pytest
import torch

from ddfast.paper import data


def write_idx(path, arr, code=0x08, gz=False):
    arr = np.asarray(arr)
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    dt = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    raw = header + arr.astype(dt).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_mnist_dir(d, n=7, gz=True, sums=True):
    rng = np.random.default_rng(0)
    files = {}
    for split, (img, lab) in data.IDX_FILES.items():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(d / (img + suffix), images, gz=gz)
        write_idx(d / (lab + suffix), labels, gz=gz)
        files[split] = (images, labels)
    if sums:
        lines = ["# comment line", ""]
        for p in sorted(d.iterdir()):
            lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}")
        (d / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return files


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    assert np.array_equal(data.read_idx(write_idx(tmp_path / "a", arr, gz=gz)), arr)
    f = np.linspace(-1, 1, 6).reshape(2, 3)
    out = data.read_idx(write_idx(tmp_path / "f", f, code=0x0D))
    assert out.dtype == np.float32 and np.allclose(out, f)
    s = np.array([-300, 5, 1000])
    assert np.array_equal(data.read_idx(write_idx(tmp_path / "s", s, code=0x0B)), s)


def test_read_idx_rejects_bad_files(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="bad"):
        data.read_idx(p)
    q = write_idx(tmp_path / "short", np.zeros((3, 4)))
    q.write_bytes(q.read_bytes()[:-1])
    with pytest.raises(ValueError, match="size mismatch"):
        data.read_idx(q)
    r = tmp_path / "code"
    r.write_bytes(b"\x00\x00\x42\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="dtype code"):
        data.read_idx(r)
    z = write_idx(tmp_path / "flipped.gz", np.arange(4000).reshape(40, 100) % 251, gz=True)
    raw = bytearray(z.read_bytes())
    raw[40:80] = bytes(255 - v for v in raw[40:80])          # damage inside the deflate stream
    z.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="flipped.gz: corrupt gzip data"):
        data.read_idx(z)


@pytest.mark.parametrize("gz", [False, True])
def test_load_generated_mnist_dir(tmp_path, gz):
    files = make_mnist_dir(tmp_path, gz=gz)
    for split in ("train", "test"):
        x, y = data.load_mnist(tmp_path, split)
        assert x.dtype == torch.uint8 and x.shape == (7, 28, 28)
        assert y.dtype == torch.int64
        assert np.array_equal(x.numpy(), files[split][0]) and np.array_equal(y.numpy(), files[split][1])
    with pytest.raises(ValueError, match="split"):
        data.load_mnist(tmp_path, "val")


def test_checksum_error_names_the_file(tmp_path):
    make_mnist_dir(tmp_path)
    assert len(data.verify_checksums(tmp_path)) == 4
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(bad.read_bytes())
    raw[-5] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(data.ChecksumError, match="t10k-labels-idx1-ubyte.gz"):
        data.load_mnist(tmp_path, "test")
    data.load_mnist(tmp_path, "train")  # the other split is still fine
    with pytest.raises(data.ChecksumError, match="t10k-labels"):
        data.verify_checksums(tmp_path)


def test_shipped_mnist():
    root = data.find_mnist_root()
    assert len(data.verify_checksums(root)) == 4
    x, y = data.load_mnist(split="test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_find_root_env_and_error(tmp_path, monkeypatch):
    (tmp_path / "mnist").mkdir()
    make_mnist_dir(tmp_path / "mnist")
    monkeypatch.setenv("DDFAST_DATA", str(tmp_path))
    assert data.find_mnist_root() == tmp_path / "mnist"
    monkeypatch.setattr(data, "mnist_root_candidates", lambda: [tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.find_mnist_root()


def test_preprocess_and_inverse():
    imgs = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    mean = data.mean_image(imgs)
    assert torch.allclose(mean, imgs.double().mean(0).float())
    x = data.preprocess(imgs, mean)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x * 255, data.preprocess(imgs, mean, data.PIXEL), atol=1e-4)
    assert torch.allclose(x.mean(0), torch.zeros(1, 28, 28), atol=1e-6)
    assert torch.equal(data.deprocess(x, mean), imgs.unsqueeze(1))
    with pytest.raises(ValueError, match="scale"):
        data.preprocess(imgs, mean, 0.0)


def _cifar_arrays(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)


def test_cifar_binary(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    expect = {}
    for i, name in enumerate([f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]):
        im, lab = _cifar_arrays(3, i)
        rec = np.concatenate([lab[:, None].astype(np.uint8), im.reshape(3, -1)], 1)
        (d / name).write_bytes(rec.tobytes())
        expect[name] = (im, lab)
    x, y = data.load_cifar10(tmp_path, "test")
    assert x.shape == (3, 3, 32, 32) and np.array_equal(x.numpy(), expect["test_batch.bin"][0])
    assert np.array_equal(y.numpy(), expect["test_batch.bin"][1])
    x, y = data.load_cifar10(tmp_path, "train")
    assert x.shape == (15, 3, 32, 32) and np.array_equal(x[3:6].numpy(), expect["data_batch_2.bin"][0])
    (d / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="3073"):
        data.load_cifar10(tmp_path, "test")


def test_cifar_python_restricted_unpickler(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        im, lab = _cifar_arrays(2, i)
        obj = {b"data": im.reshape(2, -1), b"labels": lab.tolist(), b"batch_label": b"x"}
        (d / name).write_bytes(pickle.dumps(obj, protocol=2))
    x, y = data.load_cifar10(tmp_path, "test")
    im, lab = _cifar_arrays(2, 5)
    assert np.array_equal(x.numpy(), im) and np.array_equal(y.numpy(), lab)
    assert data.load_cifar10(tmp_path, "train")[0].shape == (10, 3, 32, 32)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_restricted_unpickler_rejects_code(tmp_path, capsys):
    payload = pickle.dumps({b"data": _Evil(), b"labels": []})
    with pytest.raises(pickle.UnpicklingError, match="print"):
        data.restricted_load(io.BytesIO(payload))
    assert "pwned" not in capsys.readouterr().out
    d = tmp_path
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(pickle.dumps({"data": _Evil()}))
    with pytest.raises(ValueError, match="refusing"):
        data.load_cifar10(d, "test")
    os_payload = b"cos\nsystem\n(S'echo hacked'\ntR."
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        data.restricted_load(io.BytesIO(os_payload))


def test_missing_cifar_and_prepare_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        data.load_cifar10(tmp_path, "train")
    with pytest.raises(ValueError, match="dataset"):
        data.prepare("svhn")
    with pytest.raises(ValueError, match="root"):
        data.prepare("cifar10")
