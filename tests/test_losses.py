"""CrossEntropyLoss: -sum over the batch of y log(yhat + eps), eps the dtype's machine epsilon;
backward -y / yhat (the course's, no eps); fused with SoftMax, yhat * sum(y) - y."""
import numpy as np
import pytest

import xpnn
from xpnn.backend import make_backend
from xpnn.layers import SoftMax
from xpnn.losses import CrossEntropyLoss
from xpnn.testing import gradient_check
from conftest import assert_close

EPS64 = np.finfo(np.float64).eps


def _batch(seed=0, batch=5, classes=4):
    rng = np.random.default_rng(seed)
    prediction = rng.random((batch, classes)) + 0.05
    prediction /= prediction.sum(axis=1, keepdims=True)
    labels = np.eye(classes)[rng.integers(0, classes, batch)]
    return prediction, labels


def test_forward_is_batch_sum_as_0d_array(backend):
    prediction, labels = _batch()
    loss = CrossEntropyLoss().forward(backend.asarray(prediction), labels)
    assert backend.owns(loss) and loss.ndim == 0
    expected = -np.sum(labels * np.log(prediction + EPS64))
    assert_close(loss, expected, rtol=1e-13)
    # a sum, not a mean: the same batch twice gives twice the loss
    doubled = CrossEntropyLoss().forward(np.vstack([prediction] * 2), np.vstack([labels] * 2))
    assert_close(doubled, 2 * expected, rtol=1e-13)


def test_backward_is_minus_label_over_prediction(backend):
    prediction, labels = _batch(seed=1)
    loss_layer = CrossEntropyLoss()
    loss_layer.forward(backend.asarray(prediction), labels)
    error = loss_layer.backward(labels)
    assert backend.owns(error)
    assert_close(error, -labels / prediction, rtol=1e-14)


def test_epsilon_is_the_dtype_machine_epsilon(backend32):
    # yhat = 0 where y = 1: the loss is exactly -log(eps) of the dtype (not of float64).
    prediction = backend32.asarray(np.array([[0.0, 1.0]]), dtype="float32")
    loss = CrossEntropyLoss().forward(prediction, np.array([[1.0, 0.0]]))
    assert loss.dtype == backend32.dtype
    eps32 = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(xpnn.to_numpy(loss), -np.log(eps32), rtol=1e-6)


def test_labels_follow_the_prediction(backend):
    """Integer NumPy labels and labels on another backend's device are moved to the prediction's."""
    prediction, labels = _batch(seed=2)
    expected = -np.sum(labels * np.log(prediction + EPS64))
    other = make_backend("array-api-strict", "float32", device="device1").asarray(labels)
    for label_tensor in (labels.astype(np.int64), other, labels.tolist()):
        loss_layer = CrossEntropyLoss()
        loss = loss_layer.forward(backend.asarray(prediction), label_tensor)
        assert backend.owns(loss) and loss.dtype == backend.dtype
        assert_close(loss, expected, rtol=1e-13)
        assert backend.owns(loss_layer.backward(label_tensor))


def test_float64_labels_with_a_float32_prediction_on_a_device_without_float64():
    """Labels in float64 on array-api-strict's default device are cast to float32 before they
    move to the prediction's 'no_float64' device (which holds no float64 array)."""
    from conftest import backend_unavailable_reason

    reason = backend_unavailable_reason("array-api-strict", "no_float64", "float32")
    if reason is not None:
        pytest.skip(reason)
    no_float64 = make_backend("array-api-strict", "float32", "no_float64")
    strict64 = make_backend("array-api-strict", "float64")
    prediction, labels = _batch(seed=5)
    prediction32 = prediction.astype(np.float32).astype(np.float64)
    eps32 = float(np.finfo(np.float32).eps)
    with xpnn.use_backend(no_float64):
        loss_layer = CrossEntropyLoss()
    label_tensor = strict64.asarray(labels, dtype=strict64.dtype)
    loss = loss_layer.forward(no_float64.asarray(prediction, dtype=no_float64.dtype), label_tensor)
    assert no_float64.owns(loss) and loss.dtype == no_float64.dtype
    assert_close(loss, -np.sum(labels * np.log(prediction32 + eps32)), rtol=1e-6)
    error = loss_layer.backward(label_tensor)
    assert no_float64.owns(error) and error.dtype == no_float64.dtype
    assert_close(error, -labels / prediction32, rtol=1e-6)


def test_gradient_check_through_softmax(backend):
    rng = np.random.default_rng(3)
    input_tensor = rng.standard_normal((4, 5))
    labels = np.eye(5)[[0, 3, 2, 4]]
    difference = gradient_check([SoftMax(), CrossEntropyLoss()], input_tensor, labels)
    assert np.max(difference) < 1e-6


def test_softmax_then_loss_gradient_is_p_minus_y(backend):
    """SoftMax.backward(CE.backward(y)) = p - y (up to rounding), the fused gradient a network may use."""
    rng = np.random.default_rng(4)
    input_tensor = rng.standard_normal((6, 3))
    labels = np.eye(3)[[0, 1, 2, 2, 1, 0]]
    softmax, loss_layer = SoftMax(), CrossEntropyLoss()
    loss_layer.forward(softmax.forward(input_tensor), labels)
    exponentials = np.exp(input_tensor - input_tensor.max(axis=1, keepdims=True))
    probabilities = exponentials / exponentials.sum(axis=1, keepdims=True)
    assert_close(softmax.backward(loss_layer.backward(labels)), probabilities - labels,
                 rtol=1e-9, atol=1e-14)


def test_shape_mismatch_names_layer_and_shapes(backend):
    prediction, labels = _batch()
    with pytest.raises(ValueError) as info:
        CrossEntropyLoss().forward(prediction, labels[:, :3])
    message = str(info.value)
    assert "CrossEntropyLoss" in message and "(5, 3)" in message and "(5, 4)" in message
    loss_layer = CrossEntropyLoss()
    loss_layer.forward(prediction, labels)
    with pytest.raises(ValueError, match="CrossEntropyLoss"):
        loss_layer.backward(labels[:4])


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="CrossEntropyLoss"):
        CrossEntropyLoss().backward(np.eye(2))


def test_confident_predictions_limits(backend):
    """Perfect prediction: loss -batch * log(1 + eps) ~ 0; zero prediction: batch * -log(eps)."""
    labels = np.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1, 2]]
    assert abs(float(xpnn.to_numpy(CrossEntropyLoss().forward(backend.asarray(labels), labels)))) < 1e-10
    high = CrossEntropyLoss().forward(backend.asarray(np.zeros_like(labels)), labels)
    # 9 * -log(2.220446049250313e-16) = 9 * 36.04365338911715
    assert_close(high, 324.39288050205435, rtol=1e-14)


@pytest.mark.parametrize("labels, indices", [([0, 2, 1, 1, 0], "labels"),
                                             ([[0], [2], [1], [1], [0]], "labels.ravel()")])
def test_class_index_labels_get_the_hint_to_one_hot_encode(backend, labels, indices):
    prediction, _ = _batch()
    for given in (np.array(labels), np.array(labels, dtype=np.float64)):
        with pytest.raises(ValueError) as info:
            CrossEntropyLoss().forward(prediction, given)
        shape = np.shape(labels)
        assert str(info.value) == (
            f"CrossEntropyLoss: the labels have shape {shape}, the prediction (5, 4): both must be "
            f"(batch, classes), the labels one-hot; these look like class indices: one-hot encode "
            f"them, e.g. np.eye(4)[{indices}]")


def test_labels_of_another_shape_name_both_shapes_without_the_one_hot_hint(backend):
    prediction, labels = _batch()
    with pytest.raises(ValueError) as info:
        CrossEntropyLoss().forward(prediction, labels[:3])
    assert str(info.value) == ("CrossEntropyLoss: the labels have shape (3, 4), the prediction (5, 4): "
                               "both must be (batch, classes), the labels one-hot")


def test_labels_of_a_prediction_that_is_not_2d_get_no_one_hot_hint():
    with pytest.raises(ValueError) as info:
        CrossEntropyLoss().forward(np.full((5, 4, 2), 0.25), np.zeros(5))
    assert "the labels have shape (5,), the prediction (5, 4, 2)" in str(info.value)
    assert "one-hot encode" not in str(info.value)


def test_to_moves_the_cached_prediction(backend):
    prediction, labels = _batch(seed=6)
    loss_layer = CrossEntropyLoss()
    with xpnn.use_backend("cpu", dtype="float64"):
        loss_layer.forward(np.array(prediction), labels)
    assert loss_layer.to(backend) is loss_layer
    error = loss_layer.backward(labels)
    assert backend.owns(error)
    assert_close(error, -labels / prediction, rtol=1e-14)
    fused = loss_layer.backward_through_softmax(labels)
    assert backend.owns(fused)
    assert_close(fused, prediction * labels.sum(axis=1, keepdims=True) - labels,
                 rtol=1e-12, atol=1e-15)


def test_to_a_backend_object_with_a_dtype_takes_that_dtype():
    prediction, labels = _batch(seed=7)
    with xpnn.use_backend("cpu", dtype="float64") as cpu:
        loss_layer = CrossEntropyLoss()
        loss_layer.forward(cpu.asarray(prediction), labels)
    loss_layer.to(make_backend("cpu", "float64"), "float32")
    assert loss_layer.backend.dtype_name == "float32"
    error = xpnn.to_numpy(loss_layer.backward(labels))
    assert error.dtype == np.float32
    prediction32 = prediction.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(error, -labels / prediction32, rtol=1e-6)


# -- a hopeless sample: the right class far below eps ----------------------------------------
# Three wrong classes at logit +100, the right one at 0: the right class's probability is
# e^-100 / 3 ~ 1.2e-44 (below eps, still a normal float64). The gradient with respect to the
# logits is p - y: 1/3 for each wrong class, about -1 for the right one (issue 18).
HOPELESS_LOGITS = np.array([[100.0, 100.0, 100.0, 0.0], [0.0, 3.0, -2.0, 1.0]])
HOPELESS_LABELS = np.array([[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])


def _softmax_reference(logits):
    """Row-wise softmax in NumPy float64 (the row max subtracted)."""
    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def test_hopeless_sample_standalone_backward_through_softmax_keeps_its_gradient(backend):
    """The course's composition, loss backward then SoftMax backward, in float64: the wrong
    classes get 1/3 each, the right class -1 (an eps in the backward gave ~1e-29 there)."""
    softmax, loss_layer = SoftMax(), CrossEntropyLoss()
    loss_layer.forward(softmax.forward(backend.asarray(HOPELESS_LOGITS)), HOPELESS_LABELS)
    error = loss_layer.backward(HOPELESS_LABELS)
    assert np.all(np.isfinite(xpnn.to_numpy(error)))
    gradient = softmax.backward(error)
    expected = _softmax_reference(HOPELESS_LOGITS) - HOPELESS_LABELS
    np.testing.assert_allclose(expected[0], [1 / 3, 1 / 3, 1 / 3, -1.0], rtol=1e-15)
    assert_close(gradient, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_hopeless_sample_fused_gradient_in_float64(backend, scale):
    """The fused gradient p * sum(y) - y for logits up to +-1e4 (the right class's probability
    is 0 there): wrong classes 1/3, right class -1, finite."""
    logits = HOPELESS_LOGITS * scale
    _check_fused_hopeless(backend, logits, rtol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_hopeless_sample_fused_gradient_in_float32(backend32, scale):
    """The same in float32, where eps ~ 1.2e-7: an eps weighting p / (p + eps) made the right
    class's gradient ~1e-37 instead of -1 (the sample taught the network almost nothing)."""
    _check_fused_hopeless(backend32, HOPELESS_LOGITS * scale, rtol=1e-5)


def _check_fused_hopeless(backend_obj, logits, rtol):
    softmax, loss_layer = SoftMax(), CrossEntropyLoss()
    prediction = softmax.forward(backend_obj.asarray(logits, dtype=backend_obj.dtype))
    loss_layer.forward(prediction, HOPELESS_LABELS)
    fused = loss_layer.backward_through_softmax(HOPELESS_LABELS)
    assert backend_obj.owns(fused) and fused.dtype == backend_obj.dtype
    expected = _softmax_reference(logits) - HOPELESS_LABELS
    np.testing.assert_allclose(expected[0], [1 / 3, 1 / 3, 1 / 3, -1.0], rtol=1e-15)
    assert_close(fused, expected, rtol=rtol, atol=1e-7 if rtol > 1e-12 else 1e-15)


def test_fused_gradient_with_soft_labels_is_p_times_label_sum_minus_label(backend):
    """Labels that are not one-hot (rows summing to other than 1): p * sum(y) - y, which is
    what the composition gives (checked against it)."""
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((5, 4)) * 3.0
    labels = rng.random((5, 4))
    softmax, loss_layer = SoftMax(), CrossEntropyLoss()
    loss_layer.forward(softmax.forward(backend.asarray(logits)), labels)
    fused = loss_layer.backward_through_softmax(labels)
    composed = xpnn.to_numpy(softmax.backward(loss_layer.backward(labels)))
    expected = _softmax_reference(logits) * labels.sum(axis=1, keepdims=True) - labels
    assert_close(fused, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(composed, expected, rtol=1e-10, atol=1e-14)
