// mvpctl web: polls mvpd through this page's server once a second and draws the peers.
"use strict";

const TOKEN = document.querySelector('meta[name="mvp-token"]').content;
const SVG = "http://www.w3.org/2000/svg";
const rttSeries = new Map();  // peer -> [[time, ms]], the ICE round trip as polled

function size(n) {
  let v = Number(n || 0);
  for (const unit of ["B", "KiB", "MiB", "GiB"]) {
    if (v < 1024 || unit === "GiB") return unit === "B" ? `${v.toFixed(0)} B` : `${v.toFixed(1)} ${unit}`;
    v /= 1024;
  }
}

async function getJSON(path) {
  const reply = await fetch(path, {credentials: "same-origin"});
  const body = await reply.json().catch(() => ({error: reply.statusText}));
  if (!reply.ok) throw new Error(body.error || reply.statusText);
  return body;
}

async function act(action, body) {
  const reply = await fetch(`/api/${action}`, {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-MVP-Token": TOKEN},
    body: JSON.stringify(body),
  });
  const answer = await reply.json().catch(() => ({error: reply.statusText}));
  notice(reply.ok ? "" : `${action}: ${answer.error || reply.statusText}`);
  refresh();
  return answer;
}

function notice(text) { document.getElementById("notice").textContent = text; }

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4))
                                      : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

// One SVG plot of several series of [x, y] points, scaled to fit, with its maximum shown.
function plot(series, unit) {
  const w = 400, h = 90, pad = 4;
  const svg = el("svg:svg", {class: "plot", viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none"});
  const all = series.flatMap(s => s.points);
  if (all.length < 2) { svg.append(el("svg:text", {x: 6, y: 14}, "collecting…")); return svg; }
  const x0 = Math.min(...all.map(p => p[0])), x1 = Math.max(...all.map(p => p[0]));
  const top = Math.max(...all.map(p => p[1]), 1e-9);
  for (const s of series) {
    const points = s.points.map(([x, y]) => {
      const px = pad + (w - 2 * pad) * (x - x0) / Math.max(x1 - x0, 1e-9);
      const py = h - pad - (h - 2 * pad) * y / top;
      return `${px.toFixed(1)},${py.toFixed(1)}`;
    }).join(" ");
    svg.append(el("svg:polyline", {class: s.cls, points}));
  }
  svg.append(el("svg:text", {x: 6, y: 12}, `max ${unit(top)}`));
  return svg;
}

function throughput(history) {
  const inRate = [], outRate = [];
  for (let i = 1; i < history.length; i++) {
    const [t0, in0, out0] = history[i - 1], [t1, in1, out1] = history[i];
    const dt = Math.max(t1 - t0, 1e-3);
    inRate.push([t1, Math.max(in1 - in0, 0) / dt]);
    outRate.push([t1, Math.max(out1 - out0, 0) / dt]);
  }
  return [{cls: "in", points: inRate}, {cls: "out", points: outRate}];
}

function peerCard(peer, stats) {
  const card = el("article", {class: "peer", "data-peer": peer.peer});
  const disconnect = el("button", {class: "disconnect"}, "disconnect");
  disconnect.addEventListener("click", () => act("disconnect", {peer: peer.peer}));
  const ping = el("button", {class: "ping"}, "ping");
  ping.addEventListener("click", async () => {
    const r = await act("ping", {peer: peer.peer});
    if (r.rtt_ms !== undefined) notice(r.rtt_ms === null ? `ping ${peer.peer}: no reply`
      : `ping ${peer.peer}: ${r.rtt_ms.toFixed(3)} ms, ${r.path}`);
  });
  card.append(el("h2", {}, peer.peer, el("span", {class: `state ${peer.state}`}, peer.state),
                 disconnect, ping));
  const facts = el("dl", {class: "facts"});
  const add = (k, v) => facts.append(el("dt", {}, k), el("dd", {}, String(v)));
  add("mode", peer.mode || "-");
  add("path", peer.path);
  if (peer.fingerprint) add("fingerprint", peer.fingerprint);
  if (stats && stats.pair) {
    const l = stats.pair.local || {}, r = stats.pair.remote || {};
    add("pair", `${l.protocol} ${l.address}:${l.port} ${l.type} → ${r.address}:${r.port} ${r.type}`);
  }
  if (stats && stats.ice_rtt) add("ICE rtt", `${stats.ice_rtt.last_ms.toFixed(2)} ms`);
  add("traffic", `in ${size(peer.bytes_in)} / ${peer.messages_in} msgs, out ${size(peer.bytes_out)} / ${peer.messages_out} msgs`);
  const drops = Object.entries(peer.dropped || {}).map(([k, v]) => `${k} ${v}`).join(", ");
  add("drops", drops || "none");
  if (peer.error) add("error", peer.error);
  card.append(facts);
  if (stats) {
    card.append(el("div", {class: "legend"}, "throughput (blue in, orange out)"),
                plot(throughput(stats.history || []), v => `${size(v)}/s`));
    card.append(el("div", {class: "legend"}, "ICE round trip"),
                plot([{cls: "rtt", points: rttSeries.get(peer.peer) || []}], v => `${v.toFixed(2)} ms`));
  }
  return card;
}

let refreshing = false;

async function refresh() {
  if (refreshing) return;  // a slow daemon must not pile up polls
  refreshing = true;
  try { await redraw(); } finally { refreshing = false; }
}

async function redraw() {
  let status;
  try { status = await getJSON("/api/status"); } catch (e) { notice(`status: ${e.message}`); return; }
  document.getElementById("agent").textContent = status.agent_id;
  document.getElementById("summary").textContent =
    `signaling ${status.signaling.state} · ${status.peers.length} peer(s) · up ${Math.round(status.uptime)} s`;
  const cards = [];
  for (const peer of status.peers) {
    let stats = null;
    if (peer.state !== "closed" && peer.state !== "failed") {
      stats = await getJSON(`/api/stats?peer=${encodeURIComponent(peer.peer)}`).catch(() => null);
    }
    if (stats && stats.ice_rtt) {
      const series = rttSeries.get(peer.peer) || [];
      series.push([Date.now() / 1000, stats.ice_rtt.last_ms]);
      rttSeries.set(peer.peer, series.slice(-120));
    }
    cards.push(peerCard(peer, stats));
  }
  const list = document.getElementById("peers");
  list.replaceChildren(...(cards.length ? cards : [el("p", {}, "no peers")]));
  const select = document.getElementById("send-peer");
  const chosen = select.value;
  select.replaceChildren(...status.peers.map(p => el("option", {}, p.peer)));
  if (chosen) select.value = chosen;
  document.body.dataset.ready = "1";
}

document.getElementById("connect-form").addEventListener("submit", e => {
  e.preventDefault();
  const body = {peer: document.getElementById("connect-peer").value};
  const mode = document.getElementById("connect-mode").value;
  if (mode) body.mode = mode;
  act("connect", body);
});
document.getElementById("send-form").addEventListener("submit", e => {
  e.preventDefault();
  const text = document.getElementById("send-text");
  act("send", {peer: document.getElementById("send-peer").value, text: text.value});
  text.value = "";
});

refresh();
setInterval(refresh, 1000);
