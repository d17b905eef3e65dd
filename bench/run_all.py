"""Runs every benchmark at full size, one after another (they would skew each
other on a 2-core machine if run together), then regenerates docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys

from bench.common import ROOT, parser
from bench.report import ORDER
from bench.report import main as report


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    failed = []
    for name in ORDER:
        cmd = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if args.quick else [])]
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            failed.append(name)
    if not args.quick:
        report()
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
