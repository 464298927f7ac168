"""The deployment recipes in deploy/ agree with the code, so they cannot drift.

Every manifest is parsed (compose, the Kubernetes multi-document file, the Dockerfiles, the
systemd unit) and its ports, probes and environment names are checked against the code's own
defaults: `ServerConfig` / `MeshConfig` listen ports, the routes the app registers, the cloud key
variables of `node.CLOUD_KEYS` (which `config.embedded_default` reads), and the `MESHNODE_*`
variables `deploy/quickstart.sh` reads. The quick-start script itself is run in a temp dir with
fake keys and its output is validated with `meshnode check-config`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshnode.config import MeshConfig, ServerConfig, embedded_default, load_config
from meshnode.mesh.seeds import split_host_port
from meshnode.node import CLOUD_KEYS

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
HTTP_PORT = split_host_port(ServerConfig().listen_addr)[1]
GRPC_PORT = split_host_port(MeshConfig().listen_addr)[1]
CLOUD_VARS = {var for keys in CLOUD_KEYS.values() for var in keys}
QUICKSTART = DEPLOY / "quickstart.sh"
FAKE_KEYS = {
    "OPENAI_API_KEY": "sk-test-openai",
    "ANTHROPIC_API_KEY": "sk-ant-test",
    "CLOUDFLARE_ACCOUNT_ID": "acct-test",
    "CLOUDFLARE_API_TOKEN": "cf-test",
    "TOGETHER_API_KEY": "tg-test",
}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
UID = 10001


def _quickstart_vars() -> set[str]:
    return set(re.findall(r"\$\{(MESHNODE_[A-Z_]+)", QUICKSTART.read_text(encoding="utf-8")))


def _entrypoint_vars() -> set[str]:
    text = (DEPLOY / "docker" / "entrypoint.sh").read_text(encoding="utf-8")
    return set(re.findall(r"\$\{(MESHNODE_[A-Z_]+)", text))


def _app_routes() -> str:
    return (ROOT / "meshnode" / "api" / "app.py").read_text(encoding="utf-8")


def test_the_code_serves_the_paths_the_manifests_probe() -> None:
    routes = _app_routes()
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert f'"{path}"' in routes, path
    assert CLOUD_VARS == set(FAKE_KEYS)
    # the embedded default reads exactly these variables
    for provider, keys in CLOUD_KEYS.items():
        partial = {k: FAKE_KEYS[k] for k in keys}
        assert provider in embedded_default(partial)["providers"]
        assert provider not in embedded_default({})["providers"]


# --------------------------------------------------------------------------- Dockerfiles
def _dockerfile(name: str) -> dict[str, list[str]]:
    """Instructions of a Dockerfile, continuation lines joined, by keyword."""
    text = (DEPLOY / "docker" / name).read_text(encoding="utf-8")
    text = re.sub(r"\\\n\s*", " ", text)
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        out.setdefault(keyword.upper(), []).append(rest.strip())
    return out


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile(name: str) -> None:
    df = _dockerfile(name)
    assert df["FROM"][0].startswith("python:3.11")
    exposed = {int(p) for line in df["EXPOSE"] for p in line.split()}
    assert exposed == {HTTP_PORT, GRPC_PORT}
    # non-root, one uid and gid (10001) as in the Kubernetes pod and the systemd recipe
    assert df["USER"] == [f"{UID}:{UID}"]
    assert any(f"groupadd --system --gid {UID} meshnode" in r and
               f"useradd --system --uid {UID} --gid {UID}" in r for r in df["RUN"])
    sc = _k8s()["StatefulSet/meshnode"]["spec"]["template"]["spec"]["securityContext"]
    assert sc["runAsUser"] == sc["runAsGroup"] == sc["fsGroup"] == UID
    # relative data dirs of a mounted config land on the volume the user owns
    assert df["WORKDIR"][-1] == df["VOLUME"][0].strip('[]"') == "/var/lib/meshnode"
    # the healthcheck reads the port from the config the node runs (not a fixed 8080)
    (health,) = df["HEALTHCHECK"]
    assert health.endswith('CMD ["python", "-m", "meshnode.cli.healthcheck"]')
    env = " ".join(df["ENV"])
    assert "MESHNODE_HEALTH_URL" not in env and "8080/health" not in health
    assert "MESHNODE_DATA_DIR=/var/lib/meshnode" in env  # absolute: the generated config's too
    assert f"MESHNODE_LISTEN=0.0.0.0:{HTTP_PORT}" in env
    assert f"MESHNODE_GRPC_LISTEN=0.0.0.0:{GRPC_PORT}" in env
    # every MESHNODE_ variable the image sets is one the entrypoint or quickstart reads
    set_vars = set(re.findall(r"(MESHNODE_[A-Z_]+)=", env))
    assert set_vars <= _quickstart_vars() | _entrypoint_vars()
    assert any("torch==${TORCH_VERSION}" in r for r in df["RUN"])
    args = " ".join(df["ARG"])
    assert "TORCH_VERSION=2.13.0" in args
    if name == "Dockerfile.cpu":
        assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in args
    copied = " ".join(df["COPY"])
    for needed in ("pyproject.toml", "requirements/lock.txt", "meshnode", "deploy/quickstart.sh",
                   "deploy/docker/entrypoint.sh"):
        assert needed in copied
    # the pinned set goes in before meshnode, which then adds nothing of its own
    assert "pip install -r requirements/lock.txt" in df["RUN"]
    assert "pip install --no-deps ." in df["RUN"]
    ignore = (DEPLOY / "docker" / f"{name}.dockerignore").read_text(encoding="utf-8")
    for needed in ("!pyproject.toml", "!requirements/lock.txt", "!meshnode/",
                   "!deploy/quickstart.sh"):
        assert needed in ignore
    assert df["ENTRYPOINT"] == ['["/usr/local/bin/meshnode-entrypoint"]']


# --------------------------------------------------------------------------- compose
def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))


def test_compose_three_node_mesh() -> None:
    services = _compose()["services"]
    assert set(services) == {"node-a", "node-b", "node-c"}
    host_ports = set()
    for name, svc in services.items():
        env = svc["environment"]
        assert env["MESHNODE_NODE_ID"] == name
        assert env["MESH_SECRET"].startswith("${MESH_SECRET:?")  # required, from the host env
        assert CLOUD_VARS <= set(env)
        assert {k for k in env if k.startswith("MESHNODE_")} <= _quickstart_vars()
        assert split_host_port(env["MESHNODE_LISTEN"])[1] == HTTP_PORT
        assert split_host_port(env["MESHNODE_GRPC_LISTEN"])[1] == GRPC_PORT
        assert str(GRPC_PORT) in svc["expose"]
        (mapping,) = svc["ports"]
        host, host_port, container_port = mapping.split(":")
        assert host == "127.0.0.1" and int(container_port) == HTTP_PORT
        host_ports.add(host_port)
        assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu"
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert any(v.endswith(":/var/lib/meshnode") for v in svc["volumes"])
        if name == "node-a":
            assert "MESHNODE_SEEDS" not in env
        else:
            assert env["MESHNODE_SEEDS"] == f"node-a:{GRPC_PORT}"
    assert len(host_ports) == 3


# --------------------------------------------------------------------------- Kubernetes
def _k8s() -> dict[str, dict[str, Any]]:
    docs = yaml.safe_load_all((DEPLOY / "k8s" / "meshnode.yaml").read_text(encoding="utf-8"))
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs if d}


def test_k8s_manifests() -> None:
    objs = _k8s()
    sts = objs["StatefulSet/meshnode"]
    headless = objs[f"Service/{sts['spec']['serviceName']}"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"] == labels == sts["spec"]["selector"]["matchLabels"]
    assert objs["Service/meshnode"]["spec"]["selector"] == labels
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": HTTP_PORT, "grpc": GRPC_PORT}
    for svc in (headless, objs["Service/meshnode"]):
        for port in svc["spec"]["ports"]:
            assert port["port"] == ports[port["targetPort"]]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    notes = sts["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/path"] == "/metrics"
    assert int(notes["prometheus.io/port"]) == HTTP_PORT
    assert pod["terminationGracePeriodSeconds"] > ServerConfig().shutdown_grace_s

    env = {e["name"]: e for e in container["env"]}
    secret = yaml.safe_load((DEPLOY / "k8s" / "secret.example.yaml").read_text("utf-8"))
    for var in CLOUD_VARS | {"MESH_SECRET"}:
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] == var and var in secret["stringData"]
        assert ref.get("optional", False) is (var != "MESH_SECRET")

    # the ConfigMap's config is valid, listens on the container's ports, seeds on the Service
    config_map = objs["ConfigMap/meshnode-config"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    path = env["MESHNODE_CONFIG"]["value"]
    assert path.startswith(mount["mountPath"] + "/")
    text = config_map["data"][path.rsplit("/", 1)[1]]
    for var in set(_VAR.findall(text)):
        assert var in env, f"the config reads ${{{var}}}, which the pod does not set"
    pod_env = {"POD_NAME": "meshnode-0", "POD_IP": "10.1.2.3", "MESH_SECRET": "s"}
    config = _load_text(text, pod_env)
    assert config.node.id == "meshnode-0"
    assert split_host_port(config.server.listen_addr)[1] == HTTP_PORT
    assert split_host_port(config.mesh.listen_addr)[1] == GRPC_PORT
    assert config.mesh.advertise == f"10.1.2.3:{GRPC_PORT}"
    assert config.mesh.seeds == [f"{headless['metadata']['name']}:{GRPC_PORT}"]
    assert config.mesh.secret == "s" and config.mesh.mdns is False
    data = next(m for m in container["volumeMounts"] if m["name"] == "data")
    assert str(config.node.data_dir) == data["mountPath"]
    assert objs["PodDisruptionBudget/meshnode"]["spec"]["selector"]["matchLabels"] == labels
    # the mesh port admits only meshnode pods; HTTP is open to the cluster
    policy = objs["NetworkPolicy/meshnode"]["spec"]
    assert policy["podSelector"]["matchLabels"] == labels
    by_port = {rule["ports"][0]["port"]: rule.get("from") for rule in policy["ingress"]}
    assert by_port["grpc"] == [{"podSelector": {"matchLabels": labels}}]
    assert by_port["http"] is None


def test_k8s_pods_meet_the_restricted_pod_security_standard() -> None:
    """The rules of the "restricted" profile (kubernetes.io/docs/concepts/security/
    pod-security-standards), checked on every pod template, plus what the issue asks beyond it:
    a read-only root with writable volumes for data and /tmp, spread over hosts, a PDB."""
    objs = _k8s()
    pods = [o["spec"]["template"] for o in objs.values()
            if o["kind"] in ("StatefulSet", "Deployment", "DaemonSet")]
    assert pods
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                       "persistentVolumeClaim", "projected", "secret"}
    for template in pods:
        pod = template["spec"]
        psc = pod.get("securityContext", {})
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= allowed_volumes, volume
        for container in pod["containers"] + pod.get("initContainers", []):
            csc = container.get("securityContext", {})
            assert csc.get("privileged", False) is False
            assert csc["allowPrivilegeEscalation"] is False
            assert csc["capabilities"]["drop"] == ["ALL"]
            assert set(csc["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}
            assert (csc.get("runAsNonRoot", psc.get("runAsNonRoot"))) is True
            assert csc.get("runAsUser", psc.get("runAsUser")) not in (None, 0)
            seccomp = csc.get("seccompProfile", psc.get("seccompProfile"))
            assert seccomp and seccomp["type"] in ("RuntimeDefault", "Localhost")
            assert not any(p.get("hostPort") for p in container.get("ports", []))
            assert csc["readOnlyRootFilesystem"] is True
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert not mounts["/var/lib/meshnode"].get("readOnly") and "/tmp" in mounts
        spread = pod["topologySpreadConstraints"]
        assert spread[0]["topologyKey"] == "kubernetes.io/hostname"
        assert spread[0]["labelSelector"]["matchLabels"] == template["metadata"]["labels"]
    sts = objs["StatefulSet/meshnode"]
    pdb = objs["PodDisruptionBudget/meshnode"]["spec"]
    assert 0 < pdb["minAvailable"] < sts["spec"]["replicas"]


def _load_text(text: str, env: dict[str, str]) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(text, encoding="utf-8")
        return load_config(path, env=env)


# --------------------------------------------------------------------------- systemd
def test_systemd_unit() -> None:
    text = (DEPLOY / "systemd" / "meshnode.service").read_text(encoding="utf-8")
    keys: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            keys[key.strip()] = value.split("#")[0].strip()
    assert keys["User"] == "meshnode"
    assert " run --config " in keys["ExecStart"]
    assert keys["KillSignal"] == "SIGTERM"
    assert float(keys["TimeoutStopSec"]) > ServerConfig().shutdown_grace_s
    assert keys["RestartPreventExitStatus"] == "2"  # invalid config (cli.main.EXIT_INVALID)
    assert keys["EnvironmentFile"].lstrip("-").endswith(".env")
    assert "'meshnode[local]'" not in text  # not on PyPI: the header installs a checkout
    assert f"--uid {UID} --gid {UID}" in text and f"--gid {UID} meshnode" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = DEPLOY / "systemd" / "meshnode.service"
    as_shipped = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                                text=True, timeout=60, check=False)
    # Here /opt/meshnode does not exist: that is the only thing it may say about the unit.
    complaints = [line for line in (as_shipped.stdout + as_shipped.stderr).splitlines() if line]
    assert all("/opt/meshnode/bin/meshnode is not executable" in c for c in complaints), complaints
    # The same unit with ExecStart pointed at this checkout's meshnode passes clean.
    meshnode = Path(sys.executable).with_name("meshnode")
    text = unit.read_text(encoding="utf-8").replace("/opt/meshnode/bin/meshnode", str(meshnode))
    local = tmp_path / "meshnode.service"
    local.write_text(text, encoding="utf-8")
    done = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


# --------------------------------------------------------------------------- quickstart.sh
def _quickstart(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in CLOUD_VARS and k != "MESH_SECRET" and not k.startswith("MESHNODE_")}
    clean["MESHNODE_BIN"] = f"{sys.executable} -m meshnode"
    clean["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        ["bash", str(QUICKSTART), *args], cwd=tmp_path, env={**clean, **env},
        capture_output=True, text=True, timeout=120,
    )


def test_quickstart_writes_a_valid_config_from_the_keys_it_finds(tmp_path: Path) -> None:
    env = {**FAKE_KEYS, "MESH_SECRET": "mesh-s3cret"}
    run = _quickstart(tmp_path, env, "--seed", "10.0.0.2:50051", "--node-id", "box-1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "valid" in run.stdout
    written = (tmp_path / "meshnode.yaml").read_text(encoding="utf-8")
    for secret in [*FAKE_KEYS.values(), "mesh-s3cret"]:
        assert secret not in written  # only ${VAR} references are written
    config = load_config(tmp_path / "meshnode.yaml", env=env)
    # the same providers and models as the embedded default with the same keys
    assert config.providers == load_config(None, env=env).providers
    assert config.mesh.secret == "mesh-s3cret"
    assert config.mesh.seeds == ["10.0.0.2:50051"]
    assert config.node.id == "box-1"
    assert config.server.listen_addr == ServerConfig().listen_addr
    assert config.mesh.listen_addr == MeshConfig().listen_addr


def test_quickstart_only_enables_what_is_there(tmp_path: Path) -> None:
    env = {"ANTHROPIC_API_KEY": "sk-ant-test", "CLOUDFLARE_ACCOUNT_ID": "only-half",
           "MESHNODE_LISTEN": "0.0.0.0:9000", "MESHNODE_SEEDS": "a:1,b:2",
           "MESHNODE_MDNS": "false"}
    run = _quickstart(tmp_path, env, "-o", "sub/node.yaml")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "MESH_SECRET is not set" in run.stderr
    assert "cloudflare (CLOUDFLARE_ACCOUNT_ID+CLOUDFLARE_API_TOKEN)" in run.stdout
    config = load_config(tmp_path / "sub" / "node.yaml", env=env)
    assert set(config.providers) == {"local", "anthropic"}
    assert config.providers == load_config(None, env=env).providers
    assert config.server.listen_addr == "0.0.0.0:9000"
    assert config.mesh.seeds == ["a:1", "b:2"] and config.mesh.mdns is False
    assert config.mesh.secret is None

    again = _quickstart(tmp_path, env, "-o", "sub/node.yaml")
    assert again.returncode == 1 and "--force" in again.stderr  # never overwrites silently
    nothing = _quickstart(tmp_path, {}, "--no-local", "-o", "none.yaml")
    assert nothing.returncode == 1 and not (tmp_path / "none.yaml").exists()


def test_quickstart_reports_an_invalid_config(tmp_path: Path) -> None:
    run = _quickstart(tmp_path, {}, "--listen", "no-port")
    assert run.returncode == 2
    assert "server.listen_addr" in run.stderr


# --------------------------------------------------------------------------- example configs
@pytest.mark.parametrize("path", sorted((DEPLOY / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_listen_on_the_default_ports(path: Path) -> None:
    config = load_config(path, env={})
    assert split_host_port(config.server.listen_addr)[1] == HTTP_PORT
    if config.mesh.enabled:
        assert split_host_port(config.mesh.listen_addr)[1] == GRPC_PORT


def test_quickstart_without_meshnode_installed_writes_the_file_and_says_so(
    tmp_path: Path,
) -> None:
    # A copy of the script outside this checkout (no .venv beside it), no meshnode on PATH,
    # a python3 that cannot import it: the file is written, the check is skipped, exit 0.
    script = tmp_path / "deploy" / "quickstart.sh"
    script.parent.mkdir()
    script.write_text(QUICKSTART.read_text(encoding="utf-8"), encoding="utf-8")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MESH_SECRET": "m",
           "OPENAI_API_KEY": "sk-test"}
    run = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "not checked: no meshnode found" in run.stderr
    assert "is not valid" not in run.stderr
    assert load_config(tmp_path / "meshnode.yaml", env=env).mesh.secret == "m"
    # the next step names the variables the file needs in the node's environment
    assert "export MESH_SECRET OPENAI_API_KEY" in run.stdout


def test_quickstart_does_not_call_a_config_invalid_when_the_check_cannot_run(
    tmp_path: Path,
) -> None:
    run = _quickstart(tmp_path, {"MESHNODE_BIN": "false"})
    assert run.returncode == 1
    assert "could not run the check" in run.stderr and "is not valid" not in run.stderr
    assert (tmp_path / "meshnode.yaml").exists()
