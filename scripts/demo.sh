#!/usr/bin/env bash
# `make demo`: two shims on this machine split SmolLM2 and answer a prompt through `llm`.
# Node A uses the default data directory (it holds the pulled model); node B starts empty in
# .omni-demo/ and fetches the shards of its slice from A. Both listen on loopback only and
# find each other with --peer (mDNS stays off so nothing leaves this machine).
set -euo pipefail
BIN=${BIN:-.venv/bin}
PROMPT=${PROMPT:-Name three uses for a paperclip.}
DEMO=${DEMO_DIR:-.omni-demo}
PORT_A=${PORT_A:-47341}
PORT_B=${PORT_B:-47342}
HOME_A=$($BIN/python -c 'from llm_omninode.home import omni_home; print(omni_home())')

rm -rf "$DEMO/nodeB"
mkdir -p "$DEMO"
if [ ! -f "$HOME_A/cluster_secret" ]; then
    $BIN/llm omni init
fi
SECRET=$(cat "$HOME_A/cluster_secret")
COMMON=(--host 127.0.0.1 --no-mdns --max-memory 1GiB)

$BIN/omni-shim "${COMMON[@]}" --port "$PORT_A" --name node-a >"$DEMO/node-a.log" 2>&1 &
PID_A=$!
$BIN/omni-shim "${COMMON[@]}" --port "$PORT_B" --name node-b --data-dir "$DEMO/nodeB" \
    --join "$SECRET" --peer "127.0.0.1:$PORT_A" >"$DEMO/node-b.log" 2>&1 &
PID_B=$!
stop() { kill "$PID_A" "$PID_B" 2>/dev/null || true; wait "$PID_A" "$PID_B" 2>/dev/null || true; }
trap stop EXIT

export OMNI_SHIM="127.0.0.1:$PORT_A"
echo "== waiting for node-a and node-b to see each other"
live_nodes() {  # nodes that answered a greeting (a budget to plan on)
    $BIN/llm omni peers --json 2>/dev/null |
        $BIN/python -c 'import json,sys; print(sum(1 for r in json.load(sys.stdin) if r["memory_budget"]))' ||
        echo 0
}
for _ in $(seq 60); do
    [ "$(live_nodes)" -ge 2 ] && break
    sleep 1
done
$BIN/llm omni peers
echo
echo "== llm -m omni/smollm2 \"$PROMPT\""
$BIN/llm -m omni/smollm2 "$PROMPT"
echo
echo "== the split"
$BIN/llm omni status
echo
echo "== node-b fetched its shards from node-a:"
grep -E "fetching|loaded" "$DEMO/node-b.log" | sed 's/^[^ ]* [^ ]* //' || true
