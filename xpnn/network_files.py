"""The course's pickle save/load of a whole network (:func:`xpnn.network.save`, ``load``).

Checkpoints of ``xpnn-train`` are another format (:mod:`xpnn.checkpoint`: npz and
JSON, no code executed on load); the messages here point there.
"""
import copy
import errno
import os
import pickle

from xpnn._files import atomic_write_bytes
from xpnn.backend import get_backend, make_backend

CHECKPOINT_HINT = ("; a checkpoint of xpnn-train (a directory holding model.npz and model.json) "
                    "loads with xpnn.checkpoint.load_model(directory)")


def save(filename, net):
    """Pickle ``net`` without its data layer; arrays are stored as NumPy arrays.

    A network trained on any backend (the GPU included) therefore loads on a
    CPU-only machine. The file is written to a temporary name and renamed, so
    an interrupted save never leaves a truncated file behind.
    """
    data_layer, net.data_layer = net.data_layer, None
    try:
        host_net = copy.deepcopy(net)
    finally:
        net.data_layer = data_layer
    host_net.loss = [float(host_net.backend.to_numpy(value)) for value in host_net.loss]
    # The last batch's labels may be device arrays (a GPU data layer): not model state.
    host_net.label_tensor = None
    host_net.to(make_backend("cpu", host_net.backend.dtype_name))
    atomic_write_bytes(filename, pickle.dumps(host_net, protocol=pickle.HIGHEST_PROTOCOL))


def load(filename, data_layer):
    """Unpickle a network saved by :func:`save`, attach ``data_layer``, move it to the current backend."""
    if os.path.isdir(filename):
        raise IsADirectoryError(errno.EISDIR, f"xpnn.network.load: {filename} is a directory, not "
                                f"a file saved by xpnn.network.save(filename, net){CHECKPOINT_HINT}")
    with open(filename, "rb") as handle:
        try:
            net = pickle.load(handle)
        except (pickle.UnpicklingError, EOFError) as error:
            handle.seek(0)
            if handle.read(4) == b"PK\x03\x04":  # a zip archive, as an .npz is
                directory = os.path.dirname(os.path.abspath(filename))
                message = (f"xpnn.network.load: {filename} is a zip archive (.npz), not a pickle "
                           f"written by xpnn.network.save(filename, net){CHECKPOINT_HINT}, "
                           f"here xpnn.checkpoint.load_model({directory!r})")
            else:
                detail = str(error).replace("\n", " ").rstrip(".")
                message = (f"xpnn.network.load: {filename} is not a pickle written by "
                           f"xpnn.network.save(filename, net), or it is truncated (pickle: {detail})")
            raise type(error)(message) from error
    net.data_layer = data_layer
    current = get_backend()
    if net.layers and net.backend.name != current.name:
        net.to(make_backend(current.name, net.backend.dtype_name, current.device_spec))
    return net
