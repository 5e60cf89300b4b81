"""Streaming (`load_model(streaming=True)`): one part's weights in memory at a time, and the same
numbers as the model loaded whole."""
from __future__ import annotations

import gc
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerwise import LayerwiseError, load_model
from layerwise.apply.run import run_quantize
from layerwise.apply.storage import StoredModules, apply_quantized, load_quantized
from layerwise.data.windows import token_windows
from layerwise.evaluate.quality import base_outputs, compare_streamed, evaluate
from layerwise.evaluate.run import run_eval
from layerwise.models import streaming
from layerwise.models.layout import blocks_of
from layerwise.plan.plan import Plan
from layerwise.profile import run_profile
from layerwise.quant.config import QuantConfig
from layerwise.quant.qtensor import QTensor
from conftest import EVALUATION_TEXT, SMOLLM2, STORIES


@pytest.fixture(scope="module")
def streamed():
    return load_model(STORIES, streaming=True)


def _tokens(loaded, shape=(2, 48)) -> torch.Tensor:
    return torch.randint(0, loaded.model.config.vocab_size, shape, generator=torch.Generator().manual_seed(1))


def test_streamed_forward_equals_the_model_loaded_whole(stories, streamed):
    ids = _tokens(stories)
    loads = streamed.streamed.loads
    with torch.no_grad():
        whole = stories.model(input_ids=ids, use_cache=False).logits
        parts = streamed.model(input_ids=ids, use_cache=False).logits
    assert torch.equal(whole, parts)
    assert streamed.streamed.resident_parameters() == 0  # everything let go after the pass
    assert streamed.streamed.loads - loads == 5  # five blocks; the embedding and head read rows only
    assert streamed.describe()["streaming"] is True


def test_a_streamed_head_reads_and_applies_a_slice_of_its_rows_at_a_time(stories, monkeypatch):
    """The head's [vocab, hidden] matrix is never in memory whole: each call reads it a slice of
    rows at a time (here 100 of stories260K's 512), and the logits are the whole model's."""
    monkeypatch.setattr(streaming, "HEAD_SLICE_ELEMENTS", 100 * stories.model.config.hidden_size)
    loaded = load_model(STORIES, streaming=True)
    weights, head = loaded.streamed, loaded.model.get_submodule(loaded.adapter.lm_head)
    reads, in_head = [], []
    read_rows = weights.source.read_rows
    monkeypatch.setattr(weights.source, "read_rows",
                        lambda name, rows: (reads.append(len(rows)) if in_head else None) or read_rows(name, rows))
    handles = [head.register_forward_pre_hook(lambda module, args: in_head.append(True)),
               head.register_forward_hook(lambda module, args, output: in_head.clear())]
    ids = _tokens(loaded)
    try:
        with torch.no_grad():
            whole = stories.model(input_ids=ids, use_cache=False).logits
            loads = weights.loads
            parts = loaded.model(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    assert reads == [100] * 5 + [12]
    assert weights.loads - loads == 5  # the blocks, never the head whole
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-6)


def test_an_overridden_streamed_head_applies_its_override(streamed):
    """A quantized head is an override: it is decoded whole, not read from the checkpoint."""
    weights, ids = streamed.streamed, _tokens(streamed)
    with torch.no_grad():
        before = streamed.model(input_ids=ids, use_cache=False).logits
        weights.override("lm_head.weight", lambda: torch.zeros(512, 64))
        try:
            zeroed = streamed.model(input_ids=ids, use_cache=False).logits
            with weights.original():
                again = streamed.model(input_ids=ids, use_cache=False).logits
        finally:
            weights.overrides.clear()
    assert not zeroed.any()
    assert torch.equal(before, again)


def test_streamed_eval_of_a_quantized_head_matches_in_memory():
    """A variant whose head is overridden runs the base through the checkpoint's head and itself
    through its own, chunk by chunk: the same KL as in memory."""
    windows = token_windows(load_model(STORIES, streaming=True).tokenizer, EVALUATION_TEXT, tokens=1024,
                            seq_len=256, seed=None)
    whole = load_model(STORIES)
    base = base_outputs(whole, windows, progress=False)
    head = whole.model.get_submodule(whole.adapter.lm_head)
    changed = head.weight.detach().clone() * 0.7  # tied: the embedding changes with it, as an override does
    head.weight.data.copy_(changed)
    expected = evaluate(whole, base, progress=False)
    parts = load_model(STORIES, streaming=True)
    parts.streamed.override("lm_head.weight", lambda: changed.clone())
    _, quality = compare_streamed(parts, windows, progress=False)
    assert quality.kl > 0.01
    assert quality.kl == pytest.approx(expected.kl, rel=1e-6)
    assert quality.perplexity == pytest.approx(expected.perplexity, rel=1e-6)
    assert (quality.kl_p99, quality.kl_p999) == pytest.approx((expected.kl_p99, expected.kl_p999), rel=1e-5)


def test_only_the_running_block_holds_weights(streamed):
    """Counted as each block is called (its pre-hook runs before it loads) and inside it (at its
    attention): nothing is in memory between blocks, and exactly that block's weights within."""
    weights = streamed.streamed
    blocks = blocks_of(streamed.model, streamed.adapter)
    between, within = [], []

    def count(into: list):
        return lambda module, args: into.append(weights.resident_parameters())

    handles = [block.register_forward_pre_hook(count(between)) for block in blocks]
    handles += [block.self_attn.register_forward_pre_hook(count(within)) for block in blocks]
    try:
        with torch.no_grad():
            streamed.model(input_ids=_tokens(streamed), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    assert between == [0] * len(blocks)
    assert within == [sum(p.numel() for p in blocks[0].parameters())] * len(blocks)


def test_overrides_outlast_a_release_and_original_ignores_them(streamed):
    name = "model.layers.2.mlp.down_proj"
    weights = streamed.streamed
    ids = _tokens(streamed)
    with torch.no_grad():
        before = streamed.model(input_ids=ids, use_cache=False).logits
        weights.override(f"{name}.weight", lambda: torch.zeros(64, 172))
        try:
            changed = streamed.model(input_ids=ids, use_cache=False).logits
            with weights.held("model.layers.2"):
                assert streamed.model.get_submodule(name).weight.abs().sum() == 0
            with weights.original():
                again = streamed.model(input_ids=ids, use_cache=False).logits
        finally:
            weights.overrides.clear()
    assert not torch.equal(before, changed)
    assert torch.equal(before, again)


def _live_qtensors() -> int:
    gc.collect()
    return sum(isinstance(item, QTensor) for item in gc.get_objects())


def test_nan_in_a_streamed_part_is_refused_and_a_new_override_is_checked_again(streamed, tmp_path):
    """Each part is checked for NaN/Inf once as read, and once with its overrides; a new override
    makes its part be checked again when next loaded."""
    folder = tmp_path / "nan"
    shutil.copytree(STORIES, folder)
    (folder / "model.safetensors").chmod(0o644)  # the shared copy may be read-only
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.3.self_attn.o_proj.weight"][1, 2] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    broken = load_model(folder, streaming=True)
    with pytest.raises(LayerwiseError, match="model.layers.3: weight self_attn.o_proj.weight has 1 NaN or Inf"), \
            torch.no_grad():
        broken.model(input_ids=_tokens(broken), use_cache=False)

    weights = streamed.streamed
    name = "model.layers.2.mlp.down_proj.weight"
    ids = _tokens(streamed)
    try:
        with torch.no_grad():
            weights.override(name, lambda: torch.zeros(64, 172))
            streamed.model(input_ids=ids, use_cache=False)  # checked with this override
            assert ("model.layers.2", True) in weights.checked
            weights.override(name, lambda: torch.full((64, 172), float("inf")))
            with pytest.raises(LayerwiseError, match="model.layers.2: weight mlp.down_proj.weight has 11,008"):
                streamed.model(input_ids=ids, use_cache=False)
    finally:
        weights.overrides.clear()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_quantization_stores_the_same_codes(method):
    plan = Plan(QuantConfig("int", 4, None, True, method, "error"))
    _, whole, whole_sizes = run_quantize(STORIES, plan, tokens=1024, progress=False)
    del _
    in_memory = _live_qtensors()
    loaded, parts, sizes = run_quantize(STORIES, plan, tokens=1024, streaming=True, progress=False)
    assert loaded.streamed is not None and sizes == whole_sizes
    # Streamed, the codes wait on disk: neither the result nor the model's overrides hold them.
    assert isinstance(parts, StoredModules) and _live_qtensors() == in_memory
    assert whole.keys() == parts.keys()
    for name in whole:
        assert torch.equal(whole[name].dequantize(), parts[name].dequantize()), name
    ids = _tokens(loaded)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, use_cache=False).logits
    reference = load_model(STORIES)
    for name, q in whole.items():
        reference.model.get_submodule(name).weight.data.copy_(q.dequantize())
    with torch.no_grad():
        assert torch.equal(logits, reference.model(input_ids=ids, use_cache=False).logits)


def test_a_tokenizer_set_aside_is_read_again_when_asked_for():
    loaded = load_model(STORIES, streaming=True)
    ids = loaded.tokenizer("Once upon a time")["input_ids"]
    loaded.set_tokenizer_aside()
    assert "tokenizer" not in vars(loaded)
    assert loaded.tokenizer("Once upon a time")["input_ids"] == ids


def test_a_streamed_model_reads_a_saved_quantization_from_disk_as_blocks_load(tmp_path):
    plan = Plan(QuantConfig("int", 3, None, True, "rtn", "error"))
    _, whole, _ = run_quantize(STORIES, plan, out=tmp_path / "q", progress=False)
    expected = {name: q.dequantize() for name, q in whole.items()}
    del whole, _
    before = _live_qtensors()
    loaded = load_model(STORIES, streaming=True)
    document, stored = load_quantized(tmp_path / "q", lazy=True)
    apply_quantized(loaded, document, stored)
    assert isinstance(stored, StoredModules) and _live_qtensors() == before
    for name, weight in expected.items():
        with streaming.held(loaded.streamed, name):
            assert torch.equal(loaded.model.get_submodule(name).weight, weight), name


def test_streamed_eval_and_profile_match(tmp_path):
    plan = Plan(QuantConfig("int", 3, None, True, "rtn", "error"))
    run_quantize(STORIES, plan, out=tmp_path / "q", progress=False)
    whole = run_eval(STORIES, data=EVALUATION_TEXT, quantized=tmp_path / "q", tokens=2048, progress=False)
    parts = run_eval(STORIES, data=EVALUATION_TEXT, quantized=tmp_path / "q", tokens=2048, streaming=True,
                     progress=False)
    for key in ("base", "quantized"):
        assert parts[key]["perplexity"] == pytest.approx(whole[key]["perplexity"], rel=1e-9)
        assert parts[key]["top1"] == whole[key]["top1"]
        assert max(abs(a - b) for a, b in zip(parts[key]["window_kl"], whole[key]["window_kl"])) < 1e-6
    assert whole["quantized"]["kl"] > 0.01
    # Streamed, the ablation's block runs hold one block's weights at a time as the forward does.
    parts = load_model(STORIES, streaming=True)
    held = []
    handles = [block.self_attn.register_forward_pre_hook(
        lambda module, args: held.append(parts.streamed.resident_parameters()))
        for block in blocks_of(parts.model, parts.adapter)]
    try:
        profiled = [run_profile(STORIES, tokens=1024, ablation=True, progress=False),
                    run_profile(parts, tokens=1024, ablation=True, progress=False)]
    finally:
        for handle in handles:
            handle.remove()
    block_size = sum(p.numel() for p in blocks_of(parts.model, parts.adapter)[0].parameters())
    assert len(held) > 4 * parts.n_blocks and set(held) == {block_size}
    for a, b in zip(profiled[0].blocks, profiled[1].blocks):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_embedding_rows_with_a_padding_id_beyond_them(tmp_path):
    """Only the batch's rows are read: a padding id larger than their count must not matter."""
    import json
    import shutil

    folder = tmp_path / "padded"
    shutil.copytree(STORIES, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"pad_token_id": 400}))
    whole, parts = load_model(folder), load_model(folder, streaming=True)
    ids = torch.tensor([[1, 5, 7, 9, 300, 5]])
    with torch.no_grad():
        assert torch.equal(whole.model(input_ids=ids).logits, parts.model(input_ids=ids).logits)


def test_checkpoint_saved_without_the_base_model_prefix(tmp_path):
    """GPT-2's own checkpoint names its tensors wte.weight, h.0...: the tied head is found too."""
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=512)).eval()
    (tmp_path / "gpt2").mkdir()
    model.config.save_pretrained(tmp_path / "gpt2")
    save_file({name.removeprefix("transformer."): tensor.contiguous() for name, tensor in model.state_dict().items()
               if name != "lm_head.weight"}, tmp_path / "gpt2" / "model.safetensors", metadata={"format": "pt"})
    from layerwise.models.loading import load_tokenizer

    parts = load_model(tmp_path / "gpt2", tokenizer=load_tokenizer(STORIES), streaming=True)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, parts.model(input_ids=ids).logits)


def test_streamed_eval_of_a_schedule_matches_in_memory():
    """Streamed, the blocks run in the schedule's order a block at a time for all windows, each
    with its own call arguments: the same numbers as the in-memory model running that order."""
    order = [0, 1, 1, 3, 4]  # block 1 twice, block 2 skipped
    whole = run_eval(STORIES, data=EVALUATION_TEXT, tokens=1024, schedule=order, progress=False)
    parts = run_eval(STORIES, data=EVALUATION_TEXT, tokens=1024, schedule=order, streaming=True, progress=False)
    assert whole["quantized"]["kl"] > 0.01
    for key in ("base", "quantized"):
        assert parts[key]["perplexity"] == pytest.approx(whole[key]["perplexity"], rel=1e-6)
        assert max(abs(a - b) for a, b in zip(parts[key]["window_kl"], whole[key]["window_kl"])) < 1e-6
    with pytest.raises(LayerwiseError, match="schedule names block 9"):
        run_eval(STORIES, data=EVALUATION_TEXT, tokens=1024, schedule=[0, 9], streaming=True, progress=False)


def test_streamed_eval_of_the_base_alone():
    whole = run_eval(STORIES, data=EVALUATION_TEXT, tokens=1024, progress=False)
    parts = run_eval(STORIES, data=EVALUATION_TEXT, tokens=1024, streaming=True, progress=False)
    assert parts["base"]["perplexity"] == pytest.approx(whole["base"]["perplexity"], rel=1e-9)
    assert "quantized" not in parts


def test_streamed_gpt2_conv1d_weights_quantize_as_in_memory(tmp_path):
    """GPT-2 keeps its linears transposed (Conv1D) and ties its head: overrides follow both."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=512)  # stories260K's tokenizer
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    from layerwise.models.loading import load_tokenizer

    tokenizer = load_tokenizer(STORIES)
    plan = Plan(QuantConfig("int", 4, 32, True, "rtn", "error"))
    whole = load_model(tmp_path / "gpt2", tokenizer=tokenizer)
    parts = load_model(tmp_path / "gpt2", tokenizer=tokenizer, streaming=True)
    _, stored_whole, _ = run_quantize(whole, plan, progress=False)
    _, stored_parts, _ = run_quantize(parts, plan, progress=False)
    ids = _tokens(whole, (1, 16))
    with torch.no_grad():
        assert torch.equal(whole.model(input_ids=ids).logits, parts.model(input_ids=ids).logits)
    assert all(torch.equal(stored_whole[n].dequantize(), stored_parts[n].dequantize()) for n in stored_whole)


def test_streaming_refuses_what_it_cannot_do(streamed, tmp_path):
    with pytest.raises(LayerwiseError, match="device-map"):
        load_model(STORIES, streaming=True, device_map="auto")
    folder = tmp_path / "bin-only"
    folder.mkdir()
    (folder / "config.json").write_text((STORIES / "config.json").read_text())
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(LayerwiseError, match="safetensors"):
        load_model(folder, streaming=True, tokenizer=streamed.tokenizer)


@pytest.mark.slow
def test_streamed_gguf_matches_transformers_gguf_loader(smollm2):
    """Dequantized one tensor at a time (llama's q/k un-permuted as transformers does): the same
    weights as `from_pretrained(gguf_file=...)`, so the same logits."""
    parts = load_model(SMOLLM2, streaming=True, tokenizer=smollm2.tokenizer)
    ids = _tokens(smollm2, (1, 32))
    with torch.no_grad():
        assert torch.equal(smollm2.model(input_ids=ids, use_cache=False).logits,
                           parts.model(input_ids=ids, use_cache=False).logits)
    assert parts.streamed.loads == 30  # 30 blocks once each; the embedding and the tied head read rows only


@pytest.mark.slow  # the CLI in fresh processes
def test_cli_streaming_quantize_and_eval(tmp_path):
    from test_cli import assert_one_line_error, layerwise

    done = layerwise("quantize", STORIES, "--bits", "4", "--group-size", "none", "--streaming", "--out", tmp_path / "q",
                     "--quiet")
    assert done.returncode == 0, done.stderr
    done = layerwise("eval", STORIES, "--quantized", tmp_path / "q", "--data", EVALUATION_TEXT, "--tokens", "1024",
                     "--streaming", "--quiet", "--json", tmp_path / "eval.json")
    assert done.returncode == 0, done.stderr
    assert "KL(base||quantized)" in done.stdout
    assert_one_line_error(layerwise("profile", STORIES, "--streaming", "--device-map", "auto"), "device-map")


@pytest.mark.parametrize("model_type", ["gpt_neox", "opt", "gemma3_text", "phi3"])
def test_other_families_stream_as_transformers_loads_them(model_type, tmp_path):
    """GPT-NeoX's checkpoint names its head embed_out (transformers renames it on loading)."""
    from transformers import AutoModelForCausalLM
    from test_adapters import tiny_model

    tiny_model(model_type).save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    parts = load_model(tmp_path, tokenizer=object(), streaming=True)
    ids = _tokens(parts, (1, 12))
    with torch.no_grad():
        assert torch.equal(reference(input_ids=ids).logits, parts.model(input_ids=ids).logits)
