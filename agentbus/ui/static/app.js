// agentbus operator page. Plain JS, no dependencies.
// Every piece of data comes from the JSON API with the operator's bearer token. Values from
// the API (agent ids, keys, shard values) are untrusted: they only ever reach the DOM as
// text nodes (textContent), never as HTML.
"use strict";

const TOKEN_KEY = "agentbus.token";
const AGENT_KEY = "agentbus.agent";
const SESSION = "operator-ui"; // keeps the page's own reads apart from the operator's other sessions
const MAX_LANE_EVENTS = 400; // the timeline shows the newest events only, to keep the page light
const TRACE_PAGE = 500;
const MAX_PAGES = 40;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  agentId: sessionStorage.getItem(AGENT_KEY) || "",
  me: null, // subject behind the token: the page's own reads are not shown in the timeline
  heads: new Map(), // space -> its last commit seq, from the spaces list
  space: null,
  generation: 0, // bumped on every space switch: late answers for an old space are dropped
  authGeneration: 0, // bumped on every sign-in: late answers for an old token are dropped
  source: null, // "trace" | "log"
  events: [],
  seen: new Set(),
  traceCursor: null,
  logAfter: 0,
  lastSeq: 0,
  selectedId: null,
  kinds: new Set(["read", "list", "commit", "conflict", "model_call"]),
  live: null, // AbortController of the event stream
  shardCursor: null,
  shard: null,
  refreshTimer: null,
  pollTimer: null,
};

// ------------------------------------------------------------------ DOM helpers

const $ = (id) => document.getElementById(id);

/** Element with attributes and children; strings become text nodes (never HTML). */
function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function fmtTime(ms) {
  if (!Number.isFinite(ms)) return "";
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function fmtDateTime(ms) {
  if (!Number.isFinite(ms)) return "";
  const d = new Date(ms);
  return d.toLocaleDateString() + " " + fmtTime(ms);
}

function fmtNum(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") return Number.isInteger(v) ? v.toLocaleString() : v.toLocaleString(undefined, { maximumFractionDigits: 6 });
  return String(v);
}

function fmtCost(v) {
  if (v === null || v === undefined || !Number.isFinite(Number(v))) return "—";
  const n = Number(v);
  if (Math.abs(n) >= 1 || n === 0) return "$" + n.toFixed(2);
  if (Math.abs(n) < 0.0000005) return n > 0 ? "<$0.000001" : "-<$0.000001";
  // Small amounts: up to 6 decimals, at least 2.
  let t = n.toFixed(6).replace(/0+$/, "");
  if (/\.\d$/.test(t)) t += "0";
  return "$" + t;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

// ------------------------------------------------------------------ API

class TraceDisabled extends Error {}

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || "";
    this.body = body;
  }
}

function authHeaders() {
  const headers = { "X-Agent-Session": SESSION };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  else if (state.agentId) headers["X-Agent-Id"] = state.agentId;
  return headers;
}

async function api(path, options = {}) {
  const res = await fetch(path, {
    ...options,
    headers: { Accept: "application/json", ...authHeaders(), ...(options.headers || {}) },
    cache: "no-store",
    credentials: "omit",
  });
  let body = null;
  const text = await res.text();
  if (text) {
    try {
      body = JSON.parse(text);
    } catch {
      body = null;
    }
  }
  if (!res.ok) throw new ApiError(res.status, body);
  return body;
}

const enc = encodeURIComponent;
const keyPath = (key) => key.split("/").map(enc).join("/");
const spacePath = (space) => `/v1/spaces/${enc(space)}`;

function explain(err) {
  if (!(err instanceof ApiError)) return String(err && err.message ? err.message : err);
  if (err.status === 401) return "Not authenticated: enter a valid operator token.";
  if (err.status === 403) return `Forbidden: ${err.message}`;
  return `${err.message} (HTTP ${err.status}${err.code ? ", " + err.code : ""})`;
}

// ------------------------------------------------------------------ sign-in and spaces

async function signIn() {
  showError("");
  const gen = ++state.authGeneration;
  const who = $("whoami");
  try {
    const me = await api("/v1/whoami");
    if (gen !== state.authGeneration) return;
    state.me = me.subject;
    clear(who).append(
      "Signed in as ",
      h("strong", { text: me.subject }),
      ` (${me.kind}, tenant ${me.tenant}) · scopes: ${(me.scopes || []).join(", ") || "none"}`,
    );
  } catch (err) {
    if (gen !== state.authGeneration) return;
    if (err instanceof ApiError && err.status === 401) {
      who.textContent = state.token ? "Not signed in: this token was refused." : "Not signed in: enter an operator token.";
    } else {
      who.textContent = explain(err);
    }
    clear($("spaces"));
    showSections(false);
    return;
  }
  await loadSpaces();
  if (gen !== state.authGeneration) return;
  $("usage-section").hidden = false;
  loadUsage();
  const wanted = hashSpace();
  if (wanted && wanted !== state.space) openSpace(wanted);
}

/** The space named in the address (#space=NAME), if any. */
function hashSpace() {
  const m = location.hash.match(/^#space=(.+)$/);
  if (!m) return "";
  try {
    return decodeURIComponent(m[1]);
  } catch {
    return "";
  }
}

async function loadSpaces() {
  const list = $("spaces");
  const note = $("spaces-note");
  const gen = state.authGeneration;
  try {
    const { spaces } = await api("/v1/spaces");
    if (gen !== state.authGeneration) return;
    clear(list);
    for (const s of spaces) {
      state.heads.set(s.space, s.seq);
      const button = h(
        "button",
        { type: "button", "aria-current": s.space === state.space ? "true" : "false", onclick: () => openSpace(s.space) },
        h("span", { class: "mono", text: s.space }),
        h("span", { class: "seq", text: `#${s.seq}`, "aria-label": `${s.seq} commits` }),
      );
      button.dataset.space = s.space;
      list.append(h("li", null, button));
    }
    note.textContent = spaces.length ? "" : "No spaces yet.";
  } catch (err) {
    if (gen === state.authGeneration) note.textContent = explain(err);
  }
}

function markCurrentSpace() {
  for (const b of $("spaces").querySelectorAll("button")) {
    b.setAttribute("aria-current", b.dataset.space === state.space ? "true" : "false");
  }
}

function showSections(on) {
  for (const id of ["timeline-section", "shards-section"]) $(id).hidden = !on;
  $("welcome").hidden = on;
}

function openSpace(space) {
  stopLive();
  state.generation += 1;
  Object.assign(state, {
    space,
    source: null,
    events: [],
    seen: new Set(),
    traceCursor: null,
    logAfter: 0,
    lastSeq: 0,
    selectedId: null,
    shardCursor: null,
    shard: null,
  });
  history.replaceState(null, "", `#space=${enc(space)}`);
  markCurrentSpace();
  showSections(true);
  showError("");
  $("space-name").textContent = space;
  clear($("timeline"));
  resetDetail();
  clear($("shards"));
  resetHistory();
  const gen = state.generation;
  loadTimeline().then(() => {
    if (gen !== state.generation) return;
    // With the trace API, the newest commits may still be on their way into the trace (it is
    // written a moment after each operation): the event stream replays the last few from the
    // commit log (shown at once, replaced by their traced events when those arrive). Older
    // commits missing from the trace were pruned from it: they are not replayed.
    if (state.source === "trace") {
      state.lastSeq = Math.max(state.lastSeq, (state.heads.get(space) || 0) - 100);
      scheduleRefresh(1000);
    }
    startLive();
  });
  loadShards(false);
}

// ------------------------------------------------------------------ timeline data

function tsOf(ev) {
  if (Number.isFinite(ev.ts_ms)) return ev.ts_ms;
  const parsed = Date.parse(ev.ts);
  return Number.isFinite(parsed) ? parsed : NaN;
}

function addEvents(list) {
  const added = [];
  for (const ev of list) {
    const id = String(ev.id);
    if (state.seen.has(id)) continue;
    state.seen.add(id);
    if (ev.session === SESSION && ev.agent === state.me) continue; // this page's own listings and reads
    if (ev.kind === "commit" && !id.startsWith("commit-") && state.seen.has(`commit-${ev.seq}`)) {
      // The traced commit replaces the one taken from the event stream while the trace caught up.
      state.events = state.events.filter((e) => e.id !== `commit-${ev.seq}`);
    }
    if (id.startsWith("commit-") && state.events.some((e) => e.kind === "commit" && e.seq === ev.seq)) continue;
    ev.id = id;
    ev._ms = tsOf(ev);
    if (ev.kind === "commit" && Number.isFinite(ev.seq)) state.lastSeq = Math.max(state.lastSeq, ev.seq);
    state.events.push(ev);
    added.push(ev);
  }
  if (added.length) state.events.sort((a, b) => a._ms - b._ms || 0);
  return added;
}

/** The trace API when the server has it (and the token may read it); else the commit log. */
async function loadTimeline() {
  const gen = state.generation;
  const space = state.space;
  let added = [];
  try {
    if (state.source !== "log") {
      try {
        added = await loadTrace(space, gen);
        state.source = "trace";
        setTraceNote("");
      } catch (err) {
        const unavailable = err instanceof TraceDisabled || err.code === "route_not_found" || err.status === 403;
        if (!unavailable) throw err;
        state.source = "log";
        setTraceNote(
          err instanceof TraceDisabled
            ? "This server keeps no timeline events (AGENTBUS_TRACE_STORE=false): the timeline shows commits from the commit log only."
            : err.status === 403
            ? "This token lacks the traces:read scope: the timeline shows commits from the commit log only. Reads, conflicts and model calls need GET /v1/spaces/{space}/trace with traces:read."
            : "This server has no trace API yet (GET /v1/spaces/{space}/trace): the timeline shows commits from the commit log only. Reads, conflicts and model calls appear once the trace API is available.",
        );
      }
    }
    if (state.source === "log") added = await loadLog(space, gen);
  } catch (err) {
    if (gen === state.generation) showError(explain(err));
    return;
  }
  if (gen !== state.generation) return;
  if (added.length || !$("timeline").firstChild) renderTimeline(new Set(added.map((e) => e.id)));
}

async function loadTrace(space, gen) {
  const added = [];
  for (let page = 0; page < MAX_PAGES; page++) {
    const q = new URLSearchParams({ limit: String(TRACE_PAGE) });
    if (state.traceCursor !== null && state.traceCursor !== undefined) q.set("after", String(state.traceCursor));
    const body = await api(`${spacePath(space)}/trace?${q}`);
    if (gen !== state.generation) return added;
    if (body.enabled === false) throw new TraceDisabled();
    added.push(...addEvents(body.events || []));
    if (body.next === null || body.next === undefined || body.next === state.traceCursor) break;
    state.traceCursor = body.next;
  }
  return added;
}

async function loadLog(space, gen) {
  const added = [];
  for (let page = 0; page < MAX_PAGES; page++) {
    const body = await api(`${spacePath(space)}/log?after=${state.logAfter}&limit=1000`);
    if (gen !== state.generation) return added;
    added.push(...addEvents((body.commits || []).map(commitToEvent)));
    if (!body.commits || !body.commits.length || body.next_after === state.logAfter) break;
    state.logAfter = body.next_after;
  }
  return added;
}

/** A commit-log record (or an SSE commit event) as a timeline event. */
function commitToEvent(c) {
  const versions = {};
  for (const w of c.writes || []) versions[w.key] = w.deleted ? `${w.version} (deleted)` : w.version;
  return {
    id: `commit-${c.seq}`,
    ts_ms: c.at * 1000,
    agent: c.committed_by,
    session: c.session,
    kind: "commit",
    keys: (c.writes || []).map((w) => w.key),
    commit_id: c.commit_id,
    seq: c.seq,
    versions,
  };
}

function setTraceNote(text) {
  const note = $("trace-note");
  note.textContent = text;
  note.hidden = !text;
}

// ------------------------------------------------------------------ timeline rendering

function keysOf(ev) {
  // For a conflict, the keys that conflicted (ev.keys are the writes it attempted).
  if (ev.kind === "conflict" && Array.isArray(ev.conflicts) && ev.conflicts.length) {
    return [...new Set(ev.conflicts.map((c) => c.key))];
  }
  if (Array.isArray(ev.keys) && ev.keys.length) return ev.keys;
  if (ev.versions && typeof ev.versions === "object") return Object.keys(ev.versions);
  return ev.key ? [ev.key] : [];
}

function winnersOf(ev) {
  const seen = new Map();
  for (const c of ev.conflicts || []) {
    if (c.committed_by || c.commit_seq) seen.set(`${c.committed_by}#${c.commit_seq}`, c);
  }
  return [...seen.values()];
}

function chipParts(ev) {
  const keys = keysOf(ev);
  switch (ev.kind) {
    case "read":
      return { kind: "read", main: ev.key || "", sub: ev.version === 0 ? "absent" : `v${ev.version}` };
    case "list":
    case "list": {
      const n = Number.isFinite(ev.count) ? ev.count : Array.isArray(ev.keys) ? ev.keys.length : null;
      return { kind: "list", main: (ev.prefix || "") + "*", sub: n === null ? "" : plural(n, "shard") };
    }
    case "commit":
      return { kind: `commit #${ev.seq ?? "?"}`, main: keys.join(", "), sub: ev.replayed ? "replayed (Idempotency-Key)" : "" };
    case "conflict": {
      const w = winnersOf(ev).map((c) => `${c.committed_by} #${c.commit_seq}`);
      return { kind: "conflict", main: keys.join(", "), sub: w.length ? `won by ${w.join(", ")}` : ev.replayed ? "replayed" : "" };
    }
    case "model_call": {
      const tokens = `${fmtNum(ev.input_tokens)}→${fmtNum(ev.output_tokens)} tok`;
      const lat = Number.isFinite(ev.latency_ms) ? ` · ${Math.round(ev.latency_ms)} ms` : "";
      return { kind: "model", main: ev.model || "?", sub: tokens + lat };
    }
    default:
      return { kind: ev.kind || "event", main: keys.join(", "), sub: "" };
  }
}

function chipLabel(ev, parts) {
  const who = ev.agent || "unknown agent";
  const at = fmtTime(ev._ms);
  return [parts.kind, parts.main, parts.sub, `by ${who}`, at].filter(Boolean).join(", ");
}

function renderTimeline(fresh = new Set()) {
  const box = $("timeline");
  // Follow the newest events unless the operator scrolled back to look at older ones.
  const first = !box.firstChild;
  const atEnd = first || box.scrollLeft + box.clientWidth >= box.scrollWidth - 8;
  const scrollLeft = box.scrollLeft;
  const focused = box.contains(document.activeElement) ? document.activeElement.dataset.id : null;
  clear(box);
  const visible = state.events.filter((e) => state.kinds.has(e.kind));
  const shown = visible.slice(-MAX_LANE_EVENTS);
  const agents = [];
  for (const ev of shown) {
    const a = ev.agent || "unknown";
    if (!agents.includes(a)) agents.push(a);
  }
  if (!shown.length) {
    box.append(h("p", { class: "note", text: state.events.length ? "No events of the selected kinds." : "No events yet in this space." }));
    box.style.gridTemplateColumns = "1fr";
    renderAgents();
    return;
  }
  box.style.gridTemplateColumns = `minmax(7rem, max-content) repeat(${shown.length}, max-content)`;
  if (visible.length > shown.length) {
    const more = h("p", { class: "note", text: `Showing the newest ${shown.length} of ${visible.length} events.` });
    more.style.gridColumn = `1 / span ${shown.length + 1}`;
    more.style.gridRow = "1";
    box.append(more);
  }
  const rowOffset = visible.length > shown.length ? 2 : 1;
  const lanes = new Map();
  agents.forEach((agent, i) => {
    const labelId = `lane-${i}`;
    const label = h("div", { class: "lane-label", id: labelId, text: agent });
    label.style.gridRow = String(i + rowOffset);
    const lane = h("ul", { class: "lane", "aria-labelledby": labelId, "data-testid": "lane" });
    lane.dataset.agent = agent;
    box.append(label, lane);
    lanes.set(agent, { lane, row: i + rowOffset });
  });
  const winnerSeqs = new Set();
  const selected = state.events.find((e) => e.id === state.selectedId);
  if (selected && selected.kind === "conflict") for (const c of selected.conflicts || []) winnerSeqs.add(c.commit_seq);
  shown.forEach((ev, col) => {
    const { lane, row } = lanes.get(ev.agent || "unknown");
    const parts = chipParts(ev);
    const chip = h(
      "button",
      {
        type: "button",
        class: `chip ${ev.kind}${ev.status && ev.status !== "ok" && ev.kind === "model_call" ? " error-status" : ""}`,
        "aria-pressed": ev.id === state.selectedId ? "true" : "false",
        "aria-label": chipLabel(ev, parts),
        title: chipLabel(ev, parts),
        "data-testid": `event-${ev.kind}`,
        onclick: () => selectEvent(ev.id),
      },
      h("span", { class: "k", text: parts.kind }),
      parts.main ? h("span", { class: "m", text: parts.main }) : null,
      parts.sub ? h("span", { class: "m", text: parts.sub }) : null,
      h("span", { class: "t", text: fmtTime(ev._ms) }),
    );
    chip.dataset.id = ev.id;
    if (ev.kind === "commit" && winnerSeqs.has(ev.seq)) chip.classList.add("winner");
    if (fresh.has(ev.id) && !first) chip.classList.add("fresh");
    const item = h("li", null, chip);
    item.style.gridRow = String(row);
    item.style.gridColumn = String(col + 2);
    lane.append(item);
  });
  box.scrollLeft = fresh.size && atEnd ? box.scrollWidth : scrollLeft;
  if (focused) {
    const again = [...box.querySelectorAll(".chip")].find((c) => c.dataset.id === focused);
    if (again) again.focus({ preventScroll: true });
  }
  renderAgents();
}

function renderAgents() {
  const table = clear($("agents"));
  const per = new Map();
  for (const ev of state.events) {
    const a = ev.agent || "unknown";
    if (!per.has(a)) per.set(a, { read: 0, commit: 0, conflict: 0, model_call: 0, tokens: 0, cost: 0 });
    const s = per.get(a);
    if (ev.kind === "read" || ev.kind === "list") s.read += 1;
    else if (ev.kind in s) s[ev.kind] += 1;
    if (ev.kind === "model_call") {
      s.tokens += (ev.input_tokens || 0) + (ev.output_tokens || 0);
      s.cost += ev.cost || 0;
    }
  }
  table.append(
    h("thead", null, h("tr", null,
      h("th", { scope: "col", text: "Agent" }),
      h("th", { scope: "col", class: "num", text: "Reads" }),
      h("th", { scope: "col", class: "num", text: "Commits" }),
      h("th", { scope: "col", class: "num", text: "Conflicts" }),
      h("th", { scope: "col", class: "num", text: "Model calls" }),
      h("th", { scope: "col", class: "num", text: "Tokens" }),
      h("th", { scope: "col", class: "num", text: "Cost" }),
    )),
  );
  const body = h("tbody");
  for (const [agent, s] of per) {
    body.append(h("tr", null,
      h("th", { scope: "row", class: "mono", text: agent }),
      h("td", { class: "num", text: fmtNum(s.read) }),
      h("td", { class: "num", text: fmtNum(s.commit) }),
      h("td", { class: `num${s.conflict ? " bad" : ""}`, text: fmtNum(s.conflict) }),
      h("td", { class: "num", text: fmtNum(s.model_call) }),
      h("td", { class: "num", text: fmtNum(s.tokens) }),
      h("td", { class: "num", text: s.model_call ? fmtCost(s.cost) : "—" }),
    ));
  }
  table.append(body);
}

function resetDetail() {
  const box = clear($("detail"));
  box.className = "detail";
  box.append(h("h3", { id: "detail-title", text: "Event details" }), h("p", { class: "note", text: "Select an event in the timeline." }));
}

/** Scroll the timeline horizontally so a chip is visible beside the sticky lane labels. */
function revealChip(chip) {
  const box = $("timeline");
  const label = box.querySelector(".lane-label");
  const left = chip.offsetLeft - (label ? label.offsetWidth : 0) - 8;
  const right = chip.offsetLeft + chip.offsetWidth + 8 - box.clientWidth;
  if (box.scrollLeft > left) box.scrollLeft = left;
  else if (box.scrollLeft < right) box.scrollLeft = right;
}

function selectEvent(id) {
  state.selectedId = id;
  renderTimeline();
  const ev = state.events.find((e) => e.id === id);
  if (!ev) return resetDetail();
  // Show the winning commit(s) of a conflict next to it (they are highlighted).
  const winner = $("timeline").querySelector(".chip.winner");
  if (winner) revealChip(winner);
  const box = clear($("detail"));
  box.className = `detail ${ev.kind}`;
  const title = { read: "Read", list: "Listing (range read)", commit: `Commit #${ev.seq}`, conflict: "Conflict (commit rejected, 409)", model_call: "Model call" }[ev.kind] || ev.kind;
  box.append(h("h3", { id: "detail-title", text: title }));
  const rows = [
    ["Agent", ev.agent],
    ["Session", ev.session || null],
    ["Time", fmtDateTime(ev._ms)],
  ];
  if (ev.kind === "read") rows.push(["Key", ev.key], ["Version", ev.version === 0 ? "0 (absent)" : ev.version]);
  if (ev.kind === "list") rows.push(["Prefix", ev.prefix === "" ? "(all)" : ev.prefix], ["Keys", (ev.keys || []).join(", ")]);
  if (ev.kind === "commit") {
    rows.push(["Seq", ev.seq], ["Commit id", ev.commit_id]);
    const v = ev.versions || {};
    rows.push(["Writes", Object.keys(v).map((k) => `${k} → v${v[k]}`).join(", ")]);
  }
  if (ev.kind === "model_call") {
    rows.push(
      ["Model", ev.model],
      ["Endpoint", ev.endpoint],
      ["Input tokens", fmtNum(ev.input_tokens)],
      ["Output tokens", fmtNum(ev.output_tokens)],
      ["Latency", Number.isFinite(ev.latency_ms) ? `${Math.round(ev.latency_ms)} ms` : null],
      ["Cost", ev.cost !== undefined ? fmtCost(ev.cost) : null],
      ["Status", ev.status],
    );
  }
  if (ev.kind === "conflict") {
    rows.push(["Conflicting keys", keysOf(ev).join(", ")], ["Writes attempted", (ev.keys || []).join(", ")]);
    if (ev.replayed) rows.push(["Replayed", "yes (same Idempotency-Key)"]);
  }
  if (ev.kind === "commit" && ev.replayed) rows.push(["Replayed", "yes (same Idempotency-Key)"]);
  rows.push(["Trace", ev.trace_id ? `${ev.trace_id} / ${ev.span_id || ""}` : null]);
  const dl = h("dl");
  for (const [k, v] of rows) {
    if (v === null || v === undefined || v === "") continue;
    dl.append(h("dt", { text: k }), h("dd", { text: String(v) }));
  }
  box.append(dl);
  if (ev.kind === "conflict" && Array.isArray(ev.conflicts)) {
    const table = h("table", { "aria-label": "Conflicting keys", "data-testid": "conflict-table" },
      h("thead", null, h("tr", null,
        h("th", { scope: "col", text: "Key" }),
        h("th", { scope: "col", text: "Kind" }),
        h("th", { scope: "col", class: "num", text: "Read version" }),
        h("th", { scope: "col", class: "num", text: "Current version" }),
        h("th", { scope: "col", text: "Winning commit" }),
      )),
      h("tbody", null, ev.conflicts.map((c) => h("tr", null,
        h("td", { class: "mono", text: c.key }),
        h("td", { text: c.kind }),
        h("td", { class: "num", text: fmtNum(c.read_version) }),
        h("td", { class: "num", text: fmtNum(c.current_version) }),
        h("td", { text: c.committed_by ? `${c.committed_by} (commit #${c.commit_seq})` : `commit #${c.commit_seq ?? "?"}` }),
      ))),
    );
    box.append(table);
  }
}

// ------------------------------------------------------------------ live updates (SSE over fetch)

function setLive(text, on) {
  const live = $("live");
  live.textContent = text;
  live.classList.toggle("on", !!on);
}

function stopLive() {
  if (state.live) state.live.abort();
  state.live = null;
  clearTimeout(state.refreshTimer);
  clearInterval(state.pollTimer);
  setLive("offline", false);
}

/** EventSource cannot send Authorization, so read the stream with fetch and parse SSE here. */
function startLive() {
  stopLive();
  const ctrl = new AbortController();
  state.live = ctrl;
  const space = state.space;
  let retryMs = 1000;
  let failures = 0;
  // Reads, conflicts and model calls produce no commit event: poll the trace now and then.
  state.pollTimer = setInterval(() => {
    if (state.source === "trace" && !document.hidden) scheduleRefresh(0);
  }, 5000);

  const connect = async () => {
    while (!ctrl.signal.aborted) {
      try {
        const headers = { ...authHeaders(), Accept: "text/event-stream" };
        headers["Last-Event-ID"] = String(state.lastSeq || 0);
        const res = await fetch(`${spacePath(space)}/events`, { headers, signal: ctrl.signal, cache: "no-store", credentials: "omit" });
        if (!res.ok) {
          let body = null;
          try { body = await res.json(); } catch { /* not JSON */ }
          throw new ApiError(res.status, body);
        }
        failures = 0;
        setLive("live", true);
        await readSSE(res.body, ctrl.signal, (ev) => {
          if (ev.retry) retryMs = ev.retry;
          if (ev.event === "commit" && ev.data) onCommitEvent(ev);
        });
      } catch (err) {
        if (ctrl.signal.aborted) return;
        failures += 1;
        if (err instanceof ApiError && (err.status === 401 || err.status === 403 || err.status === 404)) {
          setLive(`offline: ${explain(err)}`, false);
          return;
        }
      }
      if (ctrl.signal.aborted) return;
      setLive("reconnecting…", false);
      await sleep(Math.min(retryMs * 2 ** Math.min(failures, 4), 15000), ctrl.signal);
    }
  };
  connect();
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

/** Minimal SSE parser (WHATWG rules: fields id/event/data/retry, blank line dispatches). */
async function readSSE(stream, signal, onEvent) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let ev = { data: [], event: "", id: null, retry: null };
  const dispatch = () => {
    if (ev.data.length || ev.retry) onEvent({ event: ev.event || "message", id: ev.id, data: ev.data.join("\n"), retry: ev.retry });
    ev = { data: [], event: "", id: null, retry: null };
  };
  try {
    while (!signal.aborted) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let m;
      while ((m = /\r\n|\r|\n/.exec(buf))) {
        // A lone \r at the very end may be the first half of \r\n: wait for more input.
        if (m[0] === "\r" && m.index === buf.length - 1) break;
        const line = buf.slice(0, m.index);
        buf = buf.slice(m.index + m[0].length);
        if (line === "") { dispatch(); continue; }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "data") ev.data.push(val);
        else if (field === "event") ev.event = val;
        else if (field === "id" && !val.includes("\0")) ev.id = val;
        else if (field === "retry" && /^\d+$/.test(val)) ev.retry = Number(val);
      }
    }
  } finally {
    try { reader.cancel(); } catch { /* already closed */ }
  }
}

function onCommitEvent(ev) {
  let c;
  try {
    c = JSON.parse(ev.data);
  } catch {
    return;
  }
  const seq = Number(ev.id || c.seq);
  if (Number.isFinite(seq)) state.lastSeq = Math.max(state.lastSeq, seq);
  setLive(`live · #${c.seq} by ${c.committed_by}`, true);
  // The stream carries the whole log record: show it at once. The trace API has it (and the
  // reads and conflicts around it) after its next flush: refresh from there shortly.
  const added = addEvents([commitToEvent(c)]);
  if (state.source === "log") state.logAfter = Math.max(state.logAfter, c.seq);
  else scheduleRefresh(800);
  renderTimeline(new Set(added.map((e) => e.id)));
  const touched = (c.writes || []).map((w) => w.key);
  scheduleShardRefresh(touched);
}

function scheduleRefresh(ms) {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(() => loadTimeline(), ms);
}

let shardTimer = null;
let touchedKeys = new Set();
function scheduleShardRefresh(keys) {
  for (const k of keys) touchedKeys.add(k);
  clearTimeout(shardTimer);
  shardTimer = setTimeout(() => {
    const keysNow = touchedKeys;
    touchedKeys = new Set();
    loadShards(false);
    if (state.shard && keysNow.has(state.shard)) openShard(state.shard);
    loadSpaces();
  }, 250);
}

// ------------------------------------------------------------------ shards and history

async function loadShards(more) {
  const gen = state.generation;
  const list = $("shards");
  const q = new URLSearchParams({ limit: "100" });
  if (more && state.shardCursor) q.set("cursor", state.shardCursor);
  try {
    const body = await api(`${spacePath(state.space)}/shards?${q}`);
    if (gen !== state.generation) return;
    if (!more) clear(list);
    for (const s of body.shards || []) {
      const button = h(
        "button",
        {
          type: "button",
          "aria-current": s.key === state.shard ? "true" : "false",
          "aria-label": `${s.key}, version ${s.version}`,
          onclick: () => openShard(s.key),
        },
        h("span", { class: "key", text: s.key }),
        h("span", { class: "seq", text: `v${s.version}` }),
        h("span", { class: "meta", text: `by ${s.updated_by} · ${fmtTime(s.updated_at * 1000)}` }),
      );
      button.dataset.key = s.key;
      list.append(h("li", null, button));
    }
    if (!list.children.length) list.append(h("li", { class: "note", text: "No shards." }));
    state.shardCursor = body.next_cursor || null;
    $("more-shards").hidden = !state.shardCursor;
  } catch (err) {
    if (gen === state.generation) showError(explain(err));
  }
}

function resetHistory() {
  const box = clear($("history"));
  box.append(
    h("h3", { id: "history-title", text: "History" }),
    h("p", { class: "note", text: "Select a shard to see its versions, newest first, with line diffs." }),
  );
}

async function openShard(key) {
  const gen = state.generation;
  state.shard = key;
  for (const b of $("shards").querySelectorAll("button")) b.setAttribute("aria-current", b.dataset.key === key ? "true" : "false");
  let body;
  try {
    body = await api(`${spacePath(state.space)}/shards/${keyPath(key)}/history?limit=50`);
  } catch (err) {
    if (gen === state.generation) showError(explain(err));
    return;
  }
  if (gen !== state.generation || state.shard !== key) return;
  const box = clear($("history"));
  box.append(h("h3", { id: "history-title" }, "History of ", h("code", { text: key })));
  const versions = body.versions || [];
  versions.forEach((v, i) => {
    const older = versions[i + 1];
    const head = h("header", null,
      h("span", { class: "v", text: `v${v.version}` }),
      v.deleted ? h("span", { class: "tomb", text: "deleted" }) : null,
      h("span", { text: `commit #${v.seq}` }),
      h("span", { text: `by ${v.updated_by}` }),
      h("span", { class: "note", text: fmtDateTime(v.updated_at * 1000) }),
    );
    const newText = v.deleted ? [] : pretty(v.value);
    let lines;
    let caption;
    if (older) {
      lines = diffLines(older.deleted ? [] : pretty(older.value), newText);
      caption = `Changes from v${older.version} to v${v.version}`;
    } else {
      lines = newText.map((t) => ({ op: v.version === 1 ? "add" : "ctx", text: t }));
      caption = v.version === 1 ? `v${v.version} (created)` : `v${v.version} (oldest shown)`;
    }
    const same = older && lines.every((l) => l.op === "ctx");
    const body = same ? [h("div", { class: "diff-line gap", text: `Same value as v${older.version}.` })] : renderDiff(lines);
    const pre = h("div", { class: "diff", role: "group", "aria-label": caption, "data-testid": "diff" }, body);
    box.append(h("article", { class: "version", "aria-label": `Version ${v.version}`, "data-testid": "version" }, head, pre));
  });
  if (versions.length === 50) box.append(h("p", { class: "note", text: "Showing the newest 50 versions." }));
}

function pretty(value) {
  if (typeof value === "string") return value.split(/\r\n|\r|\n/);
  return JSON.stringify(value, null, 2).split("\n");
}

/** Line diff by longest common subsequence: [{op: "ctx"|"add"|"del", text}]. */
function diffLines(a, b) {
  let start = 0;
  while (start < a.length && start < b.length && a[start] === b[start]) start++;
  let endA = a.length;
  let endB = b.length;
  while (endA > start && endB > start && a[endA - 1] === b[endB - 1]) { endA--; endB--; }
  const out = a.slice(0, start).map((text) => ({ op: "ctx", text }));
  const x = a.slice(start, endA);
  const y = b.slice(start, endB);
  const n = x.length;
  const m = y.length;
  if (n * m > 4_000_000) {
    // Too big for a quadratic table: show it as a replacement.
    out.push(...x.map((text) => ({ op: "del", text })), ...y.map((text) => ({ op: "add", text })));
  } else {
    const w = m + 1;
    const lcs = new Uint32Array((n + 1) * w);
    for (let i = n - 1; i >= 0; i--) {
      for (let j = m - 1; j >= 0; j--) {
        lcs[i * w + j] = x[i] === y[j] ? lcs[(i + 1) * w + j + 1] + 1 : Math.max(lcs[(i + 1) * w + j], lcs[i * w + j + 1]);
      }
    }
    let i = 0;
    let j = 0;
    while (i < n && j < m) {
      if (x[i] === y[j]) { out.push({ op: "ctx", text: x[i] }); i++; j++; }
      else if (lcs[(i + 1) * w + j] >= lcs[i * w + j + 1]) { out.push({ op: "del", text: x[i] }); i++; }
      else { out.push({ op: "add", text: y[j] }); j++; }
    }
    while (i < n) out.push({ op: "del", text: x[i++] });
    while (j < m) out.push({ op: "add", text: y[j++] });
  }
  out.push(...a.slice(endA).map((text) => ({ op: "ctx", text })));
  return out;
}

/** Diff lines with unchanged runs longer than 2*CONTEXT+1 folded. */
function renderDiff(lines, context = 3) {
  const keep = new Array(lines.length).fill(false);
  const changed = lines.some((l) => l.op !== "ctx");
  lines.forEach((l, i) => {
    if (l.op !== "ctx") for (let k = Math.max(0, i - context); k <= Math.min(lines.length - 1, i + context); k++) keep[k] = true;
  });
  if (!changed) {
    // The oldest version shown (no older one to compare with): the whole value.
    if (!lines.length) return [h("div", { class: "diff-line gap", text: "(empty)" })];
    return lines.map((l) => h("div", { class: "diff-line ctx", "data-testid": "diff-line" }, "  " + l.text));
  }
  const nodes = [];
  const line = (l) => {
    const sign = l.op === "add" ? "+ " : l.op === "del" ? "- " : "  ";
    return h("div", { class: `diff-line ${l.op}`, "data-testid": "diff-line" }, sign + l.text);
  };
  let gap = [];
  const flush = () => {
    // Fold a run of unchanged lines, unless folding would hide just one line.
    if (gap.length === 1) nodes.push(line(gap[0]));
    else if (gap.length) nodes.push(h("div", { class: "diff-line gap", text: `… ${plural(gap.length, "unchanged line")}` }));
    gap = [];
  };
  lines.forEach((l, i) => {
    if (!keep[i]) {
      gap.push(l);
      return;
    }
    flush();
    nodes.push(line(l));
  });
  flush();
  return nodes;
}

// ------------------------------------------------------------------ usage and budgets

async function loadUsage() {
  const box = $("usage");
  const note = $("usage-note");
  const setNote = (text) => { note.textContent = text; note.hidden = !text; };
  try {
    const body = await api("/v1/usage");
    setNote("");
    renderUsage(body.principals || [], body.tenant_budget ? { subject: `tenant ${body.tenant}`, ...body.tenant_budget } : null);
    return;
  } catch (err) {
    if (!(err instanceof ApiError) || !(err.code === "route_not_found" || err.status === 403)) {
      clear(box);
      setNote(explain(err));
      return;
    }
    setNote(
      err.status === 403
        ? "This token may not see every principal's usage (GET /v1/usage): showing your own budget (GET /v1/budget)."
        : "This server has no per-principal usage API yet (GET /v1/usage): showing your own budget (GET /v1/budget).",
    );
  }
  try {
    const own = await api("/v1/budget");
    renderOwnBudget(own);
  } catch (err) {
    clear(box);
    setNote(`${note.textContent} ${explain(err)}`);
  }
}

const USED_FIELDS = [
  ["requests", "Requests"],
  ["input_tokens", "Input tokens"],
  ["output_tokens", "Output tokens"],
  ["tokens", "Tokens"],
  ["cost", "Cost"],
];

function kvList(obj) {
  if (!obj || typeof obj !== "object") return h("span", { class: "note", text: "—" });
  // Unset limits are null; a window of 0 s means "no window" (the budget never resets).
  const parts = Object.entries(obj).filter(
    ([k, v]) => v !== null && v !== undefined && typeof v !== "object" && !(k.startsWith("window") && !v),
  );
  if (!parts.length) return h("span", { class: "note", text: "unlimited" });
  return h("ul", { class: "kv" }, parts.map(([k, v]) => h("li", null, h("span", { class: "note", text: `${k}: ` }), k.includes("cost") ? fmtCost(v) : fmtNum(v))));
}

function renderUsage(principals, tenantRow) {
  const box = clear($("usage"));
  if (tenantRow) principals = [...principals, tenantRow];
  if (!principals.length) {
    box.append(h("p", { class: "note", text: "No broker usage yet." }));
    return;
  }
  const cols = USED_FIELDS.filter(([f]) => principals.some((p) => p.used && p.used[f] !== undefined));
  const table = h("table", { "aria-label": "Usage per principal", "data-testid": "usage-table" },
    h("thead", null, h("tr", null,
      h("th", { scope: "col", text: "Principal" }),
      cols.map(([, label]) => h("th", { scope: "col", class: "num", text: label })),
      h("th", { scope: "col", text: "Budgets" }),
      h("th", { scope: "col", text: "Remaining" }),
    )),
    h("tbody", null, principals.map((p) => h("tr", null,
      h("th", { scope: "row" }, h("span", { class: "mono", text: p.subject }), p.token_id ? h("div", { class: "note mono", text: p.token_id }) : null),
      cols.map(([f]) => h("td", { class: "num", text: f === "cost" ? fmtCost((p.used || {})[f]) : fmtNum((p.used || {})[f]) })),
      h("td", null, kvList(p.budgets)),
      h("td", null, kvList(p.remaining)),
    ))),
  );
  box.append(table);
}

function renderOwnBudget(own) {
  const box = clear($("usage"));
  const scopes = Object.entries(own.scopes || {});
  const table = h("table", { "aria-label": "Your budget", "data-testid": "usage-table" },
    h("thead", null, h("tr", null,
      h("th", { scope: "col", text: "Scope" }),
      h("th", { scope: "col", class: "num", text: "Requests" }),
      h("th", { scope: "col", class: "num", text: "Tokens" }),
      h("th", { scope: "col", class: "num", text: "Cost" }),
      h("th", { scope: "col", text: "Limits" }),
      h("th", { scope: "col", text: "Remaining" }),
    )),
    h("tbody", null, scopes.map(([name, s]) => h("tr", null,
      h("th", { scope: "row", class: "mono", text: name.startsWith("t:") ? `tenant ${name.slice(2)}` : name.slice(2) }),
      h("td", { class: "num", text: fmtNum((s.used || {}).requests) }),
      h("td", { class: "num", text: fmtNum((s.used || {}).tokens) }),
      h("td", { class: "num", text: fmtCost((s.used || {}).cost) }),
      h("td", null, kvList(s.limits)),
      h("td", null, kvList(s.remaining)),
    ))),
  );
  box.append(table);
}

// ------------------------------------------------------------------ wiring

function init() {
  $("token").value = state.token;
  $("agent-id").value = state.agentId;
  $("auth-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token").value.trim();
    state.agentId = $("agent-id").value.trim();
    if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
    else sessionStorage.removeItem(TOKEN_KEY);
    if (state.agentId) sessionStorage.setItem(AGENT_KEY, state.agentId);
    else sessionStorage.removeItem(AGENT_KEY);
    const space = state.space;
    stopLive();
    signIn().then(() => { if (space) openSpace(space); });
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = "";
    $("token").value = "";
    stopLive();
    state.space = null;
    state.generation += 1;
    state.authGeneration += 1;
    showSections(false);
    $("usage-section").hidden = true;
    clear($("spaces"));
    $("whoami").textContent = "Token forgotten.";
  });
  $("refresh-spaces").addEventListener("click", loadSpaces);
  $("refresh-timeline").addEventListener("click", () => loadTimeline());
  $("refresh-shards").addEventListener("click", () => loadShards(false));
  $("more-shards").addEventListener("click", () => loadShards(true));
  $("refresh-usage").addEventListener("click", loadUsage);
  for (const box of document.querySelectorAll('input[name="kind"]')) {
    box.addEventListener("change", () => {
      if (box.checked) state.kinds.add(box.value);
      else state.kinds.delete(box.value);
      renderTimeline();
    });
  }
  window.addEventListener("hashchange", () => {
    const wanted = hashSpace();
    if (wanted && wanted !== state.space) openSpace(wanted);
  });
  signIn();
}

document.addEventListener("DOMContentLoaded", init);
