"""How long the README's first command takes: `layerwise compress` on SmolLM2 with its defaults.

Runs the `layerwise compress` line of the README's first code block as it stands (so the two
cannot drift apart), in a fresh process from the repository root, with `--overwrite` added so that
every run starts from nothing, and records the wall time, each step's seconds (as the command
prints them), what it left, and eval.json's numbers. Issue 18's target: 10 minutes on 2 cores.

    python bench/compress.py    # about as long as the command itself
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, write_results  # noqa: E402

TARGET_SECONDS = 600


def readme_command() -> list[str]:
    """The `layerwise compress` invocation in the README's first ```bash block, as arguments."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    if block is None:
        sys.exit("README.md has no ```bash block")
    for part in re.split(r"&&|\n", block.group(1)):
        words = shlex.split(part)
        if "compress" in words and any(word.endswith("layerwise") for word in words):
            start = next(i for i, word in enumerate(words) if word.endswith("layerwise"))
            return [sys.executable, "-m", "layerwise", *words[start + 1:]]
    sys.exit("the README's first ```bash block has no `layerwise compress` command")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="compress")
    args = parser.parse_args()
    command = readme_command() + ["--overwrite"]
    out = Path(command[command.index("--out") + 1])
    out = out if out.is_absolute() else ROOT / out
    print("running:", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"the command failed ({done.returncode}):\n{done.stderr[-3000:]}")
    steps = {}
    for line in done.stdout.splitlines():  # "plan     runs/smollm2/plan.json (41 s)"
        found = re.match(r"(\w+)\s+(\S+) \((\d+) s\)$", line.strip())
        if found:
            steps[found.group(1)] = {"path": found.group(2), "seconds": int(found.group(3))}
    evaluation = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else None
    left = sorted(str(path.relative_to(out)) for path in out.iterdir())
    write_results(args.name, {"readme_command": " ".join(command[1:-1]), "seconds": seconds,
                              "target_seconds": TARGET_SECONDS, "within_target": seconds <= TARGET_SECONDS,
                              "steps": steps, "left": left, "eval": evaluation})
    print("\n| step | seconds |\n| --- | ---: |")
    for name, step in steps.items():
        print(f"| {name} | {step['seconds']} |")
    print(f"| **all (wall, incl. start-up)** | **{seconds:.0f}** (target {TARGET_SECONDS}) |")
    print("left:", ", ".join(left))


if __name__ == "__main__":
    main()
