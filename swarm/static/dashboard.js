// Legion's swarm dashboard: renders /api/swarm snapshots, then each one /events streams.
// Everything shown came from other peers: it goes into the page as text, never as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const short = (id) => (id && id.length > 14 ? id.slice(0, 6) + "…" + id.slice(-6) : id || "");
const fmt = (x, digits = 3) => (x === null || x === undefined ? "-" : Number(x).toFixed(digits));
const bytes = (n) => (n >= 1e9 ? (n / 1e9).toFixed(2) + " GB" : n >= 1e6 ? (n / 1e6).toFixed(1) + " MB" : (n / 1e3).toFixed(0) + " kB");

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = String(text);
  return node;
}

const compact = (y) => (Math.abs(y) >= 1e6 ? (y / 1e6).toFixed(1) + "M" : Math.abs(y) >= 1e3 ? (y / 1e3).toFixed(1) + "k" : y.toPrecision(3));

function duration(seconds) {
  seconds = Math.floor(seconds || 0);
  if (seconds < 3600) return Math.floor(seconds / 60) + "m" + String(seconds % 60).padStart(2, "0") + "s";
  return Math.floor(seconds / 3600) + "h" + String(Math.floor((seconds % 3600) / 60)).padStart(2, "0") + "m";
}

// A line chart of series [{points: [[x, y], ...], color}] with axes; data-points counts the points drawn.
function lineChart(svg, series, xLabel) {
  svg.replaceChildren();
  const W = 480, H = 240, L = 48, R = 10, T = 10, B = 30;
  const all = series.flatMap((s) => s.points).filter((p) => p[1] !== null);
  svg.dataset.points = String(series.length ? series[0].points.filter((p) => p[1] !== null).length : 0);
  if (!all.length) {
    svg.append(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "waiting for data"));
    return;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05;
  y0 = y0 >= 0 ? Math.max(0, y0 - pad) : y0 - pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svg.append(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#aab" }));
  svg.append(svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#aab" }));
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    svg.append(svgEl("text", { x: L - 4, y: sy(y) + 4, "text-anchor": "end" }, compact(y)));
    svg.append(svgEl("line", { x1: L, y1: sy(y), x2: W - R, y2: sy(y), stroke: "#eef" }));
  }
  svg.append(svgEl("text", { x: L, y: H - 8 }, xLabel(x0)));
  svg.append(svgEl("text", { x: W - R, y: H - 8, "text-anchor": "end" }, xLabel(x1)));
  for (const s of series) {
    const pts = s.points.filter((p) => p[1] !== null);
    if (!pts.length) continue;
    svg.append(svgEl("polyline", { points: pts.map((p) => sx(p[0]) + "," + sy(p[1])).join(" "), fill: "none", stroke: s.color, "stroke-width": 2 }));
    for (const p of pts.length <= 60 ? pts : []) svg.append(svgEl("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: s.color }));
  }
}

// Stacked bars of rounds per peer.
function roundsChart(svg, peers) {
  svg.replaceChildren();
  const W = 480, H = 240, L = 10, T = 20, B = 30;
  const rows = peers.filter((p) => p.rounds_averaged !== undefined);
  if (!rows.length) {
    svg.append(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no training peers"));
    return;
  }
  const max = Math.max(1, ...rows.map((p) => p.rounds_averaged + p.rounds_failed));
  const bw = Math.min(40, (W - L * 2) / rows.length - 6);
  rows.forEach((p, i) => {
    const x = L + i * (bw + 6);
    const ha = ((H - T - B) * p.rounds_averaged) / max, hf = ((H - T - B) * p.rounds_failed) / max;
    svg.append(svgEl("rect", { x, y: H - B - ha, width: bw, height: ha, fill: "#2f9e44" }, ""));
    svg.append(svgEl("rect", { x, y: H - B - ha - hf, width: bw, height: hf, fill: "#e03131" }));
    svg.append(svgEl("text", { x: x + bw / 2, y: H - B + 14, "text-anchor": "middle" }, p.peer_id.slice(-4)));
    svg.append(svgEl("text", { x: x + bw / 2, y: H - B - ha - hf - 3, "text-anchor": "middle" }, p.rounds_averaged + "/" + p.rounds_failed));
  });
}

function card(label, value) {
  const node = el("div", undefined, "card");
  node.append(el("b", value), el("span", label));
  return node;
}

function render(s) {
  document.getElementById("swarm-name").textContent = "swarm " + s.swarm;
  const run = s.runs[0];
  const totals = document.getElementById("totals");
  totals.replaceChildren(
    card("live peers", s.peers.length),
    // a large swarm's board is read one bucket at a time: the peers shown are a sample
    ...(s.board_sampled ? [card("peers in the run (estimate)", "~" + s.board_estimate)] : []),
    card("training", run ? run.training : 0),
    card("round", run ? run.round : "-"),
    card("tokens/s (swarm)", run ? Math.round(run.tokens_per_second) : "-"),
    card("rounds averaged / failed", run ? run.rounds_averaged + " / " + run.rounds_failed : "-"),
    card("bytes up / down", run ? bytes(run.bytes_sent) + " / " + bytes(run.bytes_received) : "-"),
  );
  const curve = run ? run.curve : [];
  lineChart(document.getElementById("loss-chart"), [
    { points: curve.map((c) => [c.round, c.loss]), color: "#2f6fdf" },
    { points: curve.map((c) => [c.round, c.val_loss]), color: "#d9480f" },
  ], (x) => "round " + Math.round(x));
  const start = run && run.throughput.length ? run.throughput[0][0] : 0;
  lineChart(document.getElementById("throughput-chart"), [
    { points: run ? run.throughput.map((p) => [p[0] - start, p[1]]) : [], color: "#5f3dc4" },
  ], (x) => Math.round(x) + " s");
  roundsChart(document.getElementById("rounds-chart"), s.peers);

  const body = document.querySelector("#peers tbody");
  body.replaceChildren(...s.peers.map((p) => {
    const tr = el("tr");
    tr.dataset.peerId = p.peer_id;
    const cells = [[short(p.peer_id), "id"], [p.role], [p.version], [duration(p.uptime_seconds)], [p.reachability],
      [p.cpu_cores], [(p.ram_bytes / 2 ** 30).toFixed(1) + " GiB"], [p.gpu || "none"], [p.round ?? "-"],
      [fmt(p.loss)], [p.tokens_per_second === undefined ? "-" : Math.round(p.tokens_per_second || 0)],
      [p.rounds_averaged === undefined ? "-" : p.rounds_averaged + "/" + p.rounds_failed], [p.addrs[0] || "-", "addr"]];
    for (const [text, cls] of cells) tr.append(el("td", text, cls));
    tr.firstChild.title = p.peer_id;
    tr.lastChild.title = p.addrs.join("\n");
    return tr;
  }));

  document.getElementById("groups").replaceChildren(...(s.groups.length ? s.groups.map((g) =>
    el("li", g.key + ": " + g.members.map(short).join(", "))) : [el("li", "no averaged round seen yet")]));

  document.querySelector("#checkpoints tbody").replaceChildren(...s.checkpoints.map((v) => {
    const tr = el("tr");
    tr.append(el("td", short(v.run_id)), el("td", v.round), el("td", v.manifest_id.slice(0, 12), "id"),
      el("td", v.holders.map((h) => short(h.peer_id) + " (" + h.held + "/" + h.total + ")").join(", ")));
    return tr;
  }));

  const shards = document.getElementById("shards");
  shards.replaceChildren();
  if (!s.shards.length) shards.append(el("p", "no sharded run (outer momentum is replicated on every peer)"));
  for (const r of s.shards) {
    const table = el("table");
    table.append(el("caption", "run " + r.run_id + ": " + r.shards.length + " shards, " + r.replicas + " replicas each"));
    for (const sh of r.shards) {
      const tr = el("tr");
      const owners = sh.owners.map((o) => short(o.peer_id) + " (lease " + Math.round(o.lease_age_seconds) + " s)").join(", ") || "none";
      tr.append(el("td", "shard " + sh.shard), el("td", sh.values + " values"),
        el("td", owners, sh.owners.length < r.replicas ? "under" : ""));
      table.append(tr);
    }
    shards.append(table);
  }
  document.getElementById("config").textContent = run ? JSON.stringify(run.config, null, 2) : "no run published yet";
  const status = document.getElementById("connection");
  status.textContent = "live · updated " + new Date(s.updated * 1000).toLocaleTimeString();
  status.className = "";
}

fetch("/api/swarm").then((r) => r.json()).then((s) => { if (s.updated) render(s); });
const events = new EventSource("/events");
events.onmessage = (e) => render(JSON.parse(e.data));
events.onerror = () => {
  const status = document.getElementById("connection");
  status.textContent = "reconnecting…";
  status.className = "stale";
};
