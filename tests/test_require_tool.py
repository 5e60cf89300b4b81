"""`require_tool`: a test whose external tool (Chromium, llama.cpp's converter) is missing skips
on a developer's machine and fails under .ci/run, which sets LAYERWISE_REQUIRE_TOOLS=1."""
from __future__ import annotations

import pytest

from conftest import REQUIRE_TOOLS_ENV, require_tool


def test_a_found_tool_is_returned_whatever_the_flag(monkeypatch):
    for flag in (None, "1"):
        if flag is None:
            monkeypatch.delenv(REQUIRE_TOOLS_ENV, raising=False)
        else:
            monkeypatch.setenv(REQUIRE_TOOLS_ENV, flag)
        assert require_tool("chromium", "/usr/bin/chromium", "apt install chromium") == "/usr/bin/chromium"


@pytest.mark.parametrize("flag", [None, "", "0"])
def test_a_missing_tool_skips_without_the_flag(flag, monkeypatch):
    if flag is None:
        monkeypatch.delenv(REQUIRE_TOOLS_ENV, raising=False)
    else:
        monkeypatch.setenv(REQUIRE_TOOLS_ENV, flag)
    with pytest.raises(pytest.skip.Exception, match=r"chromium is not available \(apt install chromium\)"):
        require_tool("chromium", None, "apt install chromium")


def test_a_missing_tool_fails_with_the_flag(monkeypatch):
    monkeypatch.setenv(REQUIRE_TOOLS_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"converter is not available .*{REQUIRE_TOOLS_ENV} is set"):
        require_tool("converter", "", "set LAYERWISE_CONVERT_HF_TO_GGUF")
