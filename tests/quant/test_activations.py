"""llama.cpp's CPU rounding of a linear's inputs: the values, the hooks, and the KL llama-perplexity finds."""
import re
import subprocess

import numpy as np
import pytest
import torch

from conftest import EVALUATION_TEXT, STORIES
from layerwise.errors import LayerwiseError
from layerwise.quant import QuantConfig
from layerwise.quant.activations import LLAMA_CPU, Q8_0, Q8_K, InputRounding, input_rounding, round_inputs


def _reference_q8(row: np.ndarray, block: int, fp16_scale: bool) -> np.ndarray:
    """quantize_row_q8_0_ref / quantize_row_q8_K_ref of ggml-quants.c, a block at a time, in float32."""
    out = np.empty_like(row)
    for start in range(0, len(row), block):
        x = row[start:start + block].astype(np.float32)
        amax = np.float32(np.abs(x).max())
        d = amax / np.float32(127)
        inverse = np.float32(1) / d if d else np.float32(0)
        codes = np.clip(np.round(x * inverse), -127, 127)  # ties: no exact ties in random data
        scale = np.float32(np.float16(d)) if fp16_scale else d
        out[start:start + block] = codes * scale
    return out


def test_rounding_matches_the_c_reference_and_keeps_zero_blocks():
    rows = torch.randn(3, 512) * torch.linspace(0.1, 20, 512)
    rows[1, 256:] = 0  # an all-zero block: no division by zero, zeros stay zeros
    rows[2, 7] = 300.0  # one large input coarsens the step of its whole block
    for rounding in (Q8_0, Q8_K):
        ours = round_inputs(rows, rounding).numpy()
        for row, got in zip(rows.numpy(), ours):
            np.testing.assert_allclose(got, _reference_q8(row, rounding.block, rounding.fp16_scale), rtol=0, atol=1e-6)
    assert torch.equal(round_inputs(rows, Q8_0)[1, 256:], torch.zeros(256))
    # The outlier's block: at 256 the other 255 values share its step (300/127), at 32 only 31 do.
    error_k = (round_inputs(rows, Q8_K)[2, :256] - rows[2, :256]).abs().mean()
    error_0 = (round_inputs(rows, Q8_0)[2, :256] - rows[2, :256]).abs().mean()
    assert error_k > 4 * error_0
    with pytest.raises(LayerwiseError, match="multiple of 256"):
        round_inputs(torch.ones(2, 576), Q8_K)


def test_each_gguf_type_rounds_its_inputs_as_its_vec_dot_type():
    assert input_rounding(QuantConfig("q4_k"), 1536, "llama-cpu") is Q8_K
    # A K-quant whose rows do not fit falls back (remainder "fallback") and rounds as the fallback does.
    assert input_rounding(QuantConfig("q5_k", remainder="fallback"), 576, "llama-cpu") is LLAMA_CPU["q5_1"]
    assert input_rounding(QuantConfig("q5_0", algorithm="gptq"), 576, "llama-cpu") is Q8_0
    assert input_rounding(QuantConfig("int", 4, 64), 576, "llama-cpu") is None  # not a GGUF type
    assert input_rounding(QuantConfig("q8_0"), 576, "float") is None
    assert input_rounding("drop", 576, "llama-cpu") is None


def test_input_rounding_hooks_only_what_is_set_and_leaves_nothing_behind():
    linear = torch.nn.Linear(64, 8)
    x = torch.randn(5, 64) * 3
    plain = linear(x)
    with InputRounding({"a": linear}, "float") as rounding:
        rounding.set("a", QuantConfig("q8_0"))
        assert torch.equal(linear(x), plain) and not linear._forward_pre_hooks
    with InputRounding({"a": linear}, "llama-cpu") as rounding:
        assert torch.equal(linear(x), plain)  # hooked, but nothing set yet
        rounding.set("a", QuantConfig("q8_0"))
        assert torch.allclose(linear(x), linear.forward(round_inputs(x, Q8_0)))
        assert not torch.equal(linear(x), plain)
        rounding.clear(["a"])
        assert torch.equal(linear(x), plain)
        rounding.set("a", QuantConfig("q8_0"))
    assert not linear._forward_pre_hooks and torch.equal(linear(x), plain)
    with pytest.raises(LayerwiseError, match="unknown emulation"):
        InputRounding({"a": linear}, "llama-cuda")


def _llama_positions(tokenizer, text: str, context: int, chunks: int) -> torch.Tensor:
    """llama-perplexity's chunks: the text's tokens after a BOS, cut into `context`-long chunks whose
    first token is made the BOS."""
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([[tokenizer.bos_token_id] + ids[i * context + 1:(i + 1) * context] for i in range(chunks)])


@pytest.mark.slow
def test_emulated_kl_is_the_kl_llama_perplexity_finds(llama_cpp_bin, tmp_path):
    """stories260K's linears at Q8_0 (inputs rounded to Q8_0) and Q5_1 (to Q8_1), its 172-wide down
    projections in float: llama-perplexity --kl-divergence against the float32 GGUF, and our KL
    on its very positions, with and without the emulation. On Q8_0 the rounding of the inputs is
    most of llama.cpp's KL (float 0.00075 against llama.cpp's 0.00129 here)."""
    import os

    from conftest import require_tool
    from layerwise import load_model
    from layerwise.apply.quantize import input_rounding_for, plan_targets
    from layerwise.apply.run import run_quantize
    from layerwise.engine.divergence import Reference, kl_per_token
    from layerwise.export.convert import CONVERTER_ENV, convert_to_gguf
    from layerwise.export.run import run_export
    from layerwise.models.loading import resolve_source
    from layerwise.plan import Plan

    converter = require_tool("llama.cpp's convert_hf_to_gguf.py", os.environ.get(CONVERTER_ENV),
                             f"{CONVERTER_ENV} is not set; .ci/run sets it to the converter it unpacks")
    context, chunks = 256, 16
    text = tmp_path / "text.txt"
    text.write_text(EVALUATION_TEXT.read_text()[:200_000])
    base = convert_to_gguf(resolve_source(STORIES), tmp_path / "base.gguf", torch.float32, converter=converter)

    def llama_kl(*args: object) -> str:
        done = subprocess.run([str(a) for a in (llama_cpp_bin / "llama-perplexity", "-f", text, "-c", context,
                                                "--chunks", chunks, "-t", "2", *args)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    llama_kl("-m", base, "--kl-divergence-base", tmp_path / "base.kld")
    loaded = load_model(STORIES)
    positions = _llama_positions(loaded.tokenizer, text.read_text(), context, chunks)
    first = context // 2  # llama-perplexity scores the second half of every chunk
    with torch.no_grad():
        reference = Reference.from_logits(loaded.model(input_ids=positions).logits[:, first:context - 1])
    originals = {name: tensor.clone() for name, tensor in loaded.model.state_dict().items()}
    for fmt in ("q8_0", "q5_1"):
        plan = Plan(QuantConfig(fmt)).override("re:.*down_proj", None)
        out = tmp_path / f"{fmt}.gguf"
        run_export(STORIES, plan=plan, out=out, converter=converter, progress=False)
        for attempt in range(3):  # llama-perplexity's logger now and then loses its last lines
            found = re.search(r"Mean\s+KLD:\s+([-\d.e]+)\s+±\s+([-\d.e]+)",
                              llama_kl("-m", out, "--kl-divergence-base", tmp_path / "base.kld", "--kl-divergence"))
            if found:
                break
        assert found, "no KL summary from llama-perplexity"
        theirs, plus_minus = float(found[1]), float(found[2])
        loaded.model.load_state_dict(originals)
        run_quantize(loaded, plan, progress=False)
        ours = {}
        for emulation in ("float", "llama-cpu"):
            with torch.no_grad(), input_rounding_for(loaded, plan_targets(loaded, plan), emulation):
                logits = loaded.model(input_ids=positions).logits[:, first:context - 1]
            ours[emulation] = float(kl_per_token(reference, logits).mean())
        # Measured here: Q8_0 llama.cpp 0.001289 +- 0.000039, emulated 0.001251, float 0.000750;
        # Q5_1 0.04017 +- 0.00125, emulated 0.04009, float 0.03944.
        assert abs(ours["llama-cpu"] - theirs) < 3 * plus_minus, (fmt, ours, theirs, plus_minus)
        if fmt == "q8_0":
            assert abs(ours["float"] - theirs) > 10 * plus_minus, (ours, theirs, plus_minus)


def test_eval_emulates_llama_cpu_on_request_and_refuses_what_it_cannot(tmp_path):
    from layerwise.evaluate.run import run_eval
    from layerwise.plan import Plan

    plan = Plan(QuantConfig("q8_0")).override("re:.*down_proj", None)
    reports = {emulation: run_eval(STORIES, data=EVALUATION_TEXT, plan=plan, tokens=2048, seq_len=256,
                                   emulate=emulation, progress=False) for emulation in ("float", "llama-cpu")}
    assert reports["llama-cpu"]["emulation"] == "llama-cpu" and "emulation" not in reports["float"]
    assert reports["llama-cpu"]["base"] == reports["float"]["base"]
    assert reports["llama-cpu"]["quantized"]["kl"] > 1.3 * reports["float"]["quantized"]["kl"]
    # A quantized directory: the same numbers as the plan quantized on the fly.
    from layerwise.apply.run import run_quantize

    run_quantize(STORIES, plan, out=tmp_path / "q8", progress=False)
    stored = run_eval(STORIES, data=EVALUATION_TEXT, quantized=tmp_path / "q8", tokens=2048, seq_len=256,
                      emulate="llama-cpu", progress=False)
    assert stored["quantized"]["kl"] == pytest.approx(reports["llama-cpu"]["quantized"]["kl"], rel=1e-9)
    with pytest.raises(LayerwiseError, match="give --quantized or --plan"):
        run_eval(STORIES, data=EVALUATION_TEXT, tokens=512, emulate="llama-cpu", progress=False)
    with pytest.raises(LayerwiseError, match="unknown emulation"):
        run_eval(STORIES, data=EVALUATION_TEXT, plan=plan, tokens=512, emulate="metal", progress=False)
    with pytest.raises(LayerwiseError, match="streamed model"):
        run_eval(STORIES, data=EVALUATION_TEXT, plan=plan, tokens=512, emulate="llama-cpu", streaming=True,
                 progress=False)


def _window_kl_as_llama_cpu(folder, plan, windows, store=torch.float32) -> np.ndarray:
    """Per window, the mean KL of the model quantized by `plan`, its inputs rounded as llama.cpp's
    CPU backend rounds them, computed plainly (the whole model, hooks and logits; the base
    distributions kept in `store`, as the table keeps them in float16)."""
    from layerwise import load_model
    from layerwise.apply.quantize import input_rounding_for, plan_targets, quantize_
    from layerwise.engine.divergence import Reference, kl_per_token

    base, quantized = load_model(folder), load_model(folder)
    quantize_(quantized, plan, progress=False)
    values = []
    with torch.no_grad(), input_rounding_for(quantized, plan_targets(quantized, plan), "llama-cpu"):
        for batch in windows.batches(4):
            reference = Reference.from_logits(base.model(input_ids=batch).logits[:, :-1], store=store)
            kl = kl_per_token(reference, quantized.model(input_ids=batch).logits[:, :-1])
            values.extend(kl.reshape(kl.shape[0], -1).mean(dim=1).tolist())
    return np.asarray(values)


@pytest.mark.parametrize("tied", [True, False])
def test_emulated_table_entries_and_whole_plans_are_the_kl_of_the_rounded_model(tied, tmp_path):
    """Table entries (a block unit, the embedding/head) and the check's whole plans, measured with
    emulation "llama-cpu", against the model quantized and hooked plainly: a tiny random Llama
    (rows of 64 and 128, which GGUF's 32-weight blocks fit) with its head tied to the embedding or not."""
    import shutil

    import transformers

    from conftest import CALIBRATION_TEXT
    from layerwise import load_model, token_windows
    from layerwise.measure.run import plan_from_choice
    from layerwise.measure.sensitivity import measure_sensitivity
    from layerwise.measure.streamed import StreamedFitness
    from layerwise.plan.plan import Plan

    folder = tmp_path / "tiny"
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
                                      initializer_range=0.2)  # larger weights: KLs well above float16 sums' floor
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(STORIES / name, folder / name)
    loaded = load_model(folder)
    windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=1024, seq_len=128)
    table = measure_sensitivity(loaded, windows, "q4_0,q8_0", "tensor", edges=True, emulation="llama-cpu",
                                progress=False)
    plain = measure_sensitivity(loaded, windows, "q4_0,q8_0", "tensor", edges=True, progress=False)
    names = [unit.name for unit in table.units]
    assert table.meta["emulation"] == "llama-cpu" and "emulation" not in plain.meta
    edge = "model.embed_tokens" if tied else "lm_head"
    for name in (edge, "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj"):
        u = names.index(name)
        for option in (0, 1):
            plan = Plan(None).override(name, table.configs[option])
            direct = _window_kl_as_llama_cpu(folder, plan, windows, torch.float16)
            # float16 base sums: ~1e-4 relative at 1e-5 nats (the float table's own floor)
            assert table.kl[u, option] == pytest.approx(float(direct.mean()), rel=1e-3), (name, option)
        assert table.kl[u, 1] > 1.05 * plain.kl[u, 1], name  # at Q8_0 the rounding of the inputs shows
    choice = [1] * len(names)
    choice[names.index(edge)] = 0
    choice[names.index("model.layers.0.self_attn.q_proj")] = 0
    plan = plan_from_choice(table, choice)
    with StreamedFitness(loaded, table, windows, emulation="llama-cpu") as fitness:
        measured = fitness.window_kl(choice)
    np.testing.assert_allclose(measured, _window_kl_as_llama_cpu(folder, plan, windows), rtol=1e-4)
    # Streamed (one block read at a time), the same table and the same plan's KL.
    streamed = load_model(folder, streaming=True)
    np.testing.assert_allclose(measure_sensitivity(streamed, windows, "q4_0,q8_0", "tensor", edges=True,
                                                   emulation="llama-cpu", progress=False).kl, table.kl, rtol=1e-6)
    with StreamedFitness(streamed, table, windows, emulation="llama-cpu") as fitness:
        np.testing.assert_allclose(fitness.window_kl(choice), measured, rtol=1e-6)


def test_emulation_refusals_in_plans_and_on_the_command_line(tmp_path):
    from layerwise import load_model, token_windows
    from layerwise.measure.run import run_plan, sensitivity_for
    from layerwise.measure.sensitivity import measure_sensitivity
    from test_cli import assert_one_line_error, layerwise

    with pytest.raises(LayerwiseError, match="needs the measured table"):
        run_plan(STORIES, bits_per_weight=6, options="q8_0", estimator="fisher", emulate="llama-cpu", progress=False)
    with pytest.raises(LayerwiseError, match="unknown emulation"):
        run_plan(STORIES, bits_per_weight=6, options="q8_0", emulate="llama-gpu", progress=False)
    loaded = load_model(STORIES)
    windows = token_windows(loaded.tokenizer, EVALUATION_TEXT, tokens=256, seq_len=128)
    with pytest.raises(LayerwiseError, match="needs a measured table"):
        measure_sensitivity(loaded, windows, "q8_0", "block", estimator="weights", emulation="llama-cpu",
                            progress=False)
    table = tmp_path / "table.json"
    measure_sensitivity(loaded, windows, "int8pc", "block", progress=False).save(table)
    with pytest.raises(LayerwiseError, match="measured with emulation 'float', this plan asks for 'llama-cpu'"):
        sensitivity_for(loaded, table=table, emulation="llama-cpu", progress=False)
    done = layerwise("eval", STORIES, "--data", EVALUATION_TEXT, "--emulate", "llama-cpu", "--quiet")
    assert_one_line_error(done, "give --quantized or --plan")
