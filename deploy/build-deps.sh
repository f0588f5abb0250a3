#!/usr/bin/env bash
# Installs, when missing, the Debian packages building modelwatch needs:
# the system OpenSSL headers librdkafka's TLS / SASL is built against
# (libssl-dev) and libcurl's, for OAUTHBEARER's OIDC token fetching
# (libcurl4-openssl-dev), both found through pkg-config. With --test, also what the tests
# need beyond that: stunnel4 (the TLS front of the test broker) and the
# openssl CLI (the tests make their own CA and certificates at run time).
# Idempotent: apt-get runs only when something is missing.
set -euo pipefail

want=(libssl-dev libcurl4-openssl-dev pkg-config)
if [ "${1:-}" = "--test" ]; then
  want+=(stunnel4 openssl)
fi
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing ${missing[*]} (Debian packages)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
