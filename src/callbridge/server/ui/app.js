// The callbridge console: plain ES module, no build step, no third-party code.
// Every string from the server (numbers, transcripts, details) goes into the page as text
// (textContent, text nodes, SVG <title> text): never as HTML.

const TOKEN_KEY = "callbridge.token";
const PAGE_SIZE = 25;
const SVG = "http://www.w3.org/2000/svg";

const state = {
  token: null,
  live: new Map(), // call SID -> summary from the live feed
  socket: null,
  retry: null,
  offset: 0,
  offsets: [], // offsets of the pages before this one (for "Newer")
  nextOffset: null,
  call: null, // the record shown on the call page
  watching: null,
  notLiveHere: null, // the call SID this server last said was not live here
};

const $ = (id) => document.getElementById(id);

// -- small DOM helpers (text only) ----------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, String(value));
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

function svg(tag, attrs = {}, title = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (title !== null) {
    const t = document.createElementNS(SVG, "title");
    t.textContent = title;
    node.append(t);
  }
  return node;
}

function clear(node) {
  node.replaceChildren();
  return node;
}

function callLink(sid) {
  return el("a", { href: "#/call/" + encodeURIComponent(sid), class: "sid-link" }, sid);
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "";
  const s = Math.max(0, Math.floor(seconds));
  const m = Math.floor(s / 60);
  return `${m}:${String(s % 60).padStart(2, "0")}`;
}

function fmtTime(iso) {
  if (!iso) return "";
  return iso.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "");
}

function showMessage(text, kind = "error") {
  const node = $("message");
  node.textContent = text;
  node.dataset.kind = kind;
  node.hidden = !text;
}

// -- the API, always with the Bearer header -------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${state.token}`, ...(options.headers || {}) };
  let resp;
  try {
    resp = await fetch(path, { ...options, headers, cache: "no-store" });
  } catch (err) {
    throw new ApiError(0, "the server cannot be reached");
  }
  let body = null;
  try {
    body = await resp.json();
  } catch (err) {
    body = null;
  }
  if (!resp.ok) {
    const why = body && typeof body.error === "string" ? body.error : `HTTP ${resp.status}`;
    if (resp.status === 401 && state.token) {
      signOut("Wrong API token: the server refused it. Enter the token set in CALLBRIDGE_API_TOKEN.");
    } else if (resp.status === 503 && why.includes("CALLBRIDGE_API_TOKEN")) {
      disabled();
    }
    throw new ApiError(resp.status, why);
  }
  return body;
}

// -- sign-in --------------------------------------------------------------------------------

function readTokenFromHash() {
  const match = location.hash.match(/^#token=(.+)$/);
  if (!match) return;
  localStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
  // The token leaves the address bar (and the history) at once.
  history.replaceState(null, "", location.pathname + location.search + "#/");
}

function signOut(why = "") {
  localStorage.removeItem(TOKEN_KEY);
  state.token = null;
  closeFeed();
  for (const id of ["home", "call"]) $(id).hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  showMessage(why);
}

function disabled() {
  closeFeed();
  for (const id of ["home", "call", "sign-in"]) $(id).hidden = true;
  $("sign-out").hidden = true;
  showMessage(
    "This server has no API token configured (CALLBRIDGE_API_TOKEN is not set): the console and the /calls API are disabled.",
  );
}

async function signIn(token) {
  state.token = token;
  try {
    const summary = await api("/ui/api/summary");
    localStorage.setItem(TOKEN_KEY, token);
    $("sign-in").hidden = true;
    $("sign-out").hidden = false;
    showMessage("");
    fillReasons(summary.known_end_reasons || []);
    openFeed();
    route();
    renderSummary(summary);
  } catch (err) {
    if (err.status !== 401 && err.status !== 503) showMessage(`Cannot sign in: ${err.message}`);
  }
}

// -- live feed (WebSocket; the token is its first message, never in the URL) ----------------

function openFeed() {
  closeFeed();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}/ui/api/live`);
  state.socket = socket;
  socket.addEventListener("open", () => {
    socket.send(JSON.stringify({ token: state.token }));
  });
  socket.addEventListener("message", (event) => {
    let msg;
    try {
      msg = JSON.parse(event.data);
    } catch (err) {
      return;
    }
    if (msg.type === "hello") {
      state.live.clear();
      setFeedStatus("on");
      if (state.watching) socket.send(JSON.stringify({ watch: state.watching }));
      renderLive();
    } else if (msg.type === "update") {
      applyUpdate(msg);
    } else if (msg.type === "error") {
      showMessage(`Live feed: ${msg.error}`);
    }
  });
  socket.addEventListener("close", (event) => {
    if (state.socket !== socket) return;
    state.socket = null;
    setFeedStatus("off");
    if (event.code === 1008) {
      if (state.token) signOut("Wrong API token: the live feed refused it.");
      return;
    }
    if (state.token) state.retry = setTimeout(openFeed, 2000);
  });
}

function closeFeed() {
  clearTimeout(state.retry);
  const socket = state.socket;
  state.socket = null;
  if (socket) socket.close();
  setFeedStatus("off");
}

function setFeedStatus(value) {
  const node = $("feed-status");
  node.dataset.state = value;
  node.textContent = `live feed: ${value}`;
}

function watch(sid) {
  state.watching = sid;
  if (state.socket && state.socket.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify({ watch: sid }));
  }
}

function applyUpdate(msg) {
  for (const call of msg.calls || []) {
    state.live.set(call.call_sid, call);
    // The call on screen went live here (e.g. a page opened before the feed listed it).
    if (state.call && state.call.call_sid === call.call_sid && state.watching !== call.call_sid && !call.end_reason) {
      state.notLiveHere = null;
      watch(call.call_sid);
    }
  }
  for (const gone of msg.ended || []) state.live.delete(gone.call_sid);
  if ((msg.calls || []).length || (msg.ended || []).length) {
    renderLive();
    if (!$("home").hidden && (msg.ended || []).length) loadRecords();
  }
  const w = msg.watched;
  if (w && state.call && w.call_sid === state.call.call_sid) {
    if (w.live) {
      const rec = state.call;
      w.transcript.forEach((line, i) => {
        rec.transcript[w.transcript_from + i] = line;
      });
      w.timeline.forEach((event, i) => {
        rec.timeline[w.timeline_from + i] = event;
      });
      renderCall(rec, true);
    } else {
      // Not live here (over, or held by another process): the stored record says the rest.
      state.notLiveHere = w.call_sid;
      loadCall(w.call_sid);
    }
  }
}

// -- calls now ------------------------------------------------------------------------------

function renderLive() {
  const body = clear($("live-calls").tBodies[0]);
  const calls = [...state.live.values()].sort((a, b) => (a.started_at < b.started_at ? 1 : -1));
  for (const c of calls) {
    const button = el("button", { type: "button", class: "hangup", "data-sid": c.call_sid }, "Hang up");
    button.addEventListener("click", () => hangup(c.call_sid, button));
    const last = c.last_line ? `${c.last_line.role}: ${c.last_line.text}` : "";
    body.append(
      el(
        "tr",
        { "data-sid": c.call_sid },
        el("td", { class: "sid" }, callLink(c.call_sid)),
        el("td", {}, c.from ?? ""),
        el("td", {}, c.to ?? ""),
        el("td", {}, c.direction ?? ""),
        el("td", { class: "duration", "data-started": c.started_at ?? "" }, liveDuration(c.started_at)),
        el("td", { class: "state" }, c.state),
        el("td", { class: `speaking speaking-${c.speaking}` }, c.speaking === "agent" ? "agent" : "caller"),
        el("td", { class: "line", title: last }, last),
        el("td", {}, button),
      ),
    );
  }
  $("live-count").textContent = String(calls.length);
  $("live-empty").hidden = calls.length > 0;
}

function liveDuration(startedAt) {
  if (!startedAt) return "";
  return fmtDuration((Date.now() - Date.parse(startedAt)) / 1000);
}

function tickDurations() {
  for (const cell of document.querySelectorAll("#live-calls td.duration")) {
    cell.textContent = liveDuration(cell.dataset.started);
  }
  const rec = state.call;
  if (rec && rec.status === "active" && rec.started_at && !$("call").hidden) {
    const cell = document.querySelector("dd[data-fact='duration']");
    if (cell) cell.textContent = `${((Date.now() - Date.parse(rec.started_at)) / 1000).toFixed(1)} s`;
  }
}

async function hangup(sid, button) {
  if (!window.confirm(`Hang up call ${sid}? The caller is disconnected and the call ends hangup_requested.`)) {
    return;
  }
  if (button) button.disabled = true;
  try {
    const record = await api(`/calls/${encodeURIComponent(sid)}/hangup`, { method: "POST" });
    showMessage(`Call ${sid} hung up (${record.end_reason || "ending"}).`, "info");
  } catch (err) {
    showMessage(`Hang-up of ${sid} failed: ${err.message}`);
    if (button) button.disabled = false;
  }
}

// -- at a glance ----------------------------------------------------------------------------

async function loadSummary() {
  try {
    renderSummary(await api("/ui/api/summary"));
  } catch (err) {
    if (err.status !== 401) $("per-minute-caption").textContent = `calls per minute: ${err.message}`;
  }
}

function renderSummary(summary) {
  const chart = clear($("per-minute"));
  const width = 600, height = 120, top = 10, bottom = 20;
  const end = Math.floor(Date.now() / 60000);
  const start = end - 60;
  const counts = new Map();
  for (const row of summary.per_minute || []) counts.set(Math.floor(Date.parse(row.minute) / 60000), row.calls);
  const peak = Math.max(1, ...counts.values());
  const slot = width / 61;
  chart.append(svg("line", { x1: 0, y1: height - bottom, x2: width, y2: height - bottom, class: "axis" }));
  const total = (summary.per_minute || []).reduce((sum, row) => sum + row.calls, 0);
  for (let m = start; m <= end; m++) {
    const n = counts.get(m) || 0;
    if (!n) continue;
    const h = ((height - top - bottom) * n) / peak;
    const when = new Date(m * 60000).toISOString().slice(11, 16);
    chart.append(
      svg("rect", { x: (m - start) * slot + 1, y: height - bottom - h, width: slot - 2, height: h, class: "bar" }, `${when} UTC: ${n} calls`),
    );
  }
  chart.append(svg("text", { x: 0, y: height - 5 }, null));
  chart.lastChild.textContent = "-60 min";
  chart.append(svg("text", { x: width - 30, y: height - 5 }, null));
  chart.lastChild.textContent = "now";
  chart.append(svg("text", { x: 0, y: top }, null));
  chart.lastChild.textContent = `max ${peak}/min`;
  $("per-minute-caption").textContent = `calls started per minute, last hour: ${total} in all`;

  const body = clear($("end-reasons").tBodies[0]);
  const reasons = Object.entries(summary.end_reasons || {}).sort((a, b) => b[1] - a[1]);
  for (const [reason, n] of reasons) body.append(el("tr", {}, el("td", {}, reason), el("td", {}, n)));
  if (!reasons.length) body.append(el("tr", {}, el("td", { colspan: 2, class: "muted" }, "no calls in the last hour")));
}

function fillReasons(reasons) {
  const select = $("f-reason");
  if (select.options.length > 1) return;
  for (const r of reasons) select.append(el("option", { value: r }, r));
}

// -- recent calls (server-side filters and paging) ------------------------------------------

function localToIso(value) {
  // datetime-local is the browser's local time; the server wants an ISO time with an offset.
  return value ? new Date(value).toISOString() : "";
}

async function loadRecords() {
  const params = new URLSearchParams({ view: "brief", limit: String(PAGE_SIZE), offset: String(state.offset) });
  const reason = $("f-reason").value, status = $("f-status").value;
  const since = localToIso($("f-since").value), until = localToIso($("f-until").value);
  if (reason) params.set("end_reason", reason);
  if (status) params.set("status", status);
  if (since) params.set("since", since);
  if (until) params.set("until", until);
  let page;
  try {
    page = await api(`/calls?${params}`);
  } catch (err) {
    showMessage(`Recent calls: ${err.message}`);
    return;
  }
  state.nextOffset = page.next_offset;
  const body = clear($("records").tBodies[0]);
  for (const r of page.calls) {
    body.append(
      el(
        "tr",
        { "data-sid": r.call_sid },
        el("td", {}, fmtTime(r.started_at)),
        el("td", { class: "sid" }, callLink(r.call_sid)),
        el("td", {}, r.from ?? ""),
        el("td", {}, r.to ?? ""),
        el("td", {}, r.direction ?? ""),
        el("td", {}, r.duration_s === null ? "" : `${r.duration_s.toFixed(1)} s`),
        el("td", {}, r.status ?? ""),
        el("td", { class: "reason" }, r.end_reason ?? ""),
      ),
    );
  }
  if (!page.calls.length) body.append(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "no calls match")));
  const pageNo = state.offsets.length + 1;
  $("page-label").textContent = `page ${pageNo} (calls ${state.offset + 1}-${state.offset + page.calls.length})`;
  $("prev-page").disabled = state.offsets.length === 0;
  $("next-page").disabled = state.nextOffset === null;
}

// -- one call -------------------------------------------------------------------------------

async function loadCall(sid) {
  let record;
  try {
    record = await api(`/calls/${encodeURIComponent(sid)}`);
  } catch (err) {
    showMessage(`Call ${sid}: ${err.message}`);
    return;
  }
  if (location.hash !== `#/call/${encodeURIComponent(sid)}`) return; // moved on meanwhile
  const live = record.status === "active" && state.live.has(sid);
  state.call = record;
  // Followed live while the records say it is, unless this server just said it is not here.
  watch(record.status === "active" && (state.notLiveHere !== sid || live) ? sid : null);
  renderCall(record, live);
}

// What the timeline's event names mean, for people.
const LABELS = {
  "call.started": "media stream started",
  "agent.connected": "agent connected",
  "agent.interrupted": "caller interrupted the agent (audio cleared)",
  "agent.end_call": "agent ended the conversation (end_call)",
  "agent.closed": "agent session closed",
  "agent.tool": "agent used a tool",
  "tool.call": "client tool called",
  "caller.dtmf": "caller pressed a key",
  "caller.stop": "caller hung up (stream stop)",
  "telephony.closed": "media stream closed",
  "call.ending": "call ending",
  "phone.last_mark": "caller heard the last goodbye mark",
  "phone.request_hangup": "hang-up requested from Twilio",
  "phone.hangup": "Twilio answered the hang-up",
  "phone.hangup_failed": "hang-up failed",
  "phone.redirect": "call redirected",
  "call.ended": "call ended",
};

// The events named on the drawing itself (the others: hover, or the table below).
const SHORT = {
  "agent.interrupted": "interrupted",
  "caller.dtmf": "key",
  "caller.stop": "caller hung up",
  "phone.last_mark": "last mark",
  "phone.request_hangup": "hang-up",
  "phone.hangup": "Twilio: done",
  "call.ended": "ended",
};

const LANES = [
  ["caller", "caller"],
  ["agent", "agent"],
  ["phone", "phone"],
  ["end", "end"],
];

function laneOf(event) {
  const name = event.event || "";
  if (name.startsWith("caller.")) return "caller";
  if (name.startsWith("agent.") || name.startsWith("tool.")) return "agent";
  if (name.startsWith("call.ending") || name.startsWith("call.ended")) return "end";
  return "phone";
}

function detailOf(event) {
  return Object.entries(event)
    .filter(([k]) => k !== "t" && k !== "event")
    .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)
    .join(" ");
}

// Everything with a time, in seconds from the call's start: the timeline, the transcript
// lines, the last goodbye mark and Twilio's status callbacks.
function timedEvents(rec) {
  const out = [];
  for (const e of rec.timeline || []) {
    if (e && typeof e.t === "number") {
      out.push({ t: e.t, lane: laneOf(e), label: e.event, what: LABELS[e.event] || "", detail: detailOf(e) });
    }
  }
  for (const line of rec.transcript || []) {
    if (!line || typeof line.t !== "number") continue;
    const lane = line.role === "agent" ? "agent" : "caller";
    const label = line.role === "agent" ? "agent speech" : "caller speech";
    out.push({ t: line.t, lane, label, what: "", detail: (line.interrupted ? "(interrupted) " : "") + (line.text ?? "") });
  }
  const started = Date.parse(rec.started_at || "");
  for (const ev of rec.twilio_events || []) {
    // Twilio's Timestamp (RFC 2822) is to the second.
    const at = Date.parse(typeof ev.Timestamp === "string" ? ev.Timestamp : "");
    if (Number.isNaN(started) || Number.isNaN(at)) continue;
    out.push({ t: (at - started) / 1000, lane: "phone", label: `Twilio status ${ev.status ?? ""}`, what: "status callback (time to the second)", detail: "" });
  }
  return out.sort((a, b) => a.t - b.t);
}

function renderCall(rec, live) {
  $("home").hidden = true;
  $("call").hidden = false;
  $("call-sid").textContent = rec.call_sid;
  $("call-live").hidden = !live;

  const facts = clear($("call-facts"));
  const duration = rec.duration_s ?? (rec.started_at ? (Date.now() - Date.parse(rec.started_at)) / 1000 : null);
  const rows = [
    ["status", rec.status],
    ["end reason", rec.end_reason ?? (live ? "(live)" : "")],
    ["end detail", rec.end_detail ?? ""],
    ["from", rec.from ?? ""],
    ["to", rec.to ?? ""],
    ["direction", rec.direction ?? ""],
    ["started (UTC)", fmtTime(rec.started_at)],
    ["duration", duration === null ? "" : `${duration.toFixed(1)} s`],
    ["Twilio status", rec.twilio_status ?? ""],
  ];
  for (const [k, v] of rows) facts.append(el("dt", {}, k), el("dd", { "data-fact": k }, v));

  const latency = rec.metrics ? rec.metrics.hangup_latency_ms : null;
  $("call-latency").textContent =
    typeof latency === "number"
      ? `Hang-up requested ${latency} ms after the caller heard the last goodbye mark.`
      : live
        ? ""
        : "No hang-up after a goodbye on this call (no hang-up latency).";

  drawTimeline(rec, live);
  renderTranscript(rec.transcript || []);
  $("raw-json").textContent = JSON.stringify(rec, null, 2);
}

// Events on their lanes, to scale between t0 and t1 (seconds from the call's start);
// the axis in seconds (unit "s", scale 1) or milliseconds (unit "ms", scale 1000) from t0.
function drawLanes(chart, events, t0, t1, scale, unit) {
  clear(chart);
  const width = 1000, left = 70, right = 20, laneH = 40, top = 15;
  const span = Math.max(t1 - t0, 1e-6);
  const x = (t) => left + ((width - left - right) * Math.min(Math.max(0, t - t0), span)) / span;
  LANES.forEach(([lane, label], i) => {
    const y = top + i * laneH + laneH / 2;
    chart.append(svg("line", { x1: left, y1: y, x2: width - right, y2: y, class: "axis" }));
    const text = svg("text", { x: 0, y: y + 4, class: "lane-label" });
    text.textContent = label;
    chart.append(text);
  });
  const laneY = Object.fromEntries(LANES.map(([lane], i) => [lane, top + i * laneH + laneH / 2]));
  // The hang-up latency: from the last goodbye mark heard to the hang-up request.
  const heard = events.find((e) => e.label === "phone.last_mark");
  const asked = events.find((e) => e.label === "phone.request_hangup");
  if (heard && asked) {
    const y = laneY.phone;
    chart.append(svg("line", { x1: x(heard.t), y1: y, x2: x(asked.t), y2: y, class: "phone latency", "stroke-width": 6 }, "hang-up latency"));
  }
  const flips = {};
  for (const e of events) {
    const y = laneY[e.lane];
    const words = e.label.endsWith("speech") ? e.detail : SHORT[e.label];
    if (words) {
      flips[e.lane] = ((flips[e.lane] || 0) + 1) % 2;
      const at = x(e.t);
      const anchor = at > width * 0.8 ? "end" : "start";
      const label = svg("text", { x: at + (anchor === "end" ? -6 : 6), y: y - 8 - flips[e.lane] * 10, class: "ev-label", "text-anchor": anchor });
      label.textContent = words.length > 28 ? `${words.slice(0, 27)}…` : words;
      chart.append(label);
    }
    const title = `${e.t.toFixed(3)} s ${e.label} ${e.what || ""} ${e.detail}`;
    const shape =
      e.lane === "end"
        ? svg("rect", { x: x(e.t) - 3, y: y - 9, width: 6, height: 18, class: `${e.lane} ev` }, title)
        : svg("circle", { cx: x(e.t), cy: y, r: 5, class: `${e.lane} ev` }, title);
    shape.setAttribute("data-event", e.label);
    chart.append(shape);
  }
  const axisY = top + LANES.length * laneH + 5;
  for (let i = 0; i <= 4; i++) {
    const t = t0 + (span * i) / 4;
    const tick = svg("text", { x: x(t) - (i === 4 ? 40 : 0), y: axisY + 12 });
    const shown = (t - (unit === "ms" ? t0 : 0)) * scale;
    tick.textContent = unit === "ms" ? `+${shown.toFixed(0)} ms` : `${shown.toFixed(1)} s`;
    chart.append(tick);
  }
}

function drawTimeline(rec, live) {
  const events = timedEvents(rec);
  const now = rec.started_at ? (Date.now() - Date.parse(rec.started_at)) / 1000 : 0;
  const span = Math.max(1, rec.duration_s ?? 0, live ? now : 0, ...events.map((e) => e.t));
  drawLanes($("timeline"), events, 0, span, 1, "s");
  // The end, zoomed: from the last goodbye mark (else the start of the ending) to the end, in ms.
  const ending = events.find((e) => e.label === "call.ending");
  const ended = events.find((e) => e.label === "call.ended");
  const zoom = $("timeline-end");
  $("timeline-end-box").hidden = !(ending && ended);
  if (ending && ended) {
    const heard = events.find((e) => e.label === "phone.last_mark");
    const from = heard ? heard.t : ending.t;
    const pad = Math.max(0.002, (ended.t - from) * 0.05);
    const last = events.filter((e) => e.t >= from - pad && e.t <= ended.t + pad);
    drawLanes(zoom, last, from - pad, ended.t + pad, 1000, "ms");
  }

  const body = clear($("events").tBodies[0]);
  for (const e of events) {
    body.append(
      el(
        "tr",
        { "data-event": e.label },
        el("td", {}, e.t.toFixed(3)),
        el("td", {}, e.lane),
        el("td", {}, e.label),
        el("td", {}, e.what),
        el("td", {}, e.detail),
      ),
    );
  }
}

function renderTranscript(lines) {
  const list = clear($("transcript"));
  for (const line of lines) {
    if (!line) continue;
    const role = line.role === "agent" ? "agent" : "user";
    const item = el(
      "li",
      { class: role },
      el("span", { class: "who" }, `${role === "agent" ? "agent" : "caller"} · ${typeof line.t === "number" ? line.t.toFixed(1) + " s" : ""}`),
      el("span", { class: "text" }, line.text ?? ""),
    );
    if (line.interrupted) item.append(el("span", { class: "cut" }, " (interrupted)"));
    list.append(item);
  }
}

// -- routing --------------------------------------------------------------------------------

function route() {
  if (!state.token) return;
  const match = location.hash.match(/^#\/call\/(.+)$/);
  if (match) {
    const sid = decodeURIComponent(match[1]);
    $("home").hidden = true;
    $("call").hidden = false;
    loadCall(sid);
    return;
  }
  state.call = null;
  watch(null);
  $("call").hidden = true;
  $("home").hidden = false;
  renderLive();
  loadRecords();
  loadSummary();
}

function init() {
  readTokenFromHash();
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token-input").value.trim();
    if (token) signIn(token);
  });
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    state.offset = 0;
    state.offsets = [];
    loadRecords();
  });
  $("next-page").addEventListener("click", () => {
    if (state.nextOffset === null) return;
    state.offsets.push(state.offset);
    state.offset = state.nextOffset;
    loadRecords();
  });
  $("prev-page").addEventListener("click", () => {
    if (!state.offsets.length) return;
    state.offset = state.offsets.pop();
    loadRecords();
  });
  window.addEventListener("hashchange", route);
  setInterval(tickDurations, 1000);
  setInterval(() => {
    if (state.token && !$("home").hidden) loadSummary();
  }, 30000);
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) {
    signIn(token);
  } else {
    probe();
  }
}

// Without a stored token: a server with no token configured says so (503) before any sign-in.
async function probe() {
  try {
    await api("/ui/api/summary");
  } catch (err) {
    if (err.status === 503 && err.message.includes("CALLBRIDGE_API_TOKEN")) return;
  }
  $("sign-in").hidden = false;
}

init();
