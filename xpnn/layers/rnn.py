"""RNN (course API): the Elman cell, built from FullyConnected, TanH and Sigmoid."""
from xpnn.layers.activations import TanH
from xpnn.layers.recurrent import RecurrentLayer


class RNN(RecurrentLayer):
    """Elman recurrent layer: ``h_t = tanh(FC_h([x_t, h_{t-1}]))``, ``y_t = sigmoid(FC_y(h_t))``.

    Parameters
    ----------
    input_size, hidden_size, output_size : int
        Features of ``x_t``, ``h_t`` and ``y_t``.

    Notes
    -----
    Input ``(time, input_size)`` is one sequence (the course's semantics: the
    batch axis is the time axis) and gives ``(time, output_size)``; input
    ``(time, batch, input_size)`` runs ``batch`` independent sequences and
    gives ``(time, batch, output_size)``. ``weights`` are ``FC_h``'s, shape
    ``(input_size + hidden_size + 1, hidden_size)``; ``hidden_state`` (shape
    ``(batch, hidden_size)``, a 2-D input's batch being 1) is the state carried
    to the next ``forward`` while ``memorize`` is True (None otherwise, or to
    start afresh). See :class:`~xpnn.layers.recurrent.RecurrentLayer` for the
    rest of the interface.
    """

    carried_names = ("hidden_state",)
    state_names = ("weights", "output_weights", "hidden_state")

    def __init__(self, input_size, hidden_size, output_size):
        super().__init__(input_size, hidden_size, output_size, hidden_outputs=hidden_size)
        self.tanh = TanH()

    def _parts(self):
        return super()._parts() + [self.tanh]

    def _run_steps(self, sequences):
        xp = self.backend.xp
        state = self._start_state("hidden_state", sequences.shape[1])
        steps, hidden = [], []
        for time in range(sequences.shape[0]):
            pre_activation = self.fc_hidden.forward(xp.concat([sequences[time, ...], state], axis=1))
            state = self.tanh.forward(pre_activation)
            # What this step's backward needs: FC_h's input (with its ones) and h_t.
            steps.append((self.fc_hidden._augmented_input, state))
            hidden.append(state)
        self._steps = steps
        self._keep_state("hidden_state", state)
        return xp.stack(hidden)

    def _back_steps(self, hidden_error):
        xp = self.backend.xp
        # The error of h_t that step t + 1 sends back (none into the last step).
        carried = self._zeros(hidden_error.shape[1])
        total, input_errors = None, []
        for time in reversed(range(len(self._steps))):
            step_input, state = self._steps[time]
            self.tanh._saved = state  # the step's output, as its forward left it
            pre_error = self.tanh.backward(hidden_error[time, ...] + carried)
            step_error, total = self._accumulate_step(step_input, pre_error, total)
            input_errors.append(step_error[:, :self.input_size])
            carried = step_error[:, self.input_size:]
        self.fc_hidden.gradient_weights = total
        return xp.stack(input_errors[::-1])
