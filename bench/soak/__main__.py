"""`python -m bench.soak [--minutes 10 | --quick] [--report docs/soak.md]`: see bench/soak."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from bench.soak.run import SoakSettings, run_soak

QUICK_S = 75.0
MARK = "<!-- soak:latest -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="load duration (default 10)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_S:g} s, one chaos cycle")
    parser.add_argument("--clients", type=int, default=6, help="concurrent clients (6)")
    parser.add_argument("--max-requests", type=int, default=0,
                        help="stop after this many requests (default 400 per second of load)")
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temp dir)")
    parser.add_argument("--report", type=Path,
                        help=f"write the table into this markdown file, after the {MARK} line")
    args = parser.parse_args(argv)
    seconds = QUICK_S if args.quick else args.minutes * 60.0
    command = "python -m bench.soak " + ("--quick" if args.quick else f"--minutes {args.minutes:g}")
    settings = SoakSettings(seconds=seconds, clients=args.clients,
                            max_requests=args.max_requests, workdir=args.workdir,
                            cycle_s=min(60.0, seconds * 0.8), command=command)
    # SIGTERM (and SIGINT, which a background shell ignores) end the run through the same
    # `finally` as an error: every node and fake is stopped.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    result = run_soak(settings)
    print(result.report)
    if args.report is not None:
        write_report(args.report, result.report)
    print("soak:", "PASSED" if result.ok else "FAILED", file=sys.stderr)
    return 0 if result.ok else 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def write_report(path: Path, report: str) -> None:
    """Replace what follows the marker line (or append the marker and the report)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    head, found, _ = text.partition(MARK)
    path.write_text((head if found else text + "\n") + MARK + "\n\n" + report, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
