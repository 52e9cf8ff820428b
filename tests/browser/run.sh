#!/usr/bin/env bash
# End-to-end test of the browser chat page: Debian's Chromium, driven by playwright-core
# (npm, version pinned in package.json), against the real binary with the real SmolLM2 model.
#   usage: tests/browser/run.sh PATH/TO/confab [OUT_DIR]
# Leaves screenshots in OUT_DIR (default /var/tmp/confab-e2e).
set -euo pipefail
bin=$(realpath "${1:?path to the confab binary}")
out=${2:-/var/tmp/confab-e2e}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
chromium=${CHROMIUM:-/usr/bin/chromium}
[ -x "$chromium" ] || { echo "Chromium is missing at $chromium (apt-get install chromium)" >&2; exit 1; }
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$model" ] || { echo "the model is missing: run ./models/fetch" >&2; exit 1; }
command -v node >/dev/null || { echo "node is missing (apt-get install nodejs npm)" >&2; exit 1; }
cd "$here"
if [ ! -d node_modules/playwright-core ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
mkdir -p "$out"
exec timeout 300 node e2e.mjs --bin "$bin" --model "$model" --chromium "$chromium" --out "$out"
