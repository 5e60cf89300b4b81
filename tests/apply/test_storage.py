"""The quantized folder on disk: codes packed at their width, as many bytes as the size report
counts, and the same weights back bit for bit."""
from __future__ import annotations

import copy
import json
import math
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from layerwise import LayerwiseError
from layerwise.apply.run import run_quantize
from layerwise.apply.storage import StoredModules, load_quantized, pack_bits, save_quantized, unpack_bits
from layerwise.plan import Plan
from layerwise.quant import QuantConfig, quantize_weight
from layerwise.quant.awq import awq_quantize
from layerwise.quant.gguf_blocks import GGUF_TYPES
from layerwise.quant.qtensor import QTensor
from layerwise.util.tensor_files import TensorSpill, save_safetensors

ROUND_TRIP_CONFIGS = [
    QuantConfig("int", bits, group, symmetric, remainder="tail")
    for bits in range(2, 9) for group in (32, 48, None) for symmetric in (True, False)
] + [QuantConfig("nf4", group_size=64), QuantConfig("fp4", group_size=32), QuantConfig("mxfp4"),
     QuantConfig("fp8", group_size=None), QuantConfig("fp8", group_size=64)
     ] + [QuantConfig(name.lower()) for name in GGUF_TYPES]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def tensor_data_bytes(path) -> dict[str, int]:
    """Bytes of each tensor's data in a safetensors file, read from its JSON header."""
    with open(path, "rb") as file:
        (header_length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_length))
    return {key: end - start for key, entry in header.items() if key != "__metadata__"
            for start, end in [entry["data_offsets"]]}


def test_pack_bits_is_a_little_endian_bit_stream():
    assert pack_bits(np.array([1, 2, 3]), 2).tolist() == [0b111001]
    assert pack_bits(np.array([5, 7, 6]), 3).tolist() == [0b10_111_101, 0b1]  # 6 = 0b110 straddles a byte
    generator = np.random.default_rng(0)
    for bits in range(1, 9):
        for count in (0, 1, 7, 8, 9, 1001):
            values = generator.integers(0, 2**bits, size=count).astype(np.uint8)
            packed = pack_bits(values, bits)
            assert len(packed) == math.ceil(count * bits / 8)
            assert np.array_equal(unpack_bits(packed, bits, count), values)


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS, ids=lambda c: c.label)
def test_dequantized_weights_survive_save_and_load_bit_for_bit(config, tmp_path):
    weight = torch.randn(7, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    weight[2, :64] = 0.0  # all-zero groups: -0.0 scales must stay -0.0
    weight[3, :64] = 0.3  # a one-signed group
    q = quantize_weight(weight, config)
    save_quantized(tmp_path, Plan(config), {"layer": q}, {})
    _, loaded = load_quantized(tmp_path)
    back = loaded["layer"]
    assert bitwise_equal(back.dequantize(), q.dequantize())
    if q.codes is not None:
        assert bitwise_equal(back.codes, q.codes)
        assert back.params.keys() == q.params.keys()
        assert all(bitwise_equal(back.params[key], value) for key, value in q.params.items())
    else:
        assert np.array_equal(back.packed, q.packed)
    # The file holds what n_bits counts (up to rounding each tensor to whole bytes).
    stored = sum(tensor_data_bytes(tmp_path / "qweights.safetensors").values())
    assert 0 <= stored - q.n_bits / 8 < 3


def test_awq_channel_scales_are_stored_in_16_bits_and_come_back(tmp_path):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(32, 64, generator=generator) * 0.1
    inputs = torch.randn(256, 64, generator=generator) * torch.logspace(0, 1.5, 64)
    config = QuantConfig("int", 3, 32, symmetric=False, algorithm="awq")
    q = awq_quantize(weight, inputs, config)
    save_quantized(tmp_path, Plan(config), {"layer": q}, {})
    back = load_quantized(tmp_path)[1]["layer"]
    assert bitwise_equal(back.channel_scale, q.channel_scale)
    assert bitwise_equal(back.dequantize(), q.dequantize())
    sizes = tensor_data_bytes(tmp_path / "qweights.safetensors")
    assert sizes["layer.channel_scale"] == 2 * 64
    assert sum(sizes.values()) == q.n_bits / 8


def _save_schema_version_1(out, q: QTensor, config: QuantConfig) -> None:
    """What layerwise wrote before codes were packed: int16 codes and float32 parameters."""
    tensors = {"layer.codes": q.codes, **{f"layer.{key}": value for key, value in q.params.items()}}
    save_file(tensors, str(out / "qweights.safetensors"))
    document = {"schema": "layerwise.quantized", "schema_version": 1, "meta": {},
                "modules": {"layer": {"config": config.to_dict(), "shape": list(q.shape)}}}
    (out / "quant.json").write_text(json.dumps(document))


def test_schema_version_1_folders_still_load(tmp_path):
    config = QuantConfig("int", 4, 32, symmetric=False)
    q = quantize_weight(torch.randn(8, 64, generator=torch.Generator().manual_seed(2)), config)
    _save_schema_version_1(tmp_path, q, config)
    back = load_quantized(tmp_path)[1]["layer"]
    assert back.codes.dtype == torch.int16
    assert bitwise_equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("lazy", [False, True])
def test_a_missing_tensor_is_a_one_line_error(lazy, tmp_path):
    config = QuantConfig("int", 4, 32)
    q = quantize_weight(torch.randn(8, 64), config)
    save_quantized(tmp_path, Plan(config), {"layer": q}, {})
    document = json.loads((tmp_path / "quant.json").read_text())
    document["modules"]["other"] = document["modules"]["layer"]
    (tmp_path / "quant.json").write_text(json.dumps(document))
    with pytest.raises(LayerwiseError, match="corrupt quantized model: tensor other.codes is missing"):
        load_quantized(tmp_path, lazy=lazy)


def test_tensors_spilled_one_at_a_time_make_a_file_safetensors_reads(tmp_path):
    generator = torch.Generator().manual_seed(3)
    tensors = {"codes": torch.randint(0, 255, (5, 7), generator=generator, dtype=torch.uint8),
               "scale": torch.randn(5, 2, generator=generator).to(torch.float16),
               "bf": torch.randn(3, generator=generator).to(torch.bfloat16),
               "f8": torch.randn(4, 4, generator=generator).to(torch.float8_e4m3fn),
               "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 3), "wide": torch.arange(9.0).double()}
    spill = TensorSpill(tmp_path)
    for key, tensor in tensors.items():
        spill.add(key, tensor)
    with pytest.raises(LayerwiseError, match="already stored"):
        spill.add("codes", tensors["codes"])
    spill.write_safetensors(tmp_path / "out.safetensors")
    back = load_file(str(tmp_path / "out.safetensors"))
    assert back.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert bitwise_equal(back[key], tensor), key
        assert bitwise_equal(spill.read(key), tensor), key
    assert list(tmp_path.iterdir()) == [tmp_path / "out.safetensors"]  # the scratch file has no name
    save_safetensors(tensors, tmp_path / "direct.safetensors", metadata={"format": "pt"})
    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, str(tmp_path / "theirs.safetensors"),
              metadata={"format": "pt"})
    ours, theirs = (safe_open(str(tmp_path / name), framework="pt") for name in ("direct.safetensors", "theirs.safetensors"))
    assert ours.metadata() == theirs.metadata() == {"format": "pt"} and set(ours.keys()) == set(theirs.keys())
    assert all(bitwise_equal(ours.get_tensor(key), theirs.get_tensor(key)) for key in tensors)


def test_modules_kept_on_disk_decode_as_they_were_and_save_the_same_file(tmp_path):
    generator = torch.Generator().manual_seed(5)
    stored = {"a": quantize_weight(torch.randn(8, 64, generator=generator), QuantConfig("int", 3, 32, False)).compact(),
              "b": quantize_weight(torch.randn(4, 256, generator=generator), QuantConfig("q4_k"))}
    on_disk = StoredModules(directory=tmp_path)
    for name, q in stored.items():
        on_disk.add(name, q)
    assert list(on_disk) == ["a", "b"] and on_disk.configs() == {name: q.config for name, q in stored.items()}
    for name, q in stored.items():
        assert bitwise_equal(on_disk[name].dequantize(), q.dequantize())
        assert bitwise_equal(on_disk.stored_form(name).dequantize(), q.dequantize())
    save_quantized(tmp_path / "from-disk", Plan(QuantConfig("int", 3, 32)), on_disk, {})
    save_quantized(tmp_path / "from-memory", Plan(QuantConfig("int", 3, 32)), stored, {})
    first, second = (load_file(str(tmp_path / side / "qweights.safetensors")) for side in ("from-disk", "from-memory"))
    assert first.keys() == second.keys() and all(bitwise_equal(first[key], second[key]) for key in first)
    document, lazy = load_quantized(tmp_path / "from-disk", lazy=True)
    assert isinstance(lazy, StoredModules)
    for name, q in stored.items():
        assert bitwise_equal(lazy[name].dequantize(), q.dequantize())


def test_a_scale_that_fp16_cannot_hold_is_refused_rather_than_rounded(tmp_path):
    config = QuantConfig("int", 4, 32)
    q = quantize_weight(torch.randn(8, 64, generator=torch.Generator().manual_seed(4)), config)
    q.params["scale"] = q.params["scale"] * (1 + 2.0**-20)
    with pytest.raises(LayerwiseError, match="layer: its scale does not survive float16 storage exactly"):
        save_quantized(tmp_path, Plan(config), {"layer": q}, {})


STORIES_PLANS = {
    "int4 per-row": Plan.uniform(bits=4, group_size=None),
    "int3 g32 asym (tail)": Plan.uniform(bits=3, group_size=32, symmetric=False, remainder="tail"),
    # stories260K's rows are 64 wide, 172 for down_proj: g4 divides both, q8_0 fits only the 64s.
    "mixed int2/int3/int8/nf4/q8_0": Plan(QuantConfig("int", 8, None))
    .override("re:.*self_attn.(q|k)_proj", QuantConfig("int", 2, 4, symmetric=False))
    .override("re:.*self_attn.(v|o)_proj", QuantConfig("q8_0"))
    .override("re:.*mlp.(gate|up)_proj", QuantConfig("int", 3, 16))
    .override("re:.*layers.4.mlp.down_proj", QuantConfig("nf4", group_size=4)),
}


@pytest.mark.parametrize("label", STORIES_PLANS)
def test_the_folder_holds_what_the_size_report_says(stories, label, tmp_path):
    # stories260K is tiny (0.25M linear weights), so the safetensors JSON header (~100 bytes per
    # tensor, 2-3 tensors per module) is 4-10% of the file: compare the tensor data with the
    # report here, and the whole file on a bigger layer below.
    _, stored, sizes = run_quantize(copy.deepcopy(stories), STORIES_PLANS[label], out=tmp_path / "q", progress=False)
    data = sum(tensor_data_bytes(tmp_path / "q" / "qweights.safetensors").values())
    assert data == pytest.approx(sizes["linear_bytes"], rel=0.02)
    assert sizes["linear_bits_per_weight"] < 8.5
    document, loaded = load_quantized(tmp_path / "q")
    for name, q in stored.items():
        assert bitwise_equal(loaded[name].dequantize(), q.dequantize()), name


@pytest.mark.parametrize("config", [QuantConfig("int", 4, 128), QuantConfig("int", 3, 64, symmetric=False),
                                    QuantConfig("int", 2, None), QuantConfig("mxfp4"), QuantConfig("q4_k")],
                         ids=lambda c: c.label)
def test_the_whole_file_matches_the_predicted_size_on_a_bigger_layer(config, tmp_path):
    weight = torch.randn(512, 2048, generator=torch.Generator().manual_seed(3)) * 0.02
    q = quantize_weight(weight, config)
    save_quantized(tmp_path, Plan(config), {"model.layers.0.mlp.down_proj": q}, {})
    file_bytes = (tmp_path / "qweights.safetensors").stat().st_size
    assert file_bytes == pytest.approx(q.n_bits / 8, rel=0.02)
    assert file_bytes < 0.3 * weight.numel() * 2  # int16 codes alone would be 2 bytes a weight


def test_a_tensor_given_in_pieces_of_rows_is_stored_as_a_whole_one():
    weight = torch.arange(35, dtype=torch.float32).reshape(7, 5)
    spill = TensorSpill()
    spill.add("whole", weight)
    spill.add_rows("rows", weight.dtype, tuple(weight.shape), iter(weight.split(3)))
    assert torch.equal(spill.read("rows"), weight) and torch.equal(spill.read("whole"), weight)
    with pytest.raises(LayerwiseError, match="pieces of 6 rows for a tensor of 7"):
        spill.add_rows("short", weight.dtype, tuple(weight.shape), iter(weight[:6].split(3)))
    with pytest.raises(LayerwiseError, match="another dtype or width"):
        spill.add_rows("wide", weight.dtype, (7, 4), iter(weight.split(3)))
    spill.close()
