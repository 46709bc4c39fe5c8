"""How much room a checkpoint needs on disk, known before training (``xpnn-train`` checks it).

A save writes the new ``model.npz`` as a temporary copy beside the previous one
and then renames it: while it runs, the file system holds both. So a run that
starts without a checkpoint needs room for two, a resumed one for one more;
plus the small files (``model.json``, ``metrics.json``, ``plot.png``, each also
written as a temporary copy first).
"""
import io
import json

import numpy as np

from xpnn.checkpoint import META_KEY, model_metadata, network_arrays, optimizers_of
from xpnn.checkpoint_checks import manifest

#: Room for model.json, metrics.json and plot.png with their temporary copies, and for the
#: metrics that the checkpoint's training state gains per epoch (plot.png: ~50 kB).
SMALL_FILES_BYTES = 1 << 20


def full_arrays(net):
    """:func:`~xpnn.checkpoint.network_arrays` plus what training adds later: running
    statistics (one per channel, as γ) and each optimizer's state (the shape of what it steps)."""
    arrays = network_arrays(net)
    for index, layer in enumerate(net.layers):
        weights = arrays.get(f"layers.{index}.weights")
        if weights is None:
            continue  # (no parameters: no statistics, no optimizer)
        for name in ("running_mean", "running_variance"):
            if name in getattr(layer, "state_names", ()):
                arrays.setdefault(f"layers.{index}.{name}", np.zeros_like(weights))
        for slot, optimizer in optimizers_of(layer):
            parameter = arrays.get(f"layers.{index}.{'bias' if slot == 'bias_optimizer' else 'weights'}")
            for name in getattr(optimizer, "state_names", ()):
                if parameter is not None:
                    arrays.setdefault(f"layers.{index}.{slot}.{name}", np.zeros_like(parameter))
    return arrays


def checkpoint_bytes(net, model, options, resume):
    """The size of the ``model.npz`` that a save of ``net`` (with every state array it will
    have once trained) and the training state ``resume`` writes."""
    arrays = full_arrays(net)
    meta = model_metadata(net, model, options)
    meta["arrays"] = manifest(arrays)
    meta["resume"] = resume
    arrays[META_KEY] = np.asarray(json.dumps(meta, sort_keys=True))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.tell()


def room_needed(checkpoint_size, has_checkpoint):
    """Free bytes a run needs for its saves: see the module docstring."""
    return checkpoint_size * (1 if has_checkpoint else 2) + SMALL_FILES_BYTES
