#!/bin/sh
# Self-signed TLS for TESTS and local trials: a throw-away CA and one certificate per node,
# signed by it. Production uses certificates from your CA or ACME (docs/deployment.md).
#
#   deploy/make-test-certs.sh [OUT_DIR] [NAME...]     # default: deploy/certs alice bob charlie
#
# Writes OUT_DIR/ca.pem (what coordinators and peers trust: SSL_CERT_FILE, or `cafile` of a
# [[peers]] entry) and OUT_DIR/NAME.pem + OUT_DIR/NAME.key (a node's --certfile/--keyfile).
# Each certificate names NAME, localhost and 127.0.0.1, so the same files work inside
# compose (wss://alice:8777) and on this machine (wss://localhost:8777). Valid 30 days.
set -eu

out=${1:-deploy/certs}
[ "$#" -gt 0 ] && shift
[ "$#" -eq 0 ] && set -- alice bob charlie

command -v openssl >/dev/null 2>&1 || { echo "make-test-certs: openssl is not installed" >&2; exit 2; }
mkdir -p "$out"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

openssl req -x509 -newkey rsa:2048 -nodes -days 30 -sha256 \
    -subj "/CN=fedws test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$out/ca.key" -out "$out/ca.pem" 2>/dev/null

for name in "$@"; do
    printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
        "$name" > "$tmp/$name.ext"
    openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=$name" \
        -keyout "$out/$name.key" -out "$tmp/$name.csr" 2>/dev/null
    openssl x509 -req -in "$tmp/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" -CAcreateserial \
        -days 30 -sha256 -extfile "$tmp/$name.ext" -out "$out/$name.pem" 2>/dev/null
done
rm -f "$out/ca.srl"
# Certificates are public; keys stay readable by their owner only. A container's user
# (uid 10001) must be able to read its key: chown it there, or mount it as a secret.
chmod 644 "$out"/*.pem
echo "test CA: $out/ca.pem; node certificates: $(printf '%s ' "$@")in $out/"
