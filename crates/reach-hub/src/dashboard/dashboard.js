// The hub dashboard: polls /status every second and draws the overlay
// map (every hub's card: its links, who dialled, round trips, attached
// nodes) and the hub's own tables. No dependencies, no build step.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const short = (id) => id.slice(0, 8);

function el(name, attrs, text) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function ms(us) {
  if (us === null || us === undefined) return "";
  return us < 10000 ? (us / 1000).toFixed(2) + " ms" : (us / 1000).toFixed(0) + " ms";
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

// The links to draw: a link is up when every reachable hub at its ends
// that has a card lists it (a stale card of a hub that is gone lists links
// its neighbours dropped). Direction: from the side that dialled.
function linksOf(cards) {
  const byHub = new Map(cards.map((c) => [c.hub, c]));
  const lists = (hub, other) => byHub.get(hub).links.some((l) => l.hub === other);
  const out = new Map();
  for (const c of cards) {
    if (!c.reachable) continue;
    for (const l of c.links) {
      const other = byHub.get(l.hub);
      if (!other) continue;
      if (other.reachable && !lists(l.hub, c.hub)) continue;
      const key = c.hub < l.hub ? c.hub + " " + l.hub : l.hub + " " + c.hub;
      const from = l.dialled ? c.hub : l.hub;
      const to = l.dialled ? l.hub : c.hub;
      const seen = out.get(key);
      if (!seen) {
        out.set(key, { from, to, rtt: l.rtt_us });
      } else if (l.rtt_us && (!seen.rtt || l.rtt_us < seen.rtt)) {
        seen.rtt = l.rtt_us;
      }
    }
  }
  return [...out.values()];
}

// Hubs in the order they sit on the circle: depth first along the links
// from this hub (a ring or a chain draws without crossings), then the
// rest by id.
function circleOrder(overlay, me) {
  const byId = [...overlay].sort((a, b) => (a.hub < b.hub ? -1 : 1));
  const byHub = new Map(byId.map((c) => [c.hub, c]));
  const out = [];
  const seen = new Set();
  const visit = (hub) => {
    if (seen.has(hub) || !byHub.has(hub)) return;
    seen.add(hub);
    out.push(byHub.get(hub));
    const next = new Set(byHub.get(hub).links.map((l) => l.hub));
    for (const c of byId) if (c.links.some((l) => l.hub === hub)) next.add(c.hub);
    [...next].sort().forEach(visit);
  };
  visit(me);
  byId.forEach((c) => visit(c.hub));
  return out;
}

function drawOverlay(status) {
  const svg = $("overlay");
  const cards = circleOrder(status.overlay, status.hub);
  const [w, h] = [640, 440];
  const r = cards.length > 1 ? Math.min(w, h) / 2 - 60 : 0;
  const pos = new Map();
  cards.forEach((c, i) => {
    const a = (2 * Math.PI * i) / cards.length - Math.PI / 2;
    pos.set(c.hub, [w / 2 + r * Math.cos(a), h / 2 + r * Math.sin(a)]);
  });
  svg.replaceChildren();
  const defs = el("defs");
  const marker = el("marker", {
    id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5",
    markerWidth: "8", markerHeight: "8", orient: "auto-start-reverse",
  });
  marker.append(el("path", { d: "M 0 0 L 10 5 L 0 10 z" }));
  defs.append(marker);
  svg.append(defs);
  const R = 26;
  for (const l of linksOf(cards)) {
    const [x1, y1] = pos.get(l.from);
    const [x2, y2] = pos.get(l.to);
    const len = Math.hypot(x2 - x1, y2 - y1) || 1;
    const [ux, uy] = [(x2 - x1) / len, (y2 - y1) / len];
    const g = el("g", { class: "link", "data-from": l.from, "data-to": l.to });
    g.append(el("line", {
      x1: x1 + ux * R, y1: y1 + uy * R, x2: x2 - ux * (R + 2), y2: y2 - uy * (R + 2),
      "marker-end": "url(#arrow)",
    }));
    g.append(el("text", { x: (x1 + x2) / 2 - uy * 10, y: (y1 + y2) / 2 + ux * 10 }, ms(l.rtt)));
    svg.append(g);
  }
  for (const c of cards) {
    const [x, y] = pos.get(c.hub);
    const cls = ["hub"];
    if (c.hub === status.hub) cls.push("me");
    if (!c.reachable) cls.push("gone");
    const g = el("g", {
      class: cls.join(" "), "data-hub": c.hub, "data-reachable": String(c.reachable),
      "data-nodes": String(c.nodes),
    });
    g.append(el("title", {}, c.hub));
    g.append(el("circle", { cx: x, cy: y, r: R }));
    g.append(el("text", { x, y: y + 4 }, String(c.nodes)));
    g.append(el("text", { x, y: y + R + 14 }, short(c.hub)));
    g.append(el("text", { class: "count", x, y: y + R + 27 },
      c.nodes === 1 ? "1 node" : c.nodes + " nodes"));
    svg.append(g);
  }
}

function table(id, head, rows) {
  const t = $(id);
  t.replaceChildren();
  const tr = document.createElement("tr");
  for (const h of head) {
    const th = document.createElement("th");
    th.textContent = h;
    tr.append(th);
  }
  t.append(tr);
  if (rows.length === 0) {
    const r = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = head.length;
    td.textContent = "none";
    r.append(td);
    t.append(r);
  }
  for (const row of rows) {
    const r = document.createElement("tr");
    for (const cell of row) {
      const td = document.createElement("td");
      td.textContent = cell;
      if (typeof cell === "number") td.className = "num";
      r.append(td);
    }
    t.append(r);
  }
}

function render(s) {
  $("me").textContent = s.hub;
  drawOverlay(s);
  table("summary", ["", ""], [
    ["listens on", s.listen.join(", ")],
    ["nodes attached", s.nodes_attached],
    ["nodes on other hubs", s.remote_nodes],
    ["hubs in the overlay", s.overlay.length],
    ["routed streams now", s.streams],
    ["relay circuits now", s.circuits.active],
    ["bytes relayed", bytes(s.counters.bytes_relayed)],
  ]);
  table("links", ["hub", "address", "dialled by", "round trip"], s.hub_links.map((l) => [
    short(l.hub), l.addr || "", l.dialled ? "this hub" : "the other", ms(l.rtt_us),
  ]));
  table("routes", ["to hub", "next hop", "hops"], s.routes.map((r) => [
    short(r.hub), short(r.next_hop), r.hops,
  ]));
  table("exposures", ["port", "node", "vport", "connections", "active", "refused", "in", "out"],
    s.exposures.map((e) => [
      e.port, short(e.node), e.vport, e.connections, e.active, e.refused,
      bytes(e.bytes_in), bytes(e.bytes_out),
    ]));
  table("nodes", ["node", "from", "streams"], s.nodes.map((n) => [
    short(n.node), n.observed, n.streams,
  ]));
  const counters = Object.entries(s.counters).concat(
    Object.entries(s.circuits).map(([k, v]) => ["circuits " + k, v]));
  table("counters", ["counter", "value"], counters.map(([k, v]) => [k.replaceAll("_", " "), v]));
}

async function refresh() {
  const state = $("state");
  try {
    const reply = await fetch("/status", { cache: "no-store" });
    if (!reply.ok) throw new Error("HTTP " + reply.status);
    render(await reply.json());
    state.textContent = "live, updated " + new Date().toLocaleTimeString();
    state.className = "ok";
  } catch (e) {
    state.textContent = "the hub does not answer (" + e.message + "); retrying every second";
    state.className = "bad";
  }
}

refresh();
setInterval(refresh, 1000);
