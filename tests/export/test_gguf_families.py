"""GGUF export of every mixture-of-experts and hybrid family, refereed by llama.cpp: a tiny random
model of each family is given a plan of two GGUF types, exported, and each planned tensor of the file is
compared with the float tensor llama.cpp's own converter writes under that name (so a module put
under the wrong name, in the wrong expert slot or in the wrong row order fails); llama-perplexity
then runs the file. The importance matrix and the file as a size reference (`--budget-like`) use
the same names: checked against the file too.

llama.cpp's converter reads a family's tokenizer by its own rules (most want a byte-level BPE whose
pre-tokenizer it recognises), so these models carry SmolLM2's tokenizer, rebuilt from the shared
GGUF, instead of the stories260K one."""
from __future__ import annotations


import numpy as np
import pytest

from conftest import EVALUATION_TEXT, SMOLLM2, llama_perplexity, require_tool
from layerwise.errors import LayerwiseError
from tiny_families import HYBRID_FAMILIES, MOE_FAMILIES, save_tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converter():
    from layerwise.export.convert import find_converter

    try:
        found = find_converter(None)
    except LayerwiseError:
        found = None
    return require_tool("llama.cpp's convert_hf_to_gguf.py", found, "bash .ci/llama_cpp_converter")


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", MOE_FAMILIES + HYBRID_FAMILIES)
def test_planned_gguf_holds_the_converters_tensors_quantized(model_type, converter, bpe_tokenizer, llama_cpp_bin,
                                                             tmp_path):
    import gguf
    import torch

    from layerwise.export.convert import convert_to_gguf
    from layerwise.export.run import run_export
    from layerwise.models import load_model
    from layerwise.plan import Plan
    from layerwise.plan.options import parse_option
    from layerwise.quant import gguf_blocks

    folder = tmp_path / "m"
    save_tiny(model_type, folder, tokenizer=bpe_tokenizer, vocab_size=49152)
    loaded = load_model(folder)
    # Token mixers at one type, feed-forward (experts included) at the other.
    plan = Plan(parse_option("q4_0")).override("re:.*\\.(mlp|feed_forward)\\..*(proj|w[123])$", parse_option("q8_0"))
    out = tmp_path / "planned.gguf"
    run_export(folder, plan=plan, format="gguf", out=out, converter=converter, progress=False)

    float_file = convert_to_gguf(loaded.source, tmp_path / "float.gguf", torch.float32, converter,
                                 loaded.adapter.converter_args)
    floats = {tensor.name: np.asarray(tensor.data, dtype=np.float32) for tensor in gguf.GGUFReader(float_file).tensors}
    planned = [tensor for tensor in gguf.GGUFReader(out).tensors
               if tensor.tensor_type.name in ("Q4_0", "Q8_0") and tensor.name.startswith("blk.")]
    # Every block's attention (or mixer) and feed-forward weights were planned.
    assert {tensor.name.split(".")[1] for tensor in planned} == {str(b) for b in range(loaded.n_blocks)}
    assert {tensor.tensor_type.name for tensor in planned} == {"Q4_0", "Q8_0"}
    assert any("exps" in tensor.name for tensor in planned) == (loaded.adapter.experts is not None)
    for tensor in planned:
        reference = floats[tensor.name]
        rows = int(np.prod(reference.shape[:-1]))
        ours = gguf_blocks.dequantize(np.asarray(tensor.data), tensor.tensor_type.name,
                                      (rows, reference.shape[-1])).numpy().reshape(reference.shape)
        # Rounding moves a random Gaussian weight by ~9% (Q4_0) or ~0.5% (Q8_0) of its norm; a
        # tensor from the wrong module, slot or row order is off by ~140%.
        error = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
        assert error < (0.12 if tensor.tensor_type.name == "Q4_0" else 0.01), (tensor.name, error)

    # Every importance-matrix entry names a tensor of the file, with its row length; read as a size
    # reference, the file gives the planned modules exactly its planned tensors' bytes.
    from layerwise.data.windows import token_windows
    from layerwise.models.gguf_reference import read_reference
    from layerwise.models.layout import block_linears
    from layerwise.quant.imatrix import collect_imatrix

    imatrix = collect_imatrix(loaded, token_windows(loaded.tokenizer, EVALUATION_TEXT, tokens=256, seq_len=128),
                              progress=False)
    planned_names = {tensor.name for tensor in planned}
    assert set(imatrix.sums) == planned_names
    for name, sums in imatrix.sums.items():
        assert sums.shape[-1] == floats[name].shape[-1], name
    modules = [name for _, name, _ in block_linears(loaded.model, loaded.adapter)]
    reference = read_reference(loaded, out, modules)
    assert sum(reference.tensor_bytes.values()) == sum(int(tensor.n_bytes) for tensor in planned)

    text = tmp_path / "text.txt"
    text.write_text(EVALUATION_TEXT.read_text()[:20_000])
    assert llama_perplexity(llama_cpp_bin, out, text, "-c", 128, "--chunks", 2) > 0
