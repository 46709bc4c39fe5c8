"""Images read row by row (ImageRows), the last step of sequences (LastStep) and the recurrent
classifier built from them (xpnn.models.recurrent)."""
import numpy as np
import pytest

import xpnn
from xpnn.initializers import Xavier
from xpnn.layers import LSTM, RNN, FullyConnected, ImageRows, LastStep, SoftMax
from xpnn.losses import CrossEntropyLoss
from xpnn.models import recurrent
from xpnn.testing import gradient_check
from conftest import assert_close, assert_passes_leave_inputs_unchanged


@pytest.mark.parametrize("shape", [(3, 5, 4), (3, 2, 5, 4)], ids=["rows", "channels"])
def test_image_rows_reads_each_row_as_a_step(backend, shape):
    images = np.random.default_rng(0).standard_normal(shape)
    layer = ImageRows()
    sequences = layer.forward(backend.asarray(images))
    features = 4 * (shape[1] if len(shape) == 4 else 1)
    assert backend.owns(sequences) and tuple(sequences.shape) == (5, 3, features)
    host = xpnn.to_numpy(sequences)
    for row in range(5):
        for image in range(3):
            expected = images[image, ..., row, :].reshape(-1)  # every channel's row, in order
            np.testing.assert_array_equal(host[row, image], expected)
    error = np.random.default_rng(1).standard_normal(tuple(sequences.shape))
    # The adjoint of a permutation is its inverse: <forward(x), e> = <x, backward(e)>.
    back = xpnn.to_numpy(layer.backward(backend.asarray(error)))
    assert back.shape == shape
    assert np.sum(host * error) == pytest.approx(np.sum(images * back), rel=1e-12)
    assert_passes_leave_inputs_unchanged(ImageRows(), images, backend)


def test_last_step_takes_the_last_step_and_sends_the_error_there(backend):
    sequences = np.random.default_rng(2).standard_normal((4, 3, 2))
    layer = LastStep()
    assert_close(layer.forward(backend.asarray(sequences)), sequences[-1], rtol=0.0)
    error = np.random.default_rng(3).standard_normal((3, 2))
    back = xpnn.to_numpy(layer.backward(backend.asarray(error)))
    expected = np.zeros_like(sequences)
    expected[-1] = error
    np.testing.assert_array_equal(back, expected)
    one_step = LastStep()
    one_step.forward(sequences[:1])
    assert_close(one_step.backward(error), error[None], rtol=0.0)


def test_shape_errors_name_the_layer(backend):
    with pytest.raises(ValueError, match=r"ImageRows: expected images of shape \(batch, rows, "
                                         r"columns\) or \(batch, channels, rows, columns\), "
                                         r"received \(3, 4\)"):
        ImageRows().forward(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"LastStep: expected sequences of shape \(time, batch, "
                                         r"features\), at least one time step, received \(3, 4\)"):
        LastStep().forward(np.zeros((3, 4)))
    rows, last = ImageRows(), LastStep()
    rows.forward(np.zeros((2, 1, 3, 4)))
    last.forward(np.zeros((3, 2, 4)))
    with pytest.raises(ValueError, match=r"ImageRows: expected error of shape \(3, 2, 4\)"):
        rows.backward(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"LastStep: expected error of shape \(2, 4\)"):
        last.backward(np.zeros((3, 2, 4)))
    for layer in (ImageRows(), LastStep()):
        with pytest.raises(RuntimeError, match="backward called before forward"):
            layer.backward(np.zeros((2, 4)))


@pytest.mark.parametrize("cell", [RNN, LSTM])
def test_the_classifier_chain_passes_a_numerical_gradient_check(backend, cell):
    """ImageRows -> cell -> LastStep -> FC -> SoftMax -> cross-entropy, on 2 images of 3 x 4
    (longer sequences make the first rows' gradients small enough for finite-difference noise)."""
    np.random.seed(7)
    layers = [ImageRows(), cell(4, 3, 3), LastStep(), FullyConnected(3, 2), SoftMax()]
    for layer in (layers[1], layers[3]):
        layer.initialize(Xavier(), Xavier())
    images = np.random.default_rng(8).standard_normal((2, 1, 3, 4))
    labels = np.eye(2)[[0, 1]]
    difference = gradient_check(layers + [CrossEntropyLoss()], images, labels)
    assert np.sum(difference) <= 1e-5


@pytest.mark.parametrize("cell", sorted(recurrent.CELLS))
def test_build_gives_the_row_by_row_classifier(backend, cell):
    net = recurrent.build(cell, hidden_size=16, output_size=8, learning_rate=1e-2)
    assert [type(layer) for layer in net.layers] == [
        ImageRows, recurrent.CELLS[cell], LastStep, FullyConnected, SoftMax]
    recurrent_layer = net.layers[1]
    assert (recurrent_layer.input_size, recurrent_layer.hidden_size,
            recurrent_layer.output_size) == (28, 16, 8)
    assert net.layers[3].input_size == 8 and net.layers[3].output_size == 10
    assert np.all(xpnn.to_numpy(recurrent_layer.weights)[-1] == 0.0)  # biases start at 0
    images = np.random.default_rng(9).random((6, 1, 28, 28))
    labels = np.eye(10)[np.arange(6)]
    losses = []
    for _ in range(8):
        loss, prediction = net.train_batch(images, labels)
        losses.append(float(xpnn.to_numpy(loss)))
    assert tuple(prediction.shape) == (6, 10) and backend.owns(prediction)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses


def test_build_refuses_an_unknown_cell_and_a_negative_weight_decay():
    with pytest.raises(ValueError, match=r"cell must be one of \['lstm', 'rnn'\], got 'gru'"):
        recurrent.build("gru")
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        recurrent.build("rnn", weight_decay=-1.0)
    net = recurrent.build("rnn", weight_decay=1e-3)
    assert net.layers[1].optimizer.regularizer.alpha == 1e-3
