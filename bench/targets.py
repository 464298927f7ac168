"""What a benchmark run measures: the fake backend itself, one meshnode node, LiteLLM's proxy.

It owns starting each target as a real process on the cores it is given, with a generated config
that points it at the same backend, and waiting until it answers a chat completion. A `Target` is
a name, a base URL and the process whose CPU is charged to it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
import yaml

from bench.procs import BenchProcessError, Managed, ProcessSet, free_port

REPO = Path(__file__).resolve().parent.parent
CHAT_PATH = "/v1/chat/completions"
MODEL = "bench"
SLOW_MODEL = "bench-slow"  # bench.backend streams it with a delay between chunks
# Sent by every client to every target; LiteLLM refuses to start without a master key.
API_KEY = "sk-bench-0123456789abcdef0123456789abcdef"
# Anything a proxy tries to reach beyond loopback goes to a dead loopback port instead.
_NO_EGRESS = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
# Provider keys in the caller's environment must not switch on real cloud adapters.
_CLOUD_ENV = (
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "CLOUDFLARE_ACCOUNT_ID",
    "CLOUDFLARE_API_TOKEN",
    "TOGETHER_API_KEY",
)


@dataclass(frozen=True)
class Target:
    name: str  # "direct", "relay", "meshnode", "meshnode@0c3eb37", "litellm"
    base_url: str  # http://127.0.0.1:PORT
    process: Managed  # whose CPU a request through this target costs

    @property
    def chat_url(self) -> str:
        return self.base_url + CHAT_PATH


def chat_body(model: str = MODEL, stream: bool = False) -> bytes:
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLOUD_ENV}
    env.update(_NO_EGRESS)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _wait_chat_ok(managed: Managed, base_url: str, timeout_s: float) -> None:
    managed.wait_http_ok(
        base_url + CHAT_PATH,
        timeout_s,
        method="POST",
        body=chat_body(),
        headers={"Authorization": f"Bearer {API_KEY}"},
    )


def start_backend(procs: ProcessSet, cores: set[int] | None, chunk_delay_ms: float) -> Target:
    argv = [
        sys.executable, "-m", "bench.backend", "--port", "0",
        "--chunk-delay-ms", str(chunk_delay_ms),
    ]  # fmt: skip
    managed = procs.start("backend", argv, cores=cores, env=_clean_env(), cwd=REPO)
    url = managed.wait_for_line(r"^BACKEND_HTTP=(\S+)$", timeout_s=30).group(1)
    _wait_chat_ok(managed, url, 30)
    return Target("direct", url, managed)


def start_relay(procs: ProcessSet, cores: set[int] | None, backend: Target) -> Target:
    """`bench.relay` in front of the backend: the floor of a proxy on `cores` (bench.relay)."""
    argv = [sys.executable, "-m", "bench.relay", "--upstream", backend.base_url, "--port", "0"]
    managed = procs.start("relay", argv, cores=cores, env=_clean_env(), cwd=REPO)
    url = managed.wait_for_line(r"^RELAY_HTTP=(\S+)$", timeout_s=30).group(1)
    _wait_chat_ok(managed, url, 30)
    return Target("relay", url, managed)


def meshnode_config(backend_url: str, listen_port: int, grpc_port: int, data_dir: Path) -> dict:
    """A node with one openai_compatible provider (`backend`) and nothing else switched on."""
    models = [
        {"name": name, "openai_model": name, "cost_per_1k_tokens": 0.0}
        for name in (MODEL, SLOW_MODEL)
    ]
    return {
        "node": {"id": "bench-node", "data_dir": str(data_dir)},
        "server": {"listen_addr": f"127.0.0.1:{listen_port}"},
        "logging": {"level": "warning"},
        "mesh": {"enabled": False, "listen_addr": f"127.0.0.1:{grpc_port}", "mdns": False},
        "providers": {
            "local": {"enabled": False},
            "backend": {
                "type": "openai_compatible",
                "base_url": backend_url + "/v1",
                "credentials": {"api_key": API_KEY},
                "models": models,
            },
        },
        "routing": {"failover": {"fallback_chain": ["backend"]}},
        # Identical requests would otherwise be answered from the cache, measuring the cache.
        "cache": {"enabled": False},
        "budget": {"enabled": False},
        "auth": {"enabled": False},
    }


def meshnode_argv(meshnode_bin: Path | None) -> list[str]:
    """The installed `meshnode` script, else `python -m meshnode`.

    Either way the code it runs is the source folder that `start_meshnode` puts first on
    `PYTHONPATH`, not whatever checkout the venv's editable install points at.
    """
    if meshnode_bin is not None:
        if not meshnode_bin.exists():
            raise BenchProcessError(f"{meshnode_bin} not found (run `make install`)")
        return [str(meshnode_bin)]
    beside = Path(sys.executable).parent / "meshnode"
    if beside.exists():
        return [str(beside)]
    return [sys.executable, "-m", "meshnode"]


def slug(name: str) -> str:
    """A target's name as a file name: "meshnode@0c3eb37" -> "meshnode-0c3eb37"."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def node_env(source_dir: Path) -> dict[str, str]:
    """The environment of a node that runs the meshnode package found in `source_dir`."""
    return _clean_env({"PYTHONPATH": str(source_dir)})


def check_imports_from(source_dir: Path, env: dict[str, str]) -> None:
    """Fail unless this venv's Python, given `env`, imports meshnode from `source_dir`.

    A venv's editable install points at one checkout; a worktree or an unpacked baseline must
    win over it, or "before" and "after" would both be that checkout.
    """
    probe = "import meshnode, sys; sys.stdout.write(meshnode.__file__ or '')"
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=source_dir,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    found = Path(done.stdout.strip()).resolve() if done.returncode == 0 else None
    if found is None or not found.is_relative_to(source_dir.resolve()):
        raise BenchProcessError(
            f"meshnode imports from {found or done.stderr.strip()[-300:]}, not {source_dir}"
        )


def start_meshnode(
    procs: ProcessSet,
    cores: set[int] | None,
    backend: Target,
    work_dir: Path,
    meshnode_bin: Path | None,
    timeout_s: float,
    name: str = "meshnode",
    source_dir: Path = REPO,
    wrapper: Sequence[str] = (),
) -> Target:
    """A node named `name` running the meshnode package in `source_dir` (today's: this checkout);
    `wrapper` runs it under another program (`bench.instructions`: valgrind), as
    `python -m meshnode` then (an entry-point script's shebang would be the wrapped program)."""
    file_name = slug(name)
    config_path = work_dir / f"{file_name}.yaml"
    config = meshnode_config(backend.base_url, 0, free_port(), work_dir / f"{file_name}-data")
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = node_env(source_dir)
    check_imports_from(source_dir, env)
    program = [*wrapper, sys.executable, "-m", "meshnode"] if wrapper else meshnode_argv(meshnode_bin)
    argv = [*program, "run", "--config", str(config_path),
            "--listen", "127.0.0.1:0"]  # fmt: skip
    managed = procs.start(file_name, argv, cores=cores, env=env, cwd=source_dir)
    # The node binds port 0 and says where it listens.
    url = managed.wait_for_line(r"^MESHNODE_HTTP=(http://\S+?)/?$", timeout_s).group(1)
    _wait_chat_ok(managed, url, timeout_s)
    return Target(name, url, managed)


def litellm_config(backend_url: str) -> dict:
    return {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{name}",
                    "api_base": backend_url + "/v1",
                    "api_key": API_KEY,
                },
            }
            for name in (MODEL, SLOW_MODEL)
        ],
        "litellm_settings": {"telemetry": False, "set_verbose": False},
        "general_settings": {"master_key": API_KEY},
    }


def litellm_bin(venv: Path) -> Path:
    return venv / "bin" / "litellm"


def start_litellm(
    procs: ProcessSet,
    cores: set[int] | None,
    backend: Target,
    work_dir: Path,
    venv: Path,
    timeout_s: float,
) -> Target:
    binary = litellm_bin(venv.resolve())
    if not binary.exists():
        raise BenchProcessError(f"{binary} not found: run `make bench-setup` to measure LiteLLM")
    port = free_port()
    config_path = work_dir / "litellm.yaml"
    config_path.write_text(yaml.safe_dump(litellm_config(backend.base_url), sort_keys=False))
    argv = [
        str(binary), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port),
        "--num_workers", "1",
    ]  # fmt: skip
    env = _clean_env(
        {
            # The cost map is fetched from the internet unless told to use the bundled one.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
        }
    )
    env.pop("DATABASE_URL", None)
    managed = procs.start("litellm", argv, cores=cores, env=env, cwd=work_dir)
    url = f"http://127.0.0.1:{port}"
    _wait_chat_ok(managed, url, timeout_s)
    return Target("litellm", url, managed)
