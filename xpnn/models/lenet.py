"""The seed's modified LeNet for 1×28×28 images and 10 classes (DESIGN.md)."""
from xpnn.initializers import Constant, He
from xpnn.layers.activations import ReLU, SoftMax
from xpnn.layers.batch_normalization import BatchNormalization
from xpnn.layers.conv import Conv
from xpnn.layers.dropout import Dropout
from xpnn.layers.flatten import Flatten
from xpnn.layers.fully_connected import FullyConnected
from xpnn.layers.pooling import Pooling
from xpnn.losses import CrossEntropyLoss
from xpnn.network import NeuralNetwork
from xpnn.optimizers import Adam
from xpnn.regularizers import L2_Regularizer

#: Input image shape (channels, rows, columns) and number of classes.
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


def build(batch_norm=False, dropout=False, keep_probability=0.8, learning_rate=5e-4,
          weight_decay=4e-4, batch_norm_eps=1e-10):
    """Return the seed's LeNet as a :class:`xpnn.NeuralNetwork` on the current backend.

    With the defaults this is exactly DESIGN.md's network::

        Conv(1→6, 5×5, same) → ReLU → MaxPool 2×2/2 → Conv(6→16, 5×5, same) → ReLU
        → MaxPool 2×2/2 → Flatten (784) → FC 120 → ReLU → FC 84 → ReLU → FC 10 → SoftMax

    with :class:`~xpnn.losses.CrossEntropyLoss` and ``Adam(learning_rate, 0.9, 0.999)``
    carrying ``L2_Regularizer(weight_decay)``.

    Parameters
    ----------
    batch_norm : bool
        Insert :class:`~xpnn.layers.BatchNormalization` after each convolution
        and each hidden fully connected layer, before its ReLU.
    dropout : bool
        Insert ``Dropout(keep_probability)`` before each of the last two fully
        connected layers (after the preceding ReLU).
    keep_probability : float
        Fraction of units dropout keeps, in (0, 1]. The default 0.8 rather
        than the classic 0.5: with batch normalization in the same network,
        keep 0.5 cost about two points of test accuracy after one epoch on
        Fashion-MNIST (measured over five seeds, see the README).
    learning_rate : float
        Adam's step size.
    weight_decay : float or None
        L2 regularization strength; ``0`` or ``None`` adds no regularizer. As in
        the course framework the regularizer rides on the optimizer, so it acts
        on every trainable layer's weights (batch norm's γ included).
    batch_norm_eps : float
        ``eps`` of the batch-normalization layers; the default 1e-10 suits
        float64, a float32 network may want 1e-5.

    Returns
    -------
    xpnn.NeuralNetwork
        Layers bound to the current backend and initialized; ``loss_layer`` set.
        The caller sets ``net.data_layer`` (anything whose ``next()`` returns
        ``(images (b, 1, 28, 28), one-hot labels (b, 10))``).

    Notes
    -----
    DESIGN.md asks for He initialization and is silent about biases: weights
    are drawn with :class:`~xpnn.initializers.He` (σ = √(2/fan_in)) and biases
    start at ``Constant(0.1)``, a small positive value that keeps ReLU units
    active at the start of training. Batch normalization ignores both (γ = 1,
    β = 0).
    """
    optimizer = Adam(learning_rate, 0.9, 0.999)
    if weight_decay:
        if weight_decay < 0:
            raise ValueError(f"lenet.build: weight_decay must be >= 0, got {weight_decay!r}")
        optimizer.add_regularizer(L2_Regularizer(weight_decay))
    net = NeuralNetwork(optimizer, He(), Constant(0.1))
    for layer in _layers(batch_norm, dropout, keep_probability, batch_norm_eps):
        net.append_layer(layer)
    net.loss_layer = CrossEntropyLoss()
    return net


def _layers(batch_norm, dropout, keep_probability, eps):
    """The layer sequence, options included."""
    def normalized_relu(channels):
        return ([BatchNormalization(channels, eps=eps)] if batch_norm else []) + [ReLU()]

    def dropped():
        return [Dropout(keep_probability)] if dropout else []

    return ([Conv((1, 1), (1, 5, 5), 6)] + normalized_relu(6) + [Pooling((2, 2), (2, 2))]
            + [Conv((1, 1), (6, 5, 5), 16)] + normalized_relu(16) + [Pooling((2, 2), (2, 2))]
            + [Flatten(), FullyConnected(16 * 7 * 7, 120)] + normalized_relu(120) + dropped()
            + [FullyConnected(120, 84)] + normalized_relu(84) + dropped()
            + [FullyConnected(84, NUM_CLASSES), SoftMax()])
