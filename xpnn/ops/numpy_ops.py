"""NumPy fast paths for the hot operations of the ``"cpu"`` backend.

:class:`NumpyOps` overrides the convolution (:mod:`xpnn.ops.numpy_conv`),
max-pooling, ReLU and batch-norm (:mod:`xpnn.ops.numpy_channels`) and Adam methods of the generic
:class:`xpnn.ops.Ops` (which stays the reference that
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

Threads
-------
Each operation splits into independent parts (output rows of a convolution,
channels elsewhere) that a :class:`xpnn.ops.threads.PartPool` (a standard
``ThreadPoolExecutor``) runs at the same time, one per core, with BLAS limited
to one thread meanwhile (two BLAS calls each asking for every core would fight
over them; this needs threadpoolctl). Small operations run in one part.
``NumpyOps.threads`` (default: the ``XPNN_NUM_THREADS`` environment variable,
else the usable cores, at most 4) sets the number of parts; results do not
depend on it beyond the order of floating-point sums. During a network's pass
(:meth:`NumpyOps.compute_scope`) BLAS stays at one thread throughout: BLAS
threads spin while they wait, which on a busy machine made training 2-3x
slower (measured with one competing process: OpenBLAS on 2 threads 2.2-2.7x
slower than one thread, these parts 0.9-1.0x). ``XPNN_NUM_THREADS=1`` leaves
BLAS its own threads instead (e.g. one process per core under MPI).

Measured on a 2-core Xeon shared with other work (LeNet with and without batch
norm and dropout, batch 64 and 256, float32; training steps and 10,000-image
inference, the two settings interleaved, 7 rounds, medians of the per-round
ratios): 2 threads against 1 (BLAS then on its own threads) took 0.57-0.64 of
the inference time (pieces of the batch on the threads, :meth:`map_samples`;
0.26 in a round disturbed by other load) and 0.89-1.01 of a training step's.
"""
import contextlib
import functools
import operator
import threading

import numpy as np

from xpnn.ops import Ops
from xpnn.ops.numpy_channels import ChannelPaths
from xpnn.ops.numpy_conv import ConvolutionPaths
from xpnn.ops.numpy_settings import blas_on_one_thread, default_threads
from xpnn.ops.threads import PartPool, split_range

#: Element-wise operations (ReLU, pooling, batch norm) on fewer elements than this run
#: in one part: at ~1 ns per element they gain less than the hand-off costs.
MIN_PARALLEL_ELEMENTS = 1 << 21
#: A batch runs through :meth:`NumpyOps.map_samples` in pieces from this many samples per
#: thread: a piece must be large enough that NumPy spends far more time in its loops (GIL
#: released) than in the layers' Python code (GIL held).
MIN_SAMPLES_PER_THREAD = 128


class NumpyOps(ConvolutionPaths, ChannelPaths, Ops):
    """:class:`xpnn.ops.Ops` with batch-innermost, multi-threaded NumPy hot paths.

    Convolutions (1-D ones run as 2-D with a trailing axis of size 1), 2x2
    max pooling with stride 2, ReLU and batch normalization of images; other
    cases use the generic methods.

    Attributes
    ----------
    threads : int
        How many parts (threads) an operation is split into.
    """

    def __init__(self, backend, threads=None):
        super().__init__(backend)
        self._pool = PartPool(1)
        self._scoped = _Depth()
        self.threads = default_threads() if threads is None else threads

    @property
    def threads(self):
        return self._pool.size

    @threads.setter
    def threads(self, count):
        if int(count) != self._pool.size:
            old, self._pool = self._pool, PartPool(int(count))
            old.close()  # its threads end once their parts are done

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
        limit = self.threads > 1 and not self._scoped.depth
        with blas_on_one_thread() if limit else contextlib.nullcontext():
            self._scoped.depth += 1
            try:
                yield
            finally:
                self._scoped.depth -= 1

    def _parallel(self, task, parts):
        """``[task(part) for part in parts]``, computed at the same time."""
        if len(parts) == 1 or self.threads == 1 or self._pool.inside_part():
            # (Inside a part, e.g. a piece of a batch, the pool runs them in turn anyway.)
            return [task(part) for part in parts]
        if self._scoped.depth:
            return self._pool.run(task, parts)
        with blas_on_one_thread():
            return self._pool.run(task, parts)

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

    # -- optimizers and regularizers ----------------------------------------------
    def total(self, values):
        """Same contract as :meth:`xpnn.ops.Ops.total`, added in turn: NumPy's norms are scalars,
        whose additions cost less than a stack and its sum."""
        return functools.reduce(operator.add, values) if values else 0.0

    def sum_of_squares(self, x):
        """Same contract as :meth:`xpnn.ops.Ops.sum_of_squares`, as one BLAS dot product.

        No product array: LeNet's first fully connected layer (94,200 float32
        values) 9 instead of 36 µs, a small one 0.8 instead of 3.4 µs. The sum
        runs in another order than NumPy's pairwise one (last bits differ).
        """
        if not (isinstance(x, np.ndarray) and x.dtype.kind == "f"):
            return super().sum_of_squares(x)
        return np.vdot(x, x)

    def adam_update(self, weights, gradient, moments, mu, rho, step_size,
                    inverse_root_correction, epsilon, learning_rate=0.0, decay=0.0):
        """Same results as :meth:`xpnn.ops.Ops.adam_update`, bit for bit.

        The same operations in the same order, but each writes into an array
        it is given (``out=``) instead of allocating temporaries: one new array
        a step (the result) instead of four. Two threads per update were
        slower: each part's dozen short calls wait for the GIL.
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
        updated += epsilon / inverse_root_correction
        np.divide(first, updated, out=updated)
        updated *= -(step_size / inverse_root_correction)
        updated += weights
        if decay:
            np.multiply(weights, learning_rate * decay, out=scratch)
            updated -= scratch
        return updated


# -- helpers --------------------------------------------------------------------

class _Depth(threading.local):
    """How many compute scopes the current thread is in."""

    depth = 0
