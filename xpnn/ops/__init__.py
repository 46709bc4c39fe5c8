"""Hot-path array operations, written once against the array API standard.

:class:`Ops` holds the generic implementations; a backend may carry a subclass
that overrides a method with a library-specific fast path, but only where a
benchmark shows it pays, and always with a test that compares it against the
generic method here (the reference).
"""
import contextlib

from xpnn.ops import adam as _adam
from xpnn.ops import batch_norm as _batch_norm
from xpnn.ops import conv as _conv
from xpnn.ops import pooling as _pooling
from xpnn.ops import windows as _windows


class Ops:
    """Generic (array API standard) hot paths bound to one backend.

    Parameters
    ----------
    backend : xpnn.backend.Backend
        Supplies ``xp``, ``device`` and the default ``dtype``.
    """

    def __init__(self, backend):
        self.backend = backend
        self.xp = backend.xp

    def compute_scope(self):
        """Context manager around a whole training or inference pass of a network.

        A backend may set up its threading there once instead of per operation;
        the generic one does nothing.
        """
        return contextlib.nullcontext()

    def map_samples(self, function, x):
        """``function(x)`` for a ``function`` that treats every sample (row of axis 0) on its own.

        A backend may cut the batch into pieces, run ``function`` on them at
        the same time and concatenate the results along axis 0 (the values are
        those of one call, up to the order of floating-point sums). The generic
        one makes one call. ``function`` must return one array and be safe to
        call from two threads at once.
        """
        return function(x)

    def training_pieces(self, shape):
        """``(start, stop)`` pieces along axis 0 that a training input of ``shape`` is cut into.

        See :mod:`xpnn.piecewise`; one piece means: run it whole. The generic
        one never cuts.
        """
        return [(0, shape[0])]

    def process_pass(self, layers, shape, worker):
        """A training pass of ``layers`` over a batch of ``shape`` with pieces in worker processes.

        Returns ``(pass, worker)``: the pass (``forward``, ``backward``, ``output``
        as :class:`xpnn.piecewise.PiecewisePass`) or None, and the worker to keep
        for the next call (``worker`` is the last one; it has ``close()``). The
        generic one: ``(None, worker)``, never a process.
        """
        return None, worker

    def run_pieces(self, task, count):
        """``[task(index) for index in range(count)]``; a backend may run them at the same time.

        ``task`` must be safe to call from two threads at once.
        """
        return [task(index) for index in range(count)]

    def join_samples(self, pieces):
        """The arrays ``pieces`` joined along axis 0 (the samples)."""
        return self.xp.concat(list(pieces), axis=0)

    # -- sliding windows (shared by convolution and pooling) -------------------
    def extract_windows(self, x, window_shape, strides, padding):
        """Every window of ``x``: see :func:`xpnn.ops.windows.extract_windows`."""
        return _windows.extract_windows(self.xp, self.backend.device, x, tuple(window_shape),
                                        tuple(strides), tuple(padding))

    def accumulate_windows(self, windows, spatial_shape, window_shape, strides, padding):
        """Adjoint of :meth:`extract_windows`: see :func:`xpnn.ops.windows.accumulate_windows`."""
        return _windows.accumulate_windows(self.xp, self.backend.device, windows,
                                           tuple(spatial_shape), tuple(window_shape),
                                           tuple(strides), tuple(padding))

    # -- convolution ("same" padding, strides) --------------------------------
    def im2col(self, x, kernel_shape, strides):
        """``(b, c, *spatial)`` -> columns ``(b, c*K, P)``: see :func:`xpnn.ops.conv.im2col`."""
        return _conv.im2col(self.xp, self.backend.device, x, tuple(kernel_shape), tuple(strides))

    def col2im(self, columns, spatial_shape, kernel_shape, strides):
        """Adjoint of :meth:`im2col`: see :func:`xpnn.ops.conv.col2im`."""
        return _conv.col2im(self.xp, self.backend.device, columns, tuple(spatial_shape),
                            tuple(kernel_shape), tuple(strides))

    def conv_forward(self, x, weights, bias, strides, need_backward=True):
        """Convolution output and an opaque cache: see :func:`xpnn.ops.conv.conv_forward`.

        ``need_backward=False`` (testing phase) lets a fast path use a cheaper
        forward; :meth:`conv_backward` must still work with that cache.
        """
        return _conv.conv_forward(self.xp, self.backend.device, x, weights, bias, tuple(strides))

    def conv_backward(self, error, weights, cache, input_gradient=True):
        """(input, weights, bias) gradients: see :func:`xpnn.ops.conv.conv_backward`."""
        return _conv.conv_backward(self.xp, self.backend.device, error, weights, cache,
                                   input_gradient)

    # -- ReLU -------------------------------------------------------------------
    def relu_forward(self, x, need_backward=True):
        """``max(x, 0)`` and what :meth:`relu_backward` needs.

        Inputs ``<= 0`` (-0.0 included) give +0; NaN stays NaN, as NumPy's and
        PyTorch's ``maximum(x, 0)`` have it, so that a non-finite input reaches
        the loss (where training stops on it) instead of vanishing here.
        ``need_backward=False`` (testing phase) lets a fast path skip work that
        only a backward pass uses; :meth:`relu_backward` must still work.

        Returns
        -------
        output : array, the shape of ``x``
        mask : array
            Opaque to callers; has the shape of ``x``.
        """
        mask = self.xp.logical_not(x <= 0.0)  # (true for NaN, where ``x > 0`` is false)
        return self.xp.where(mask, x, 0.0), mask

    def relu_backward(self, error, mask):
        """``error`` where the forward input was positive or NaN (as PyTorch's), +0 elsewhere."""
        if mask.dtype != self.xp.bool:
            mask = mask != 0  # another backend's mask form (the layer was moved)
        return self.xp.where(mask, error, 0.0)

    # -- batch normalization ----------------------------------------------------
    def batch_norm_forward(self, x, gamma, beta, eps, axes, statistics=None, all_sum=None):
        """Output, statistics used and an opaque cache: see :func:`xpnn.ops.batch_norm.batch_norm_forward`."""
        return _batch_norm.batch_norm_forward(self.xp, x, gamma, beta, eps, tuple(axes), statistics,
                                              all_sum)

    def batch_norm_backward(self, error, gamma, cache):
        """(input, gamma, beta) gradients: see :func:`xpnn.ops.batch_norm.batch_norm_backward`."""
        return _batch_norm.batch_norm_backward(self.xp, error, gamma, cache)

    def batch_norm_running_statistics(self, running_mean, running_variance, mean, variance,
                                      decay):
        """``decay * running + (1 - decay) * batch`` for the mean and the variance (new arrays)."""
        keep, take = decay, 1.0 - decay
        return keep * running_mean + take * mean, keep * running_variance + take * variance

    # -- dropout ------------------------------------------------------------------
    def dropout_forward(self, x, draws, probability):
        """Training-phase dropout of ``x`` given uniform ``draws`` of its shape.

        Returns
        -------
        output : array
            ``x * scale``.
        mask : array, the dtype of ``x``
            1 where ``draws < probability`` (the unit is kept), else 0.
        scale : array
            ``mask / probability``, what backward multiplies the error by.
        """
        mask = self.xp.astype(draws < probability, x.dtype)
        scale = mask / probability
        return x * scale, mask, scale

    # -- max pooling ("valid") ------------------------------------------------
    def max_pool_forward(self, x, pool_shape, strides):
        """Pooled output and an opaque cache: see :func:`xpnn.ops.pooling.max_pool_forward`."""
        return _pooling.max_pool_forward(self.xp, self.backend.device, x, tuple(pool_shape),
                                         tuple(strides))

    def max_pool_backward(self, error, cache):
        """Error routed to each window's first maximum.

        See :func:`xpnn.ops.pooling.max_pool_backward`.
        """
        return _pooling.max_pool_backward(self.xp, self.backend.device, error, cache)

    # -- optimizers and regularizers ----------------------------------------------
    def sum_of_squares(self, x):
        """``sum(x * x)`` over every entry (an L2 regularizer's norm, each training step)."""
        return self.xp.sum(x * x)

    def adam_update(self, weights, gradient, moments, mu, rho, step_size,
                    inverse_root_correction, epsilon, learning_rate=0.0, decay=0.0):
        """One Adam step, moments in place: see :func:`xpnn.ops.adam.adam_update`."""
        return _adam.adam_update(self.xp, weights, gradient, moments, mu, rho, step_size,
                                 inverse_root_correction, epsilon, learning_rate, decay)
