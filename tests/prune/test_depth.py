"""Drops, schedules and the choice of what to drop, on stories260K and tiny random models."""
import subprocess
import sys

import pytest
import torch

from conftest import CALIBRATION_TEXT, STORIES
from layerwise import load_model, token_windows
from layerwise.errors import LayerwiseError
from layerwise.models import ADAPTERS
from layerwise.models.loading import wrap_model
from layerwise.prune import choose_drops, delete_blocks_, schedule, silence_
from layerwise.prune.depth import out_projections
from layerwise.prune.run import run_drop


@pytest.fixture(scope="module")
def loaded():
    return load_model(STORIES)


@pytest.fixture(scope="module")
def windows(loaded):
    return token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=1024, seq_len=256)


def _logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(input_ids=ids, use_cache=False).logits


def test_schedule_skip_equals_deleting_and_silencing(windows):
    loaded = load_model(STORIES)
    ids = windows.input_ids[:2]
    full = _logits(loaded, ids)
    with schedule(loaded, range(loaded.n_blocks)):
        assert torch.equal(_logits(loaded, ids), full)
    with schedule(loaded, [0, 1, 3, 4]):
        skipped = _logits(loaded, ids)
    with schedule(loaded, [0, 1, 1, 2, 3, 4]):
        repeated = _logits(loaded, ids)
    assert not torch.allclose(repeated, full) and loaded.n_blocks == 5 and torch.equal(_logits(loaded, ids), full)
    saved = out_projections(loaded)
    silence_(loaded, "block", [2])
    torch.testing.assert_close(_logits(loaded, ids), skipped, rtol=1e-5, atol=1e-5)
    loaded.model.load_state_dict(saved, strict=False)
    assert torch.equal(_logits(loaded, ids), full)
    kept = delete_blocks_(loaded, [2])
    assert kept == [0, 1, 3, 4] and loaded.model.config.num_hidden_layers == 4
    assert [b.self_attn.layer_idx for b in loaded.model.model.layers] == [0, 1, 2, 3]
    torch.testing.assert_close(_logits(loaded, ids), skipped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", sorted(ADAPTERS))
def test_a_silenced_block_is_a_skipped_block_is_a_deleted_block(architecture):
    """On every architecture of the adapter table (tiny random weights: wiring, not quality)."""
    from models.test_adapters import tiny_model

    tiny = wrap_model(tiny_model(architecture), tokenizer=None)
    ids = torch.randint(3, 128, (2, 16))
    with schedule(tiny, [0, 2]):
        skipped = _logits(tiny, ids)
    saved = out_projections(tiny)
    silence_(tiny, "block", [1])
    torch.testing.assert_close(_logits(tiny, ids), skipped, rtol=1e-5, atol=1e-5)
    tiny.model.load_state_dict(saved, strict=False)
    delete_blocks_(tiny, [1])
    torch.testing.assert_close(_logits(tiny, ids), skipped, rtol=1e-5, atol=1e-5)


def test_bad_drops(loaded):
    with pytest.raises(LayerwiseError, match="out of range"):
        silence_(loaded, "attn", [5])
    with pytest.raises(LayerwiseError, match="schedule names block 9"):
        with schedule(loaded, [0, 9]):
            pass
    with pytest.raises(LayerwiseError, match="at least one"):
        with schedule(loaded, []):
            pass
    with pytest.raises(LayerwiseError, match="unknown drop kind"):
        silence_(loaded, "head", [1])
    with pytest.raises(LayerwiseError, match="leave none"):
        run_drop(loaded, indices=[0, 1, 2, 3, 4])
    with pytest.raises(LayerwiseError, match="either"):
        run_drop(loaded)


@pytest.mark.parametrize("kind", ["block", "attn", "mlp"])
def test_ablation_and_search_agree_on_the_first_drop_and_search_measures_the_pruned_model(loaded, windows, kind):
    ablation = choose_drops(loaded, windows, kind, 2, "ablation", progress=False)
    search = choose_drops(loaded, windows, kind, 2, "search", progress=False)
    assert ablation.order[0] == search.order[0]
    assert ablation.scores[0] == pytest.approx(search.scores[0])
    # The search's second score is the KL of the model without both units, measured directly.
    assert search.scores[1] > search.scores[0]
    assert search.history[1]["dropped"] == search.order[:1]
    bi = choose_drops(loaded, windows, kind, 2, "bi", progress=False)
    assert len(set(bi.order)) == 2 and bi.forward_equivalents == 1.0


def test_drop_writes_a_checkpoint_plain_transformers_loads(windows, tmp_path):
    loaded, choice = run_drop(STORIES, count=2, by="bi", data=CALIBRATION_TEXT, tokens=1024, out=tmp_path / "d",
                              progress=False)
    _assert_plain_reload_matches(loaded, windows.input_ids[:2], tmp_path, layers=3, tolerance=1e-5)


def _assert_plain_reload_matches(loaded, ids, tmp_path, layers: int, tolerance: float) -> None:
    """A fresh process loads tmp_path/d with plain transformers and gets the in-memory logits."""
    torch.save({"ids": ids, "logits": _logits(loaded, ids)}, tmp_path / "expected.pt")
    script = (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'd')!r})\n"
        "with torch.no_grad(): logits = model(input_ids=expected['ids']).logits\n"
        f"assert model.config.num_hidden_layers == {layers}, model.config.num_hidden_layers\n"
        f"torch.testing.assert_close(logits, expected['logits'], rtol={tolerance}, atol={tolerance})\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.stdout.strip().endswith("ok"), done.stderr


@pytest.mark.slow
def test_drop_smollm2_gguf_and_reload_with_plain_transformers(tmp_path):
    from conftest import SMOLLM2

    loaded, choice = run_drop(SMOLLM2, count=2, by="bi", data=CALIBRATION_TEXT, tokens=1024, out=tmp_path / "d",
                              progress=False)
    assert loaded.n_blocks == 28 and 0 not in choice.order
    ids = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=256, seq_len=128).input_ids
    _assert_plain_reload_matches(loaded, ids, tmp_path, layers=28, tolerance=1e-4)


@pytest.mark.parametrize("kind, by, count", [("block", "bi", 2), ("attn", "ablation", 2), ("block", "search", 2)])
def test_a_streamed_drop_writes_what_one_in_memory_writes(kind, by, count, tmp_path, resident_parameters):
    """The same choice (and scores) and the same checkpoint bytes, with one block in memory at most."""
    runs = {}
    for name, streaming in (("whole", False), ("streamed", True)):
        loaded, choice = run_drop(STORIES, kind=kind, count=count, by=by, data=CALIBRATION_TEXT, tokens=1024,
                                  out=tmp_path / name, streaming=streaming, progress=False)
        runs[name] = choice, (tmp_path / name / "model.safetensors").read_bytes()
    (whole, whole_bytes), (streamed, streamed_bytes) = runs["whole"], runs["streamed"]
    assert streamed.order == whole.order and len(whole.order) == count
    if by != "bi":
        assert streamed.scores == pytest.approx(whole.scores, rel=1e-6)
    assert streamed_bytes == whole_bytes
    block = sum(p.numel() for p in load_model(STORIES).model.model.layers[0].parameters())
    assert resident_parameters and max(resident_parameters) <= block


def test_a_streamed_model_with_deleted_blocks_runs_as_in_memory(windows):
    """Deleting blocks renumbers the streamed parts: each kept block still reads its own weights."""
    ids = windows.input_ids[:2]
    whole, streamed = load_model(STORIES), load_model(STORIES, streaming=True)
    for loaded in (whole, streamed):
        assert delete_blocks_(loaded, [1, 3]) == [0, 2, 4]
    assert [name for name in streamed.streamed.parts if ".layers." in name] == [f"model.layers.{i}" for i in range(3)]
    torch.testing.assert_close(_logits(streamed, ids), _logits(whole, ids), rtol=1e-6, atol=1e-6)
