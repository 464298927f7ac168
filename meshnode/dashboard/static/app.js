// meshnode dashboard: polls this node's admin API and draws the mesh. No build step, no
// dependencies, nothing fetched from anywhere but this node.
//
// Data: GET /admin/mesh (members, status, RTT, models, capacity), /admin/stats (traffic per
// provider and model), /admin/budget (spend and what is left), /admin/history (the node's last
// 15 minutes per provider and per node, and its last errors), /admin/spend (per API key). With auth on these need an
// admin key: it comes from the page's fragment (#key=sk-..., never sent to the server) or the
// key form, is kept in sessionStorage (this tab only) and sent as a Bearer token.
// Everything from the node (ids, model names) is put into the page as text, never as HTML:
// peers' gossip is not trusted markup.
"use strict";

const POLL_MS = 1000;
const KEY_STORE = "meshnode.adminKey";
const SVG_NS = "http://www.w3.org/2000/svg";
const STATUSES = ["alive", "suspect", "dead", "left"];

let apiKey = null;
let lastGood = null;

function loadKey() {
  const match = /(?:^#|&)key=([^&]+)/.exec(window.location.hash);
  if (match) {
    sessionStorage.setItem(KEY_STORE, decodeURIComponent(match[1]));
    // Out of the address bar, so the key is not shared with a copied link.
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  apiKey = sessionStorage.getItem(KEY_STORE);
}

class HttpError extends Error {
  constructor(status, path, message) {
    super(`${path}: HTTP ${status}${message ? " " + message : ""}`);
    this.status = status;
  }
}

async function getJson(path) {
  const headers = { Accept: "application/json" };
  if (apiKey) headers.Authorization = "Bearer " + apiKey;
  const response = await fetch(path, { headers, cache: "no-store" });
  if (!response.ok) {
    let message = "";
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    throw new HttpError(response.status, path, message);
  }
  return response.json();
}

async function optional(path) {
  try { return await getJson(path); } catch (e) {
    if (e instanceof HttpError && e.status === 404) return null;
    throw e;
  }
}

// ------------------------------------------------------------------------------ DOM helpers
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function statusClass(status) {
  return "status-" + (STATUSES.includes(status) ? status : "left");
}

function badge(status) {
  return el("span", { class: "badge " + statusClass(status) }, status);
}

function num(value, digits) {
  if (value === null || value === undefined) return "-";
  return Number(value).toFixed(digits === undefined ? 1 : digits);
}

function money(value) {
  if (value === null || value === undefined) return "-";
  return "$" + Number(value).toPrecision(4).replace(/\.?0+$/, "").replace(/\.?0+e/, "e");
}

function bar(fraction, cls) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  const fill = el("span", {});
  // Through the CSSOM: the page's CSP forbids inline style attributes.
  fill.style.width = `${pct.toFixed(1)}%`;
  return el("div", { class: "bar" + (cls ? " " + cls : "") }, fill);
}

// ------------------------------------------------------------------------------ rendering
function members(data) {
  if (data.mesh) return data.mesh.members;
  // Mesh off on this node: it is the whole "mesh".
  return [{ id: data.stats.node, self: true, status: "alive", addresses: {}, models: [],
            capacity: null, rtt_ms: null, last_heard_s: 0, incarnation: 0 }];
}

function renderGraph(list) {
  const graph = document.getElementById("graph");
  graph.replaceChildren();
  const width = 640, height = 420, cx = width / 2, cy = height / 2;
  const self = list.find((m) => m.self) || list[0];
  const others = list.filter((m) => m !== self);
  const radius = Math.min(width, height) / 2 - 60;
  const pos = new Map([[self.id, [cx, cy]]]);
  others.forEach((m, i) => {
    // Two peers sit left and right (the box is wide), more go round a ring.
    const angle = -Math.PI / 2 + Math.PI / others.length + (2 * Math.PI * i) / others.length;
    pos.set(m.id, [cx + radius * 1.25 * Math.cos(angle), cy + radius * Math.sin(angle)]);
  });
  // Links: the RTT this node measures to each member (its own probes).
  for (const m of others) {
    const [x, y] = pos.get(m.id);
    graph.append(svg("line", { class: "link " + statusClass(m.status), x1: cx, y1: cy, x2: x, y2: y,
                               "data-link": `${self.id}-${m.id}` }));
    const label = m.rtt_ms === null || m.rtt_ms === undefined ? "rtt -" : `${num(m.rtt_ms)} ms`;
    graph.append(svg("text", { class: "rtt", x: (cx + x) / 2 + 6, y: (cy + y) / 2 - 4 }, label));
  }
  for (const m of list) {
    const [x, y] = pos.get(m.id);
    const g = svg("g", { class: `node ${statusClass(m.status)}${m.self ? " self" : ""}`,
                         "data-node-id": m.id, "data-status": m.status,
                         transform: `translate(${x.toFixed(1)},${y.toFixed(1)})` });
    g.append(svg("circle", { r: m.self ? 22 : 18 }));
    g.append(svg("text", { y: -28 }, m.id));
    const models = (m.models || []).map((o) => o.name);
    g.append(svg("text", { class: "sub", y: 36 }, `${m.status} · ${models.length} model(s)`));
    const cap = m.capacity || {};
    if (cap.slots_total) {
      const busy = cap.slots_total - cap.slots_free;
      g.append(svg("text", { class: "sub", y: 49 }, `slots ${busy}/${cap.slots_total} · queue ${cap.queue_depth}`));
    }
    graph.append(g);
  }
}

function renderNodes(list) {
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren(...list.map((m) => {
    const cap = m.capacity || {};
    const models = (m.models || []).map((o) => el("span", { class: "model" },
      `${o.name} [${o.provider_kind}] ${money(o.cost_per_1k_input)}/${money(o.cost_per_1k_output)}`));
    const busy = cap.slots_total ? cap.slots_total - cap.slots_free : null;
    const addresses = m.addresses || {};
    return el("tr", { class: statusClass(m.status), "data-node-id": m.id, "data-status": m.status },
      el("td", {}, el("strong", {}, m.id), m.self ? " (this node)" : ""),
      el("td", {}, badge(m.status)),
      el("td", { class: "small" }, `grpc ${addresses.grpc || "-"}`, el("br"), `http ${addresses.http || "-"}`),
      el("td", {}, models.length ? models : "-"),
      el("td", { class: "num" }, busy === null ? "-" : `${busy}/${cap.slots_total}`,
        busy === null ? null : bar(busy / cap.slots_total)),
      el("td", { class: "num" }, cap.queue_depth === undefined ? "-" : cap.queue_depth),
      el("td", { class: "num" }, cap.tokens_per_s ? num(cap.tokens_per_s) : "-"),
      el("td", { class: "num" }, num(m.rtt_ms)),
      el("td", { class: "num" }, num(m.last_heard_s)));
  }));
}

function renderProviders(stats) {
  const rows = stats.candidates || [];
  const most = Math.max(1, ...rows.map((r) => r.requests));
  const body = document.querySelector("#providers tbody");
  if (!rows.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 11, class: "muted" }, "no traffic yet")));
    return;
  }
  body.replaceChildren(...rows.map((r) => {
    // Errors over requests: the breaker's error_rate leaves out failures that say nothing about
    // the provider's health (a client's bad request), so 25 failed of 25 read 0.0% there.
    const rate = r.requests > 0 ? r.errors / r.requests : 0;
    const lat = r.latency_ms || {};
    const seen = r.requests > 0;
    return el("tr", { "data-provider": r.provider, "data-model": r.model },
      el("td", {}, r.provider), el("td", {}, r.model),
      el("td", { class: "num" }, r.requests), el("td", {}, bar(r.requests / most)),
      el("td", { class: "num" + (r.errors ? " err" : "") }, r.errors),
      el("td", { class: "num" + (rate > 0.05 ? " err" : ""), "data-error-rate": rate.toFixed(4) },
        `${(100 * rate).toFixed(1)}%`),
      el("td", { class: "num" }, seen ? num(lat.p50) : "-"),
      el("td", { class: "num" }, seen ? num(lat.p95) : "-"),
      el("td", { class: "num" }, (r.tokens || {}).total || 0),
      el("td", { class: "num" }, money(r.cost)),
      el("td", { class: "num" }, r.in_flight || 0));
  }));
}

function budgetRow(label, spent, limit, left) {
  if (limit === null || limit === undefined) {
    return el("div", { class: "budget-row" },
      el("div", { class: "line" }, el("span", {}, label), el("span", {}, `spent ${money(spent)} · no limit`)));
  }
  const used = limit > 0 ? spent / limit : 1;
  return el("div", { class: "budget-row", "data-budget": label },
    el("div", { class: "line" }, el("span", {}, label),
      el("span", {}, `${money(spent)} of ${money(limit)} · left `, el("strong", { class: "left" }, money(left)))),
    bar(used, used >= 1 ? "bad" : used > 0.9 ? "warn" : ""));
}

function renderBudget(budget) {
  const box = document.getElementById("budget");
  if (!budget) { box.replaceChildren(el("p", { class: "muted" }, "this node reports no budget")); return; }
  if (!budget.enabled) {
    box.replaceChildren(el("p", { class: "muted" }, `budget off · spent today ${money(budget.spent_today)}`));
    return;
  }
  box.replaceChildren(
    el("p", { class: "muted small" }, `scope: ${budget.scope} · ${budget.day}`),
    budgetRow("today", budget.spent_today, budget.daily_limit, budget.left_today),
    budgetRow("this month", budget.spent_this_month, budget.monthly_limit, budget.left_this_month),
    el("p", { class: "muted small" }, `reserved ${money(budget.reserved)} in ${budget.open_reservations} open reservation(s)`));
}

// ------------------------------------------------------------------------------ history
const COLOURS = ["#58a6ff", "#3fb950", "#d29922", "#f85149", "#bc8cff", "#39c5cf", "#ff7b72",
                 "#e3b341"];
const CHARTS = [
  { field: "requests", title: "requests / 10 s" },
  { field: "errors", title: "errors / 10 s" },
  { field: "p50_ms", title: "latency p50 ms", also: "p95_ms" },
  { field: "tokens_per_s", title: "tokens/s" },
];

function chart(spec, series, names, span) {
  const width = 260, height = 70;
  const values = [];
  for (const name of names) {
    for (const v of series[name][spec.field]) if (v !== null) values.push(v);
    if (spec.also) for (const v of series[name][spec.also]) if (v !== null) values.push(v);
  }
  const top = Math.max(1e-9, ...values);
  const box = svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none",
                           "data-chart": spec.field });
  box.append(svg("line", { class: "axis", x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5 }));
  const pad = 3;  // the newest bucket's point stays inside the box
  const line = (list, colour, dashed, name, field) => {
    const step = (width - 2 * pad) / Math.max(1, list.length - 1);
    const points = [];
    list.forEach((v, i) => {
      // Whole-pixel rows: a 2 px line on them is drawn crisp, in its own colour.
      if (v !== null) points.push(`${(pad + i * step).toFixed(1)},${Math.round(height - 4 - (v / top) * (height - 8))}`);
    });
    if (!points.length) return;
    const attrs = { points: points.join(" "), stroke: colour, "data-series": name, "data-field": field };
    if (dashed) attrs["stroke-dasharray"] = "3 2";
    box.append(svg("polyline", attrs));
  };
  names.forEach((name, i) => {
    const colour = COLOURS[i % COLOURS.length];
    line(series[name][spec.field], colour, false, name, spec.field);
    if (spec.also) line(series[name][spec.also], colour, true, name, spec.also);
  });
  const last = (name) => {
    const list = series[name][spec.field];
    for (let i = list.length - 1; i >= 0; i--) if (list[i] !== null) return list[i];
    return null;
  };
  const total = spec.field === "requests" || spec.field === "errors"
    ? ` · ${names.reduce((n, name) => n + series[name][spec.field].reduce((a, b) => a + b, 0), 0)} in ${span}`
    : "";
  const keys = el("div", { class: "keys" }, names.map((name, i) => {
    const sw = el("span", { class: "swatch" });
    sw.style.background = COLOURS[i % COLOURS.length];
    const now = last(name);
    return el("span", {}, sw, `${name} ${now === null ? "-" : num(now, spec.field === "requests" || spec.field === "errors" ? 0 : 1)}`);
  }));
  return el("div", { class: "chart" },
    el("div", { class: "title" }, el("span", {}, spec.title + (spec.also ? " (p95 dashed)" : "")),
      el("span", { class: "muted" }, `max ${num(top, top < 10 ? 2 : 0)}${total}`)),
    box, keys);
}

function renderHistory(history) {
  const span = document.getElementById("history-span");
  if (!history) { span.textContent = "not reported by this node"; return; }
  const h = history.history;
  span.textContent = `${Math.round(h.window_s / 60)} min window`;
  for (const dimension of ["provider", "node"]) {
    const box = document.getElementById("history-" + dimension);
    const series = h.series[dimension] || {};
    const names = Object.keys(series).sort();
    box.dataset.series = names.join(",");
    if (!names.length) {
      box.replaceChildren(el("p", { class: "muted" }, "no requests in the last 15 minutes"));
      continue;
    }
    box.replaceChildren(...CHARTS.map((spec) => chart(spec, series, names, `${Math.round(h.window_s / 60)} min`)));
  }
}

function renderErrors(history) {
  const body = document.querySelector("#errors tbody");
  const rows = history ? history.errors : [];
  if (!rows.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "no errors")));
    return;
  }
  body.replaceChildren(...rows.map((e) => el("tr", { "data-request-id": e.request_id },
    el("td", {}, new Date(e.at * 1000).toLocaleTimeString()),
    el("td", {}, el("code", {}, e.request_id)),
    el("td", { class: "num err" }, e.status), el("td", {}, e.code), el("td", {}, e.model || "-"),
    el("td", {}, e.provider || "-"), el("td", {}, e.key || "-"),
    el("td", { class: "num" }, e.attempts))));
}

function renderSpend(spend) {
  const body = document.querySelector("#spend tbody");
  const rows = spend ? spend.keys : [];
  if (!rows.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 6, class: "muted" },
      spend ? "no API keys (auth off, or none created)" : "not reported by this node")));
    return;
  }
  body.replaceChildren(...rows.map((k) => el("tr", { "data-key": k.key },
    el("td", {}, el("strong", {}, k.key)),
    el("td", { class: "num" }, money(k.today)), el("td", { class: "num" }, money(k.this_month)),
    el("td", { class: "num" }, k.daily_limit === null ? "none" : money(k.daily_limit)),
    el("td", { class: "num" }, k.left_today === null ? "-" : money(k.left_today)),
    el("td", { class: "small" }, Object.entries(k.nodes).map(([n, v]) => `${n} ${money(v.today)}`).join(" · ") || "-"))));
}

function render(data) {
  const list = members(data);
  const alive = list.filter((m) => m.status === "alive").length;
  document.getElementById("node-name").textContent = data.stats.node;
  document.getElementById("summary").textContent =
    `${alive}/${list.length} nodes alive · ${data.stats.totals.requests} requests · ` +
    `${data.stats.totals.errors} errors · spend ${money(data.stats.totals.cost)}`;
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  document.body.dataset.nodes = String(list.length);
  document.body.dataset.alive = String(alive);
  renderGraph(list);
  renderNodes(list);
  renderProviders(data.stats);
  renderBudget(data.budget);
  renderHistory(data.history);
  renderErrors(data.history);
  renderSpend(data.spend);
}

function showBanner(text) {
  const banner = document.getElementById("banner");
  banner.textContent = text;
  banner.classList.toggle("hidden", !text);
  document.body.dataset.stale = text ? "true" : "false";
}

// ------------------------------------------------------------------------------ polling
async function poll() {
  try {
    const [mesh, stats, budget, history, spend] = await Promise.all(
      [optional("/admin/mesh"), getJson("/admin/stats"), optional("/admin/budget"),
       optional("/admin/history"), optional("/admin/spend")]);
    lastGood = { mesh, stats, budget, history, spend };
    document.getElementById("key-form").classList.add("hidden");
    showBanner("");
    render(lastGood);
  } catch (e) {
    const refused = e instanceof HttpError && (e.status === 401 || e.status === 403);
    document.getElementById("key-form").classList.toggle("hidden", !refused);
    const what = refused ? "an admin key is needed" : "the node did not answer";
    showBanner(`${what}: ${e.message}` + (lastGood ? " (showing the last data)" : ""));
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = document.getElementById("key-input").value.trim();
  if (value) sessionStorage.setItem(KEY_STORE, value);
  apiKey = value || null;
});
document.getElementById("forget-key").addEventListener("click", (event) => {
  event.preventDefault();
  sessionStorage.removeItem(KEY_STORE);
  apiKey = null;
});

loadKey();
poll();
