"""Experiment, not a feature: plain LeNet trained with each batch cut in two, one half per process.

Why: on one core xpnn's NumPy step is faster than PyTorch's (``scripts/bench.py
--threads 1``), but PyTorch gains ~1.4x from the second core and xpnn ~1.1x:
Python threads hand work over in ~80 µs on this machine and share one GIL, so
only large operations split well (pieces of 32 samples on two threads gained
nothing). Two *processes* share no GIL. This script measures what a step would
cost if a worker process ran half of every batch: the worker is forked with a
copy of the layers; parameters, its half of the input, its output, its error
and its gradients pass through shared memory; main sums the two halves'
gradients and steps Adam once, as ``xpnn.piecewise`` does for threads.

It first trains two copies of the same network for a few steps, one with the
library's own step and one with the halves in two processes, and checks that
the losses and weights agree (float32 rounding). Then it alternates rounds of
the library's step, the two-process step and PyTorch's step in this process
and prints ms per step and the ratios.

Limits: plain LeNet only (batch norm and dropout couple the halves through
``PieceSlot``; exchanging those sums between processes is not done here);
Linux (fork); one worker. Usage: ``python scripts/explore_two_processes.py
[--batch-size 64] [--rounds 7] [--iterations 30]``.
"""
import argparse
import copy
import mmap
import os
import statistics
import sys
import time

import numpy as np
import threadpoolctl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the same LeNet, data and PyTorch model as the benchmark)

import xpnn  # noqa: E402
from xpnn.backend import Backend  # noqa: E402
from xpnn.piecewise import backward_chain  # noqa: E402


class SharedArrays:
    """Float arrays of fixed shapes in one anonymous shared mapping (made before the fork)."""

    def __init__(self, shapes, dtype):
        sizes = [int(np.prod(shape)) for shape in shapes]
        self._memory = mmap.mmap(-1, max(1, sum(sizes)) * np.dtype(dtype).itemsize)
        flat = np.frombuffer(self._memory, dtype=dtype)
        bounds = np.cumsum([0] + sizes)
        self.arrays = [flat[start:stop].reshape(shape)
                       for start, stop, shape in zip(bounds[:-1], bounds[1:], shapes)]


class TwoProcessTrainer:
    """Training steps of ``net`` with the second half of each batch in a forked worker."""

    def __init__(self, net, batch_size):
        self.net, self.half = net, batch_size // 2
        self.trainable = [layer for layer in net.layers if layer.trainable]
        self.parameter_names = [[name for name in ("weights", "bias") if getattr(layer, name) is not None
                                 and (name == "weights" or "gradient_bias" in layer.gradient_names)]
                                for layer in self.trainable]
        shapes = [getattr(layer, name).shape for layer, names in zip(self.trainable, self.parameter_names)
                  for name in names]
        dtype = net.backend.dtype_name
        self.parameters = SharedArrays(shapes, dtype).arrays
        self.gradients = SharedArrays(shapes, dtype).arrays
        probe = net.data_layer.batches[0][0]
        classes = net.data_layer.batches[0][1].shape[1]
        self.input, self.output, self.error = SharedArrays(
            [(batch_size - self.half,) + probe.shape[1:], (batch_size - self.half, classes),
             (batch_size - self.half, classes)], dtype).arrays
        self.replicas = self._last = None
        self._to_worker_read, self._to_worker = os.pipe()
        self._from_worker, self._from_worker_write = os.pipe()
        self.worker = os.fork()
        if self.worker == 0:
            self._serve()

    # -- the worker -----------------------------------------------------------------
    def _serve(self):
        threadpoolctl.threadpool_limits(1)
        try:
            while True:
                command = os.read(self._to_worker_read, 1)
                if command == b"F":
                    self._take_parameters()
                    self._forward(self.input)
                    self.output[...] = self._last
                elif command == b"B":
                    backward_chain(self.replicas[:-1], np.array(self.error))
                    self._put_gradients(self.replicas)
                else:
                    break
                os.write(self._from_worker_write, b".")
        finally:
            os._exit(0)

    def _take_parameters(self):
        arrays = iter(self.parameters)
        for layer, names in zip(self.trainable, self.parameter_names):
            for name in names:
                setattr(layer, name, next(arrays))

    def _put_gradients(self, replicas):
        arrays = iter(self.gradients)
        for replica, names in zip((r for r in replicas if r.trainable), self.parameter_names):
            for name in names:
                next(arrays)[...] = getattr(replica, "gradient_" + name)

    # -- both sides ------------------------------------------------------------------
    def _forward(self, piece):
        # The last pass's replicas (and their caches) go only after this pass made its own:
        # freeing them all first let the allocator return that memory, and every array of
        # the pass then paid its page faults again (a batch-32 pass 2.6 -> 4.3 ms).
        previous, self.replicas = self.replicas, [layer.replica() for layer in self.net.layers]
        for replica in self.replicas:
            piece = replica.forward(piece)
        self._last = piece
        del previous

    # -- main ------------------------------------------------------------------------
    def train(self, iterations):
        with threadpoolctl.threadpool_limits(1):
            for _ in range(iterations):
                self.net.loss.append(self.step())

    def step(self):
        net, half = self.net, self.half
        images, labels = net.data_layer.next()
        arrays = iter(self.parameters)
        for layer, names in zip(self.trainable, self.parameter_names):
            for name in names:
                next(arrays)[...] = getattr(layer, name)
        self.input[...] = images[half:]
        os.write(self._to_worker, b"F")
        self._forward(images[:half])
        self._wait()
        prediction = np.concatenate([self._last, self.output])
        loss = net.loss_layer.forward(prediction, labels) + net.regularization_loss()
        error = net.loss_layer.backward_through_softmax(labels)
        self.error[...] = error[half:]
        os.write(self._to_worker, b"B")
        backward_chain(self.replicas[:-1], error[:half])
        self._wait()
        arrays = iter(self.gradients)
        for layer, replica, names in zip(self.trainable, (r for r in self.replicas if r.trainable),
                                         self.parameter_names):
            worker_half = _Gradients({"gradient_" + name: next(arrays) for name in names})
            layer.take_gradients([replica, worker_half])
        return loss

    def _wait(self):
        if os.read(self._from_worker, 1) != b".":
            raise RuntimeError("the worker process ended")

    def close(self):
        os.write(self._to_worker, b"Q")
        os.waitpid(self.worker, 0)


class _Gradients:
    """Stands in for the worker's replica in ``take_gradients``: just its gradients."""

    def __init__(self, gradients):
        self.__dict__.update(gradients)


def make_network(batch_size, images, labels, threads):
    """The benchmark's plain LeNet on its own CPU backend (own thread count)."""
    runner = bench.XpnnRunner("cpu", "lenet", batch_size, images, labels)
    backend = Backend("cpu", runner.backend.xp, "cpu", "float32", np)
    backend.ops.threads = threads
    runner.net.to(backend)
    return runner.net


def check_same_training(batch_size, images, labels, steps=8):
    """The two-process step trains like the library's own step (float32 rounding)."""
    reference = make_network(batch_size, images, labels, threads=1)
    candidate = copy.deepcopy(reference)
    trainer = TwoProcessTrainer(candidate, batch_size)
    try:
        trainer.train(steps)
    finally:
        trainer.close()
    reference.train(steps)
    losses = [float(value) for value in reference.loss], [float(value) for value in candidate.loss]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    for mine, theirs in zip(candidate.layers, reference.layers):
        if mine.trainable:
            np.testing.assert_allclose(mine.weights, theirs.weights, rtol=1e-3, atol=1e-5)
    print(f"same training: {steps} steps, losses agree to 1e-4 ({losses[0][-1]:.3f} / {losses[1][-1]:.3f}), "
          "weights to 1e-3")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=30)
    args = parser.parse_args()
    xpnn.set_backend("cpu", dtype="float32")
    images, labels = bench.synthetic_data()
    check_same_training(args.batch_size, images, labels)
    library = make_network(args.batch_size, images, labels, threads=2)
    trainer = TwoProcessTrainer(make_network(args.batch_size, images, labels, threads=1), args.batch_size)
    import torch  # after the fork: the worker never holds PyTorch's threads

    torch.set_num_threads(2)
    pytorch = bench.TorchRunner(torch, "cpu", "lenet", args.batch_size, images, labels)
    runs = {"library step (2 threads)": library.train, "two processes": trainer.train,
            "PyTorch (2 threads)": pytorch.train}
    times = {name: [] for name in runs}
    try:
        for run in runs.values():
            run(3)
        for round_index in range(args.rounds):
            order = list(runs.items()) if round_index % 2 == 0 else list(reversed(runs.items()))
            for name, run in order:
                start = time.perf_counter()
                run(args.iterations)
                times[name].append((time.perf_counter() - start) / args.iterations * 1e3)
    finally:
        trainer.close()
    pytorch_ms = times["PyTorch (2 threads)"]
    for name, values in times.items():
        ratios = [mine / theirs for mine, theirs in zip(values, pytorch_ms)]
        print(f"{name:26} {statistics.median(values):7.2f} ms/step   ratio to PyTorch "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
