"""Per-prompt divergence: a prompt-specific planted change is flagged, ordinary rounding is not."""
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import STORIES
from layerwise import load_model
from layerwise.apply.run import run_quantize
from layerwise.errors import LayerwiseError
from layerwise.evaluate.diverge import PromptDivergence, base_references, compare, encode_prompts, flag_outliers, read_prompts
from layerwise.plan import Plan
from test_cli import assert_one_line_error, layerwise

# End to end through the CLI or fresh processes: left out of the quick tier (-m "not slow").
pytestmark = pytest.mark.slow

PROMPTS = Path(__file__).resolve().parent.parent / "data" / "story_prompts.txt"


def test_a_planted_prompt_specific_change_is_flagged():
    loaded = load_model(STORIES)
    prompts = read_prompts(PROMPTS)
    encoded = encode_prompts(loaded, prompts)
    references = base_references(loaded, encoded)
    # A token that only prompt 3 contains; change its input embedding alone (untie the head first).
    counts = Counter(t for ids in encoded for t in set(ids[0].tolist()))
    target = 3
    token = next(t for t in encoded[target][0].tolist() if counts[t] == 1)
    model = loaded.model
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.model.embed_tokens.weight[token] *= -4.0
    # and a uniform, harmless perturbation everywhere: ordinary rounding noise
    _, _, _ = run_quantize(loaded, Plan.uniform(bits=8, group_size=None), progress=False)
    rows = compare(loaded, prompts, encoded, references)
    flagged = [i for i, row in enumerate(rows) if row.flagged]
    assert flagged == [target], [(round(r.kl, 5), round(r.robust_z, 1)) for r in rows]


def test_no_outlier_among_similar_divergences():
    rows = [PromptDivergence(str(i), 10, kl, kl, 1.0) for i, kl in enumerate([0.010, 0.011, 0.012, 0.009, 0.0105])]
    assert not any(row.flagged for row in flag_outliers(rows))
    rows.append(PromptDivergence("x", 10, 0.5, 0.5, 0.5))
    assert [row.prompt for row in flag_outliers(rows) if row.flagged] == ["x"]


def test_diverge_cli(tmp_path):
    done = layerwise("quantize", STORIES, "--bits", "4", "--group-size", "none", "--out", tmp_path / "q", "--quiet")
    assert done.returncode == 0, done.stderr
    done = layerwise("diverge", STORIES, tmp_path / "q", "--prompts", PROMPTS, "--json", tmp_path / "d.json")
    assert done.returncode == 0, done.stderr
    assert "prompts flagged" in done.stdout and (tmp_path / "d.json").exists()
    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\n")
    assert_one_line_error(layerwise("diverge", STORIES, tmp_path / "q", "--prompts", few), "at least 3")
    assert_one_line_error(layerwise("diverge", STORIES, tmp_path / "missing", "--prompts", PROMPTS), "no quantized model")


def test_prompts_file_errors(tmp_path):
    with pytest.raises(LayerwiseError, match="does not exist"):
        read_prompts(tmp_path / "none.txt")


def test_streamed_diverge_measures_what_in_memory_measures(tmp_path):
    from layerwise.evaluate.diverge import run_diverge

    run_quantize(STORIES, Plan.uniform(bits=4, group_size=None), out=tmp_path / "q", progress=False)
    whole = run_diverge(STORIES, tmp_path / "q", PROMPTS, progress=False)
    streamed = run_diverge(STORIES, tmp_path / "q", PROMPTS, streaming=True, progress=False)
    assert len(streamed) == len(whole)
    for ours, theirs in zip(streamed, whole):
        assert (ours.prompt, ours.tokens, ours.flagged) == (theirs.prompt, theirs.tokens, theirs.flagged)
        assert ours.kl == pytest.approx(theirs.kl, rel=1e-6, abs=1e-9)
        assert ours.max_kl == pytest.approx(theirs.max_kl, rel=1e-6, abs=1e-9)
        assert ours.top1 == pytest.approx(theirs.top1, rel=1e-6)
