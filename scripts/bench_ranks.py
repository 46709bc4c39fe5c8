"""``scripts/bench.py --ranks N``: xpnn on N ranks (``mpiexec -n N``) against PyTorch on N threads.

The global batch is the same for both: each rank trains on its rows of every batch (one
thread each) and tests its rows of every inference batch. The ranks run as one MPI job for
the whole measurement, driven by this process through one named pipe per rank, so that
bench.compare alternates them with PyTorch round by round as it does a one-process xpnn:
``train(n)`` writes the command to every rank and returns when rank 0 reports that every
rank is done (a barrier). Between commands every rank waits in a blocking read of its pipe,
not in MPI (MPICH's waiting calls poll, and would take a core from PyTorch's rounds).

Peak memory is the sum of the ranks' peaks, measured in a job of its own (20 steps).
"""
import errno
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import bench

#: Seconds the job may take to answer one command (start-up included) before the bench fails.
ANSWER_TIMEOUT = 600


class RanksRunner:
    """The parent's side: one ``mpiexec -n ranks`` job training the bench's LeNet."""

    def __init__(self, ranks, backend_name, variant, batch_size):
        self.directory = tempfile.mkdtemp(prefix="xpnn-bench-ranks-")
        self.pipes = [os.path.join(self.directory, f"rank{rank}") for rank in range(ranks)]
        for path in self.pipes:
            os.mkfifo(path)
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        command = [mpiexec, "-n", str(ranks), sys.executable, os.path.abspath(bench.__file__),
                   "--backend", backend_name, "--rank-child", self.directory, variant, str(batch_size)]
        self.job = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.writers = []
        for path in self.pipes:
            self.writers.append(self._open(path))
        self._answer()  # (ready: built and warmed up)

    def _open(self, path):
        """``path`` open for writing once its rank reads it (a failed job: an error, not a hang)."""
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while True:
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as error:  # ENXIO: no reader yet
                if error.errno != errno.ENXIO or self.job.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"the ranks' job did not start reading {path} (exit status "
                                       f"{self.job.poll()})") from error
                time.sleep(0.05)
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "w")

    def _command(self, text):
        for writer in self.writers:
            writer.write(text + "\n")
            writer.flush()
        return self._answer()

    def _answer(self):
        line = self.job.stdout.readline()
        if not line.startswith("done"):
            self.close()
            raise RuntimeError(f"the ranks' job stopped (exit status {self.job.wait(ANSWER_TIMEOUT)}); "
                               f"its last output: {line!r}")
        return line.split()[1:]

    def train(self, iterations):
        self._command(f"train {iterations}")

    def infer(self):
        self._command("infer")

    def peak_mib(self):
        """The sum of every rank's peak resident memory so far, in MiB."""
        return float(self._command("memory")[0])

    def close(self):
        for writer in self.writers:
            writer.close()  # (the ranks read the end of their pipe and exit)
        if len(self.writers) < len(self.pipes):  # (a job that never read them all)
            self.job.kill()
        self.job.wait(ANSWER_TIMEOUT)
        for path in self.pipes:
            os.unlink(path)
        os.rmdir(self.directory)


def peak_memory_mib(ranks, backend_name, variant, batch_size):
    """The ranks' summed peak resident memory after 20 training steps, in a job of its own."""
    runner = RanksRunner(ranks, backend_name, variant, batch_size)
    try:
        runner.train(20)
        return runner.peak_mib()
    finally:
        runner.close()


class RankRunner(bench.XpnnRunner):
    """One rank's side: bench.XpnnRunner on one thread, its network distributed over the
    ranks, its rows of every training batch and of every inference batch."""

    def __init__(self, backend_name, variant, batch_size, images, labels, communicator):
        super().__init__(backend_name, variant, batch_size, images, labels, threads=1)
        from xpnn import parallel

        self.communicator = communicator
        self.net = parallel.distribute(self.net, communicator)
        layer = self.net.data_layer
        layer.batches = [(x[self._rows(x.shape[0])], y[self._rows(y.shape[0])]) for x, y in layer.batches]

    def _rows(self, count):
        from xpnn import parallel

        start, stop = parallel.batch_part(count, self.communicator.rank, self.communicator.size)
        return slice(start, stop)

    def infer(self):
        for start in range(0, bench.INFERENCE_IMAGES, bench.INFERENCE_BATCH):
            batch = self.test_images[start:start + bench.INFERENCE_BATCH, ...]
            self.net.test(batch[self._rows(batch.shape[0]), ...])
        self.backend.synchronize()


def rank_child(directory, variant, batch_size, backend_name):
    """Run one rank: build, warm up, then follow the commands of its pipe until it ends."""
    from xpnn import parallel

    communicator = parallel.world()
    images, labels = bench.synthetic_data()
    np.random.seed(0)
    runner = RankRunner(backend_name, variant, batch_size, images, labels, communicator)
    with bench.blas_threads(1):
        runner.train(3)  # (warm-up: allocations, caches, lazy initialization)
        runner.infer()
        _done(communicator)
        with open(os.path.join(directory, f"rank{communicator.rank}")) as commands:
            for line in iter(commands.readline, ""):
                name, *arguments = line.split()
                answer = _follow(runner, communicator, name, arguments)
                _done(communicator, answer)


def _follow(runner, communicator, name, arguments):
    if name == "train":
        runner.train(int(arguments[0]))
    elif name == "infer":
        runner.infer()
    elif name == "memory":
        return f"{sum(communicator.allgather(bench._peak_resident_mib())):.1f}"
    else:
        raise ValueError(f"unknown command {name!r}")
    return ""


def _done(communicator, answer=""):
    """Every rank has finished the command: rank 0 says so (with ``answer``)."""
    communicator.barrier()
    if communicator.rank == 0:
        print(f"done {answer}", flush=True)
