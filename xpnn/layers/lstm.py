"""LSTM: the course's extended exercise, built from FullyConnected, Sigmoid and TanH."""
from xpnn.layers.activations import Sigmoid, TanH
from xpnn.layers.recurrent import RecurrentLayer


class LSTM(RecurrentLayer):
    """Long short-term memory layer with the RNN's interface and output ``sigmoid(FC_y(h_t))``.

    One fully connected part ``FC_h`` maps ``[x_t, h_{t-1}]`` to the four
    gates' pre-activations, in this column order: forget ``f``, input ``i``,
    output ``o`` (each through a sigmoid) and the candidate ``g`` (through a
    tanh); the three sigmoid gates are adjacent so that one Sigmoid runs them.
    ``c_t = f * c_{t-1} + i * g``, ``h_t = o * tanh(c_t)``.

    Parameters
    ----------
    input_size, hidden_size, output_size : int
        Features of ``x_t``, ``h_t`` (and ``c_t``) and ``y_t``.

    Notes
    -----
    ``weights`` are ``FC_h``'s, shape ``(input_size + hidden_size + 1,
    4 * hidden_size)``. With ``memorize`` True, ``hidden_state`` and
    ``cell_state`` (each ``(batch, hidden_size)``) carry over to the next
    ``forward``. Shapes and the rest of the interface as for
    :class:`~xpnn.layers.RNN`.
    """

    carried_names = ("hidden_state", "cell_state")
    state_names = ("weights", "output_weights", "hidden_state", "cell_state")

    def __init__(self, input_size, hidden_size, output_size):
        super().__init__(input_size, hidden_size, output_size, hidden_outputs=4 * hidden_size)
        self.sigmoid_gates = Sigmoid()
        self.tanh_candidate = TanH()
        self.tanh_cell = TanH()

    def _parts(self):
        return super()._parts() + [self.sigmoid_gates, self.tanh_candidate, self.tanh_cell]

    def _run_steps(self, sequences):
        xp = self.backend.xp
        size, batch = self.hidden_size, sequences.shape[1]
        hidden = self._start_state("hidden_state", batch)
        cell = self._start_state("cell_state", batch)
        steps, outputs = [], []
        for time in range(sequences.shape[0]):
            pre_activation = self.fc_hidden.forward(xp.concat([sequences[time, ...], hidden], axis=1))
            gates = self.sigmoid_gates.forward(pre_activation[:, :3 * size])
            candidate = self.tanh_candidate.forward(pre_activation[:, 3 * size:])
            new_cell = gates[:, :size] * cell + gates[:, size:2 * size] * candidate
            squashed = self.tanh_cell.forward(new_cell)
            hidden = gates[:, 2 * size:] * squashed
            steps.append((self.fc_hidden._augmented_input, gates, candidate, cell, squashed))
            outputs.append(hidden)
            cell = new_cell
        self._steps = steps
        self._keep_state("hidden_state", hidden)
        self._keep_state("cell_state", cell)
        return xp.stack(outputs)

    def _back_steps(self, hidden_error):
        xp = self.backend.xp
        size = self.hidden_size
        # The errors of h_t and c_t that step t + 1 sends back (none into the last step).
        carried_hidden = carried_cell = self._zeros(hidden_error.shape[1])
        total, input_errors = None, []
        for time in reversed(range(len(self._steps))):
            step_input, gates, candidate, previous_cell, squashed = self._steps[time]
            error = hidden_error[time, ...] + carried_hidden
            # Each activation's backward from its output of this step, as its forward left it.
            self.tanh_cell._saved, self.sigmoid_gates._saved = squashed, gates
            self.tanh_candidate._saved = candidate
            cell_error = self.tanh_cell.backward(error * gates[:, 2 * size:]) + carried_cell
            gate_error = xp.concat([cell_error * previous_cell, cell_error * candidate,
                                    error * squashed], axis=1)
            pre_error = xp.concat([self.sigmoid_gates.backward(gate_error),
                                   self.tanh_candidate.backward(cell_error * gates[:, size:2 * size])],
                                  axis=1)
            step_error, total = self._accumulate_step(step_input, pre_error, total)
            input_errors.append(step_error[:, :self.input_size])
            carried_hidden = step_error[:, self.input_size:]
            carried_cell = cell_error * gates[:, :size]
        self.fc_hidden.gradient_weights = total
        return xp.stack(input_errors[::-1])
