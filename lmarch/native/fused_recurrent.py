"""PyTorch's fused recurrent kernels swapped in for lmarch's written-out RNN / LSTM / GRU.

:class:`lmarch.nn.recurrent.Recurrent` runs each cell as its equations, one Python step per
token. The kernels behind ``torch.nn.LSTM`` (``torch._VF.lstm`` and its siblings: one C++
loop on the CPU, cuDNN on a GPU) compute the same function. :func:`swap_fused_recurrent`
gives every recurrent stack of a model a subclass whose ``forward`` calls that kernel with the
stack's own parameter tensors, in torch's flat order — the way attention hands its product to
SDPA. Nothing else changes: the object, its parameters, their names (so the state dict and
checkpoints), an optimizer's references. The kernel applies its own inter-layer dropout
(same rate, different random draws from the reference's).
"""

from __future__ import annotations

from torch import _VF, Tensor, nn

from lmarch.nn.recurrent import Recurrent, State

_KERNELS = {"lstm": _VF.lstm, "gru": _VF.gru, "rnn_tanh": _VF.rnn_tanh, "rnn_relu": _VF.rnn_relu}


class FusedRecurrent(Recurrent):
    """A :class:`~lmarch.nn.recurrent.Recurrent` stack (or subclass) whose forward is torch's
    fused kernel for its mode; made only by :func:`swap_fused_recurrent`."""

    def forward(self, input: Tensor, hx: State | None = None) -> tuple[Tensor, State]:
        """What the reference ``forward`` returns, from one fused call."""
        x, hx, unbatched = self._prepare(input, hx)  # x is [B, T, I] from here
        args = (self.flat_weights(), self.bias, self.num_layers, self.dropout, self.training)
        if self.mode == "lstm":
            out, h, c = _VF.lstm(x, hx, *args, self.bidirectional, True)
            return self._finish(out, (h, c), unbatched)
        out, h = _KERNELS[self.mode](x, hx, *args, self.bidirectional, True)
        return self._finish(out, h, unbatched)


_FUSED_CLASSES: dict[type, type] = {}


def fused_class(cls: type[Recurrent]) -> type[Recurrent]:
    """The fused subclass of ``cls`` (made once per class), so ``isinstance(m, LSTM)`` still
    holds after the swap."""
    if issubclass(cls, FusedRecurrent):
        return cls
    if cls is Recurrent:
        return FusedRecurrent
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (FusedRecurrent, cls), {})
    return _FUSED_CLASSES[cls]


def swap_fused_recurrent(model: nn.Module) -> int:
    """Swap the fused kernel into every recurrent stack of ``model``, in place; returns how
    many were swapped (0 on a second call)."""
    swapped = 0
    for module in model.modules():
        if isinstance(module, Recurrent) and not isinstance(module, FusedRecurrent):
            module.__class__ = fused_class(type(module))
            swapped += 1
    return swapped


__all__ = ["FusedRecurrent", "fused_class", "swap_fused_recurrent"]
