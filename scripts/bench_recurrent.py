"""Recurrent classifier on Fashion-MNIST read row by row: xpnn against PyTorch, same run.

Both frameworks train the same model (``xpnn.models.recurrent``: 28 steps of 28 features
-> LSTM or Elman RNN -> the last step's ``sigmoid(FC_y(h))`` -> FC 10 -> SoftMax with a
summed cross-entropy), from the same initial weights (xpnn's Xavier draw, copied into the
PyTorch modules with their gate order), with the same optimizer (Adam, lr, betas 0.9/0.999,
eps 1e-8), batch size, epochs and batch order (a fresh permutation per epoch from
``numpy.random.default_rng([seed, epoch])``), in float32 on the CPU. The epochs alternate
(xpnn's epoch e, PyTorch's epoch e, ...) so that a change in the machine's load touches
both; each epoch's training time is measured alone, then both models are evaluated on the
test split. PyTorch's recurrent modules have two bias vectors where xpnn has one: the second
is held at zero and not trained, so both models have the same parameters.

Examples
--------
    python scripts/bench_recurrent.py                      # LSTM, 1 epoch
    python scripts/bench_recurrent.py --epochs 5 --json runs/bench-lstm.json
    python scripts/bench_recurrent.py --cell rnn --limit-train 6400 --limit-test 1000
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

# Run from a checkout without installing: the repository root holds the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import xpnn  # noqa: E402
from xpnn.datasets import load_dataset  # noqa: E402
from xpnn.models import recurrent  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--cell", choices=sorted(recurrent.CELLS), default="lstm")
    add("--epochs", type=int, default=1)
    add("--batch-size", type=int, default=64)
    add("--lr", type=float, default=1e-3)
    add("--hidden-size", type=int, default=128)
    add("--output-size", type=int, default=64)
    add("--seed", type=int, default=0)
    add("--data-dir", default=None, help="Fashion-MNIST IDX files (default: Debian's)")
    add("--limit-train", type=int, default=None)
    add("--limit-test", type=int, default=None)
    add("--threads", type=int, default=os.cpu_count() or 1,
        help="threads for both: PyTorch's intra-op threads, NumPy's BLAS held to as many "
             "(default: the machine's CPUs)")
    add("--json", default=None, help="also write the results to this file")
    return parser.parse_args(argv)


# -- the PyTorch model ---------------------------------------------------------------------

def torch_model(args):
    import torch

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            module = torch.nn.LSTM if args.cell == "lstm" else torch.nn.RNN
            self.recurrent = module(28, args.hidden_size)
            self.output = torch.nn.Linear(args.hidden_size, args.output_size)
            self.classify = torch.nn.Linear(args.output_size, 10)

        def forward(self, images):  # (batch, 1, 28, 28) -> logits (batch, 10)
            sequences = images.reshape(images.shape[0], 28, 28).permute(1, 0, 2)
            hidden, _ = self.recurrent(sequences)
            return self.classify(torch.sigmoid(self.output(hidden[-1])))

    return Classifier()


def copy_weights(net, model, cell):
    """xpnn's initial weights into the PyTorch model (same functions at the start)."""
    import torch

    recurrent_layer, classify = net.layers[1], net.layers[3]
    hidden_weights = xpnn.to_numpy(recurrent_layer.weights)  # (28 + H + 1, gates * H)
    size = recurrent_layer.hidden_size
    if cell == "lstm":  # xpnn's columns: forget, input, output, candidate; torch's: i, f, g, o
        blocks = [hidden_weights[:, k * size:(k + 1) * size] for k in range(4)]
        hidden_weights = np.concatenate([blocks[1], blocks[0], blocks[3], blocks[2]], axis=1)
    rows = hidden_weights.T
    linear = [(model.output, recurrent_layer.output_weights), (model.classify, classify.weights)]
    with torch.no_grad():
        model.recurrent.weight_ih_l0.copy_(torch.from_numpy(rows[:, :28].copy()))
        model.recurrent.weight_hh_l0.copy_(torch.from_numpy(rows[:, 28:28 + size].copy()))
        model.recurrent.bias_ih_l0.copy_(torch.from_numpy(rows[:, -1].copy()))
        model.recurrent.bias_hh_l0.zero_()
        for module, weights in linear:
            weights = xpnn.to_numpy(weights)
            module.weight.copy_(torch.from_numpy(weights[:-1].T.copy()))
            module.bias.copy_(torch.from_numpy(weights[-1].copy()))
    # xpnn has one bias per gate: PyTorch's second stays zero and out of training (two
    # trained copies would move the bias twice as fast under Adam).
    model.recurrent.bias_hh_l0.requires_grad_(False)


# -- epochs ------------------------------------------------------------------------------

def batches(images, labels, batch_size, order):
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield images[rows], labels[rows]


def xpnn_epoch(net, images, one_hot, batch_size, order):
    started = time.perf_counter()
    with net.backend.ops.compute_scope():
        for batch_images, batch_labels in batches(images, one_hot, batch_size, order):
            net.train_batch(batch_images, batch_labels)
    return time.perf_counter() - started


def torch_epoch(model, optimizer, images, labels, batch_size, order):
    import torch

    loss_function = torch.nn.CrossEntropyLoss(reduction="sum")  # xpnn's loss is a sum too
    model.train()
    started = time.perf_counter()
    for batch_images, batch_labels in batches(images, labels, batch_size, order):
        optimizer.zero_grad()
        loss_function(model(batch_images), batch_labels).backward()
        optimizer.step()
    return time.perf_counter() - started


def warm_up(net, model, images, one_hot, labels, args):
    """A few steps on throwaway copies of both models: library set-up (thread pools, PyTorch's
    first-call dispatch) stays out of the first epoch's time, the models stay untouched."""
    import copy

    import torch

    order = np.arange(min(len(images), 3 * args.batch_size))
    xpnn_epoch(copy.deepcopy(net), images, one_hot, args.batch_size, order)
    twin = copy.deepcopy(model)
    trained = [parameter for parameter in twin.parameters() if parameter.requires_grad]
    torch_epoch(twin, torch.optim.Adam(trained, lr=args.lr), torch.from_numpy(images),
                torch.from_numpy(labels), args.batch_size, torch.from_numpy(order))


def xpnn_accuracy(net, images, labels):
    predictions = [np.argmax(xpnn.to_numpy(net.test(images[start:start + 500])), axis=1)
                   for start in range(0, len(images), 500)]
    net.phase = False
    return float(np.mean(np.concatenate(predictions) == labels))


def probability_difference(net, model, images):
    """Largest difference of the two models' class probabilities on ``images``: before
    training ~1e-7 (float32 rounding) when the weights were copied right."""
    import torch

    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(images)), dim=1).numpy()
    actual = xpnn.to_numpy(net.test(images))
    net.phase = False
    return float(np.max(np.abs(actual - expected)))


def torch_accuracy(model, images, labels):
    import torch

    model.eval()
    with torch.no_grad():
        predictions = [model(images[start:start + 500]).argmax(dim=1)
                       for start in range(0, len(images), 500)]
    return float((torch.cat(predictions) == labels).double().mean())


def main(argv=None):
    args = parse_args(argv)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads, user_api="blas"):
        return compare(args, torch)


def load(args):
    """Fashion-MNIST as float32 images (n, 1, 28, 28) in [0, 1] and int64 labels."""
    data = load_dataset("fashion-mnist", args.data_dir)
    return [((images[:limit] / 255.0).astype(np.float32)[:, None], labels[:limit].astype(np.int64))
            for images, labels, limit in ((data.train_images, data.train_labels, args.limit_train),
                                          (data.test_images, data.test_labels, args.limit_test))]


def build_both(args, torch, test_images):
    """xpnn's model (float32, CPU), the PyTorch one with its weights, and PyTorch's Adam."""
    xpnn.seed(args.seed)
    with xpnn.use_backend("cpu", dtype="float32"):  # (the network keeps it; nothing global)
        net = recurrent.build(args.cell, args.hidden_size, args.output_size, args.lr)
    model = torch_model(args)
    copy_weights(net, model, args.cell)
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    difference = probability_difference(net, model, test_images[:100])
    print(f"{args.cell}: initial probabilities differ by at most {difference:.2g}", flush=True)
    if difference > 1e-4:
        raise SystemExit("the two models do not start from the same weights")
    return net, model, optimizer, difference


def compare(args, torch):
    """Train both models epoch by epoch; print and return the per-epoch results."""
    torch.manual_seed(args.seed)
    (train_images, train_labels), (test_images, test_labels) = load(args)
    one_hot = np.eye(10, dtype=np.float32)[train_labels]
    net, model, optimizer, difference = build_both(args, torch, test_images)
    torch_data = [torch.from_numpy(a) for a in (train_images, train_labels, test_images, test_labels)]
    warm_up(net, model, train_images, one_hot, train_labels, args)
    epochs = []
    for epoch in range(args.epochs):
        order = np.random.default_rng([args.seed, epoch]).permutation(len(train_images))
        xpnn_seconds = xpnn_epoch(net, train_images, one_hot, args.batch_size, order)
        torch_seconds = torch_epoch(model, optimizer, torch_data[0], torch_data[1], args.batch_size,
                                    torch.from_numpy(order))
        entry = {"epoch": epoch + 1, "xpnn_seconds": xpnn_seconds, "torch_seconds": torch_seconds,
                 "ratio": xpnn_seconds / torch_seconds,
                 "xpnn_test_accuracy": xpnn_accuracy(net, test_images, test_labels),
                 "torch_test_accuracy": torch_accuracy(model, torch_data[2], torch_data[3])}
        epochs.append(entry)
        print(f"epoch {entry['epoch']}: test accuracy xpnn {entry['xpnn_test_accuracy']:.4f} "
              f"torch {entry['torch_test_accuracy']:.4f} | seconds xpnn {xpnn_seconds:.1f} torch "
              f"{torch_seconds:.1f} (ratio {entry['ratio']:.2f})", flush=True)
    settings = {**vars(args), "train_images": len(train_images), "test_images": len(test_images),
                "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
                "numpy_version": np.__version__, "machine": platform.platform(),
                "cpus": os.cpu_count(), "initial_difference": difference}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": settings, "epochs": epochs}, handle, indent=2)
    return epochs


if __name__ == "__main__":
    main()
