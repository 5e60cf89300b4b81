"""A bounded random byte-flip fuzz of the files layerwise reads: every mutated file must end in a
clean one-line LayerwiseError or a valid load, never a hang, a crash or another exception.

Each case runs in one child process (so a segfault shows as a signal, not a lost test run) with
an alarm per case (so a hang shows as a timeout).
"""
import json
import subprocess
import sys

import pytest

from conftest import SMOLLM2, STORIES

# End to end through the CLI or fresh processes: left out of the quick tier (-m "not slow").
pytestmark = pytest.mark.slow

CHILD = r'''
import json, shutil, signal, struct, sys, tempfile
from pathlib import Path
import numpy as np
from layerwise import load_model
from layerwise.errors import LayerwiseError

source, seed, cases, region = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(seed)
scratch = Path(tempfile.mkdtemp())

def timeout(*_):
    raise TimeoutError("hang")

signal.signal(signal.SIGALRM, timeout)
for case in range(cases):
    if source.is_dir():
        target = scratch / "model"
        shutil.copytree(source, target, dirs_exist_ok=True)
        weights = target / "model.safetensors"
    else:
        target = weights = scratch / source.name
        shutil.copy(source, target)
    data = bytearray(weights.read_bytes())
    if source.is_dir():
        header_end = 8 + struct.unpack_from("<Q", data)[0]
    else:
        from layerwise.models.integrity import check_gguf
        header_end = check_gguf(source)["data_start"]
    end = header_end if region == "header" else len(data)
    flips = []
    for _ in range(int(rng.integers(1, 9))):
        at = int(rng.integers(0, end))
        bit = int(rng.integers(0, 8))
        data[at] ^= 1 << bit
        flips.append([at, bit])
    weights.write_bytes(bytes(data))
    signal.alarm(90)
    try:
        load_model(target)
        outcome, message = "loaded", ""
    except LayerwiseError as error:
        outcome, message = "error", str(error)
    except TimeoutError:
        outcome, message = "hang", ""
    except BaseException as error:
        outcome, message = "unexpected", f"{type(error).__name__}: {error}"
    finally:
        signal.alarm(0)
    print(json.dumps({"case": case, "flips": flips, "outcome": outcome, "message": message}), flush=True)
    shutil.rmtree(target) if target.is_dir() else target.unlink()
'''


def fuzz(source, seed: int, cases: int, region: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(source), str(seed), str(cases), region],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"the loader crashed (rc {done.returncode}): {done.stderr[-2000:]}"
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == cases
    for result in results:
        assert result["outcome"] in ("loaded", "error"), result
        assert "\n" not in result["message"], result
    return results


def test_byte_flips_in_safetensors(tmp_path):
    header = fuzz(STORIES, seed=0, cases=20, region="header")
    anywhere = fuzz(STORIES, seed=1, cases=10, region="anywhere")
    outcomes = {r["outcome"] for r in header + anywhere}
    assert "error" in outcomes  # the fuzz does reach the checks


@pytest.mark.slow
def test_byte_flips_in_gguf(tmp_path):
    header = fuzz(SMOLLM2, seed=0, cases=12, region="header")
    anywhere = fuzz(SMOLLM2, seed=1, cases=4, region="anywhere")
    assert "error" in {r["outcome"] for r in header + anywhere}
