"""What ``xpnn-train`` reports: ``metrics.json``, ``plot.png`` and its one-line summaries."""
import io
import json
import os
import re

from xpnn import checkpoint as ckpt
from xpnn._files import atomic_write_bytes

METRICS_FILE = "metrics.json"
PLOT_FILE = "plot.png"
#: The summary line, for scripts: test accuracy, seconds per epoch, backend, device, dtype.
SUMMARY_PATTERN = re.compile(r"^test accuracy (?P<accuracy>[0-9.]+) \| (?P<seconds>[0-9.]+) s/epoch "
                             r"\| backend (?P<backend>\S+) \| device (?P<device>\S+) \| (?P<dtype>\w+)$")


def write_metrics(out, metrics, settings):
    """``out/metrics.json``: the per-epoch entries and the run's settings, written atomically."""
    payload = {"epochs": metrics, "settings": settings}
    atomic_write_bytes(os.path.join(out, METRICS_FILE),
                       (json.dumps(payload, indent=2) + "\n").encode("utf-8"))


def write_plot(out, metrics, title):
    """Loss and accuracy per epoch as a PNG (matplotlib's Agg canvas, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [entry["epoch"] for entry in metrics]
    figure = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [entry["train_loss"] for entry in metrics], "o-", label="train")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy per image", title="training loss")
    accuracy_axes.plot(epochs, [entry["train_accuracy"] for entry in metrics], "o-", label="train")
    accuracy_axes.plot(epochs, [entry["test_accuracy"] for entry in metrics], "s-", label="test")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    accuracy_axes.legend()
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(os.path.join(out, PLOT_FILE), buffer.getvalue())



def describe_model(settings):
    model = settings.get("model", "lenet")
    if model != "lenet":  # a recurrent classifier (xpnn.models.recurrent): rows as time steps
        return f"{model.upper()} over image rows on {settings['dataset']}"
    extras = [name for name, on in (("batch norm", settings["batch_norm"]), ("dropout", settings["dropout"])) if on]
    return f"LeNet ({', '.join(extras) or 'plain'}) on {settings['dataset']}"


def summary_line(metrics, backend, dtype):
    """``test accuracy 0.8675 | 13.8 s/epoch | backend cpu | device cpu | float32`` (SUMMARY_PATTERN)."""
    seconds = sum(entry["seconds"] for entry in metrics) / len(metrics)
    return (f"test accuracy {metrics[-1]['test_accuracy']:.4f} | {seconds:.1f} s/epoch | "
            f"backend {backend.name} | device {ckpt.device_label(backend)} | {dtype}")
