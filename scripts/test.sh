#!/usr/bin/env bash
# Every hypertool test, with its set-up, on a fresh Debian machine that has only the Rust toolchain.
# Installs what the tests need (Debian's prometheus, for prometheus and promtool,
# prometheus-alertmanager, systemd for systemd-analyze, postgresql, redis-server, chromium, git, nodejs;
# PyPI's openai, anthropic, mcp, mcp-server-time, mcp-server-git; npm's @modelcontextprotocol/server-everything
# and @anthropic-ai/claude-code, @openai/codex), then runs formatting,
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
# The MCP proxy's tests start real downstream servers: mcp-server-git needs git, server-everything node.
command -v git >/dev/null 2>&1 || missing+=(git)
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
# The README's shell examples are run as written (tests/it/readme.rs): curl and jq.
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v jq >/dev/null 2>&1 || missing+=(jq)
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The official OpenAI and Anthropic clients, to prove the gateway speaks each dialect.
python3 -c 'import openai' >/dev/null 2>&1 || python3 -m pip install -q --disable-pip-version-check openai
python3 -c 'import anthropic' >/dev/null 2>&1 || python3 -m pip install -q --disable-pip-version-check 'anthropic==2.15.0'
# The real agents, end to end against hypertool's mock: Claude Code and Codex (tests/it/dialects.rs
# looks for them here).
agents=target/agents/node_modules
[ -f "$agents/@anthropic-ai/claude-code/package.json" ] && [ -f "$agents/@openai/codex/package.json" ] ||
  npm install --prefix target/agents --no-audit --no-fund --silent @anthropic-ai/claude-code@2.1.332 @openai/codex@0.171.0

# The official MCP Python SDK as the client of `hypertool mcp`, and two reference servers behind it.
python3 -c 'import mcp, mcp_server_time, mcp_server_git' >/dev/null 2>&1 ||
  python3 -m pip install -q --disable-pip-version-check 'mcp==2.3.0' 'mcp-server-time==2026.10.19' 'mcp-server-git==2026.10.19'
# ... and the reference "everything" server from npm, where tests/it/mcp.rs looks for it.
everything=target/mcp-node/node_modules/@modelcontextprotocol/server-everything/dist/index.js
[ -f "$everything" ] ||
  npm install --prefix target/mcp-node --no-audit --no-fund --silent @modelcontextprotocol/server-everything@2026.8.31

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# The disk-fault tests mount a tmpfs: root only. They are #[ignore]d (reported as ignored, never
# as passed, without root) and included here when running as root, as CI does.
if [ "$(id -u)" = 0 ]; then
    cargo test -- --include-ignored
else
    cargo test
fi
