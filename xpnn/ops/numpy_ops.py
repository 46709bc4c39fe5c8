"""NumPy fast paths for the hot operations of the ``"cpu"`` backend.

:class:`NumpyOps` overrides the convolution, max-pooling, ReLU and batch-norm
methods of the generic :class:`xpnn.ops.Ops` (which stays the reference that
``tests/test_fastpaths.py`` compares these against). ``xpnn/backend.py``
selects it for the NumPy backend; this module is NumPy-specific code and may
therefore use NumPy directly.

Internal layout: batch innermost
--------------------------------
Arrays keep the public shape ``(b, c, y, x)``, but what these functions return
is a transposed *view* of a contiguous ``(c, y, x, b)`` array (the batch is the
fastest-varying axis in memory). Every shifted-window slice of such an array
copies runs of ``x * b`` (or ``b``) contiguous values instead of a few
values per row, which makes im2col, col2im and pooling 2-4x cheaper than on
channel-first arrays, and the columns come out ready for one large matrix
product ``(k, c*m*n) @ (c*m*n, y*x*b)`` instead of a batch of small ones.

NumPy's element-wise functions keep an input's memory order (``order="K"``),
so the layout survives ReLU, batch normalization and dropout between two
convolutions for free, and turning such a view back into ``(c, y, x, b)`` is
free too. An input in the ordinary C order is transposed once (one copy).
Values never depend on the layout; only strides do.

Threads and a worker process
----------------------------
Each operation splits into independent parts (output rows of a convolution,
channels elsewhere) that a :class:`xpnn.ops.threads.Team` runs at the same
time, one per core, with BLAS limited to one thread meanwhile (two BLAS calls
each asking for every core would fight over them; this needs threadpoolctl).
Small operations run in one part. ``NumpyOps.threads`` (default: the
``XPNN_NUM_THREADS`` environment variable, else the usable cores, at most 4)
sets the number of parts; results do not depend on it beyond the order of
floating-point sums. During a network's pass (:meth:`NumpyOps.compute_scope`)
BLAS stays at one thread throughout: BLAS threads spin while they wait, which
on a busy machine made training 2-3x slower (measured with one competing
process: OpenBLAS on 2 threads 2.2-2.7x slower than one thread, these parts
0.9-1.0x). ``XPNN_NUM_THREADS=1`` leaves BLAS its own threads instead.

On two cores a training batch of 64 or more runs half in a forked worker
process instead (:attr:`NumpyOps.processes`, :mod:`xpnn.ops.numpy_processes`): two
processes share no GIL and hand over through shared memory in microseconds, which
the threads could not match at that size.
"""
import contextlib
import functools
import threading

import numpy as np

from xpnn.ops import Ops
from xpnn.ops.numpy_columns import (
    ConvCache,
    ConvInputCache,
    Geometry,
    NormCache,
    NormState,
    PoolCache,
    channel_index,
    conv_backward_job,
    interior_view,
    normalize_channels,
    normalize_piece,
    pool_quarters,
    row_dots,
    same_width_integer,
    window_view,
    zero_padded)
from xpnn.ops.numpy_settings import blas_controller, can_fork, default_processes, default_threads
from xpnn.ops.threads import Team, split_range

#: Convolutions with fewer column entries than this run in one part (a hand-off to a
#: helper thread costs 50-150 µs on a virtual machine).
MIN_PARALLEL_COLUMNS = 1 << 18
#: A weight gradient (kernels x column rows) smaller than this is one matrix product:
#: with so few outputs its long inner dimension does not share well. LeNet's first
#: convolution (6 x 25, batch 64): 0.67 ms in one call, 0.84 ms as two halves on two
#: threads (its backward in a training step 0.98 instead of 1.17 ms); the second
#: (16 x 150): 1.07 ms in one call, 0.61 ms as two halves.
MIN_PARALLEL_WEIGHT_GRADIENT = 1 << 10
#: Element-wise operations (ReLU, pooling, batch norm) on fewer elements than this run
#: in one part: at ~1 ns per element they gain less than the hand-off costs.
MIN_PARALLEL_ELEMENTS = 1 << 21
#: A batch runs through :meth:`NumpyOps.map_samples` (and a training batch through
#: :meth:`NumpyOps.training_pieces`) in pieces from this many samples per thread: a
#: piece must be large enough that NumPy spends far more time in its loops (GIL
#: released) than in the layers' Python code (GIL held).
MIN_SAMPLES_PER_THREAD = 128
#: A training batch runs its second half in a worker process (``NumpyOps.processes = 2``)
#: from this many samples per piece.
MIN_SAMPLES_PER_PROCESS = 32
#: Columns per block of output rows of a testing-phase convolution: the block's buffer
#: stays in cache from im2col to the matrix product. Measured on one thread, 128 samples:
#: LeNet's first convolution 10.6 ms in cache-sized batch chunks (each chunk's output then
#: copied into a strided slice), 2.5 ms in row blocks of 512 KiB or 1 MiB, 4.4 ms of 3 MiB;
#: the second 8.1 ms in chunks, 3.8-3.9 ms in row blocks of 512 KiB-1 MiB. A whole
#: LeNet pass over 500 images went from ~40 to 29.4 ms.
BLOCK_BYTES = 1 << 20


def batch_innermost(x):
    """``(b, c, *spatial)`` -> a C-contiguous ``(c, *spatial, b)`` (free for our own views)."""
    return np.ascontiguousarray(np.transpose(x, tuple(range(1, x.ndim)) + (0,)))


def batch_outermost(t):
    """``(c, *spatial, b)`` -> a ``(b, c, *spatial)`` view (no copy)."""
    return np.transpose(t, (t.ndim - 1,) + tuple(range(t.ndim - 1)))


class NumpyOps(Ops):
    """:class:`xpnn.ops.Ops` with batch-innermost, multi-threaded NumPy hot paths.

    Convolutions (1-D ones run as 2-D with a trailing axis of size 1), 2x2
    max pooling with stride 2, ReLU and batch normalization of images; other
    cases use the generic methods.

    Attributes
    ----------
    threads : int
        How many parts (threads) an operation is split into.
    processes : int
        2: a training batch of at least 2 x :data:`MIN_SAMPLES_PER_PROCESS`
        runs its second half in a worker process (:mod:`xpnn.ops.numpy_processes`);
        1: never. Default: ``XPNN_PROCESSES``, else 2 with 2 threads.
    """

    def __init__(self, backend, threads=None, processes=None):
        super().__init__(backend)
        self._team = Team(1)
        self._scoped = _Depth()
        self.threads = default_threads() if threads is None else threads
        self.processes = default_processes(self.threads) if processes is None else processes

    @property
    def threads(self):
        return self._team.size

    @threads.setter
    def threads(self, count):
        if int(count) != self._team.size:
            self._team = Team(int(count))

    def _parts(self, length, elements, minimum=MIN_PARALLEL_ELEMENTS):
        """``(start, stop)`` pieces of ``range(length)``: one per thread for a job this large."""
        return split_range(length, self.threads if elements >= minimum else 1)

    @contextlib.contextmanager
    def compute_scope(self):
        """Keep BLAS to one thread for a whole pass when this splits operations into threads.

        Otherwise every BLAS call outside the split operations (the fully
        connected layers) wakes BLAS's own threads, which then spin-wait on the
        cores the helper threads need.
        """
        controller = blas_controller()
        limit = self.threads > 1 and not self._scoped.depth and controller is not None
        with controller.limit(limits=1) if limit else contextlib.nullcontext():
            self._scoped.depth += 1
            try:
                yield
            finally:
                self._scoped.depth -= 1

    def _parallel(self, task, parts):
        """``[task(part) for part in parts]``, computed at the same time."""
        if len(parts) == 1 or self.threads == 1 or self._team.inside_part():
            # (Inside a part, e.g. a piece of a batch, the team runs them in turn anyway.)
            return [task(part) for part in parts]
        controller = blas_controller()
        if self._scoped.depth or controller is None:
            return self._team.run(task, parts)
        with controller.limit(limits=1):
            return self._team.run(task, parts)

    def map_samples(self, function, x):
        """Same contract as :meth:`xpnn.ops.Ops.map_samples`: pieces of the batch on the threads.

        Inference of a large batch pays no hand-off per operation this way: each
        thread runs a whole pass over its piece, and the operations inside
        run in one part each.
        """
        pieces = split_range(x.shape[0], min(self.threads, x.shape[0] // MIN_SAMPLES_PER_THREAD))
        if len(pieces) == 1:
            return function(x)
        return np.concatenate(self._parallel(lambda piece: function(x[piece[0]:piece[1]]), pieces))

    def training_pieces(self, shape):
        """One piece per thread from :data:`MIN_SAMPLES_PER_THREAD` samples each, else one piece.

        Each thread then runs the whole training pass on its piece (one hand-off
        per pass instead of one per operation): LeNet at batch 256 on 2 threads
        0.84-0.90x the time of splitting each operation, with batch norm and
        dropout 0.88x. Pieces of 32 at batch 64 gained nothing (1.02x).
        """
        if self._team.inside_part():  # the pieces could not run at the same time
            return [(0, shape[0])]
        return split_range(shape[0], min(self.threads, shape[0] // MIN_SAMPLES_PER_THREAD))

    def process_pass(self, layers, shape, worker):
        """Same contract as :meth:`xpnn.ops.Ops.process_pass`: the batch's halves in this
        process and a forked worker (:mod:`xpnn.ops.numpy_processes`) where
        :meth:`process_pieces` cuts it."""
        pieces = self.process_pieces(shape)
        if pieces is None:
            return None, worker
        from xpnn.ops import numpy_processes  # (multiprocessing is imported only when used)

        return numpy_processes.process_pass(layers, pieces, shape, self.backend.dtype_name, worker)

    def process_pieces(self, shape):
        """Halves of a training batch of at least 2 x :data:`MIN_SAMPLES_PER_PROCESS` when
        :attr:`processes` is 2 (and fork and threadpoolctl are available), else None."""
        if (self.processes < 2 or shape[0] < 2 * MIN_SAMPLES_PER_PROCESS or self._team.inside_part()
                or blas_controller() is None or not can_fork()):
            return None
        return split_range(shape[0], 2)

    @contextlib.contextmanager
    def one_part(self):
        """Context manager: this thread's operations run in one part, BLAS on one thread (a
        piece of a batch runs beside it, in a worker process)."""
        controller = blas_controller()
        with self._team.alone(), controller.limit(limits=1) if controller else contextlib.nullcontext():
            yield

    def run_pieces(self, task, count):
        """Same contract as :meth:`xpnn.ops.Ops.run_pieces`: the pieces shared out over the threads."""
        groups = self._parallel(lambda group: [task(index) for index in range(*group)],
                                split_range(count, self.threads))
        return [result for group in groups for result in group]

    def join_samples(self, pieces):
        """Same contract as :meth:`xpnn.ops.Ops.join_samples`; images stay batch-innermost."""
        pieces = list(pieces)
        if all(piece.ndim == 4 for piece in pieces):
            return batch_outermost(np.concatenate([batch_innermost(piece) for piece in pieces], axis=-1))
        return np.concatenate(pieces, axis=0)

    # -- convolution ----------------------------------------------------------
    def conv_forward(self, x, weights, bias, strides, need_backward=True):
        """Same contract as :meth:`xpnn.ops.Ops.conv_forward` (cache differs; opaque).

        Without ``need_backward`` the columns are built a block of output rows
        at a time into a small buffer that stays in cache (2-4x faster), and
        none are kept: the cache then holds a copy of the input, and a backward
        pass rebuilds the columns.
        """
        if x.ndim == 3:
            output, cache = self.conv_forward(x[..., None], weights[..., None], bias,
                                              tuple(strides) + (1,), need_backward)
            return output[..., 0], cache
        if x.ndim != 4:
            return super().conv_forward(x, weights, bias, strides, need_backward)
        geometry = Geometry(tuple(x.shape[1:]), tuple(weights.shape[2:]), tuple(strides), x.shape[0])
        inputs = batch_innermost(x)
        if not need_backward:
            output = self._conv_forward_in_row_blocks(inputs, weights, bias, geometry)
            if np.may_share_memory(inputs, x):  # the caller may change x before a backward pass
                inputs = np.array(inputs, copy=True)
            return batch_outermost(output), ConvInputCache((inputs, geometry))
        columns, output = self._conv_forward_columns(inputs, weights, bias, geometry)
        return batch_outermost(output), ConvCache((columns, geometry))

    def _conv_forward_columns(self, inputs, weights, bias, geometry):
        """Columns ``(c, m, n, y', x', b)`` and output ``(k, y', x', b)``, split by output rows.

        ``weights=None``: the columns only.
        """
        windows = _padded_windows(inputs, geometry)
        columns = np.empty(geometry.columns_shape, dtype=inputs.dtype)
        flat_columns = np.reshape(columns, (geometry.channels * geometry.kernel_size, -1))
        output = None
        if weights is not None:
            output = np.empty((weights.shape[0],) + geometry.output_shape + (inputs.shape[3],),
                              dtype=inputs.dtype)
            flat_weights = np.reshape(weights, (weights.shape[0], -1))
            flat_output = np.reshape(output, (weights.shape[0], -1))

        def output_rows(rows):
            # One copy per part: a part that needs the GIL less often runs better beside another.
            columns[:, :, :, rows[0]:rows[1]] = windows[:, :, :, rows[0]:rows[1]]
            if weights is not None:
                block = geometry.column_block(rows)
                np.matmul(flat_weights, flat_columns[:, block], out=flat_output[:, block])
                flat_output[:, block] += np.reshape(bias, (-1, 1))

        rows = geometry.output_shape[0]
        self._parallel(output_rows, self._parts(rows, columns.size, MIN_PARALLEL_COLUMNS))
        return columns, output

    def _conv_forward_in_row_blocks(self, inputs, weights, bias, geometry):
        """Output ``(k, y', x', b)``, its columns built block by block in a cached buffer (none kept)."""
        windows = _padded_windows(inputs, geometry)
        column_rows = geometry.channels * geometry.kernel_size
        output = np.empty((weights.shape[0],) + geometry.output_shape + (inputs.shape[3],),
                          dtype=inputs.dtype)
        flat_weights = np.reshape(weights, (weights.shape[0], -1))
        flat_output = np.reshape(output, (weights.shape[0], -1))
        block_rows = max(1, BLOCK_BYTES // (column_rows * geometry.row_size * inputs.itemsize))

        def output_rows(rows):
            buffer = np.empty((column_rows, block_rows * geometry.row_size), dtype=inputs.dtype)
            for start in range(rows[0], rows[1], block_rows):
                stop = min(start + block_rows, rows[1])
                columns = buffer[:, :(stop - start) * geometry.row_size]
                # Each axis of the 2-D view splits on its own: a view, no copy.
                window_shape = geometry.columns_shape[:3] + (stop - start,) + geometry.columns_shape[4:]
                np.reshape(columns, window_shape)[...] = windows[:, :, :, start:stop]
                block = geometry.column_block((start, stop))
                np.matmul(flat_weights, columns, out=flat_output[:, block])
                flat_output[:, block] += np.reshape(bias, (-1, 1))

        rows = geometry.output_shape[0]
        columns_size = geometry.columns_size(inputs.shape[3])
        self._parallel(output_rows, self._parts(rows, columns_size, MIN_PARALLEL_COLUMNS))
        return output

    def conv_backward(self, error, weights, cache, input_gradient=True):
        """Same contract as :meth:`xpnn.ops.Ops.conv_backward`."""
        if error.ndim == 3:
            gradients = self.conv_backward(error[..., None], weights[..., None], cache,
                                           input_gradient)
            gradient_input, gradient_weights, gradient_bias = gradients
            if gradient_input is not None:
                gradient_input = gradient_input[..., 0]
            return gradient_input, gradient_weights[..., 0], gradient_bias
        if isinstance(cache, ConvInputCache):  # after a testing-phase forward
            inputs, geometry = cache
            columns, _ = self._conv_forward_columns(inputs, None, None, geometry)
            cache = ConvCache((columns, geometry))
        if not isinstance(cache, ConvCache):
            return super().conv_backward(error, weights, cache, input_gradient)
        columns, geometry = cache
        flat_error = np.reshape(batch_innermost(error), (weights.shape[0], -1))
        flat_weights = np.reshape(weights, (weights.shape[0], -1))
        flat_columns = np.reshape(columns, (flat_weights.shape[1], -1))
        gradient = None
        if input_gradient:
            gradient = zero_padded(geometry.input_shape, geometry.padding, error.dtype)
        job = functools.partial(conv_backward_job, flat_error, flat_weights, flat_columns,
                                gradient, geometry)
        jobs = self._conv_backward_jobs(geometry, columns.size, input_gradient, weights.shape[0])
        outcomes = self._parallel(job, jobs)
        partials = [outcome for outcome in outcomes if outcome is not None]
        gradient_bias = functools.reduce(np.add, (partial[0] for partial in partials))
        gradient_weights = np.reshape(functools.reduce(np.add, (partial[1] for partial in partials)),
                                      weights.shape)
        if not input_gradient:
            return None, gradient_weights, gradient_bias
        interior = interior_view(gradient, geometry.input_shape, geometry.padding)
        return batch_outermost(interior), gradient_weights, gradient_bias

    def _conv_backward_jobs(self, geometry, columns_size, input_gradient, kernels):
        """The parts of a backward pass: ``None`` for the input gradient, output rows for the rest.

        The input gradient (a product, then col2im's many short ``+=`` calls)
        runs on the calling thread; the weight gradient splits by output rows
        over the others (two long calls each, the GIL released throughout),
        unless it is a small product (:data:`MIN_PARALLEL_WEIGHT_GRADIENT`).
        """
        products = kernels * geometry.channels * geometry.kernel_size
        splittable = columns_size if products >= MIN_PARALLEL_WEIGHT_GRADIENT else 0
        parts = len(self._parts(geometry.output_shape[0], splittable, MIN_PARALLEL_COLUMNS))
        weight_parts = parts - 1 if input_gradient and parts > 1 else parts
        rows = split_range(geometry.output_shape[0], weight_parts)
        return ([None] if input_gradient else []) + rows

    # -- ReLU -------------------------------------------------------------------
    def relu_forward(self, x, need_backward=True):
        """Same results as :meth:`xpnn.ops.Ops.relu_forward`, bit for bit.

        ``np.where`` branches per element and costs ~5 ns per value on a
        ReLU's random sign pattern; AND-ing the value's bits with an integer
        mask of all ones (keep) or zeros (+0.0) is branch-free and ~10x faster.
        The mask is that integer array (same memory order as ``x``).

        Without ``need_backward`` it is ``fmax(x, 0)`` in one pass (NaN and -0.0
        give +0.0 as well), and the output stands in for the mask: it is
        positive exactly where ``x`` is (a backward pass after a testing-phase
        forward reads it, so it must not be modified in place meanwhile).
        """
        output = np.empty_like(x)
        if not need_backward:
            def maximum(part):
                index = channel_index(part)
                np.fmax(x[index], 0.0, out=output[index])

            self._parallel(maximum, self._channel_parts(x))
            return output, output
        integer = same_width_integer(x.dtype)
        mask = np.empty_like(x, dtype=integer)

        def channels(part):
            index = channel_index(part)
            np.negative(np.greater(x[index], 0.0).view(np.int8), dtype=integer, out=mask[index])
            np.bitwise_and(x[index].view(integer), mask[index], out=output[index].view(integer))

        self._parallel(channels, self._channel_parts(x))
        return output, mask

    def relu_backward(self, error, mask):
        """Same results as :meth:`xpnn.ops.Ops.relu_backward`, bit for bit."""
        if not (isinstance(mask, np.ndarray) and mask.dtype.kind in "if"):
            return super().relu_backward(error, mask)
        integer = same_width_integer(error.dtype)
        if mask.dtype.kind == "f":  # the output of a testing-phase forward
            mask = np.negative(np.greater(mask, 0.0).view(np.int8), dtype=integer)
        elif mask.dtype != integer:
            mask = mask.astype(integer)
        output = np.empty_like(error)

        def channels(part):
            index = channel_index(part)
            np.bitwise_and(error[index].view(integer), mask[index],
                           out=output[index].view(integer))

        self._parallel(channels, self._channel_parts(error))
        return output

    def _channel_parts(self, x):
        """Parts along axis 1 (the channels) of an activation, or one part."""
        if x.ndim < 2:
            return [None]
        return self._parts(x.shape[1], x.size)

    # -- batch normalization ----------------------------------------------------
    def batch_norm_forward(self, x, gamma, beta, eps, axes, statistics=None, all_sum=None):
        """Same contract as :meth:`xpnn.ops.Ops.batch_norm_forward` (cache differs; opaque).

        Images are normalized as a ``(c, y*x*b)`` matrix (free for the
        batch-innermost views the other fast paths return): every reduction
        runs along contiguous rows, where the generic reduction over axes
        (0, 2, 3) walks the array with strides (~7x slower here).
        """
        if x.ndim != 4 or tuple(axes) != (0, 2, 3):
            return super().batch_norm_forward(x, gamma, beta, eps, axes, statistics, all_sum)
        inputs = batch_innermost(x)
        rows = np.reshape(inputs, (inputs.shape[0], -1))
        state = NormState(rows, statistics)
        if all_sum is not None and statistics is None:
            normalize_piece(state, rows, gamma, beta, eps, all_sum)
        else:
            def channels(part):
                normalize_channels(state, rows, gamma, beta, eps, slice(*part))

            self._parallel(channels, self._parts(rows.shape[0], rows.size))
            all_sum = None
        output = batch_outermost(np.reshape(state.output, inputs.shape))
        cache = NormCache((state.normalized, state.inverse_std, statistics is None, all_sum))
        return output, (state.mean, state.variance), cache

    def batch_norm_backward(self, error, gamma, cache):
        """Same contract as :meth:`xpnn.ops.Ops.batch_norm_backward`."""
        if not isinstance(cache, NormCache):
            return super().batch_norm_backward(error, gamma, cache)
        normalized, inverse_std, batch_statistics, all_sum = cache
        errors = batch_innermost(error)
        rows = np.reshape(errors, normalized.shape)
        gradient = np.empty_like(rows)
        gradient_gamma = np.empty(rows.shape[0], dtype=rows.dtype)
        gradient_beta = np.empty(rows.shape[0], dtype=rows.dtype)
        totals = None  # the whole batch's (count, Σ e x̂, Σ e) when this is one piece of it

        def channels(part):
            c = slice(*part)
            if totals is None:  # (else computed below, before the sums over the pieces)
                gradient_beta[c] = np.sum(rows[c], axis=1)
                gradient_gamma[c] = row_dots(rows[c], normalized[c])
            scale = (gamma[c] * inverse_std[c])[:, None]
            if not batch_statistics:
                np.multiply(rows[c], scale, out=gradient[c])
                return
            count, projection, error_sum = totals or (rows.shape[1], gradient_gamma, gradient_beta)
            # (e - mean(e) - x̂ mean(e x̂)) γ/σ: γ is per channel, so it factors out of the means.
            np.multiply(normalized[c], (projection[c] / count)[:, None], out=gradient[c])
            np.subtract(rows[c], gradient[c], out=gradient[c])
            gradient[c] -= (error_sum[c] / count)[:, None]
            gradient[c] *= scale

        if all_sum is None:
            self._parallel(channels, self._parts(rows.shape[0], rows.size))
        else:  # the sums of every piece first (this runs on one of the pieces' threads)
            gradient_beta[...] = np.sum(rows, axis=1)
            gradient_gamma[...] = row_dots(rows, normalized)
            totals = all_sum(rows.shape[1], gradient_gamma, gradient_beta)
            channels((0, rows.shape[0]))
        return batch_outermost(np.reshape(gradient, errors.shape)), gradient_gamma, gradient_beta

    # -- max pooling ----------------------------------------------------------
    def max_pool_forward(self, x, pool_shape, strides):
        """Same contract as :meth:`xpnn.ops.Ops.max_pool_forward` (cache differs; opaque).

        The maximum of the four strided quarter-slices; three boolean arrays
        record where each window's first maximum (row-major) lies: the top
        row wins ties with the bottom row, the left column with the right one.
        """
        if x.ndim != 4 or tuple(pool_shape) != (2, 2) or tuple(strides) != (2, 2):
            return super().max_pool_forward(x, pool_shape, strides)
        inputs = batch_innermost(x)
        pooled_shape = (inputs.shape[0], inputs.shape[1] // 2, inputs.shape[2] // 2, inputs.shape[3])
        output = np.empty(pooled_shape, dtype=x.dtype)
        routing = tuple(np.empty(pooled_shape, dtype=bool) for _ in range(3))

        def channels(part):
            c = slice(*part)
            quarters = pool_quarters(inputs[c])
            top = np.maximum(quarters[0], quarters[1])
            bottom = np.maximum(quarters[2], quarters[3])
            np.maximum(top, bottom, out=output[c])
            np.greater_equal(top, bottom, out=routing[0][c])
            np.greater_equal(quarters[0], quarters[1], out=routing[1][c])
            np.greater_equal(quarters[2], quarters[3], out=routing[2][c])

        self._parallel(channels, self._parts(inputs.shape[0], inputs.size))
        return batch_outermost(output), PoolCache((tuple(inputs.shape), routing))

    def max_pool_backward(self, error, cache):
        """Same contract as :meth:`xpnn.ops.Ops.max_pool_backward`."""
        if not isinstance(cache, PoolCache):
            return super().max_pool_backward(error, cache)
        input_shape, (top_wins, left_wins_top, left_wins_bottom) = cache
        error = batch_innermost(error)
        gradient = np.empty(input_shape, dtype=error.dtype)
        # An odd last row or column lies in no window.
        gradient[:, input_shape[1] // 2 * 2:] = 0.0
        gradient[:, :, input_shape[2] // 2 * 2:] = 0.0

        def channels(part):
            c = slice(*part)
            quarters = pool_quarters(gradient[c])
            top_error = error[c] * top_wins[c]
            bottom_error = error[c] - top_error
            np.multiply(top_error, left_wins_top[c], out=quarters[0])
            np.subtract(top_error, quarters[0], out=quarters[1])
            np.multiply(bottom_error, left_wins_bottom[c], out=quarters[2])
            np.subtract(bottom_error, quarters[2], out=quarters[3])

        self._parallel(channels, self._parts(input_shape[0], gradient.size))
        return batch_outermost(gradient)

    # -- optimizers --------------------------------------------------------------
    def adam_update(self, weights, gradient, moments, mu, rho, step_size,
                    inverse_root_correction, epsilon, learning_rate=0.0, decay=0.0):
        """Same results as :meth:`xpnn.ops.Ops.adam_update`, bit for bit.

        The same operations in the same order, but each writes into an array
        it is given (``out=``) instead of copying into the scratch array first
        and allocating temporaries: 16 passes over the parameters and one new
        array (the result) instead of 19 passes and four new arrays. Measured
        on this 2-core machine: LeNet's first fully connected layer (94,200
        float32 values) 280 instead of 650 µs an update on its own; all of
        Adam's updates in a batch-64 LeNet training step 0.42 instead of
        0.53 ms (about 1 % of the step, below what whole-step timings here
        resolve). Two threads per update were slower: each part's 16 short
        calls wait for the GIL.
        """
        # 0-d: NumPy returns scalars, not arrays; another gradient dtype: the generic
        # path casts it before any arithmetic, out= would compute in the wider type.
        if np.ndim(weights) == 0 or getattr(gradient, "dtype", None) != weights.dtype:
            return super().adam_update(weights, gradient, moments, mu, rho, step_size,
                                       inverse_root_correction, epsilon, learning_rate, decay)
        first, second, scratch = moments
        np.multiply(gradient, 1.0 - mu, out=scratch)
        first *= mu
        first += scratch
        np.multiply(gradient, gradient, out=scratch)
        scratch *= 1.0 - rho
        second *= rho
        second += scratch
        updated = np.sqrt(second)  # the denominator first, then the result in its place
        updated *= inverse_root_correction
        updated += epsilon
        np.divide(first, updated, out=scratch)
        scratch *= step_size
        np.subtract(weights, scratch, out=updated)
        if decay:
            np.multiply(weights, decay, out=scratch)
            scratch *= learning_rate
            updated -= scratch
        return updated


# -- helpers --------------------------------------------------------------------

def _padded_windows(inputs, geometry):
    """The window view (see ``window_view``) of a zero-padded copy of ``inputs`` (c, y, x, b)."""
    padded = zero_padded(inputs.shape, geometry.padding, inputs.dtype)
    interior_view(padded, inputs.shape, geometry.padding)[...] = inputs
    return window_view(padded, geometry)


class _Depth(threading.local):
    """How many compute scopes the current thread is in."""

    depth = 0
