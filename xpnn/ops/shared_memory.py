"""Memory shared with a forked worker process: fixed arrays, and rings of messages.

Both are anonymous shared mappings, so they must be made before the fork.
"""
import mmap
import os
import pickle
import time

import numpy as np


class SharedArrays:
    """Arrays of fixed shapes (``arrays``) in one anonymous shared mapping."""

    def __init__(self, shapes, dtype):
        sizes = [int(np.prod(shape)) for shape in shapes]
        self._memory = mmap.mmap(-1, max(1, sum(sizes)) * np.dtype(dtype).itemsize)
        flat = np.frombuffer(self._memory, dtype=dtype)
        bounds = np.cumsum([0] + sizes)
        self.arrays = [flat[start:stop].reshape(shape)
                       for start, stop, shape in zip(bounds[:-1], bounds[1:], shapes)]


class MessageRing:
    """Messages in one direction between two processes, through shared memory.

    The reader polls the ring instead of sleeping on a pipe: inside a training
    pass both processes are busy and an answer is microseconds away, where a
    pipe's wake-up costs 100-200 µs on a virtual machine (batch norm and dropout
    exchange 14 messages a LeNet step: ~2 ms through a pipe). A message larger
    than a slot goes through ``pipe`` after its slot is published. The writer
    fills a slot, then publishes it by advancing a counter: x86-64 keeps those
    stores in order for the reader (the only architecture this is used on).

    Parameters
    ----------
    slots : int
        Messages that may wait unread.
    slot_bytes : int
        Pickled size up to which a message travels in the ring.
    """

    #: The default ``slot_bytes``.
    SLOT_BYTES = 1 << 18

    def __init__(self, slots=8, slot_bytes=SLOT_BYTES):
        self.slots, self.slot_bytes = slots, slot_bytes
        self._memory = mmap.mmap(-1, 8 * (2 + slots) + slots * slot_bytes)
        self._counters = np.frombuffer(self._memory, np.int64, 2)  # written, read
        self._lengths = np.frombuffer(self._memory, np.int64, slots, offset=16)
        self._payload = np.frombuffer(self._memory, np.uint8, slots * slot_bytes,
                                      offset=8 * (2 + slots)).reshape(slots, slot_bytes)

    def post(self, message, pipe, alive, timeout):
        """Append ``message``; waits (polling) while every slot is unread."""
        data = pickle.dumps(_packed(message), protocol=pickle.HIGHEST_PROTOCOL)
        written = int(self._counters[0])
        wait_until(lambda: written - int(self._counters[1]) < self.slots, alive, timeout)
        slot = written % self.slots
        if len(data) <= self.slot_bytes:
            self._payload[slot, :len(data)] = np.frombuffer(data, np.uint8)
            self._lengths[slot] = len(data)
            self._counters[0] = written + 1
        else:
            self._lengths[slot] = -1
            self._counters[0] = written + 1  # published first: the reader then reads the pipe
            pipe.send_bytes(data)

    def take(self, pipe, alive, timeout):
        """The next message, waiting (polling) for it."""
        read = int(self._counters[1])
        wait_until(lambda: int(self._counters[0]) > read, alive, timeout)
        slot = read % self.slots
        length = int(self._lengths[slot])
        data = pipe.recv_bytes() if length < 0 else self._payload[slot, :length].tobytes()
        self._counters[1] = read + 1
        return _unpacked(pickle.loads(data))


#: Marks an array packed by :func:`_packed` (messages are the library's own: sums, masks, errors).
_ARRAY = "\x00xpnn-array"


def _packed(value):
    """``value`` with every NumPy array in it (through tuples) as a tuple of its dtype,
    shape and bytes: pickling an array costs ~5 µs each way, that tuple well under 1."""
    if type(value) is np.ndarray and not value.dtype.hasobject:
        return _ARRAY, value.dtype.str, value.shape, value.tobytes()
    if type(value) is tuple:
        return tuple(_packed(entry) for entry in value)
    return value


def _unpacked(value):
    """The inverse of :func:`_packed` (arrays come back writable, C-ordered)."""
    if type(value) is tuple:
        if len(value) == 4 and value[0] == _ARRAY:
            return np.frombuffer(value[3], value[1]).reshape(value[2]).copy()
        return tuple(_unpacked(entry) for entry in value)
    return value


#: Seconds :func:`wait_until` polls before it sleeps between polls: inside a training pass
#: answers come within a millisecond or so; a process left waiting (a pass started ahead
#: that no step takes up) must not hold a core for the whole ``timeout``.
SPIN_SECONDS = 0.02
#: The longest sleep between two polls once spinning is over: the latest an answer is seen
#: after a long wait (a caller of train_batch busy between steps), ~1,000 wake-ups a second.
LONGEST_SLEEP = 0.001


def wait_until(ready, alive, timeout):
    """Poll ``ready()``; every few hundred polls give the core away once and check the
    other process (``alive()``) and the ``timeout`` in seconds. After ``SPIN_SECONDS``
    the polls are spaced by sleeps growing to ``LONGEST_SLEEP``."""
    polls, start, sleep = 0, None, 0.0
    while not ready():
        polls += 1
        if polls % 256:
            continue
        if not alive():
            raise RuntimeError("the other process of the training pass ended")
        now = time.monotonic()
        start = start or now
        if now - start > timeout:
            raise RuntimeError(f"the other process of the training pass did not answer in {timeout:.0f} s")
        if now - start < SPIN_SECONDS:
            os.sched_yield()
        else:
            sleep = min(LONGEST_SLEEP, max(2 * sleep, 1e-4))
            time.sleep(sleep)
            polls = 255  # (every poll from now on checks the clock and sleeps)
