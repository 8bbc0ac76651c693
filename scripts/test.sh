#!/usr/bin/env bash
# Every hypertool test, with its set-up, on a fresh Debian machine that has only the Rust toolchain.
# Installs what the tests need (Debian's prometheus, for prometheus and promtool,
# prometheus-alertmanager, systemd for systemd-analyze, postgresql, redis-server, chromium; PyPI's openai), then runs formatting,
# lints and the whole test suite. Services the tests use are started by the tests themselves, on
# loopback, in temporary directories.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
# systemd-analyze verifies deploy/systemd/hypertool.service.
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# The replica tests start their own PostgreSQL (initdb, postgres) on loopback.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
# ... and their own Redis for the shared response cache.
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# The dashboard is tested in a real headless browser, driven over the DevTools protocol.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The official OpenAI client, to prove the gateway's compatibility.
python3 -c 'import openai' >/dev/null 2>&1 || python3 -m pip install -q --disable-pip-version-check openai

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test
