"""Hot-path array operations, written once against the array API standard.

:class:`Ops` holds the generic implementations; a backend may carry a subclass
that overrides a method with a library-specific fast path, but only where a
benchmark shows it pays, and always with a test that compares it against the
generic method here (the reference).
"""
import contextlib
import functools
import operator

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
        self._ones_columns = {}  # rows -> (rows, 1) ones: see ones_column

    def ones_column(self, rows):
        """A ``(rows, 1)`` array of ones in the backend's dtype, made once per row count.

        The bias column of :class:`~xpnn.layers.FullyConnected`'s augmented input:
        shared, so never written to; made afresh each step it cost a fill (a kernel
        launch on a GPU) per layer. A few row counts are kept (a batch size and
        the last, shorter batch of an epoch).
        """
        column = self._ones_columns.get(rows)
        if column is None:
            if len(self._ones_columns) >= 4:
                self._ones_columns.clear()
            backend = self.backend
            column = self.xp.ones((rows, 1), dtype=backend.dtype, device=backend.device)
            self._ones_columns[rows] = column
        return column

    def compute_scope(self):
        """Context manager around a whole training or inference pass of a network.

        A backend sets up there, once for the pass, what its operations rely on
        (the CPU backend keeps BLAS to one thread beside its own threads; the
        GPU backend makes its device CuPy's current one); the generic one does
        nothing.
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
    def total(self, values):
        """``values[0] + values[1] + ...`` (0.0 for none): a network's regularization loss.

        Four or more 0-d arrays of this backend are summed in one reduction
        (stack and sum: two operations, kernel launches on a GPU, instead of
        one addition each); anything else (a regularizer's Python float, an
        array of another backend) is added in turn, the first value first.
        """
        if len(values) > 3 and all(self.backend.owns(value) and value.ndim == 0 for value in values):
            return self.xp.sum(self.xp.stack(values))
        return functools.reduce(operator.add, values) if values else 0.0

    def sum_of_squares(self, x):
        """``sum(x * x)`` over every entry (an L2 regularizer's norm, each training step).

        One operation: the inner product of the flattened ``x`` with itself
        (``matmul`` of two vectors), instead of a product array and its sum.
        """
        flat = self.xp.reshape(x, (-1,))
        return self.xp.matmul(flat, flat)

    def adam_update(self, weights, gradient, moments, mu, rho, step_size,
                    inverse_root_correction, epsilon, learning_rate=0.0, decay=0.0):
        """One Adam step, moments in place: see :func:`xpnn.ops.adam.adam_update`."""
        return _adam.adam_update(self.xp, weights, gradient, moments, mu, rho, step_size,
                                 inverse_root_correction, epsilon, learning_rate, decay)
