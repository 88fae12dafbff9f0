"""Without lmarch's native kernels (LMARCH_NATIVE=0, as on a machine with no C compiler):
accelerate is the identity and every model runs its PyTorch path, with the same numbers.

Runs in a fresh interpreter, since the library is loaded once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    import torch.nn.functional as F
    from lmarch import native
    from lmarch.models import GPT, Llama
    from lmarch.models.gpt import GPTConfig
    from lmarch.models.llama import LlamaConfig
    from lmarch.native import accelerate
    from lmarch.quant.apply import quantize_
    from lmarch.quant.blockq import BlockQ4Linear, BlockQ8Linear

    torch.manual_seed(0)
    out = {"available": native.native_available()}
    gpt = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=64))
    classes = [type(m) for m in gpt.modules()]
    out["gpt_unchanged"] = accelerate(gpt, training=True) is gpt and classes == [
        type(m) for m in gpt.modules()
    ]
    config = LlamaConfig(
        vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=128,
        intermediate_size=224,
    )
    q4 = Llama(config).eval()
    float_model = Llama(config).eval()
    quantize_(q4, "q4")
    classes = [type(m) for m in q4.modules()]
    accelerate(q4, training=False)
    out["q4_unchanged"] = classes == [type(m) for m in q4.modules()]
    # the float model holding the q4 model's dequantised weights: the fallback's own equation
    state = {}
    for name, module in q4.named_modules():
        if isinstance(module, (BlockQ4Linear, BlockQ8Linear)):
            state[name + ".weight"] = module.dequantized_weight()
    for name, tensor in q4.state_dict().items():
        if name.endswith(("codes", ".dm", ".d")):
            continue
        state.setdefault(name, tensor)
    missing, unexpected = float_model.load_state_dict(state, strict=False)
    out["loaded"] = [missing, unexpected]
    ids = torch.tensor([[5, 17, 3, 88, 41, 9, 60]])
    with torch.no_grad():
        got, want = q4(ids), float_model(ids)
    out["max_error"] = (got - want).abs().max().item()
    out["scale"] = want.abs().max().item()
    print(json.dumps(out))
    """
)


def test_accelerate_is_the_identity_and_q4_runs_its_pytorch_path() -> None:
    env = {**os.environ, "LMARCH_NATIVE": "0"}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["available"] is False
    assert out["gpt_unchanged"] is True and out["q4_unchanged"] is True
    assert out["loaded"] == [[], []]
    # the q4 layers multiply by their dequantised weights: the same function as the float model
    assert out["max_error"] <= 1e-5 * out["scale"]
