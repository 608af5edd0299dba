"""One check for developers, the README's test command and CI: format, lint, types, tests."""

from __future__ import annotations

import subprocess
import sys

STEPS: list[list[str]] = [
    ["ruff", "format", "--check", "."],
    ["ruff", "check", "."],
    ["mypy"],
    ["pytest", "-q", *sys.argv[1:]],
]


def main() -> int:
    bin_dir = sys.executable.rsplit("/", 1)[0]
    for step in STEPS:
        cmd = [f"{bin_dir}/{step[0]}", *step[1:]]
        print("==>", " ".join(step), flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"FAILED: {' '.join(step)} (exit {rc})", flush=True)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
