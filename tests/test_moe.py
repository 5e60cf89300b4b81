"""Mixture-of-experts models end to end on tiny random Mixtral and Qwen2-MoE folders: the profile's
expert statistics, expert units, dropping experts into a checkpoint plain transformers loads,
the importance matrix per expert, and a planned GGUF whose merged expert tensors llama.cpp runs.

Random weights: these tests check wiring and agreement between independent computations, never
quality (bench/moe.py measures a trained MoE)."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CALIBRATION_TEXT, EVALUATION_TEXT, STORIES, llama_perplexity
from layerwise.data.windows import token_windows
from layerwise.engine.divergence import Reference, kl_per_token
from layerwise.errors import LayerwiseError
from layerwise.models import load_model
from layerwise.plan.units import units_of
from layerwise.profile.runner import profile_model
from layerwise.prune.experts import drop_experts_
from layerwise.prune.run import run_drop
from tiny_families import BLOCKS, EXPERTS, MOE_FAMILIES, TOP_K, save_tiny

# End to end through the CLI or fresh processes: left out of the quick tier (-m "not slow").
pytestmark = pytest.mark.slow

# The detailed tests run on a family without and one with a shared expert.
@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_tiny(request.param, path)
    return path


@pytest.fixture(scope="module")
def loaded(folder):
    return load_model(folder)


@pytest.fixture(scope="module")
def windows(loaded):
    return token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=512, seq_len=128)


def _logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits


def test_profile_counts_routing_and_ablates_each_expert_as_a_model_without_it(loaded, windows):
    result = profile_model(loaded, windows, ablation=["expert"], weights=False, progress=False)
    assert len(result.experts) == BLOCKS * EXPERTS
    for block in range(BLOCKS):
        rows = [row for row in result.experts if row["block"] == block]
        assert sum(row["load_share"] for row in rows) == pytest.approx(1.0)
        assert 0 < result.blocks[block]["expert_load_entropy"] <= 1.0
        assert result.blocks[block]["expert_load_max"] >= 1.0
    shared = loaded.model_type == "qwen2_moe"
    assert ("shared_rel_update" in result.blocks[0]) == shared
    if not shared:  # the routed experts are the whole MLP update
        for row in result.blocks:
            assert row["routed_rel_update"] == pytest.approx(row["mlp_rel_update"], rel=1e-4)

    # Independent check of one ablation: a copy of the model with the expert physically removed
    # from its block (router rows and all) gives the KL the masked router gave.
    block, expert = 1, 2
    ids = windows.input_ids
    base = Reference.from_logits(_logits(loaded, ids))
    pruned = copy.deepcopy(loaded)
    dropped = {b: ([expert] if b == block else []) for b in range(BLOCKS)}
    _remove_from_one_block(pruned, block, expert)
    kl = kl_per_token(base, _logits(pruned, ids)).double().mean().item()
    row = next(r for r in result.experts if r["block"] == block and r["expert"] == expert)
    assert row["ablation_kl"] == pytest.approx(kl, rel=1e-3)
    assert kl > 0
    with pytest.raises(LayerwiseError, match="same number of experts from every block"):
        drop_experts_(copy.deepcopy(loaded), dropped)


def _remove_from_one_block(loaded, block: int, expert: int) -> None:
    """Drop one expert of one block by hand (drop_experts_ insists on every block)."""
    from layerwise.models.experts import block_experts

    module = loaded.model.get_submodule(f"{loaded.adapter.blocks}.{block}")
    router = module.get_submodule(loaded.adapter.router)
    keep = [e for e in range(EXPERTS) if e != expert]
    router.weight = torch.nn.Parameter(router.weight.detach()[keep].clone())
    del block_experts(module, loaded.adapter)[expert]


def test_deepseek_dense_first_block_and_grouped_router(tmp_path):
    """DeepSeek-V3: the first block is dense (its MLP a plain unit, no routing statistics), the
    router chooses experts by groups, so an ablated expert is masked by -inf in the router's
    score bias instead of losing its row (the groups are fixed slices), and removing experts for
    good is refused."""
    from transformers import AutoModelForCausalLM

    from layerwise.models.experts import without_experts

    save_tiny("deepseek_v3", tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.adapter.dense_blocks == (0,)
    ids = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=256, seq_len=128).input_ids
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()(input_ids=ids).logits
    torch.testing.assert_close(_logits(loaded, ids), plain, rtol=1e-4, atol=1e-4)

    windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=256, seq_len=128)
    result = profile_model(loaded, windows, ablation=["expert", "shared_expert"], weights=False, progress=False)
    assert {row["block"] for row in result.experts} == {1, 2}
    assert result.blocks[0]["expert_load_entropy"] is None and result.blocks[0]["ablation_kl_shared_expert"] is None
    assert result.blocks[1]["shared_rel_update"] > 0 and result.blocks[1]["routed_rel_update"] > 0
    # The shared expert's ablation against a copy whose shared expert outputs zeros by its weights.
    without_shared = copy.deepcopy(loaded)
    without_shared.model.get_submodule("model.layers.1.mlp.shared_experts.down_proj").weight.data.zero_()
    kl = kl_per_token(Reference.from_logits(_logits(loaded, ids)), _logits(without_shared, ids)).double().mean()
    assert result.blocks[1]["ablation_kl_shared_expert"] == pytest.approx(kl.item(), rel=1e-3) and kl > 0

    block, expert = 2, 1
    chosen = []
    router = loaded.model.get_submodule(f"model.layers.{block}.{loaded.adapter.router}")
    handle = router.register_forward_hook(lambda module, args, output: chosen.append(output[-1]))
    try:
        with without_experts(loaded.model.get_submodule(f"model.layers.{block}"), loaded.adapter, [expert]):
            masked = _logits(loaded, ids)
    finally:
        handle.remove()
    assert not (torch.cat(chosen) == expert).any()
    assert torch.isfinite(router.e_score_correction_bias).all()  # restored
    kl = kl_per_token(Reference.from_logits(_logits(loaded, ids)), masked).double().mean().item()
    row = next(r for r in result.experts if r["block"] == block and r["expert"] == expert)
    assert row["ablation_kl"] == pytest.approx(kl, rel=1e-3) and kl > 0
    with pytest.raises(LayerwiseError, match="grouped router"):
        drop_experts_(copy.deepcopy(loaded), {1: [0], 2: [0]})


def test_qwen_moe_with_dense_blocks(tmp_path):
    """Qwen2-MoE blocks listed in `mlp_only_layers` hold a plain MLP: units, profile and expert
    dropping leave them alone, and the dropped model still loads in plain transformers."""
    save_tiny("qwen2_moe", tmp_path / "m", mlp_only_layers=[1])
    loaded = load_model(tmp_path / "m")
    assert loaded.adapter.dense_blocks == (1,)
    mlp = {unit.block: unit.modules for unit in units_of(loaded.adapter, BLOCKS, "sublayer") if unit.kind == "mlp"}
    assert mlp[1] == tuple(f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
    assert len(mlp[0]) == 3 * EXPERTS + 3
    windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=256, seq_len=128)
    result = profile_model(loaded, windows, weights=False, progress=False)
    assert {row["block"] for row in result.experts} == {0, 2}
    drop_experts_(loaded, {0: [3], 2: [0]})
    from transformers import AutoModelForCausalLM

    from layerwise.models.saving import save_plain

    save_plain(loaded, tmp_path / "d")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    ids = windows.input_ids[:1]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, _logits(loaded, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("estimator", ["fisher", "local"])
def test_cheap_estimators_fill_expert_tables(loaded, estimator):
    """Estimators that read gradients or one block's inputs cope with experts no token of a window
    reached (a zero gradient), and rank a routed expert's int2 above its int8. Windows of four
    tokens leave some expert unused in some window."""
    from layerwise.measure.sensitivity import measure_sensitivity

    short = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=64, seq_len=4)
    table = measure_sensitivity(loaded, short, "int2g64,int8g64", "expert", estimator=estimator, progress=False)
    assert np.isfinite(table.kl).all()
    experts = [u for u, unit in enumerate(table.units) if unit.kind == "expert"]
    assert (table.kl[experts, 0] >= table.kl[experts, 1]).all()


def test_expert_units(loaded):
    units = units_of(loaded.adapter, BLOCKS, "expert")
    kinds = [unit.kind for unit in units if unit.block == 0]
    shared = loaded.model_type == "qwen2_moe"
    assert kinds == ["attn"] + (["shared_expert"] if shared else []) + ["expert"] * EXPERTS
    expert = next(unit for unit in units if unit.kind == "expert" and unit.block == 2)
    assert expert.name == "model.layers.2.mlp.experts.0"
    assert expert.modules == tuple(f"model.layers.2.mlp.experts.0.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
    # Other granularities keep a block's routed experts together (GGUF's one tensor per role).
    mlp = [unit for unit in units_of(loaded.adapter, BLOCKS, "sublayer") if unit.kind == "mlp"]
    assert len(mlp) == BLOCKS and len(mlp[0].modules) == 3 * EXPERTS + 3 * shared
    with pytest.raises(LayerwiseError, match="mixture-of-experts"):
        units_of(load_model(STORIES).adapter, 5, "expert")
    # Experts are dropped by `layerwise drop --experts`, not by a plan's per-unit choice.
    from layerwise.measure.run import run_plan

    with pytest.raises(LayerwiseError, match="drop MODEL --experts"):
        run_plan(loaded, bits_per_weight=5.0, options="int4g64,drop", granularity="expert", tokens=256,
                 seq_len=128, progress=False)


def test_routers_stay_in_float_unless_a_rule_names_them(loaded, windows):
    from layerwise.apply.quantize import plan_targets, quantize_
    from layerwise.plan import Plan
    from layerwise.quant import QuantConfig

    plan = Plan(QuantConfig("int", 4, 32))
    router = f"model.layers.1.{loaded.adapter.router}"
    assert router not in plan_targets(loaded, plan)
    pattern = "re:.*\\." + re.escape(loaded.adapter.router) + "$"
    named = plan.override(pattern, QuantConfig("int", 8, 32))
    targets = plan_targets(loaded, named)
    assert sum(name.endswith(loaded.adapter.router) for name in targets) == BLOCKS and targets[router].bits == 8
    quantized = copy.deepcopy(loaded)
    stored = quantize_(quantized, named, progress=False)
    weight = quantized.model.get_submodule(router).weight
    assert torch.equal(weight, stored[router].dequantize().to(weight.dtype))
    assert not torch.equal(weight, loaded.model.get_submodule(router).weight)
    with pytest.raises(LayerwiseError, match="only round-to-nearest"):
        plan_targets(loaded, plan.override(pattern, QuantConfig("int", 8, 32, algorithm="gptq")))


def test_dropped_experts_checkpoint_loads_in_plain_transformers(folder, windows, tmp_path):
    pruned, choice = run_drop(folder, kind="expert", count=1, by="load", data=CALIBRATION_TEXT, tokens=512,
                              seq_len=128, out=tmp_path / "d", progress=False)
    assert all(len(experts) == 1 for experts in choice.dropped.values())
    assert pruned.adapter.n_experts == EXPERTS - 1
    record = json.loads((tmp_path / "d" / "layerwise_drop.json").read_text())
    assert record["experts_after"] == EXPERTS - 1 and record["dropped"]["0"] == choice.dropped[0]
    ids = windows.input_ids[:2]
    torch.save({"ids": ids, "logits": _logits(pruned, ids)}, tmp_path / "expected.pt")
    script = (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'd')!r})\n"
        "with torch.no_grad(): logits = model(input_ids=expected['ids']).logits\n"
        "experts = getattr(model.config, 'num_local_experts', None) or model.config.num_experts\n"
        f"assert experts == {EXPERTS - 1}, experts\n"
        "torch.testing.assert_close(logits, expected['logits'], rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    with pytest.raises(LayerwiseError, match="can drop 1 to 1 experts"):
        run_drop(tmp_path / "d", kind="expert", count=2, by="load", tokens=256, seq_len=128, progress=False)


def test_imatrix_rows_are_per_expert(loaded, windows):
    from layerwise.quant.imatrix import collect_imatrix, importance_for

    imatrix = collect_imatrix(loaded, windows, progress=False)
    result = profile_model(loaded, windows, weights=False, progress=False)
    tokens = windows.input_ids.numel()
    for block in range(BLOCKS):
        counts = imatrix.counts[f"blk.{block}.ffn_gate_exps.weight"]
        assert counts.sum() == tokens * TOP_K  # every token reaches top-k experts
        shares = [row["load_share"] for row in result.experts if row["block"] == block]
        np.testing.assert_allclose(counts / counts.sum(), shares)
        assert imatrix.sums[f"blk.{block}.ffn_down_exps.weight"].shape[0] == EXPERTS
    module = "model.layers.1.mlp.experts.3.up_proj"
    row = importance_for(loaded, imatrix, [module])[module]
    expected = imatrix.sums["blk.1.ffn_up_exps.weight"][3] / imatrix.counts["blk.1.ffn_up_exps.weight"][3]
    np.testing.assert_allclose(row, expected.astype(np.float32), rtol=1e-6)


@pytest.mark.slow
def test_planned_gguf_stacks_experts_and_llama_cpp_runs_it(llama_cpp_bin, tmp_path):
    """A plan at sublayer granularity with GGUF types, exported: each merged expert tensor holds
    every expert's rows of the plan's type, in expert order (read back and compared with our own
    quantized weights), and llama-perplexity runs the file. Mixtral only: llama.cpp's converter
    takes Qwen2-MoE only with a Qwen tokenizer, which none here has."""
    import gguf

    from conftest import require_tool
    from layerwise.export.convert import find_converter
    from layerwise.export.run import run_export
    from layerwise.quant import gguf_blocks

    require_tool("llama.cpp's convert_hf_to_gguf.py", _converter_or_none(find_converter),
                 "bash .ci/llama_cpp_converter")
    folder = tmp_path / "mixtral"
    save_tiny("mixtral", folder)
    loaded = load_model(folder)
    plan_path = tmp_path / "plan.json"
    from layerwise.measure.run import run_plan

    run_plan(loaded, bits_per_weight=6.0, options="q4_0,q8_0", granularity="sublayer", tokens=256, fitness_tokens=128,
             check_tokens=256, seq_len=128, out=plan_path, progress=False)
    out = tmp_path / "planned.gguf"
    report = run_export(folder, plan=plan_path, format="gguf", out=out, progress=False)
    assert report["file_bytes"] == out.stat().st_size
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for block in range(BLOCKS):
        tensor = tensors[f"blk.{block}.ffn_down_exps.weight"]
        shape = tuple(int(n) for n in reversed(tensor.shape))
        assert shape[0] == EXPERTS
        qtype = tensor.tensor_type.name
        rows = gguf_blocks.dequantize(np.asarray(tensor.data), qtype, (EXPERTS * shape[1], shape[2])).reshape(shape)
        for expert in range(EXPERTS):
            weight = loaded.model.get_submodule(f"model.layers.{block}.mlp.experts.{expert}.down_proj").weight.detach()
            ours = gguf_blocks.dequantize(gguf_blocks.quantize(weight, qtype), qtype, tuple(weight.shape))
            torch.testing.assert_close(rows[expert], ours, rtol=0, atol=0)
    # The file as a size reference (`plan --budget-like`): each expert is given its share of its
    # block's merged tensor, and the shares add up to the tensor.
    from layerwise.models.gguf_reference import read_reference
    from layerwise.models.layout import block_linears

    reference = read_reference(loaded, out, [name for _, name, _ in block_linears(loaded.model, loaded.adapter)])
    down = [f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(EXPERTS)]
    assert len({reference.tensor_bytes[name] for name in down}) == 1
    assert sum(reference.tensor_bytes[name] for name in down) == int(tensors["blk.0.ffn_down_exps.weight"].n_bytes)
    text = tmp_path / "text.txt"
    text.write_text(EVALUATION_TEXT.read_text()[:20_000])
    assert llama_perplexity(llama_cpp_bin, out, text, "-c", 128, "--chunks", 2) > 0


def _converter_or_none(find):
    try:
        return find(None)
    except LayerwiseError:
        return None


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_plan_quantize_and_eval_each_family(model_type, tmp_path):
    """Every MoE row end to end: a profile with every ablation, then at expert granularity a plan
    whose experts take different options, the quantized model evaluated, and an HF export of it
    reloaded in plain transformers."""
    from layerwise.apply.quantize import quantize_
    from layerwise.evaluate import base_outputs, evaluate
    from layerwise.export.run import run_export
    from layerwise.measure.run import run_plan

    save_tiny(model_type, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    moe_blocks = [b for b in range(BLOCKS) if b not in loaded.adapter.dense_blocks]
    profile = profile_model(loaded, token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=256, seq_len=128),
                            ablation=True, weights=False, progress=False)
    assert len(profile.experts) == len(moe_blocks) * EXPERTS
    assert all(profile.blocks[b]["ablation_kl_mlp"] > 0 and profile.blocks[b]["router_entropy"] > 0 for b in moe_blocks)
    outcome = run_plan(loaded, bits_per_weight=5.0, options="int4g64,int8g64", granularity="expert", tokens=256,
                       fitness_tokens=128, check_tokens=256, seq_len=128, allocator="exact",
                       out=tmp_path / "plan.json", progress=False)
    experts = [unit for unit in outcome.table.units if unit.kind == "expert"]
    # DeepSeek's first block is dense: its MLP is one unit.
    assert len(experts) == len(moe_blocks) * EXPERTS
    assert [unit.block for unit in outcome.table.units if unit.kind == "mlp"] == list(loaded.adapter.dense_blocks)
    windows = token_windows(loaded.tokenizer, EVALUATION_TEXT, tokens=256, seq_len=128)
    base = base_outputs(loaded, windows, progress=False)
    quantized = copy.deepcopy(loaded)
    stored = quantize_(quantized, outcome.plan, progress=False)
    assert {name for name in stored if ".experts." in name} == {
        f"model.layers.{b}.mlp.experts.{e}.{p}" for b in moe_blocks for e in range(EXPERTS)
        for p in ("gate_proj", "up_proj", "down_proj")}
    quality = evaluate(quantized, base, progress=False)
    assert 0 < quality.kl < 1 and np.isfinite(quality.perplexity)
    run_export(tmp_path / "m", plan=tmp_path / "plan.json", format="hf", out=tmp_path / "hf", progress=False)
    reloaded = load_model(tmp_path / "hf")
    ids = windows.input_ids[:1]
    torch.testing.assert_close(_logits(reloaded, ids), _logits(quantized, ids), rtol=1e-4, atol=1e-4)
