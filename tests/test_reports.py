"""``xpnn.reports``: the summary line, the model description, metrics.json and plot.png,
checked against values written here by hand (no training)."""
import json
import struct
import zlib

import pytest

from xpnn.backend import make_backend
from xpnn.reports import SUMMARY_PATTERN, describe_model, summary_line, write_metrics, write_plot

EPOCHS = [
    {"epoch": 1, "train_loss": 0.9, "train_accuracy": 0.70, "test_accuracy": 0.8125, "seconds": 2.0,
     "eval_seconds": 0.5, "images_per_second": 30.0},
    {"epoch": 2, "train_loss": 0.5, "train_accuracy": 0.85, "test_accuracy": 0.87506, "seconds": 4.2,
     "eval_seconds": 0.5, "images_per_second": 14.0},
]


def test_summary_line_reports_the_last_epoch_and_the_mean_seconds():
    line = summary_line(EPOCHS, make_backend("cpu", "float32"), "float32")
    assert line == "test accuracy 0.8751 | 3.1 s/epoch | backend cpu | device cpu | float32"
    match = SUMMARY_PATTERN.match(line)
    assert match and match.group("accuracy") == "0.8751" and match.group("seconds") == "3.1"


@pytest.mark.parametrize("batch_norm, dropout, expected", [
    (True, True, "LeNet (batch norm, dropout) on mnist"),
    (True, False, "LeNet (batch norm) on mnist"),
    (False, True, "LeNet (dropout) on mnist"),
    (False, False, "LeNet (plain) on mnist"),
])
def test_describe_model_names_each_switch(batch_norm, dropout, expected):
    assert describe_model({"batch_norm": batch_norm, "dropout": dropout, "dataset": "mnist"}) == expected


def test_write_metrics_holds_the_epochs_and_the_settings(tmp_path):
    settings = {"seed": 0, "dtype": "float32"}
    write_metrics(str(tmp_path), EPOCHS, settings)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"epochs": EPOCHS, "settings": settings}


def png_size(payload):
    """Width and height from a PNG's IHDR chunk (the first, right after the 8-byte signature)."""
    assert payload[:8] == b"\x89PNG\r\n\x1a\n" and payload[12:16] == b"IHDR"
    length = struct.unpack(">I", payload[8:12])[0]
    assert zlib.crc32(payload[12:16 + length]) == struct.unpack(">I", payload[16 + length:20 + length])[0]
    return struct.unpack(">II", payload[16:24])


def test_write_plot_draws_the_three_curves_into_a_png(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn, plot = [], Axes.plot

    def recorded(self, x, y, *args, **kwargs):
        drawn.append((self, kwargs.get("label"), list(x), list(y)))  # (titles are set later)
        return plot(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recorded)
    write_plot(str(tmp_path), EPOCHS, "LeNet (plain) on mnist")
    width, height = png_size((tmp_path / "plot.png").read_bytes())
    assert width > height > 0
    assert [path.name for path in tmp_path.iterdir()] == ["plot.png"]   # (no temporary file left)
    curves = {(axes.get_title(), label): (x, y) for axes, label, x, y in drawn}
    assert curves == {("training loss", "train"): ([1, 2], [0.9, 0.5]),
                      ("accuracy", "train"): ([1, 2], [0.70, 0.85]),
                      ("accuracy", "test"): ([1, 2], [0.8125, 0.87506])}
