"""A float32 training step stays float32 end to end, on every backend.

Every activation a layer returns, every error it passes down, every parameter,
gradient, optimizer state, running statistic and cached array, and the recorded
loss keep the network's dtype (array-api-strict's ``no_float64`` device would
also raise on any float64 array created along the way).
"""
import numpy as np
import pytest
from array_api_compat import is_array_api_obj

from xpnn.models import lenet
from conftest import CyclingBatches




def _record_passes(layer, seen):
    """Wrap ``layer.forward``/``backward`` so their results land in ``seen``."""
    forward, backward = layer.forward, layer.backward

    def recorded_forward(input_tensor):
        output = forward(input_tensor)
        seen.append((f"{layer.name}.forward", output))
        return output

    def recorded_backward(error_tensor):
        seen.append((f"{layer.name}.backward error in", error_tensor))
        result = backward(error_tensor)
        if result is not None:
            seen.append((f"{layer.name}.backward", result))
        return result

    layer.forward, layer.backward = recorded_forward, recorded_backward


def _float_arrays(name, owner):
    """(label, array) for every floating-point array attribute of ``owner``."""
    for attribute, value in vars(owner).items():
        if is_array_api_obj(value) and "float" in str(value.dtype):
            yield f"{name}.{attribute}", value


@pytest.mark.parametrize("batch_norm, dropout", [(False, False), (True, True)],
                         ids=["plain", "bn-dropout"])
def test_a_float32_training_step_stays_float32(backend32, batch_norm, dropout):
    rng = np.random.default_rng(0)
    images = rng.random((6, 1, 28, 28)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 6)]
    net = lenet.build(batch_norm=batch_norm, dropout=dropout, batch_norm_eps=1e-5)
    net.data_layer = CyclingBatches(images, labels, 3)
    seen = []
    for layer in net.layers:
        _record_passes(layer, seen)
    net.train(2)
    float32 = backend32.dtype
    for layer in net.layers:
        if layer.trainable:
            for name in ("weights", "bias", "gradient_weights", "gradient_bias"):
                seen.append((f"{layer.name}.{name}", getattr(layer, name)))
            for optimizer in (layer._optimizer, layer._bias_optimizer):
                seen.extend(_float_arrays(f"{layer.name} optimizer", optimizer))
        seen.extend(_float_arrays(layer.name, layer))
    seen.extend((f"loss[{index}]", value) for index, value in enumerate(net.loss))
    seen.append(("test output", net.test(images)))
    checked = [(label, array) for label, array in seen if array is not None]
    assert len(checked) > 40
    wrong = [f"{label}: {array.dtype}" for label, array in checked if array.dtype != float32]
    assert not wrong, "not float32: " + ", ".join(wrong)
    assert all(backend32.owns(array) for _, array in checked)
