"""Count what one LeNet training step and one inference batch cost: array operations and Python calls.

On a GPU a LeNet step is bound by the host: its time is about the number of
kernel launches times the host's cost per launch. Those launches can be
counted without a GPU, so this tool counts, for both LeNet variants (plain;
batch norm + dropout), one ``train_batch`` step (after warm-up steps) and one
inference batch (``net.test``):

* **xpnn's generic path**: every array operation of array-api-strict (its
  functions and its arrays' operators, indexing and ``mT``), per layer and
  phase (forward, backward, update, the ``norm`` of ``train()``'s L2 loss), in
  three kinds: *computing* calls (write new values: arithmetic, reductions,
  products, ``astype``, ``__setitem__``, in-place operators), *views* (reshape,
  transposes, slices, ``expand_dims``) and *allocations* (``empty``/``zeros``/
  ``ones``/``full``/``arange`` and arrays moved from the host, such as the
  dropout draws of the strict backend). On CuPy a computing call is about one
  kernel launch; a filled allocation a memset.
* **xpnn's Python calls**: every Python frame entered in xpnn's own files
  (``sys.setprofile``; generator resumptions included), and those in
  array-api-compat's, on the generic path (strict) and on NumPy's fast paths.
* **PyTorch eager**: the ATen operations dispatched (``TorchDispatchMode``) by
  the same network, split the same way (``OpOverload.is_view``), with
  ``Adam(foreach=True)`` and ``Adam(fused=True)``.
* **CuPy kernel launches** (``--cupy``, CUDA machines only): the kernels,
  memsets and copies that PyTorch's profiler (CUPTI, which sees every
  library's launches in the process) records during one step of xpnn on CuPy.
  This part has not run yet (no GPU where the tool was written).

Counts, not times: run it on any machine, once; nothing here is timed.

Examples
--------
    python scripts/count_ops.py                 # summary table and per-layer tables
    python scripts/count_ops.py --cupy          # plus real launches on a CUDA machine
"""
import argparse
import collections
import importlib.util
import os
import sys

import numpy as np

# Run from a checkout without installing: the repository root holds the package, this
# folder op_counting (on the path already when run as a script, not when a test loads it).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "scripts")]

import xpnn  # noqa: E402
from xpnn.models import lenet  # noqa: E402

import op_counting  # noqa: E402
from op_counting import StrictCounter, owners_of  # noqa: E402

VARIANTS = {"lenet": dict(batch_norm=False, dropout=False),
            "lenet-bn-dropout": dict(batch_norm=True, dropout=True)}
BATCH = 64
WARM_UP_STEPS = 2

# -- what is counted: one step, one inference batch -----------------------------------------

def make_batch(backend, batch_size, seed=0):
    """Random images ``(b, 1, 28, 28)`` and one-hot labels, on the backend's device already
    (as a GPU data layer delivers them): no host transfer is counted."""
    rng = np.random.default_rng(seed)
    images = rng.random((batch_size,) + lenet.INPUT_SHAPE)
    labels = np.eye(lenet.NUM_CLASSES)[rng.integers(0, lenet.NUM_CLASSES, batch_size)]
    return backend.asarray(images, dtype=backend.dtype), backend.asarray(labels, dtype=backend.dtype)


def prepared(variant, backend_name, dtype="float32", batch_size=BATCH):
    """A LeNet ``variant`` on a backend after :data:`WARM_UP_STEPS` training steps, and its
    batch: ``(net, images, labels)``. The caller keeps the backend current (``use_backend``)."""
    backend = xpnn.get_backend()
    assert backend.name == backend_name and backend.dtype_name == dtype
    xpnn.seed(0)
    net = lenet.build(batch_norm_eps=1e-5, **VARIANTS[variant])
    images, labels = make_batch(backend, batch_size)
    for _ in range(WARM_UP_STEPS):
        net.train_batch(images, labels)
    return net, images, labels


def passes(net, images, labels):
    """``{name: callable}``: what is counted, run once each."""
    return {"train_batch": lambda: net.train_batch(images, labels),
            "norm": net.regularization_loss,
            "inference": lambda: net.test(images)}


def generic_counts(variant, batch_size=BATCH, dtype="float32"):
    """``{pass: records}`` of the generic path (array-api-strict) for one LeNet ``variant``;
    each record ``(kind, name, owner, phase)``."""
    with xpnn.use_backend("array-api-strict", dtype=dtype):
        net, images, labels = prepared(variant, "array-api-strict", dtype, batch_size)
        counts = {}
        for name, run in passes(net, images, labels).items():
            with StrictCounter(owners_of(net)) as counter:
                run()
            counts[name] = counter.records
        net.phase = False
    return counts


def python_calls(variant, backend_name, batch_size=BATCH, dtype="float32"):
    """``{pass: (xpnn calls, array-api-compat calls)}``: Python frames entered in each package."""
    import array_api_compat

    folders = (os.path.dirname(xpnn.__file__) + os.sep,
               os.path.dirname(array_api_compat.__file__) + os.sep)
    with xpnn.use_backend(backend_name, dtype=dtype):
        net, images, labels = prepared(variant, backend_name, dtype, batch_size)
        counts = {}
        for name, run in passes(net, images, labels).items():
            tally = [0, 0]

            def profile(frame, event, arg):
                if event == "call":
                    filename = frame.f_code.co_filename
                    for index, folder in enumerate(folders):
                        if filename.startswith(folder):
                            tally[index] += 1

            sys.setprofile(profile)
            try:
                run()
            finally:
                sys.setprofile(None)
            counts[name] = tuple(tally)
        net.phase = False
    return counts


# -- PyTorch eager ------------------------------------------------------------------------------

def torch_counts(variant, adam, batch_size=BATCH):
    """``{pass: Counter of (kind, phase)}`` of PyTorch eager for one LeNet ``variant`` on the
    CPU, ``adam`` ``"foreach"`` or ``"fused"``; pass ``train_batch`` or ``inference``."""
    import torch

    torch.manual_seed(0)
    model = _bench().torch_lenet(torch, **VARIANTS[variant])
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.999),
                                 weight_decay=4e-4, **{adam: True})
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((batch_size,) + lenet.INPUT_SHAPE, dtype=np.float32))
    labels = torch.from_numpy(rng.integers(0, lenet.NUM_CLASSES, batch_size))
    counter = op_counting.torch_counter()
    phase = counter.during

    def step():
        optimizer.zero_grad(set_to_none=True)
        with phase("forward"):
            loss = torch.nn.functional.cross_entropy(model(images), labels, reduction="sum")
        with phase("backward"):
            loss.backward()
        with phase("update"):
            optimizer.step()

    model.train()
    for _ in range(WARM_UP_STEPS):
        step()
    counter.counts.clear()
    step()
    counts = {"train_batch": collections.Counter(counter.counts)}
    counter.counts.clear()
    model.eval()
    with torch.no_grad(), phase("forward"):
        torch.softmax(model(images), dim=1)
    counts["inference"] = collections.Counter(counter.counts)
    return counts


def _bench():
    """``scripts/bench.py`` as a module (its PyTorch LeNet is the one compared with in timings)."""
    spec = importlib.util.spec_from_file_location("bench", os.path.join(REPO, "scripts", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- CuPy: real launches (a CUDA machine only) ----------------------------------------------------

def cupy_launches(variant, batch_size=BATCH, dtype="float32"):
    """``{pass: Counter of kind}`` of the CUDA work one step of xpnn on CuPy records: kernels,
    memsets and copies, as PyTorch's profiler (CUPTI) sees every library's launches.

    Needs a CUDA device, CuPy and a CUDA build of PyTorch. Not run yet: written
    where no GPU was available.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    with xpnn.use_backend("gpu", dtype=dtype) as backend:
        net, images, labels = prepared(variant, "gpu", dtype, batch_size)
        counts = {}
        for name, run in passes(net, images, labels).items():
            backend.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as recorded:
                with backend.ops.compute_scope():
                    run()
                backend.synchronize()
            counts[name] = collections.Counter(
                op_counting.cuda_kind(event.name) for event in recorded.events()
                if event.device_type == torch.autograd.DeviceType.CUDA)
        net.phase = False
    return counts


# -- tables -------------------------------------------------------------------------------------------

def kind_totals(records):
    """Counter of kind over ``records``."""
    return collections.Counter(record[0] for record in records)


def summary_rows(variant):
    """Rows of the summary table for one variant (generic, Python calls, PyTorch)."""
    generic = generic_counts(variant)
    calls = {name: python_calls(variant, name) for name in ("array-api-strict", "cpu")}
    torch = {adam: torch_counts(variant, adam) for adam in ("foreach", "fused")}
    rows = []
    phases = phase_rows(variant, generic, torch)
    for name in ("train_batch", "inference"):
        totals = kind_totals(generic[name])
        norm = kind_totals(generic["norm"])["compute"] if name == "train_batch" else None
        torch_compute = [sum(n for (kind, _), n in torch[adam][name].items() if kind == "compute")
                         for adam in ("foreach", "fused")]
        torch_views = sum(n for (kind, _), n in torch["foreach"][name].items()
                          if kind in ("view", "alloc"))
        rows.append([variant, name, totals["compute"], totals["view"], totals["alloc"],
                     "-" if norm is None else norm, *calls["array-api-strict"][name],
                     calls["cpu"][name][0], torch_compute[0],
                     torch_compute[1] if name == "train_batch" else "-", torch_views])
    return rows, generic, phases


def phase_rows(variant, generic, torch):
    """Computing calls of one training step by phase: xpnn's generic path against PyTorch's."""
    rows = []
    for phase in ("forward", "backward", "update"):
        mine = sum(1 for kind, _, owner, step in generic["train_batch"]
                   if kind == "compute" and step == phase)
        theirs = [torch[adam]["train_batch"]["compute", phase] for adam in ("foreach", "fused")]
        rows.append([variant, phase, mine] + theirs)
    return rows


PHASE_HEADER = ["variant", "train_batch phase", "xpnn generic", "torch (foreach Adam)",
                "torch (fused Adam)"]


SUMMARY_HEADER = ["variant", "pass", "generic compute", "views", "allocs", "+ train() norms",
                  "xpnn calls (strict)", "compat calls (strict)", "xpnn calls (numpy)",
                  "torch compute (foreach)", "torch compute (fused)", "torch views+allocs"]


def layer_rows(generic):
    """Per layer: computing calls ``train forward / backward / update / norm / inference``,
    views and allocations after a ``+``."""
    table = collections.defaultdict(collections.Counter)
    for pass_name, records in generic.items():
        for kind, _, owner, phase in records:
            column = "inference" if pass_name == "inference" else phase
            table[owner][column, kind == "compute"] += 1
    columns = ("forward", "backward", "update", "norm", "other", "inference")
    rows = []
    for owner in sorted(table, key=_owner_order):
        cells = [f"{table[owner][column, True]}+{table[owner][column, False]}"
                 if table[owner][column, False] else str(table[owner][column, True])
                 for column in columns]
        rows.append([owner] + cells)
    return rows


LAYER_HEADER = ["owner", "forward", "backward", "update", "norm", "other", "inference"]


def _owner_order(owner):
    head = owner.split(" ")[0]
    return (0, int(head), "") if head.isdigit() else (1, 0, owner)


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--cupy", action="store_true",
                        help="also count the CuPy path's real CUDA launches (needs a GPU)")
    args = parser.parse_args(argv)
    print(f"LeNet, batch {BATCH}, float32, after {WARM_UP_STEPS} warm-up steps; xpnn "
          f"{xpnn.__file__}\n")
    summary, layers, phases = [], {}, []
    for variant in args.variants:
        rows, layers[variant], variant_phases = summary_rows(variant)
        summary += rows
        phases += variant_phases
    print(markdown(SUMMARY_HEADER, summary))
    print("\nComputing calls of one training step by phase (the loss's in forward and backward)\n")
    print(markdown(PHASE_HEADER, phases))
    for variant in args.variants:
        print(f"\nGeneric path per layer, {variant}: computing calls (+ views and allocations)\n")
        print(markdown(LAYER_HEADER, layer_rows(layers[variant])))
    if args.cupy:
        for variant in args.variants:
            launches = cupy_launches(variant)
            print(f"\nCuPy path, {variant}: " + ", ".join(
                f"{name}: {dict(counts)}" for name, counts in launches.items()))


if __name__ == "__main__":
    main()
