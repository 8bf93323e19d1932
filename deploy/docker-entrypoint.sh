#!/bin/sh
# Entry point of the fedws images (and of deploy/systemd/): reads the node's token from a
# secret file, never from the command line or the image.
#
#   FEDWS_TOKEN_FILE=/run/secrets/fedws_token fedws-entrypoint worker --config ...
#
# FEDWS_TOKEN_FILE names a file holding the token (a docker/compose secret, a Kubernetes
# Secret volume, a systemd credential); it becomes FEDWS_TOKEN, which `fedws worker` reads
# (principal "default"). Per-principal tokens go in the node config instead
# ([[tokens]] token_file = "/run/secrets/..."), see docs/security.md.
#
# The first argument is a fedws subcommand (`worker`, `status`, ...) unless it is a program
# on PATH (`python examples/federated_demo.py ...`), which is run as is.
set -eu

if [ -n "${FEDWS_TOKEN_FILE:-}" ]; then
    if [ ! -r "$FEDWS_TOKEN_FILE" ]; then
        echo "fedws-entrypoint: FEDWS_TOKEN_FILE=$FEDWS_TOKEN_FILE is not a readable file (mount the secret there, readable by uid $(id -u))" >&2
        exit 2
    fi
    FEDWS_TOKEN=$(tr -d '\r\n' < "$FEDWS_TOKEN_FILE")
    if [ -z "$FEDWS_TOKEN" ]; then
        echo "fedws-entrypoint: $FEDWS_TOKEN_FILE is empty (write the token into it)" >&2
        exit 2
    fi
    export FEDWS_TOKEN
fi

if [ "$#" -eq 0 ]; then
    set -- --help
fi
case "$1" in
    -*) exec fedws "$@" ;;
esac
if command -v "$1" >/dev/null 2>&1; then
    exec "$@"
fi
exec fedws "$@"
