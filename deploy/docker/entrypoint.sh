#!/bin/sh
# Container entrypoint: run meshnode with a mounted config, or with one written from the
# environment. Arguments are passed to `meshnode run` (e.g. `--seed node-a:50051`).
#
# - A config mounted at $MESHNODE_CONFIG (default /etc/meshnode/meshnode.yaml) is used as is;
#   its ${VAR} references are expanded from the container's environment.
# - Otherwise deploy/quickstart.sh writes one from the environment (which cloud keys are set,
#   MESH_SECRET, MESHNODE_LISTEN, MESHNODE_GRPC_LISTEN, MESHNODE_SEEDS, MESHNODE_NODE_ID, ...;
#   the image sets container-friendly defaults) and validates it first.
set -eu
config="${MESHNODE_CONFIG:-/etc/meshnode/meshnode.yaml}"
if [ ! -f "$config" ]; then
    config="${MESHNODE_DATA_DIR:-/var/lib/meshnode}/generated-config.yaml"
    /usr/local/bin/meshnode-quickstart --output "$config" --force
fi
exec meshnode run --config "$config" "$@"
