"""Benchmark: LeNet training and inference in xpnn against PyTorch, same machine, same run.

xpnn and PyTorch alternate in rounds inside one process so that machine drift
cancels; the ratio xpnn/PyTorch is taken per round and its median reported
with the spread over rounds. Peak resident memory is measured in a separate
child process per framework (a process's peak cannot be split between two
libraries living in it).

Examples
--------
    python scripts/bench.py                       # CPU, batch 64 and 256, both variants
    python scripts/bench.py --backend gpu         # xpnn on CuPy vs PyTorch on CUDA
    python scripts/bench.py --json bench.json --rounds 7 --iterations 30
    python scripts/bench.py --ranks 2             # xpnn on 2 ranks (mpiexec) vs PyTorch on 2 threads
"""
import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

# Run from a checkout without installing: the repository root holds the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {"lenet": dict(batch_norm=False, dropout=False),
            "lenet-bn-dropout": dict(batch_norm=True, dropout=True)}
INFERENCE_IMAGES = 10_000
INFERENCE_BATCH = 1000


def positive_int(text):
    """An argparse type: an integer >= 1 (rounds, iterations, threads, batch sizes).

    (xpnn.train has the same; importing it here would load xpnn into the PyTorch
    memory child too and add to the peak measured for PyTorch.)
    """
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def batch_size(text):
    """A batch size the synthetic data holds at least one batch of (else no batch to train on)."""
    value = positive_int(text)
    if value > INFERENCE_IMAGES:
        raise argparse.ArgumentTypeError(f"must be at most {INFERENCE_IMAGES} (the benchmark's "
                                         f"synthetic images), got {text}")
    return value


def non_negative_float(text):
    """An argparse type: seconds >= 0 (time.sleep refuses negative ones)."""
    value = float(text)
    if not value >= 0:  # (NaN too)
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def check_json_path(parser, path):
    """Fail now, not after the whole benchmark, when the results could not be written to ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        parser.error(f"--json {path}: the directory {directory} does not exist; create it or "
                     f"choose another path")
    if os.path.isdir(path):
        parser.error(f"--json {path} is a directory; name a file")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu", help="xpnn backend: cpu (vs torch CPU) or gpu (vs torch CUDA)")
    parser.add_argument("--batch-sizes", type=batch_size, nargs="+", default=[64, 256],
                        help=f"training batch sizes, 1 to {INFERENCE_IMAGES} (default: 64 256)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--settle", type=non_negative_float, default=0.1,
                        help="seconds of quiet before each timed run (not timed): the other framework's "
                             "idle threads may still spin for a few ms")
    parser.add_argument("--iterations", type=positive_int, default=30, help="training iterations per round")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                        help="threads for both: PyTorch's intra-op threads; xpnn's CPU ops (NumpyOps.threads) "
                             "with NumPy's BLAS held to as many")
    parser.add_argument("--ranks", type=positive_int, default=None,
                        help="xpnn data-parallel on this many ranks (mpiexec -n RANKS, one thread each, "
                             "pip install \"xpnn[mpi]\") against PyTorch on as many threads (--threads "
                             "is ignored); the same global batch; xpnn's peak memory summed over the ranks")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--memory-child", nargs=3, metavar=("FRAMEWORK", "VARIANT", "BATCH"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--rank-child", nargs=3, metavar=("DIRECTORY", "VARIANT", "BATCH"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ranks is not None:
        args.threads = args.ranks  # (PyTorch's threads: one core per rank)
    if args.json is not None:
        check_json_path(parser, args.json)
    return args


# -- the two networks ---------------------------------------------------------

def torch_lenet(torch, batch_norm, dropout):
    """The seed's LeNet in PyTorch, layer for layer as xpnn.models.lenet.build."""
    nn = torch.nn
    layers = [nn.Conv2d(1, 6, 5, padding=2)] + ([nn.BatchNorm2d(6)] if batch_norm else [])
    layers += [nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(6, 16, 5, padding=2)]
    layers += ([nn.BatchNorm2d(16)] if batch_norm else []) + [nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten()]
    layers += [nn.Linear(784, 120)] + ([nn.BatchNorm1d(120)] if batch_norm else []) + [nn.ReLU()]
    layers += ([nn.Dropout(0.5)] if dropout else []) + [nn.Linear(120, 84)]
    layers += ([nn.BatchNorm1d(84)] if batch_norm else []) + [nn.ReLU()]
    layers += ([nn.Dropout(0.5)] if dropout else []) + [nn.Linear(84, 10)]
    return nn.Sequential(*layers)


class TorchRunner:
    """One PyTorch LeNet with Adam (coupled L2, as xpnn's regularizer) and summed cross-entropy."""

    def __init__(self, torch, device, variant, batch_size, images, labels):
        self.torch = torch
        self.device = torch.device(device)
        self.model = torch_lenet(torch, **VARIANTS[variant]).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=5e-4, betas=(0.9, 0.999),
                                          weight_decay=4e-4)
        self.batches = _batches(images, labels, batch_size)
        self.batches = [(torch.from_numpy(x).to(self.device), torch.from_numpy(np.argmax(y, 1)).to(self.device))
                        for x, y in self.batches]
        self.test_images = torch.from_numpy(images[:INFERENCE_IMAGES]).to(self.device)
        self.step_count = 0

    def train(self, iterations):
        functional = self.torch.nn.functional
        self.model.train()
        for _ in range(iterations):
            x, y = self.batches[self.step_count % len(self.batches)]
            self.step_count += 1
            self.optimizer.zero_grad(set_to_none=True)
            loss = functional.cross_entropy(self.model(x), y, reduction="sum")
            loss.backward()
            self.optimizer.step()
        self.synchronize()

    def infer(self):
        self.model.eval()
        with self.torch.no_grad():
            for start in range(0, INFERENCE_IMAGES, INFERENCE_BATCH):
                self.torch.softmax(self.model(self.test_images[start:start + INFERENCE_BATCH]), dim=1)
        self.synchronize()

    def synchronize(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


class CyclingDataLayer:
    """A data layer over preloaded device batches (no host work per step)."""

    def __init__(self, batches):
        self.batches = batches
        self.position = 0

    def next(self):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch


class XpnnRunner:
    """The same LeNet built by xpnn.models.lenet.build on the chosen backend."""

    def __init__(self, backend_name, variant, batch_size, images, labels, threads=None):
        import xpnn
        from xpnn.models import lenet

        self.backend = xpnn.set_backend(backend_name, dtype="float32")
        if threads is not None and hasattr(self.backend.ops, "threads"):
            self.backend.ops.threads = threads  # the CPU backend's own threads, like PyTorch's
        options = dict(VARIANTS[variant])
        if options["batch_norm"]:
            options["batch_norm_eps"] = 1e-5
        self.net = lenet.build(**options)
        self.net.data_layer = CyclingDataLayer(
            [(self.backend.asarray(x), self.backend.asarray(y)) for x, y in _batches(images, labels, batch_size)])
        self.test_images = self.backend.asarray(images[:INFERENCE_IMAGES])

    def train(self, iterations):
        """``iterations`` steps as ``xpnn-train`` takes them: ``train_batch`` on each batch.
        The same work as the PyTorch loop: data loss, backward, updates.
        (``NeuralNetwork.train`` also adds every layer's regularization norm to the loss it
        records, each step: on the GPU ~20-36 more kernel launches a step.)"""
        layer = self.net.data_layer
        with self.backend.ops.compute_scope():
            for _ in range(iterations):
                self.net.train_batch(*layer.next())
        self.backend.synchronize()

    def infer(self):
        for start in range(0, INFERENCE_IMAGES, INFERENCE_BATCH):
            self.net.test(self.test_images[start:start + INFERENCE_BATCH, ...])
        self.backend.synchronize()

    def close(self):
        """Nothing to release (bench_ranks.RanksRunner's job ends here)."""


def _batches(images, labels, batch_size):
    count = len(images) // batch_size
    return [(images[i * batch_size:(i + 1) * batch_size], labels[i * batch_size:(i + 1) * batch_size])
            for i in range(min(count, 40))]


def synthetic_data(count=INFERENCE_IMAGES, seed=0):
    """Fashion-MNIST-like images: host-generated, float32, in [0, 1] with zero borders (ties in pooling)."""
    rng = np.random.default_rng(seed)
    images = rng.random((count, 1, 28, 28), dtype=np.float32)
    images[:, :, :4, :] = 0.0
    images[:, :, :, :3] = 0.0
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, count)]
    return images, labels


# -- timing -------------------------------------------------------------------

def _time(function, *args, settle=0.0):
    """Seconds ``function(*args)`` takes, after ``settle`` seconds of quiet (not timed)."""
    time.sleep(settle)
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def compare(xpnn_runner, torch_runner, rounds, iterations, settle=0.0):
    """Alternate xpnn and PyTorch; return per-round ms/iteration and inference seconds.

    Each timed run starts after ``settle`` seconds: the framework that ran before
    may still keep a core busy for a few milliseconds (PyTorch's OpenMP threads
    spin after their last parallel region, ~10 ms here), and that time belongs
    to neither.
    """
    for runner in (xpnn_runner, torch_runner):  # warm-up: allocations, caches, lazy init
        runner.train(3)
        runner.infer()
    rows = []
    for round_index in range(rounds):
        order = (xpnn_runner, torch_runner) if round_index % 2 == 0 else (torch_runner, xpnn_runner)
        times = {}
        for runner in order:
            times[runner] = (_time(runner.train, iterations, settle=settle) / iterations * 1e3,
                             _time(runner.infer, settle=settle))
        rows.append({"xpnn_ms": times[xpnn_runner][0], "torch_ms": times[torch_runner][0],
                     "xpnn_infer_s": times[xpnn_runner][1], "torch_infer_s": times[torch_runner][1]})
    return rows


def summarize(rows, batch_size):
    def med(key):
        return statistics.median(row[key] for row in rows)

    train_ratios = [row["xpnn_ms"] / row["torch_ms"] for row in rows]
    infer_ratios = [row["xpnn_infer_s"] / row["torch_infer_s"] for row in rows]
    return {
        "xpnn_ms_per_iteration": med("xpnn_ms"), "torch_ms_per_iteration": med("torch_ms"),
        "xpnn_images_per_second": batch_size / med("xpnn_ms") * 1e3,
        "torch_images_per_second": batch_size / med("torch_ms") * 1e3,
        "train_ratio_median": statistics.median(train_ratios),
        "train_ratio_min": min(train_ratios), "train_ratio_max": max(train_ratios),
        "xpnn_inference_s": med("xpnn_infer_s"), "torch_inference_s": med("torch_infer_s"),
        "inference_ratio_median": statistics.median(infer_ratios),
        "inference_ratio_min": min(infer_ratios), "inference_ratio_max": max(infer_ratios),
        "rounds": rows,
    }


# -- memory (one child process per framework) ------------------------------------

def memory_child(framework, variant, batch_size, backend_name, threads):
    """Run 20 training steps and print the peak memory in MiB.

    On the CPU the process's peak resident memory; on the GPU the peak of the
    framework's device memory in use (its allocator's high-water mark: the
    host side of a CUDA process is mostly the CUDA libraries themselves).
    """
    images, labels = synthetic_data()
    gpu = _torch_device(backend_name) == "cuda"
    if framework == "torch":
        import torch

        torch.set_num_threads(threads)
        runner = TorchRunner(torch, _torch_device(backend_name), variant, batch_size, images, labels)
        runner.train(20)
        print(torch.cuda.max_memory_allocated() / 2**20 if gpu else _peak_resident_mib())
        return
    if not gpu:
        runner = XpnnRunner(backend_name, variant, batch_size, images, labels, threads)
        with blas_threads(threads):
            runner.train(20)
        print(_peak_resident_mib())
        return
    import cupy

    with _cupy_peak_hook(cupy) as hook:
        runner = XpnnRunner(backend_name, variant, batch_size, images, labels, threads)
        runner.train(20)
    print(hook.peak_bytes / 2**20)


def _cupy_peak_hook(cupy):
    """A CuPy memory hook that records the peak of the default pool's bytes in use."""

    class PeakHook(cupy.cuda.MemoryHook):
        name = "PeakHook"

        def __init__(self):
            super().__init__()
            self.pool = cupy.get_default_memory_pool()
            self.peak_bytes = self.pool.used_bytes()

        def malloc_postprocess(self, **kwargs):
            self.peak_bytes = max(self.peak_bytes, self.pool.used_bytes())

    return PeakHook()


def _peak_resident_mib():
    """This process's peak resident memory in MiB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this program's
    own memory. (getrusage's ru_maxrss survives execve, so in a child of the
    benchmark process it reports at least the parent's size, which held
    both frameworks: every figure came out the same.)
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_memory_mib(framework, variant, batch_size, args):
    command = [sys.executable, os.path.abspath(__file__), "--backend", args.backend,
               "--threads", str(args.threads), "--memory-child", framework, variant, str(batch_size)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(output.strip().splitlines()[-1])


def _torch_device(backend_name):
    return "cuda" if backend_name in ("gpu", "cupy") else "cpu"


def _numpy_blas_threads():
    """The thread count NumPy's BLAS would use now (outside xpnn's passes), or None."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    counts = [pool["num_threads"] for pool in threadpool_info()
              if pool.get("user_api") == "blas" and "numpy" in pool.get("filepath", "")]
    return max(counts) if counts else None


def machine_description(torch, backend_name):
    import xpnn

    info = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "xpnn": xpnn.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg()}
    if backend_name in ("gpu", "cupy"):
        import cupy

        info["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        info["cupy"] = cupy.__version__
    return info


def main(argv=None):
    args = parse_args(argv)
    if args.rank_child:  # (one rank of --ranks, under mpiexec)
        import bench_ranks

        directory, variant, batch_size = args.rank_child
        return bench_ranks.rank_child(directory, variant, int(batch_size), args.backend)
    if args.memory_child:
        framework, variant, batch_size = args.memory_child
        return memory_child(framework, variant, int(batch_size), args.backend, args.threads)
    import torch

    torch.set_num_threads(args.threads)
    with blas_threads(args.threads):
        return measure(args, torch)


def blas_threads(count):
    """Hold NumPy's BLAS to ``count`` threads (threadpoolctl), as PyTorch is held to its count.

    xpnn's CPU backend holds BLAS to one thread anyway while its own threads
    split the work (``threads`` > 1); with ``--threads 1`` this keeps BLAS from
    starting threads on the other cores, so both frameworks then use one core.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("note: threadpoolctl is missing, NumPy's BLAS uses its own thread count", file=sys.stderr)
        return contextlib.nullcontext()
    return threadpool_limits(limits=count, user_api="blas")


def make_xpnn_runner(args, variant, batch_size, images, labels):
    """xpnn's side: this process (XpnnRunner), or with --ranks an MPI job (bench_ranks.RanksRunner)."""
    if args.ranks:
        import bench_ranks

        return bench_ranks.RanksRunner(args.ranks, args.backend, variant, batch_size)
    return XpnnRunner(args.backend, variant, batch_size, images, labels, args.threads)


def peak_memory(args, variant, batch_size):
    """(xpnn's, PyTorch's) peak memory in MiB, each in processes of its own; with --ranks,
    xpnn's is the sum over its ranks."""
    if args.ranks:
        import bench_ranks

        xpnn_peak = bench_ranks.peak_memory_mib(args.ranks, args.backend, variant, batch_size)
    else:
        xpnn_peak = peak_memory_mib("xpnn", variant, batch_size, args)
    return xpnn_peak, peak_memory_mib("torch", variant, batch_size, args)


def measure(args, torch):
    """Time every variant and batch size (alternating rounds), print a row each, write the JSON."""
    images, labels = synthetic_data()
    results = {"machine": machine_description(torch, args.backend), "backend": args.backend,
               "memory": ("peak GPU memory in use (CuPy pool / torch.cuda.max_memory_allocated)"
                          if _torch_device(args.backend) == "cuda" else "peak resident memory"),
               "rounds": args.rounds, "iterations": args.iterations, "settle_s": args.settle,
               "ranks": args.ranks, "runs": []}
    print(f"{'variant':18} {'batch':>5} {'xpnn ms':>8} {'torch ms':>8} {'ratio':>6} {'spread':>11}"
          f" {'infer x/t s':>13} {'ratio':>6} {'peak MiB x/t':>13}")
    for variant in args.variants:
        for batch_size in args.batch_sizes:
            torch.manual_seed(0)
            np.random.seed(0)
            xpnn_runner = make_xpnn_runner(args, variant, batch_size, images, labels)
            torch_runner = TorchRunner(torch, _torch_device(args.backend), variant, batch_size, images, labels)
            summary = summarize(compare(xpnn_runner, torch_runner, args.rounds, args.iterations,
                                        args.settle), batch_size)
            xpnn_runner.close()
            summary.update(variant=variant, batch_size=batch_size)
            if not args.skip_memory:
                summary["xpnn_peak_mib"], summary["torch_peak_mib"] = peak_memory(args, variant, batch_size)
            results["runs"].append(summary)
            _print_row(summary)
    import xpnn

    results["machine"]["xpnn_threads"] = getattr(xpnn.get_backend().ops, "threads", None)
    results["machine"]["numpy_blas_threads"] = _numpy_blas_threads()
    results["machine"]["load_average_at_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2)
    return 0


def _print_row(s):
    memory = f"{s['xpnn_peak_mib']:.0f}/{s['torch_peak_mib']:.0f}" if "xpnn_peak_mib" in s else "-"
    print(f"{s['variant']:18} {s['batch_size']:>5} {s['xpnn_ms_per_iteration']:8.2f} "
          f"{s['torch_ms_per_iteration']:8.2f} {s['train_ratio_median']:6.2f} "
          f"{s['train_ratio_min']:5.2f}-{s['train_ratio_max']:<5.2f} "
          f"{s['xpnn_inference_s']:6.2f}/{s['torch_inference_s']:<6.2f} {s['inference_ratio_median']:6.2f} "
          f"{memory:>13}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
