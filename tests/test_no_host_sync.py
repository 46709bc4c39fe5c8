"""Training steps never pull a device value to the host (DESIGN.md: no host-device sync).

On a GPU, ``float(x)``, ``bool(x)``, ``int(x)``, ``x.item()``, ``if xp.any(...)``
or a NumPy conversion of a device array blocks the host until the device has
caught up, once per call. This test needs no GPU: it trains LeNet on
array-api-strict's second device, whose arrays refuse conversion to NumPy,
with every scalar conversion of an array made to fail, so any hidden
synchronisation in forward, backward, the loss, the regularizer or the
optimizer step is caught. The data and the labels are on the device already,
as a GPU data layer delivers them.
"""
import numpy as np
import pytest

import xpnn
from xpnn.models import lenet

strict = pytest.importorskip("array_api_strict", reason="the check runs on array-api-strict")

CONVERSIONS = ("__bool__", "__float__", "__int__", "__index__", "__complex__", "__array__")


class _DeviceBatches:
    def __init__(self, backend, images, labels, batch_size):
        self.batches = [(backend.asarray(images[start:start + batch_size]),
                         backend.asarray(labels[start:start + batch_size]))
                        for start in range(0, len(images), batch_size)]
        self.position = 0

    def next(self):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch


def _refuse(name):
    def conversion(self, *args, **kwargs):
        raise AssertionError(f"host-device sync: {name} called on a device array during training")
    return conversion


@pytest.mark.parametrize("batch_norm, dropout", [(False, False), (True, True)],
                         ids=["plain", "bn-dropout"])
def test_training_steps_do_not_sync(monkeypatch, batch_norm, dropout):
    rng = np.random.default_rng(0)
    images = rng.random((8, 1, 28, 28)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 8)]
    with xpnn.use_backend("array-api-strict", dtype="float32", device="device1") as backend:
        net = lenet.build(batch_norm=batch_norm, dropout=dropout, batch_norm_eps=1e-5)
        net.data_layer = _DeviceBatches(backend, images, labels, 4)
        with monkeypatch.context() as patched:
            for name in CONVERSIONS:
                patched.setattr(strict._array_object.Array, name, _refuse(name))
            net.train(3)
            losses = list(net.loss)
        # Outside training, reading the losses is fine.
        values = [float(xpnn.to_numpy(value)) for value in losses]
    assert len(values) == 3 and all(np.isfinite(values))
    assert all(backend.owns(value) for value in losses)
