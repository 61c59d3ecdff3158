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
API_PORT=${API_PORT:-47434}  # node-b's Ollama/OpenAI API (not 11434: Ollama may be running)
HOME_A=$($BIN/python -c 'from llm_omninode.home import omni_home; print(omni_home())')

rm -rf "$DEMO/nodeB"
mkdir -p "$DEMO"
if [ ! -f "$HOME_A/cluster_secret" ]; then
    $BIN/llm omni init
fi
SECRET=$(cat "$HOME_A/cluster_secret")
# two nodes on one machine: each its share of the cores
THREADS=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))
COMMON=(--host 127.0.0.1 --no-mdns --max-memory 1GiB --threads "$THREADS")

$BIN/omni-shim "${COMMON[@]}" --port "$PORT_A" --name node-a --no-api >"$DEMO/node-a.log" 2>&1 &
PID_A=$!
$BIN/omni-shim "${COMMON[@]}" --port "$PORT_B" --name node-b --data-dir "$DEMO/nodeB" \
    --join "$SECRET" --peer "127.0.0.1:$PORT_A" --api-port "$API_PORT" >"$DEMO/node-b.log" 2>&1 &
PID_B=$!
stop() { kill "$PID_A" "$PID_B" 2>/dev/null || true; wait "$PID_A" "$PID_B" 2>/dev/null || true; }
trap stop EXIT

export OMNI_SHIM="127.0.0.1:$PORT_A"
echo "== waiting for node-a and node-b to see each other"
live_nodes() {  # nodes that answered a greeting (a budget to plan on)
    $BIN/llm omni peers --json 2>/dev/null |
        $BIN/python -c 'import json,sys; print(sum(1 for r in json.load(sys.stdin) if r["memory_budget"] and r.get("live", True)))' 2>/dev/null ||
        echo 0
}
for _ in $(seq 60); do
    [ "$(live_nodes)" -ge 2 ] && break
    sleep 1
done
$BIN/llm omni peers
echo
echo "== the cluster's live page (node-b serves it): http://127.0.0.1:$API_PORT/ui"
echo
echo "== llm -m omni/smollm2 \"$PROMPT\""
$BIN/llm -m omni/smollm2 "$PROMPT"
echo
echo "== the split"
$BIN/llm omni status
echo
echo "== the same cluster through node-b's Ollama API: POST http://127.0.0.1:$API_PORT/api/chat"
$BIN/python - "$API_PORT" "$PROMPT" <<'PY'
import json, sys, urllib.request
port, prompt = sys.argv[1], sys.argv[2]
body = {"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "stream": False,
        "options": {"temperature": 0, "num_predict": 64}}
req = urllib.request.Request(f"http://127.0.0.1:{port}/api/chat", json.dumps(body).encode())
reply = json.load(urllib.request.urlopen(req, timeout=300))
print(reply["message"]["content"])
print(f'({reply["eval_count"]} tokens in {reply["eval_duration"] / 1e9:.2f} s, '
      f'{reply["eval_count"] / max(reply["eval_duration"] / 1e9, 1e-9):.1f} tok/s; '
      f'prompt {reply["prompt_eval_count"]} tokens)')
PY
echo
echo "== node-b fetched its shards from node-a:"
grep -E "fetching|loaded" "$DEMO/node-b.log" | sed 's/^[^ ]* [^ ]* //' || true
echo
echo "== the split on node-b's page (/ui/events): http://127.0.0.1:$API_PORT/ui"
$BIN/python - "$API_PORT" <<'PY'
import json, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ui/events", timeout=30) as events:
    for line in events:
        if line.startswith(b"data: "):
            snap = json.loads(line[6:])
            break
for node in snap["nodes"]:
    print(f'{node["name"]:<8} {"live" if node["live"] else "lost"}')
for model in snap["models"]:
    print(", ".join(model["aliases"]) or model["model"][:16], " | ".join(
        f'{s["name"]} [{s["start"]}, {s["end"]})' for s in model["stages"]))
PY
if [ -t 0 ] && [ -t 1 ]; then  # someone is watching: leave the page up until they are done
    read -r -p "The page stays live until you press Enter (the shims stop then). " _ || true
fi
