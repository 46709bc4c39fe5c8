"""Upper bounds on the array operations of one LeNet step on the generic path (scripts/count_ops.py).

On a GPU a step costs about one kernel launch per computing call, so the counts
must not creep back up: each bound is the count reached (issue 19), and a
change that lowers a count should lower its bound too. The counting itself is
checked first, on operations whose count is known.
"""
import importlib.util
import os

import numpy as np
import pytest

import xpnn

strict = pytest.importorskip("array_api_strict", reason="the generic path is counted on array-api-strict")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: (variant, pass) -> most (computing calls, views, allocations) allowed; measured at batch 64.
BOUNDS = {
    # (conv input gradient by correlation, tiling windows put back by one copy: 453 -> 388)
    ("lenet-bn-dropout", "train_batch"): (388, 150, 7),
    ("lenet-bn-dropout", "norm"): (20, 9, 0),
    ("lenet-bn-dropout", "inference"): (61, 97, 2),  # (+4: ReLU keeps NaN)
    ("lenet", "train_batch"): (170, 122, 5),
    ("lenet", "norm"): (12, 5, 0),
    ("lenet", "inference"): (37, 73, 2),  # (+4: ReLU keeps NaN)
}
#: Most Python frames entered in xpnn's files for one train_batch of the BN + dropout LeNet
#: on the generic path (array-api-strict), and in array-api-compat's (508 and 42 reached;
#: the first has some room for a branch taken on one Python version and not another).
PYTHON_CALLS_BOUND = (520, 42)


@pytest.fixture(scope="module")
def count_ops():
    spec = importlib.util.spec_from_file_location("count_ops", os.path.join(REPO, "scripts", "count_ops.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_counter_sorts_known_operations_and_restores_the_namespace(count_ops):
    add, array_class = strict.add, strict._array_object.Array
    add_operator, mt = array_class.__add__, array_class.__dict__["mT"]
    with xpnn.use_backend("array-api-strict", dtype="float64"):
        with count_ops.StrictCounter({}) as counter:
            x = strict.zeros((2, 3), dtype=strict.float64)        # alloc
            y = strict.reshape(x, (3, 2))                         # view
            z = strict.matmul(y.mT, y) + 1.0                      # view, compute, compute
            z[0, :] = strict.sum(z, axis=0)                       # compute, compute (setitem)
            strict.finfo(z.dtype)                                 # no array operation
            _ = z[:, 1:]                                          # view
            strict.asarray(z)                                     # view (no copy)
            strict.astype(z, strict.float32)                      # compute
            strict.reshape(z.mT, (4,))                            # view, compute (a copy)
    kinds = [record[0] for record in counter.records]
    names = [record[1] for record in counter.records]
    assert names == ["zeros", "reshape", "mT", "matmul", "__add__", "sum", "__setitem__",
                     "__getitem__", "asarray", "astype", "mT", "reshape"]
    assert kinds == ["alloc", "view", "view", "compute", "compute", "compute", "compute",
                     "view", "view", "compute", "view", "compute"]
    assert strict.add is add and array_class.__add__ is add_operator
    assert array_class.__dict__["mT"] is mt


def test_operations_are_put_down_to_the_layer_and_phase_that_ran_them(count_ops):
    records = count_ops.generic_counts("lenet", batch_size=4)
    owners = {(owner, phase) for _, _, owner, phase in records["train_batch"]}
    # Every layer with arrays to compute ran forward, the trainable ones an update too.
    assert {("0 Conv", "forward"), ("0 Conv", "backward"), ("0 Conv", "update"),
            ("11 FullyConnected", "update"), ("12 SoftMax", "forward"),
            ("loss", "forward"), ("loss", "backward")} <= owners
    assert not any(owner == "network" for owner, _ in owners)
    assert {phase for _, _, _, phase in records["norm"]} <= {"norm", "other"}
    assert {phase for _, _, _, phase in records["inference"]} == {"forward"}


@pytest.mark.parametrize("variant", ["lenet-bn-dropout", "lenet"])
def test_generic_operations_per_step_stay_within_their_bounds(count_ops, variant):
    counts = count_ops.generic_counts(variant)
    for pass_name, records in counts.items():
        totals = count_ops.kind_totals(records)
        reached = (totals["compute"], totals["view"], totals["alloc"])
        bound = BOUNDS[variant, pass_name]
        assert all(count <= most for count, most in zip(reached, bound)), (
            f"{variant} {pass_name}: (computing calls, views, allocations) {reached} "
            f"exceed the bound {bound}")


def test_python_calls_per_step_stay_within_their_bound(count_ops):
    reached = count_ops.python_calls("lenet-bn-dropout", "array-api-strict")["train_batch"]
    assert all(count <= most for count, most in zip(reached, PYTHON_CALLS_BOUND)), (
        f"Python calls (xpnn, array-api-compat) {reached} exceed {PYTHON_CALLS_BOUND}")
    assert reached[0] > 100  # (the profile saw the step)


def test_torch_counts_split_the_step_into_its_phases(count_ops):
    pytest.importorskip("torch")
    counts = count_ops.torch_counts("lenet", "foreach", batch_size=4)
    phases = {phase for _, phase in counts["train_batch"]}
    assert phases == {"forward", "backward", "update"}
    assert sum(n for (kind, _), n in counts["train_batch"].items() if kind == "compute") > 20
    assert np.all([phase == "forward" for _, phase in counts["inference"]])
