"""Recurrent classifiers of 28x28 images read row by row (28 steps of 28 features)."""
from xpnn.initializers import Constant, Xavier
from xpnn.layers.activations import SoftMax
from xpnn.layers.fully_connected import FullyConnected
from xpnn.layers.lstm import LSTM
from xpnn.layers.rnn import RNN
from xpnn.layers.sequences import ImageRows, LastStep
from xpnn.losses import CrossEntropyLoss
from xpnn.network import NeuralNetwork
from xpnn.optimizers import Adam
from xpnn.regularizers import L2_Regularizer

#: Input image shape (channels, rows, columns) and number of classes.
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
CELLS = {"rnn": RNN, "lstm": LSTM}


def build(cell="lstm", hidden_size=128, output_size=64, learning_rate=1e-3, weight_decay=0.0):
    """Return a recurrent image classifier as a :class:`xpnn.NeuralNetwork` on the current backend::

        ImageRows (28 steps x 28 features) -> RNN or LSTM(28, hidden_size, output_size)
        -> LastStep -> FC(output_size, 10) -> SoftMax

    with :class:`~xpnn.losses.CrossEntropyLoss` and ``Adam(learning_rate, 0.9, 0.999)``
    (carrying ``L2_Regularizer(weight_decay)`` when ``weight_decay`` is not 0).

    Parameters
    ----------
    cell : {"lstm", "rnn"}
    hidden_size : int
        Size of the hidden (and LSTM cell) state.
    output_size : int
        Size of the recurrent layer's output ``sigmoid(FC_y(h_t))``, of which the
        last step's goes into the classifying fully connected layer.
    learning_rate, weight_decay : float

    Notes
    -----
    Weights are drawn with :class:`~xpnn.initializers.Xavier` (tanh and sigmoid
    units, for which He's larger scale saturates), biases start at 0.
    """
    if cell not in CELLS:
        raise ValueError(f"recurrent.build: cell must be one of {sorted(CELLS)}, got {cell!r}")
    optimizer = Adam(learning_rate, 0.9, 0.999)
    if weight_decay:
        if weight_decay < 0:
            raise ValueError(f"recurrent.build: weight_decay must be >= 0, got {weight_decay!r}")
        optimizer.add_regularizer(L2_Regularizer(weight_decay))
    net = NeuralNetwork(optimizer, Xavier(), Constant(0.0))
    rows, columns = INPUT_SHAPE[1:]
    for layer in (ImageRows(), CELLS[cell](columns, hidden_size, output_size), LastStep(),
                  FullyConnected(output_size, NUM_CLASSES), SoftMax()):
        net.append_layer(layer)
    net.loss_layer = CrossEntropyLoss()
    return net


def build_lstm(hidden_size=128, output_size=64, learning_rate=1e-3, weight_decay=0.0):
    """:func:`build` with an LSTM (the checkpoint's builder for model ``lstm``)."""
    return build("lstm", hidden_size, output_size, learning_rate, weight_decay)


def build_rnn(hidden_size=128, output_size=64, learning_rate=1e-3, weight_decay=0.0):
    """:func:`build` with an Elman RNN (the checkpoint's builder for model ``rnn``)."""
    return build("rnn", hidden_size, output_size, learning_rate, weight_decay)
