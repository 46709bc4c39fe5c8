"""Dropout: inverted scaling, keep rate, identity in testing phase, mask reuse, reproducibility."""
import numpy as np
import pytest

import xpnn
from xpnn.backend import make_backend
from xpnn.layers.dropout import Dropout
from xpnn.testing import L2Loss, gradient_check
from conftest import FLOAT32_ONE_SEED, FLOAT32_ONE_SHAPE, assert_close, float32_draws_at_one


def test_gradient_check_input(backend):
    np.random.seed(1)
    input_tensor = np.random.random((5, 10))
    label_tensor = np.random.random((5, 10))
    layers = [Dropout(0.5), L2Loss()]
    difference = gradient_check(layers, input_tensor, label_tensor, seed=1337)
    assert np.max(difference) < 1e-5


@pytest.mark.parametrize("probability", [0.25, 0.5, 0.8, 1.0])
def test_keep_rate_and_scaling(backend, probability):
    layer = Dropout(probability)
    output = xpnn.to_numpy(layer.forward(np.ones((400, 250))))
    kept = output != 0
    # 1e5 Bernoulli draws: the standard error of the kept fraction is <= 0.0016.
    assert abs(np.mean(kept) - probability) < 0.01
    np.testing.assert_allclose(output[kept], 1.0 / probability, rtol=1e-15)
    assert abs(np.mean(output) - 1.0) < 0.03   # inverted dropout keeps the expectation


def test_output_and_mask_on_backend(backend):
    layer = Dropout(0.5)
    output = layer.forward(np.ones((3, 4)))
    assert backend.owns(output) and backend.owns(layer.mask)
    mask = xpnn.to_numpy(layer.mask)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert_close(output, mask / 0.5)


def test_testing_phase_is_identity(backend):
    np.random.seed(2)
    input_tensor = np.random.standard_normal((6, 7))
    error_tensor = np.random.standard_normal((6, 7))
    layer = Dropout(0.3)
    layer.testing_phase = True
    assert_close(layer.forward(input_tensor), input_tensor, rtol=0)
    assert_close(layer.backward(error_tensor), error_tensor, rtol=0)


def test_backward_uses_forward_mask(backend):
    np.random.seed(3)
    input_tensor = np.random.random((8, 9)) + 0.5   # no zeros: the output shows the mask
    error_tensor = np.random.standard_normal((8, 9))
    layer = Dropout(0.4)
    output = xpnn.to_numpy(layer.forward(input_tensor))
    kept = (output != 0).astype(np.float64)
    assert_close(layer.backward(error_tensor), error_tensor * kept / 0.4, rtol=1e-15)
    # a second backward without a new forward still uses that mask
    assert_close(layer.backward(error_tensor), error_tensor * kept / 0.4, rtol=1e-15)


def test_forward_does_not_modify_input(backend):
    host = np.random.random((4, 5))
    input_tensor = backend.asarray(host.copy())
    Dropout(0.5).forward(input_tensor)
    assert_close(input_tensor, host, rtol=0)


def test_numpy_seed_reproduces_masks():
    with xpnn.use_backend("cpu", dtype="float64"):
        shape, probability = (20, 30), 0.6
        input_tensor = np.random.random(shape)
        layer = Dropout(probability)
        np.random.seed(7)
        first = layer.forward(input_tensor)
        np.random.seed(7)
        second = layer.forward(input_tensor)
        np.random.seed(7)
        reference = input_tensor * (np.random.random_sample(shape) < probability) / probability
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, reference, rtol=1e-15)


def test_host_random_gives_the_same_mask_on_every_backend(backend):
    shape, probability = (16, 12), 0.5
    input_tensor = np.random.random(shape) + 0.5
    layer = Dropout(probability)
    with xpnn.host_random():
        np.random.seed(11)
        output = layer.forward(input_tensor)
    np.random.seed(11)
    reference_mask = np.random.random_sample(shape) < probability
    assert_close(output, input_tensor * reference_mask / probability, rtol=1e-15)


def test_float32_stays_float32(backend32):
    layer = Dropout(0.5)
    output = layer.forward(np.ones((4, 6), dtype=np.float32))
    error = layer.backward(np.ones((4, 6), dtype=np.float32))
    assert xpnn.to_numpy(output).dtype == np.float32
    assert xpnn.to_numpy(error).dtype == np.float32


def test_dropout_one_keeps_every_unit_in_float32_even_where_a_draw_rounds_to_one():
    _, at_one = float32_draws_at_one()  # (a draw of this seed rounds to 1.0 in float32)
    with xpnn.use_backend("cpu", dtype="float32"):
        layer = Dropout(1.0)
        np.random.seed(FLOAT32_ONE_SEED)
        output = xpnn.to_numpy(layer.forward(np.ones(FLOAT32_ONE_SHAPE, dtype=np.float32)))
        error = xpnn.to_numpy(layer.backward(np.full(FLOAT32_ONE_SHAPE, 2.0, dtype=np.float32)))
    assert at_one.sum() == 1
    np.testing.assert_array_equal(output, np.ones(FLOAT32_ONE_SHAPE, dtype=np.float32))
    np.testing.assert_array_equal(error, np.full(FLOAT32_ONE_SHAPE, 2.0, dtype=np.float32))


@pytest.mark.parametrize("probability", [0.0, -0.5, 1.5, float("nan"), "half"])
def test_bad_probability(probability):
    with pytest.raises(ValueError, match="Dropout"):
        Dropout(probability)


def test_bad_error_shape(backend):
    layer = Dropout(0.5)
    layer.forward(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"Dropout.*\(3, 5\).*\(3, 4\)"):
        layer.backward(np.ones((3, 5)))


def test_to_moves_the_mask():
    with xpnn.use_backend("cpu", dtype="float64"):
        layer = Dropout(0.5)
        layer.forward(np.ones((3, 4)))
    strict = make_backend("array-api-strict", "float64", "device1")
    layer.to(strict)
    error = layer.backward(np.ones((3, 4)))
    assert strict.owns(error)


def test_backward_follows_the_phase_of_the_last_forward_not_the_current_one(backend):
    np.random.seed(4)
    input_tensor = np.random.random((6, 8)) + 0.5   # no zeros: the output shows the mask
    error_tensor = np.random.standard_normal((6, 8))
    layer = Dropout(0.5)
    kept = (xpnn.to_numpy(layer.forward(input_tensor)) != 0).astype(np.float64)
    assert 0 < kept.sum() < kept.size
    layer.testing_phase = True      # switched after a training forward: its mask still applies
    assert_close(layer.backward(error_tensor), error_tensor * kept / 0.5, rtol=1e-15)
    layer.forward(input_tensor)     # a testing-phase forward is the identity ...
    layer.testing_phase = False     # ... and so is the backward after it, whatever the phase now
    assert_close(layer.backward(error_tensor), error_tensor, rtol=0)


def test_a_draw_equal_to_the_probability_drops_its_unit(backend):
    # Draws are uniform on [0, 1): a unit is kept for draws in [0, p), with probability p.
    draws = backend.asarray(np.array([[0.0, 0.25, 0.5 - 2.0 ** -53, 0.5, 0.75]]))
    x = backend.asarray(np.full((1, 5), 3.0))
    output, mask, scale = backend.ops.dropout_forward(x, draws, 0.5)
    assert_close(mask, [[1.0, 1.0, 1.0, 0.0, 0.0]], rtol=0)
    assert_close(scale, [[2.0, 2.0, 2.0, 0.0, 0.0]], rtol=0)
    assert_close(output, [[6.0, 6.0, 6.0, 0.0, 0.0]], rtol=0)


class GivenDraws(Dropout):
    """Dropout whose draws come from the test (as a subclass for a batch spread over several
    processes returns its rows of the whole batch's draws)."""

    def __init__(self, probability, draws):
        super().__init__(probability)
        self.draws = draws
        self.shapes = []

    def draw_uniform(self, shape):
        self.shapes.append(shape)
        return self.backend.asarray(self.draws, dtype=self.backend.dtype)


def test_forward_draws_its_mask_through_draw_uniform(backend):
    draws = np.array([[0.1, 0.7, 0.4], [0.9, 0.2, 0.6]])
    layer = GivenDraws(0.5, draws)
    x = np.arange(1.0, 7.0).reshape((2, 3))
    output = layer.forward(x)
    assert layer.shapes == [(2, 3)]
    assert_close(output, np.where(draws < 0.5, x / 0.5, 0.0), rtol=1e-15)
    assert_close(layer.backward(np.ones((2, 3))), np.where(draws < 0.5, 2.0, 0.0), rtol=1e-15)


def test_draw_uniform_draws_from_the_backends_generator(backend):
    layer = Dropout(0.5)
    xpnn.seed(11)
    draws = xpnn.to_numpy(layer.draw_uniform((3, 4)))
    xpnn.seed(11)
    assert_close(backend.random_uniform((3, 4)), draws, rtol=0.0)
    assert draws.shape == (3, 4) and np.all((draws >= 0.0) & (draws < 1.0))
