"""`make bench-setup`: the LiteLLM baseline's own venv (`.bench-venv`, with py-spy for
`bench.profile`) and the `wrk` load generator.

LiteLLM lives in a venv of its own so that its many pins never touch meshnode's `.venv`.
`wrk` comes from the distribution (Debian package `wrk`) when we are root and apt-get is there;
without it `bench.run` falls back to its Python load generator.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_VENV = REPO / ".bench-venv"
LITELLM_SPEC = "litellm[proxy]"


def litellm_python(venv: Path = BENCH_VENV) -> Path:
    """The interpreter of the LiteLLM venv (it may not exist yet)."""
    return venv / "bin" / "python"


def litellm_ready(venv: Path = BENCH_VENV) -> bool:
    """True when the LiteLLM venv exists and can import the proxy."""
    python = litellm_python(venv)
    if not python.exists():
        return False
    probe = subprocess.run(
        [str(python), "-c", "import litellm.proxy.proxy_server"],
        capture_output=True,
        timeout=180,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    return probe.returncode == 0


def install_litellm(venv: Path = BENCH_VENV, spec: str = LITELLM_SPEC) -> None:
    """Create the venv (from the base interpreter) and pip install LiteLLM's proxy into it."""
    if not litellm_python(venv).exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(litellm_python(venv)), "-m", "pip"]
    subprocess.run([*pip, "install", "--quiet", "--upgrade", "pip"], check=True)
    # py-spy rides along: `python -m bench.profile` samples the node with it.
    subprocess.run([*pip, "install", "--quiet", spec, "py-spy"], check=True)


def install_wrk() -> bool:
    """Install wrk from the distribution when possible; True when wrk is on PATH afterwards."""
    if shutil.which("wrk"):
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("bench-setup: wrk not found and not root/apt; the Python load generator will be used")
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, env=env)
    return shutil.which("wrk") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.setup_litellm", description=__doc__)
    parser.add_argument("--venv", type=Path, default=BENCH_VENV)
    parser.add_argument("--spec", default=LITELLM_SPEC, help="pip requirement for LiteLLM")
    parser.add_argument("--skip-wrk", action="store_true", help="do not apt-get install wrk")
    args = parser.parse_args(argv)
    if not args.skip_wrk:
        print(f"bench-setup: wrk {'ready' if install_wrk() else 'unavailable'}")
    if litellm_ready(args.venv):
        print(f"bench-setup: LiteLLM already installed in {args.venv}")
        return 0
    print(f"bench-setup: installing {args.spec} into {args.venv} (a few minutes)")
    install_litellm(args.venv, args.spec)
    if not litellm_ready(args.venv):
        print("bench-setup: LiteLLM installed but `import litellm.proxy.proxy_server` fails")
        return 1
    print(f"bench-setup: LiteLLM ready in {args.venv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
