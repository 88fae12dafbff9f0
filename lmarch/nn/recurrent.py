"""Recurrent networks written out: the Elman RNN, the LSTM and the GRU, cell by cell.

Each layer reads a sequence x_1..x_T and keeps a state that it rewrites at every step. The input
part of every step's affine map, x_t W_ih^T + b_ih, does not depend on the state, so it is
computed for all T steps in one matrix product before the loop; only the recurrent part
h_{t-1} W_hh^T + b_hh stays inside the loop (:func:`run_direction`).

The parameters are named and shaped as ``torch.nn.RNN`` / ``LSTM`` / ``GRU`` name and shape
theirs (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``, with a
``_reverse`` suffix for the backward direction), so a state dict moves between the two either
way; the gate blocks inside each matrix are stacked in torch's order too. This module is the
reference: a fused kernel for the same layers is swapped in from outside
(:mod:`lmarch.native.fused_recurrent`), never chosen in here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# a layer's state: h [.., B, H] for the Elman RNN and the GRU, (h, c) for the LSTM
State = Tensor | tuple[Tensor, Tensor]
Step = Callable[[Tensor, State, Tensor, Tensor | None], tuple[Tensor, State]]


def _recurrent(h: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> Tensor:
    return F.linear(h, w_hh, b_hh)


def elman_tanh_step(gx: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> tuple:
    """One step of the Elman RNN (Elman 1990) with tanh:

        h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)

    ``gx`` is the input part x_t W_ih^T + b_ih, [B, H]. Returns (output, new state), both h_t.
    """
    h = torch.tanh(gx + _recurrent(h, w_hh, b_hh))
    return h, h


def elman_relu_step(gx: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> tuple:
    """The Elman step with ReLU in place of tanh (Le et al. 2015 use it for IRNNs):

    h_t = max(0, x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)."""
    h = torch.relu(gx + _recurrent(h, w_hh, b_hh))
    return h, h


def lstm_step(gx: Tensor, state: tuple[Tensor, Tensor], w_hh: Tensor, b_hh: Tensor | None) -> tuple:
    """One step of the LSTM (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et
    al. 2000), gates stacked as torch stacks them, [i | f | g | o]:

        i_t = sigma(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)     input gate
        f_t = sigma(W_if x_t + b_if + W_hf h_{t-1} + b_hf)     forget gate
        g_t = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)      candidate cell
        o_t = sigma(W_io x_t + b_io + W_ho h_{t-1} + b_ho)     output gate
        c_t = f_t * c_{t-1} + i_t * g_t
        h_t = o_t * tanh(c_t)

    ``gx`` holds the four input parts, [B, 4H]. Returns (h_t, (h_t, c_t)).
    """
    h, c = state
    i, f, g, o = (gx + _recurrent(h, w_hh, b_hh)).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, (h, c)


def gru_step(gx: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> tuple:
    """One step of the GRU (Cho et al. 2014) as torch writes it, gates stacked [r | z | n],
    the reset gate applied to the recurrent part *after* its bias:

        r_t = sigma(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)     reset gate
        z_t = sigma(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)     update gate
        n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))
        h_t = (1 - z_t) * n_t + z_t * h_{t-1}

    ``gx`` holds the three input parts, [B, 3H]. Returns (h_t, h_t).
    """
    x_r, x_z, x_n = gx.chunk(3, dim=-1)
    h_r, h_z, h_n = _recurrent(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    h = (1 - z) * n + z * h
    return h, h


# mode -> (gate blocks per weight matrix, the step)
CELLS: dict[str, tuple[int, Step]] = {
    "rnn_tanh": (1, elman_tanh_step),
    "rnn_relu": (1, elman_relu_step),
    "lstm": (4, lstm_step),
    "gru": (3, gru_step),
}


def run_direction(
    x: Tensor,
    state: State,
    step: Step,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    reverse: bool = False,
) -> tuple[Tensor, State]:
    """One layer in one direction over ``x`` [B, T, I] from ``state``: the outputs [B, T, H]
    and the final state. The input projection of all T steps is one matrix product; the loop
    runs only the recurrent part. ``reverse`` reads the sequence from its end (the backward
    half of a bidirectional layer); its outputs stay aligned with the inputs."""
    gates_x = F.linear(x, w_ih, b_ih)  # [B, T, G*H], every step's input part at once
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    outputs: list[Tensor] = []
    for t in steps:
        out, state = step(gates_x[:, t], state, w_hh, b_hh)
        outputs.append(out)
    if reverse:
        outputs.reverse()
    return torch.stack(outputs, dim=1), state


class Recurrent(nn.Module):
    """A stack of recurrent layers, each running the cell of ``mode`` over the whole sequence.

    ``forward(input, hx=None)`` takes input [T, B, I] ([B, T, I] with ``batch_first``, or
    unbatched [T, I]) and the initial state h_0 [L*D, B, H] (the LSTM: the pair (h_0, c_0);
    zeros when None), with D = 2 for a bidirectional stack. It returns the last layer's outputs
    [T, B, D*H] (both directions concatenated) and the final state in the layout of h_0 — the
    calling convention of ``torch.nn.RNN``. Between layers, in training, dropout with
    probability ``dropout`` is applied to the outputs of every layer but the last (Zaremba et
    al. 2014).
    """

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if mode not in CELLS:
            raise ValueError(f"unknown recurrent mode {mode!r}; one of {sorted(CELLS)}")
        if num_layers < 1 or hidden_size < 1 or input_size < 1:
            raise ValueError("input_size, hidden_size and num_layers must be positive")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must lie in [0, 1], got {dropout}")
        self.mode = mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional = bidirectional
        gates = CELLS[mode][0] * hidden_size
        factory = {"device": device, "dtype": dtype}
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size * self.num_directions
            for suffix in self._suffixes():
                name = f"l{layer}{suffix}"
                self.register_parameter(
                    f"weight_ih_{name}", nn.Parameter(torch.empty(gates, layer_in, **factory))
                )
                self.register_parameter(
                    f"weight_hh_{name}", nn.Parameter(torch.empty(gates, hidden_size, **factory))
                )
                if bias:
                    self.register_parameter(
                        f"bias_ih_{name}", nn.Parameter(torch.empty(gates, **factory))
                    )
                    self.register_parameter(
                        f"bias_hh_{name}", nn.Parameter(torch.empty(gates, **factory))
                    )
        if self.weight_ih_l0.device.type != "meta":
            self.reset_parameters()

    @property
    def num_directions(self) -> int:
        """2 for a bidirectional stack, else 1."""
        return 2 if self.bidirectional else 1

    def _suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def reset_parameters(self) -> None:
        """Every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H)), torch's (and Keras's old) default."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def layer_weights(self, layer: int, reverse: bool = False) -> tuple:
        """``(w_ih, w_hh, b_ih, b_hh)`` of one layer and direction (biases None without bias)."""
        name = f"l{layer}{'_reverse' if reverse else ''}"
        return (
            getattr(self, f"weight_ih_{name}"),
            getattr(self, f"weight_hh_{name}"),
            getattr(self, f"bias_ih_{name}", None),
            getattr(self, f"bias_hh_{name}", None),
        )

    def flat_weights(self) -> list[Tensor]:
        """All parameters in torch's ``_flat_weights`` order (layer, direction, then
        w_ih, w_hh, b_ih, b_hh): what the fused kernels take."""
        out = []
        for layer in range(self.num_layers):
            for reverse in (False, True)[: self.num_directions]:
                out.extend(w for w in self.layer_weights(layer, reverse) if w is not None)
        return out

    def initial_state(self, batch_size: int, like: Tensor) -> State:
        """The zero state for ``batch_size`` rows, in ``like``'s dtype and device."""
        shape = (self.num_layers * self.num_directions, batch_size, self.hidden_size)
        h = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return (h, torch.zeros_like(h)) if self.mode == "lstm" else h

    def _prepare(self, input: Tensor, hx: State | None) -> tuple[Tensor, State, bool]:
        """Input as [B, T, I] and a batched state; whether the input came unbatched."""
        if input.dim() not in (2, 3):
            raise ValueError(f"expected input of 2 or 3 dimensions, got {input.dim()}")
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                hx = tuple(s.unsqueeze(1) for s in hx) if isinstance(hx, tuple) else hx[:, None]
        if not self.batch_first:
            input = input.transpose(0, 1)
        if hx is None:
            return input, self.initial_state(input.shape[0], input), unbatched
        if (self.mode == "lstm") != isinstance(hx, tuple):
            raise ValueError("the LSTM's state is a pair (h_0, c_0); the other cells' is h_0")
        expected = (self.num_layers * self.num_directions, input.shape[0], self.hidden_size)
        for h in hx if isinstance(hx, tuple) else (hx,):
            if tuple(h.shape) != expected:  # a [.., 1, H] state would broadcast silently
                raise ValueError(
                    f"expected an initial state of shape {expected}, got {tuple(h.shape)}"
                )
        return input, hx, unbatched

    def _finish(self, output: Tensor, state: State, unbatched: bool) -> tuple[Tensor, State]:
        if not self.batch_first:
            output = output.transpose(0, 1)
        if unbatched:
            output = output.squeeze(0 if self.batch_first else 1)
            state = tuple(s.squeeze(1) for s in state) if isinstance(state, tuple) else state[:, 0]
        return output, state

    def forward(self, input: Tensor, hx: State | None = None) -> tuple[Tensor, State]:
        """Outputs and final state; see the class docstring for the shapes."""
        x, hx, unbatched = self._prepare(input, hx)
        step = CELLS[self.mode][1]
        is_lstm = self.mode == "lstm"
        finals_h: list[Tensor] = []
        finals_c: list[Tensor] = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                state = (hx[0][k], hx[1][k]) if is_lstm else hx[k]
                out, state = run_direction(
                    x, state, step, *self.layer_weights(layer, direction == 1), direction == 1
                )
                outputs.append(out)
                finals_h.append(state[0] if is_lstm else state)
                if is_lstm:
                    finals_c.append(state[1])
            x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
            if layer < self.num_layers - 1 and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
        h_n = torch.stack(finals_h)
        final = (h_n, torch.stack(finals_c)) if is_lstm else h_n
        return self._finish(x, final, unbatched)

    def extra_repr(self) -> str:
        extras = [f"{self.input_size}, {self.hidden_size}", f"num_layers={self.num_layers}"]
        extras += [f"{k}={getattr(self, k)}" for k in ("bias", "batch_first", "dropout")]
        return ", ".join([*extras, f"bidirectional={self.bidirectional}"])


class RNN(Recurrent):
    """The Elman RNN stack (:func:`elman_tanh_step`, or :func:`elman_relu_step` with
    ``nonlinearity="relu"``), with ``torch.nn.RNN``'s arguments, parameters and outputs."""

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
        **kwargs,
    ) -> None:  # fmt: skip
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be tanh or relu, got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, num_layers, **kwargs)


class LSTM(Recurrent):
    """The LSTM stack (:func:`lstm_step`), with ``torch.nn.LSTM``'s arguments (no
    ``proj_size``), parameters and outputs: ``forward`` returns (output, (h_n, c_n))."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, **kwargs) -> None:
        super().__init__("lstm", input_size, hidden_size, num_layers, **kwargs)


class GRU(Recurrent):
    """The GRU stack (:func:`gru_step`), with ``torch.nn.GRU``'s arguments, parameters and
    outputs."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, **kwargs) -> None:
        super().__init__("gru", input_size, hidden_size, num_layers, **kwargs)


class RecurrentState:
    """The decoding "cache" of a recurrent language model: its state after the tokens read so
    far. Where a Transformer keeps every past key and value, an RNN keeps only this, so each
    new token costs the same O(1) work however long the text.

    ``state`` is what :class:`Recurrent` takes and returns (h, or (h, c) for the LSTM), with
    the batch in dimension 1.
    """

    def __init__(self, state: State) -> None:
        self.state = state

    def _tensors(self) -> tuple[Tensor, ...]:
        return self.state if isinstance(self.state, tuple) else (self.state,)

    def _rebuild(self, tensors: list[Tensor]) -> None:
        self.state = tuple(tensors) if isinstance(self.state, tuple) else tensors[0]

    @property
    def batch_size(self) -> int:
        """Rows of the state."""
        return self._tensors()[0].shape[1]

    def detach_(self) -> RecurrentState:
        """Cut the graph behind the state (truncated back-propagation through time)."""
        self._rebuild([t.detach() for t in self._tensors()])
        return self

    def reset_(self, rows: Tensor) -> RecurrentState:
        """Zero the state of the rows where the bool mask ``rows`` [B] is True (a stream
        that starts afresh)."""
        keep = (~rows.to(torch.bool)).to(self._tensors()[0].dtype)[None, :, None]
        self._rebuild([t * keep.to(t.device) for t in self._tensors()])
        return self

    def reorder(self, indices: Tensor, length: int | None = None) -> None:
        """Make row ``i`` a copy of old row ``indices[i]`` (beam search). ``length`` is for the
        KV cache's interface; a recurrent state has no positions."""
        self._rebuild([t.index_select(1, indices.to(t.device)) for t in self._tensors()])


__all__ = [
    "CELLS",
    "GRU",
    "LSTM",
    "RNN",
    "Recurrent",
    "RecurrentState",
    "elman_relu_step",
    "elman_tanh_step",
    "gru_step",
    "lstm_step",
    "run_direction",
]
