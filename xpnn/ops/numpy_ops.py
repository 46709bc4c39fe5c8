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
import operator
import threading

import numpy as np

from xpnn.ops import Ops
from xpnn.ops.numpy_channels import ChannelPaths
from xpnn.ops.numpy_columns import batch_innermost, batch_outermost
from xpnn.ops.numpy_conv import ConvolutionPaths
from xpnn.ops.numpy_settings import (blas_controller, blas_on_one_thread, can_fork,
                                     default_processes, default_threads)
from xpnn.ops.threads import Team, split_range

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


class NumpyOps(ConvolutionPaths, ChannelPaths, Ops):
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
            old, self._team = self._team, Team(int(count))
            old.close()  # its helpers end (a pass cut for it gets a team of its own: run_pieces)

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
        if len(parts) == 1 or self.threads == 1 or self._team.inside_part():
            # (Inside a part, e.g. a piece of a batch, the team runs them in turn anyway.)
            return [task(part) for part in parts]
        if self._scoped.depth:
            return self._team.run(task, parts)
        with blas_on_one_thread():
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
        with self._team.alone(), blas_on_one_thread():
            yield

    def run_pieces(self, task, count):
        """Same contract as :meth:`xpnn.ops.Ops.run_pieces`: the pieces shared out over the threads.

        All at once: their batch-norm sums wait for each other. A pass cut for more threads
        than there are now (``threads`` changed between its forward and backward) runs on a
        team of its own for the call.
        """
        if count > self.threads and not self._team.inside_part():
            team = Team(count)
            try:
                return team.run(task, list(range(count)))
            finally:
                team.close()
        groups = self._parallel(lambda group: [task(index) for index in range(*group)],
                                split_range(count, self.threads))
        return [result for group in groups for result in group]

    def join_samples(self, pieces):
        """Same contract as :meth:`xpnn.ops.Ops.join_samples`; images stay batch-innermost."""
        pieces = list(pieces)
        if all(piece.ndim == 4 for piece in pieces):
            return batch_outermost(np.concatenate([batch_innermost(piece) for piece in pieces], axis=-1))
        return np.concatenate(pieces, axis=0)

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
