"""What a network asks of its parts and its batches, the order it runs them in, and how it names a
failing one."""
import contextlib

from xpnn.layers.activations import ReLU
from xpnn.layers.pooling import Pooling

NO_DATA_LAYER = ("NeuralNetwork has no data_layer, so there is no batch to run: set one first: "
                  "net.data_layer = ..., an object whose next() returns (input_tensor, "
                  "one_hot_labels) (e.g. xpnn.data_layer.DataLayer(images, labels, batch_size)); "
                  "or pass batches yourself with net.train_batch(input_tensor, labels)")

NO_LOSS_LAYER = ("NeuralNetwork.{}: loss_layer is not set: set one first, e.g. "
                  "net.loss_layer = CrossEntropyLoss() (from xpnn.losses import CrossEntropyLoss)")

#: What a layer must have to be appended (the course's layer protocol; see append_layer).
_LAYER_ATTRIBUTES = ("forward", "backward", "trainable")


def check_layer(layer):
    """Raise TypeError unless ``layer`` is a layer object: an instance, with forward, backward
    and trainable (a layer class or a name given instead says what to pass)."""
    if isinstance(layer, type):
        name = layer.__name__
        raise TypeError(f"NeuralNetwork.append_layer: got the class {name}, not a layer: pass an "
                        f"instance: {name}() (with the class's arguments, if it takes any)")
    missing = [name for name in _LAYER_ATTRIBUTES if not hasattr(layer, name)]
    if missing:
        hint = (" (layers are objects, not names: e.g. net.append_layer(ReLU()) after "
                "from xpnn.layers import ReLU)" if isinstance(layer, str) else "")
        raise TypeError(f"NeuralNetwork.append_layer: expected a layer (an object with forward, "
                        f"backward and trainable, e.g. xpnn.layers.ReLU()), got "
                        f"{type(layer).__name__} {layer!r}, which lacks "
                        f"{', '.join(missing)}{hint}")


def run_order(layers):
    """``layers`` in the order a network runs them: a ReLU right before max pooling runs after it.

    The two commute exactly. ReLU is monotone, sends every value that is not
    positive to +0 and keeps NaN, so a window's largest ReLU output is the ReLU
    of its largest input (NaN when the window holds one: max pooling takes a NaN
    as the maximum); and both orders send a window's error to the same input:
    its first maximum when that is positive or NaN, none otherwise. After the
    pooling the ReLU works on a quarter of the values (2x2 windows), forward and
    backward: LeNet's training step ~10 % faster on a 2-core CPU (interleaved in
    one process: 0.88 of the time at batch 64, 0.90 at 256).

    Only the library's own :class:`~xpnn.layers.ReLU` and
    :class:`~xpnn.layers.Pooling` move (a subclass may change either); a ReLU
    followed by several poolings runs after all of them. Returns a new list.
    """
    order = list(layers)
    index = 0
    while index < len(order):
        if type(order[index]) is ReLU:
            while index + 1 < len(order) and type(order[index + 1]) is Pooling:
                order[index], order[index + 1] = order[index + 1], order[index]
                index += 1
        index += 1
    return order


def note_layer(error, layers, order, input_tensor):
    """Append to a ValueError's message which of ``layers`` raised it (recorded by
    :func:`note_layer_position` in ``order``, the last pass's run order) and the
    shape of the network's input ``input_tensor``; once; only on the error path."""
    position = getattr(error, "xpnn_layer_position", None)
    if (position is None or getattr(error, "xpnn_layer_noted", False) or not error.args
            or not isinstance(error.args[0], str) or order is None
            or not 0 <= position < len(order)):
        return
    failed = order[position]
    # One layer object may stand at several places (a Pooling used twice): its k-th place in the
    # run order is its k-th in the network (run_order moves a ReLU only past poolings, so two
    # places of one object keep their order).
    occurrence = sum(1 for layer in order[:position] if layer is failed)
    places = [index for index, layer in enumerate(layers) if layer is failed]
    if occurrence >= len(places):
        return
    index = places[occurrence]
    shape = getattr(input_tensor, "shape", None)
    given = "" if shape is None else f" given input of shape {tuple(shape)}"
    error.args = (f"{error.args[0]}; raised in net.layers[{index}] ({type(failed).__name__}) "
                  f"of a network of {len(layers)} layers{given}", *error.args[1:])
    error.xpnn_layer_noted = True


def runs_in_pieces(layer):
    """Whether ``layer`` may run on pieces of a batch at once in testing phase
    (:meth:`xpnn.NeuralNetwork.test`): xpnn's layers say so themselves; a course-style layer of
    your own, without the attribute, runs whole."""
    return getattr(layer, "runs_in_pieces", False)


def forward_chain(layers, tensor):
    """Every layer's ``forward`` in turn on ``tensor``; a ValueError records which position
    raised it (:func:`note_layer_position`)."""
    position = None
    try:
        for position, layer in enumerate(layers):
            tensor = layer.forward(tensor)
    except ValueError as error:
        note_layer_position(error, position)
        raise
    return tensor


def backward_chain(layers, error_tensor):
    """Send ``error_tensor`` back down through ``layers`` (last first).

    Nothing below the first layer needs its input gradient, so it runs with
    ``skip_input_gradient`` set and may skip that work.
    """
    for layer in reversed(layers[1:]):
        error_tensor = layer.backward(error_tensor)
    if layers:
        first = layers[0]
        first.skip_input_gradient = True
        try:
            first.backward(error_tensor)
        finally:
            first.skip_input_gradient = False


def note_layer_position(error, position):
    """Record on a ValueError the ``position`` (in the list the pass ran: the run order) of the
    layer whose forward raised it, for :func:`note_layer` to name the layer. Called only on the
    error path; the first record stays. Returns ``error``."""
    if isinstance(error, ValueError) and getattr(error, "xpnn_layer_position", None) is None:
        error.xpnn_layer_position = position
    return error


def note_piece(error, rows, batch_size):
    """Say in a ValueError's message that it came from a piece of ``rows`` of a batch of ``batch_size``.

    :meth:`xpnn.NeuralNetwork.test` may run pieces of a large batch at once; a
    layer's shape error names the shape it received, whose first entry is then
    its piece's rows, not the batch's (a batch of 512 wrong-size images read
    "received (256, 576)"). The note is appended to the same exception
    object's message once; other exceptions, and a piece that is the whole
    batch, are left as they are. Returns ``error``.
    """
    if (isinstance(error, ValueError) and rows != batch_size and error.args
            and isinstance(error.args[0], str) and not getattr(error, "xpnn_piece_noted", False)):
        error.args = (f"{error.args[0]} (while running {rows} rows of a batch of {batch_size} "
                      f"in parallel pieces)", *error.args[1:])
        error.xpnn_piece_noted = True
    return error


def check_batch(input_tensor, layers, caller):
    """Raise ValueError for an empty batch (0 samples), naming the input the network takes.

    Checked before any layer runs: an empty batch used to give a loss of -0, NaN
    running statistics in every batch normalization and, in ``test``, a
    ZeroDivisionError.
    """
    shape = getattr(input_tensor, "shape", None)
    if shape is None or len(shape) == 0 or shape[0] != 0:
        return
    raise ValueError(f"NeuralNetwork.{caller}: the batch is empty (input of shape {tuple(shape)}); "
                     f"pass at least one sample: the network takes {network_input(layers, shape)}")


def network_input(layers, shape):
    """The input shape the first layer takes, in words: ``(batch, 1, y, x) (Conv)``; else the
    given sample shape."""
    first = layers[0] if layers else None
    convolution = getattr(first, "convolution_shape", None)
    if convolution is not None:
        spatial = ", ".join("yx"[:len(convolution) - 1])
        return f"input of shape (batch, {convolution[0]}, {spatial}) ({type(first).__name__})"
    size = getattr(first, "input_size", None) or getattr(first, "channels", None)
    if size is not None:
        return f"input of shape (batch, {size}, ...) ({type(first).__name__})"
    return f"samples of shape {tuple(shape[1:])}"


@contextlib.contextmanager
def running_statistics_kept_on_error(layers):
    """Put every layer's running statistics back when the block raises.

    A training forward pass updates batch normalization's running statistics
    layer by layer; a later layer refusing the batch (e.g. one sample where batch
    statistics need two) must not leave the earlier ones updated from it. The
    updates make new arrays, so keeping the references is enough.
    """
    kept = [(layer, layer.running_mean, layer.running_variance) for layer in layers
            if hasattr(layer, "running_mean") and hasattr(layer, "running_variance")]
    try:
        yield
    except BaseException:
        for layer, mean, variance in kept:
            layer.running_mean, layer.running_variance = mean, variance
        raise
