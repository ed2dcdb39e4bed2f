"""netcl.nn against torch autograd: forward values and every gradient, float32."""

import numpy as np
import pyopencl.array as cla
import pytest

import netcl
import netcl._kernels
from netcl import nn

torch = pytest.importorskip("torch")

RTOL, ATOL = 1e-5, 1e-5
SIZES = [(37, 13, 5), (1, 1, 1), (70, 33, 20), (16, 16, 16), (64, 64, 128)]


@pytest.fixture(scope="module")
def queue():
    return netcl.default_queue()


def _close(device_array, tensor, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(device_array.get(), tensor.detach().numpy(), rtol=rtol, atol=atol)


def _torch_linear(layer):
    w = torch.tensor(layer.weight.data.get(), requires_grad=True)
    b = torch.tensor(layer.bias.data.get(), requires_grad=True)
    return w, b


@pytest.mark.parametrize("batch, n_in, n_out", SIZES)
def test_linear_forward_backward(queue, batch, n_in, n_out):
    rng = np.random.default_rng(batch * 1000 + n_in)
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    gy = rng.standard_normal((batch, n_out)).astype(np.float32)
    layer = nn.Linear(n_in, n_out, queue=queue, seed=3)
    y = layer(cla.to_device(queue, x))
    gx = layer.backward(cla.to_device(queue, gy))

    w, b = _torch_linear(layer)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.linear(xt, w, b)
    yt.backward(torch.tensor(gy))
    _close(y, yt)
    _close(gx, xt.grad)
    _close(layer.weight.grad, w.grad)
    _close(layer.bias.grad, b.grad)


def test_linear_init_like_torch(queue):
    layer = nn.Linear(50, 30, queue=queue, seed=0)
    bound = 1 / np.sqrt(50)
    for p, shape in ((layer.weight, (30, 50)), (layer.bias, (30,))):
        values = p.data.get()
        assert p.shape == shape and p.dtype == np.float32 and p.grad is None
        assert np.all(np.abs(values) <= bound) and values.std() > bound / 3
    same = nn.Linear(50, 30, queue=queue, seed=0)
    other = nn.Linear(50, 30, queue=queue, seed=1)
    np.testing.assert_array_equal(same.weight.data.get(), layer.weight.data.get())
    assert not np.array_equal(other.weight.data.get(), layer.weight.data.get())


def test_linear_accumulates_grads_and_skips_input_grad(queue):
    rng = np.random.default_rng(1)
    layer = nn.Linear(20, 16, queue=queue)  # full register blocks and edge blocks
    x = cla.to_device(queue, rng.standard_normal((9, 20)).astype(np.float32))
    gy = cla.to_device(queue, rng.standard_normal((9, 16)).astype(np.float32))
    layer(x)
    assert layer.backward(gy, input_grad=False) is None
    once_w, once_b = layer.weight.grad.get(), layer.bias.grad.get()
    layer.backward(gy)
    np.testing.assert_allclose(layer.weight.grad.get(), 2 * once_w, rtol=1e-6)
    np.testing.assert_allclose(layer.bias.grad.get(), 2 * once_b, rtol=1e-6)


def test_linear_accepts_views_with_offset(queue):
    rng = np.random.default_rng(2)
    full = rng.standard_normal((40, 13)).astype(np.float32)
    layer = nn.Linear(13, 5, queue=queue)
    y = layer(cla.to_device(queue, full)[11:30])
    w, b = _torch_linear(layer)
    _close(y, torch.nn.functional.linear(torch.tensor(full[11:30]), w, b))


def test_relu(queue):
    x = np.array([[-2.0, -0.0, 0.0, 0.5], [3.0, -1e-30, 1e-30, -7.0]], np.float32)
    gy = np.arange(8, dtype=np.float32).reshape(2, 4) + 1
    relu = nn.ReLU()
    y = relu(cla.to_device(queue, x))
    gx = relu.backward(cla.to_device(queue, gy))
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.relu(xt)
    yt.backward(torch.tensor(gy))
    _close(y, yt, 0, 0)
    _close(gx, xt.grad, 0, 0)


@pytest.mark.parametrize("batch, classes", [(37, 5), (1, 1), (200, 10), (3, 100)])
def test_softmax_cross_entropy(queue, batch, classes):
    rng = np.random.default_rng(batch + classes)
    logits = (rng.standard_normal((batch, classes)) * 4).astype(np.float32)
    labels = rng.integers(0, classes, batch)
    loss, grad = nn.softmax_cross_entropy(cla.to_device(queue, logits), labels)
    zt = torch.tensor(logits, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(zt, torch.tensor(labels))
    lt.backward()
    assert loss.shape == () and grad.shape == (batch, classes)
    _close(loss, lt)
    _close(grad, zt.grad)


def test_softmax_cross_entropy_is_stable_for_large_logits(queue):
    logits = np.array([[1000.0, 0.0, -1000.0], [-500.0, 500.0, 499.0]], np.float32)
    labels = np.array([2, 1])
    loss, grad = nn.softmax_cross_entropy(cla.to_device(queue, logits), labels)
    zt = torch.tensor(logits, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(zt, torch.tensor(labels))
    lt.backward()
    assert np.isfinite(loss.get())
    _close(loss, lt)
    _close(grad, zt.grad)


def test_softmax_cross_entropy_labels(queue):
    logits = cla.to_device(queue, np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="labels must lie"):
        nn.softmax_cross_entropy(logits, np.array([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="expected"):
        nn.softmax_cross_entropy(logits, np.array([0, 1, 2]))
    device_labels = cla.to_device(queue, np.array([0, 1, 2, 1], np.int32))
    loss, _ = nn.softmax_cross_entropy(logits, device_labels)
    np.testing.assert_allclose(loss.get(), np.log(3), rtol=1e-6)
    bad = cla.to_device(queue, np.array([0, 1, 5, 1], np.int32))
    loss, _ = nn.softmax_cross_entropy(logits, bad)
    assert np.isnan(loss.get())


def test_mlp_matches_torch_autograd(queue):
    """A whole 13-17-9-5 MLP step: loss and every parameter gradient."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((37, 13)).astype(np.float32)
    labels = rng.integers(0, 5, 37)
    model = nn.Sequential(nn.Linear(13, 17, queue=queue, seed=1), nn.ReLU(),
                          nn.Linear(17, 9, queue=queue, seed=2), nn.ReLU(),
                          nn.Linear(9, 5, queue=queue, seed=3))
    loss, grad = nn.softmax_cross_entropy(model(cla.to_device(queue, x)), labels)
    assert model.backward(grad, input_grad=False) is None

    tparams = [torch.tensor(p.data.get(), requires_grad=True) for p in model.parameters()]
    h = torch.tensor(x)
    for i in range(0, 6, 2):
        h = torch.nn.functional.linear(h, tparams[i], tparams[i + 1])
        if i < 4:
            h = torch.relu(h)
    lt = torch.nn.functional.cross_entropy(h, torch.tensor(labels))
    lt.backward()
    _close(loss, lt)
    assert len(model.parameters()) == 6
    for p, t in zip(model.parameters(), tparams):
        _close(p.grad, t.grad)


def test_take_rows(queue):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((20, 7)).astype(np.float32)
    labels = rng.integers(0, 10, 20).astype(np.int32)
    index = np.array([3, 19, 0, 3, 11])
    xd, ld = cla.to_device(queue, x), cla.to_device(queue, labels)
    np.testing.assert_array_equal(nn.take_rows(xd, index).get(), x[index])
    np.testing.assert_array_equal(nn.take_rows(ld, index).get(), labels[index])
    index_d = cla.to_device(queue, np.array([2, 25, 4, 6], np.int32))[1:]  # a view
    np.testing.assert_array_equal(nn.take_rows(ld, index_d).get(), [-1, labels[4], labels[6]])
    assert np.isnan(nn.take_rows(xd, index_d).get()[0]).all()
    with pytest.raises(IndexError):
        nn.take_rows(xd, np.array([20]))


def test_rejects_bad_inputs(queue):
    layer = nn.Linear(4, 2, queue=queue)
    with pytest.raises(ValueError, match="4 input features"):
        layer(cla.zeros(queue, (3, 5), np.float32))
    with pytest.raises(TypeError, match="float32"):
        layer(cla.zeros(queue, (3, 4), np.float64))
    with pytest.raises(TypeError, match="pyopencl"):
        layer(np.zeros((3, 4), np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        nn.Linear(4, 2, queue=queue).backward(cla.zeros(queue, (3, 2), np.float32))


def test_float64(queue):
    if not netcl._kernels.supports_fp64(queue.device):
        pytest.skip("device has no float64")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((21, 11))
    labels = rng.integers(0, 9, 21)
    model = nn.Sequential(nn.Linear(11, 10, queue=queue, seed=1, dtype=np.float64), nn.ReLU(),
                          nn.Linear(10, 9, queue=queue, seed=2, dtype=np.float64))
    loss, grad = nn.softmax_cross_entropy(model(cla.to_device(queue, x)), labels)
    model.backward(grad)
    assert loss.dtype == np.float64 and model.parameters()[0].grad.dtype == np.float64
    tparams = [torch.tensor(p.data.get(), requires_grad=True) for p in model.parameters()]
    h = torch.relu(torch.nn.functional.linear(torch.tensor(x), tparams[0], tparams[1]))
    lt = torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(h, tparams[2], tparams[3]), torch.tensor(labels))
    lt.backward()
    _close(loss, lt, 1e-12, 1e-12)
    for p, t in zip(model.parameters(), tparams):
        _close(p.grad, t.grad, 1e-11, 1e-12)
