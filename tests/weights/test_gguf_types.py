"""lmarch's own table of ggml block sizes (parsing needs no import of the gguf package) must say
exactly what the gguf package says."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np

from lmarch.weights.gguf import GGML_TYPES


def test_type_table_matches_the_gguf_package() -> None:
    for code, (name, block_size, block_bytes) in GGML_TYPES.items():
        qtype = gguf.GGMLQuantizationType(code)
        assert qtype.name == name
        assert gguf.GGML_QUANT_SIZES[qtype] == (block_size, block_bytes)


def test_parsing_a_common_file_imports_no_gguf_package(tmp_path) -> None:
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("a", np.arange(64, dtype="float32").reshape(2, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code = (
        "import sys; from lmarch.weights.gguf import read_gguf; "
        f"f = read_gguf({str(path)!r}); print(f.tensor_info('a').type_name, 'gguf' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["F32", "False"]
