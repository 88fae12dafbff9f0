"""quant.gguf.one_thread: a GGUF load's small operations run single-threaded, and the caller's
thread count comes back afterwards, also when the load fails."""

from __future__ import annotations

import pytest
import torch

from lmarch.quant.gguf import one_thread


def test_one_thread_inside_and_restored_after() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), one_thread():
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
