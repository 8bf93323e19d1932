#!/bin/sh
# HEALTHCHECK of the node image: `fedws status` asks the node in this container; exit 0
# when it answers. The token comes from FEDWS_TOKEN_FILE, as the node's does.
# A node serving wss:// sets FEDWS_HEALTH_URL=wss://NAME:PORT (a name its certificate
# carries) and, for a private CA, SSL_CERT_FILE=/path/ca.pem.
set -eu
if [ -n "${FEDWS_TOKEN_FILE:-}" ] && [ -r "$FEDWS_TOKEN_FILE" ]; then
    FEDWS_TOKEN=$(tr -d '\r\n' < "$FEDWS_TOKEN_FILE")
    export FEDWS_TOKEN
fi
exec fedws status "${FEDWS_HEALTH_URL:-ws://127.0.0.1:${FEDWS_PORT:-8777}}" --json
