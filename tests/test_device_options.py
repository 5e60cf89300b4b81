"""--device, --device-map and --dtype reach the model loader from every command that loads a model."""
from pathlib import Path

import pytest

from conftest import CALIBRATION_TEXT, STORIES
from layerwise.cli import main

PROMPTS = Path(__file__).resolve().parent / "data" / "story_prompts.txt"
# The loader itself (what imports it when called finds the stand-in) and every module that
# imported it by name.
LOADERS = ["layerwise.models.loading", "layerwise.profile.runner", "layerwise.apply.run", "layerwise.evaluate.run",
           "layerwise.measure.run", "layerwise.prune.run", "layerwise.export.run", "layerwise.quant.imatrix"]


class _Loaded(Exception):
    """Raised in place of loading: the command got as far as the loader, with these options."""

    def __init__(self, options: dict) -> None:
        super().__init__()
        self.options = options


@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory):
    from layerwise.apply.run import run_quantize
    from layerwise.plan import Plan

    out = tmp_path_factory.mktemp("q") / "q"
    run_quantize(STORIES, Plan.uniform(bits=8, group_size=None), out=out, progress=False)
    return out


@pytest.mark.parametrize("command", ["profile", "quantize", "eval", "plan", "drop", "diverge", "export", "compress",
                                     "imatrix"])
def test_device_options_reach_the_loader(command, quantized_folder, tmp_path, monkeypatch):
    import importlib

    def loader(source, **options):
        raise _Loaded(options)

    modules = [importlib.import_module(name) for name in LOADERS]  # all imported before any is patched
    for module in modules:
        monkeypatch.setattr(module, "load_model", loader)
    extra = {"profile": [], "quantize": ["--bits", "4", "--out", tmp_path / "q"],
             "eval": ["--data", CALIBRATION_TEXT], "plan": ["--budget", "4"], "drop": ["--blocks", "1"],
             "diverge": [quantized_folder, "--prompts", PROMPTS], "export": ["--format", "hf", "--quantized", quantized_folder, "--out", tmp_path / "e"],
             "compress": ["--budget", "4", "--out", tmp_path / "c"],
             "imatrix": ["--data", CALIBRATION_TEXT, "--out", tmp_path / "i.gguf"]}[command]
    with pytest.raises(_Loaded) as reached:
        main([command, str(STORIES), *map(str, extra), "--device", "cpu", "--device-map", "auto", "--dtype", "float32",
              "--no-streaming"])
    options = reached.value.options
    assert (options["device"], options["device_map"], options["dtype"]) == ("cpu", "auto", "float32")


def test_device_map_auto_on_a_cpu_gives_what_the_cpu_gives():
    """Without a GPU accelerate places every module on the CPU: the same numbers (on GPUs: untested)."""
    from layerwise.evaluate.run import run_eval

    runs = [run_eval(STORIES, data=CALIBRATION_TEXT, tokens=1024, seq_len=256, device_map=device_map, progress=False)
            for device_map in (None, "auto")]
    assert runs[0]["base"]["perplexity"] == runs[1]["base"]["perplexity"]
