// The cluster page: renders each snapshot /ui/events sends (server-sent events, ~1 s apart).
// Plain DOM, no framework, nothing fetched from elsewhere; text goes in as text, never HTML
// (names and errors come from peers).
"use strict";

const COLORS = ["#1565c0", "#6a1b9a", "#00838f", "#ef6c00", "#2e7d32", "#ad1457", "#4e342e"];
const token = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function bytes(n) {
  if (typeof n !== "number") return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
const fixed = (v, d, unit) => (typeof v === "number" ? v.toFixed(d) + (unit || "") : "-");
const num = (v) => el("td", { class: "num" }, v);

function meter(part, whole) {
  const pct = whole > 0 && typeof part === "number" ? Math.min(100, (100 * part) / whole) : 0;
  return el("span", { class: "meter" }, el("span", { style: `width:${pct.toFixed(1)}%` }));
}

function colorOf(nodeId, nodes) {
  const i = nodes.findIndex((n) => n.node_id === nodeId);
  return COLORS[(i < 0 ? 0 : i) % COLORS.length];
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function renderNodes(snap) {
  fill($("nodes").tBodies[0], snap.nodes.map((n) => {
    const name = n.name || (n.node_id ? n.node_id.slice(0, 16) : n.address);
    const state = n.live ? "live" : "lost";
    const blocks = (n.stages || []).map((s) => `[${s.start}, ${s.end})`).join(" ") || "-";
    return el("tr", { "data-node": name, "data-state": state },
      el("td", {}, name + (n.node_id === snap.node_id ? " (this)" : ""),
         el("div", { class: "note" }, n.address || "")),
      el("td", {}, el("span", { class: "state " + state }, state),
         n.lost_since ? el("div", { class: "note" },
           `for ${Math.max(0, snap.at - n.lost_since).toFixed(0)} s`) : null,
         n.error ? el("div", { class: "error" }, n.error) : null),
      el("td", {}, n.device || "?"),
      num(fixed(n.speed, 2)),
      el("td", {}, meter(n.planned, n.memory_budget),
         `${bytes(n.planned)} / ${bytes(n.memory_budget)}`),
      num(bytes(n.rss)), num(bytes(n.peak)),
      num(n.rtt_ms === null || n.rtt_ms === undefined ? "-" : fixed(n.rtt_ms, 2, " ms")),
      num(n.shards ?? "-"),
      el("td", {}, blocks));
  }));
}

function renderModels(snap) {
  const box = $("models");
  if (!snap.models.length) {
    box.replaceChildren(el("p", { class: "empty" },
      "no model planned yet (the first prompt plans one)"));
    return;
  }
  box.replaceChildren(...snap.models.map((m) => {
    const total = m.blocks || 1;
    const bar = el("div", { class: "bar", "data-model": m.model },
      ...m.stages.map((s) => el("div", {
        class: "seg" + (s.live ? "" : " lost"),
        "data-node": s.name || s.node_id.slice(0, 16),
        title: `${s.name} blocks [${s.start}, ${s.end})`,
        style: `width:${(100 * (s.end - s.start)) / total}%;` +
               `background:${colorOf(s.node_id, snap.nodes)}`,
      }, `${s.name || s.node_id.slice(0, 8)} [${s.start}, ${s.end})`)));
    const rows = m.stages.map((s) => el("tr", { "data-node": s.name },
      el("td", {}, s.name || s.node_id.slice(0, 16)),
      el("td", {}, `[${s.start}, ${s.end})`),
      num(bytes(s.weight_bytes)),
      el("td", { class: "num ms" }, fixed(s.ms_per_token, 2, " ms")),
      el("td", {}, el("span", { class: "state " + (s.live ? "live" : "lost") },
                      s.live ? "live" : "lost"))));
    return el("div", { class: "model" },
      el("strong", {}, (m.aliases || []).join(", ") || m.model.slice(0, 16)),
      ` ${m.model.slice(0, 20)}… · ${m.blocks} blocks · ${m.ready ? "ready" : "loading"}` +
      (m.coordinated_here ? " · planned here" : " · as the nodes host it (planned elsewhere)"),
      bar,
      el("table", { class: "stages" },
        el("thead", {}, el("tr", {}, ...["node", "blocks", "weights", "ms a token", "state"]
          .map((h) => el("th", {}, h)))),
        el("tbody", {}, ...rows)));
  }));
}

function renderQueue(snap) {
  const q = snap.queue;
  $("queue").replaceChildren(
    `generations here: ${q.generations} · waiting for a first token: ${q.waiting} · ` +
    `slots a model: ${q.slots} · sequences through stages hosted here: ${q.pipelines}`);
}

function renderRunning(snap) {
  fill($("running").tBodies[0], snap.requests.running.map((r) =>
    el("tr", { "data-id": r.id },
      num(r.id), el("td", {}, r.model), el("td", {}, r.via), el("td", {}, r.outcome),
      num(r.tokens), el("td", { class: "num tps" }, fixed(r.tokens_per_s, 1)),
      num(fixed(r.first_token_s, 2, " s")), num(fixed(r.elapsed_s, 1, " s")))));
}

function renderRecent(snap) {
  fill($("recent").tBodies[0], snap.requests.recent.map((r) =>
    el("tr", { "data-id": r.id },
      num(r.id), el("td", {}, r.model), el("td", {}, r.via),
      el("td", { class: r.outcome.startsWith("error") ? "error" : "" }, r.outcome),
      num(r.prompt_tokens), num(r.tokens), num(fixed(r.tokens_per_s, 1)),
      num(fixed(r.first_token_s, 2, " s")), num(fixed(r.load_s, 2, " s")),
      num(fixed(r.prefill_s, 2, " s")), num(fixed(r.decode_s, 2, " s")),
      num(fixed(r.elapsed_s, 2, " s")))));
}

function renderTransfers(snap) {
  const t = snap.transfers;
  const parts = [];
  parts.push(t.arriving.length
    ? el("table", {}, el("tbody", {}, ...t.arriving.map((a) => el("tr", {},
        el("td", {}, a.cid.slice(0, 24) + "…"),
        el("td", {}, meter(a.bytes, a.size), `${bytes(a.bytes)} / ${bytes(a.size)}`)))))
    : el("p", { class: "empty" }, "no shard arriving here now"));
  if (t.fetched.length) {
    parts.push(el("p", {}, "fetched for the stages hosted here:"));
    parts.push(el("table", {}, el("tbody", {}, ...t.fetched.map((f) => el("tr", {},
      el("td", {}, `[${f.start}, ${f.end})`), el("td", {}, f.cid.slice(0, 24) + "…"),
      num(bytes(f.size)), el("td", {}, "from " + f.from))))));
  }
  $("transfers").replaceChildren(...parts);
}

function render(snap) {
  $("served-by").textContent = `served by ${snap.name}`;
  $("updated").textContent = "updated " + new Date(snap.at * 1000).toLocaleTimeString();
  renderNodes(snap);
  renderModels(snap);
  renderQueue(snap);
  renderRunning(snap);
  renderTransfers(snap);
  renderRecent(snap);
}

function connect() {
  const link = $("link");
  const url = "/ui/events" + (token ? "?token=" + encodeURIComponent(token) : "");
  const source = new EventSource(url);
  source.onopen = () => { link.textContent = "live"; link.className = "state live"; };
  source.onmessage = (event) => {
    link.textContent = "live";
    link.className = "state live";
    render(JSON.parse(event.data));
  };
  source.onerror = () => {
    link.className = "state lost";
    link.textContent = source.readyState === EventSource.CLOSED
      ? "no data (wrong or missing ?token=?)" : "reconnecting…";
  };
}

connect();
