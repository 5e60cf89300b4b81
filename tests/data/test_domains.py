"""Calibration domains: the shipped mix, several files, mixed windows that can be re-cut."""
from pathlib import Path

import pytest
import torch

from conftest import CALIBRATION_TEXT, EVALUATION_TEXT
from layerwise.data.domains import (DEFAULT_DOMAINS, SHIPPED_MIX, calibration_domains, calibration_windows,
                                    domain_slots, take_from_domains, windows_per_domain)
from layerwise.data.overlap import rebuild_windows, shared_windows
from layerwise.data.windows import CALIBRATION_FOLDER, mix_windows, read_text, token_windows
from layerwise.errors import LayerwiseError


def test_the_shipped_mix_has_four_kinds_of_text_each_with_its_license():
    assert list(DEFAULT_DOMAINS) == ["prose", "code", "verse", "tables"]
    license_text = (CALIBRATION_FOLDER / "LICENSE").read_text()
    for name, shipped in DEFAULT_DOMAINS.items():
        text, description = read_text(shipped)
        assert description == shipped and len(text) > 60_000
        assert f"{shipped.split(':')[1]}.txt" in license_text and f"{name}:" in license_text
    assert "def " in read_text(DEFAULT_DOMAINS["code"])[0]
    assert read_text(DEFAULT_DOMAINS["tables"])[0].count(",") > 5000
    with pytest.raises(LayerwiseError, match="not a text shipped with layerwise; shipped: layerwise:"):
        read_text("layerwise:nothing")


def test_calibration_domains_from_none_one_file_several_files_or_a_mapping(tmp_path):
    assert calibration_domains(None) == DEFAULT_DOMAINS
    assert calibration_domains(CALIBRATION_TEXT) == {"valid": CALIBRATION_TEXT}
    assert calibration_domains(DEFAULT_DOMAINS["code"]) == {"code": DEFAULT_DOMAINS["code"]}
    assert list(calibration_domains([CALIBRATION_TEXT, EVALUATION_TEXT])) == ["valid", "wiki.test"]
    assert calibration_domains({"chat": "a.txt"}) == {"chat": "a.txt"}
    (tmp_path / "a").mkdir()
    with pytest.raises(LayerwiseError, match="both named 'valid'"):
        calibration_domains([CALIBRATION_TEXT, tmp_path / "a" / "valid.txt"])
    with pytest.raises(LayerwiseError, match="no calibration text"):
        calibration_domains([])


def test_the_shipped_mix_by_name_adds_a_users_text_to_its_four_domains(stories):
    assert calibration_domains(SHIPPED_MIX) == DEFAULT_DOMAINS
    alone = calibration_windows(stories.tokenizer, SHIPPED_MIX, tokens=1024, seq_len=128)
    assert alone.window_domains == ("prose", "code", "verse", "tables") * 2
    assert calibration_domains([SHIPPED_MIX, CALIBRATION_TEXT]) == DEFAULT_DOMAINS | {"valid": CALIBRATION_TEXT}
    assert list(calibration_domains([CALIBRATION_TEXT, SHIPPED_MIX])) == ["valid", *DEFAULT_DOMAINS]
    with pytest.raises(LayerwiseError, match="both named 'code'"):
        calibration_domains([SHIPPED_MIX, DEFAULT_DOMAINS["code"]])


def test_windows_from_several_domains_are_interleaved_even_and_recut_from_their_description(stories):
    slots = domain_slots(stories.tokenizer, None, seq_len=128)
    assert windows_per_domain(1024, 4, 128) == 2
    windows = take_from_domains(slots, 1024, seed=5)
    assert windows.window_domains == ("prose", "code", "verse", "tables") * 2
    description = windows.describe()
    assert set(description["domains"]) == set(DEFAULT_DOMAINS) and description["windows"] == 8
    for name, part in windows.parts:
        assert part.describe() == description["domains"][name]
        assert part.slots == slots[name].take(2, 5).slots  # each domain's own draw for that seed
    rebuilt = rebuild_windows(stories.tokenizer, description)
    assert torch.equal(rebuilt.input_ids, windows.input_ids) and rebuilt.window_domains == windows.window_domains
    # Excluding a domain's slots is honoured per domain.
    taken = {name: set(part.slots) for name, part in windows.parts}
    other = take_from_domains(slots, 1024, seed=5, exclude=taken)
    assert shared_windows(other, windows) == []
    # One domain is not mixed at all: the windows are that text's own.
    one = take_from_domains({"prose": slots["prose"]}, 256, seed=5)
    assert one.parts is None and one.window_domains == ("calibration",) * 2


def test_mixing_windows_of_other_lengths_is_refused(stories):
    short = token_windows(stories.tokenizer, DEFAULT_DOMAINS["prose"], tokens=128, seq_len=64)
    long = token_windows(stories.tokenizer, DEFAULT_DOMAINS["code"], tokens=128, seq_len=128)
    with pytest.raises(LayerwiseError, match="same length and BOS"):
        mix_windows({"prose": short, "code": long})
    assert Path(DEFAULT_DOMAINS["prose"].split(":")[1]).name == "wikitext2_valid_excerpt"


def test_a_default_size_takes_what_a_short_text_holds_and_a_requested_one_is_refused(stories, tmp_path, capsys):
    from layerwise.apply.run import QUANTIZE_TOKENS, quantize_windows

    short = tmp_path / "short.txt"
    short.write_text(read_text(CALIBRATION_TEXT)[0][:6000], encoding="utf-8")
    holds = domain_slots(stories.tokenizer, short, seq_len=512)["short"].available
    assert 1 <= holds < QUANTIZE_TOKENS // 512
    with pytest.raises(LayerwiseError, match="give more text or fewer tokens"):
        calibration_windows(stories.tokenizer, short, tokens=QUANTIZE_TOKENS)
    capped = calibration_windows(stories.tokenizer, short, tokens=QUANTIZE_TOKENS, at_most=True)
    assert capped.input_ids.shape == (holds, 512)
    # What fits is taken as before: the cap changes nothing for a text that holds enough.
    same = calibration_windows(stories.tokenizer, short, tokens=512 * holds, at_most=True)
    assert torch.equal(same.input_ids, calibration_windows(stories.tokenizer, short, tokens=512 * holds).input_ids)
    # Several domains give the same number of windows each: as many as the shortest holds.
    mixed = calibration_windows(stories.tokenizer, [short, CALIBRATION_TEXT], tokens=QUANTIZE_TOKENS, at_most=True)
    assert mixed.window_domains == ("short", "valid") * holds
    # quantize's default (tokens=None) caps and says so; a size the user asked for is refused.
    assert quantize_windows(stories.tokenizer, short, None, progress=True).input_ids.shape == (holds, 512)
    assert f"fewer than the default {QUANTIZE_TOKENS:,}" in capsys.readouterr().err
    with pytest.raises(LayerwiseError, match="give more text or fewer tokens"):
        quantize_windows(stories.tokenizer, short, QUANTIZE_TOKENS)
