// The live page: polls GET /timeline for what changed since the last answer (?since=STEP), keeps the last 30 s,
// and draws them as the comparison's timeline figure does: running and waiting per step above, a row per request
// below (waiting, prefill, decoding; finished and preempted marked). Vanilla JS and canvas, no build step.
"use strict";

const WINDOW_S = 30;  // seconds shown and kept
const POLL_MS = 500;  // between two /timeline requests
const FRAME_MS = 50;  // at most 20 redraws a second, however many requests are in view
const RATE_WINDOW_S = 5;  // tokens/s over the last 5 s
const IDLE_S = 1;  // no step for this long: the engine is idle, nothing runs or waits
const MAX_EXTRAPOLATION_S = 2;  // the clock runs on between answers, but freezes if they stop coming
const KEY_STORE = "effective-batching-key";
const PHASE_COLORS = {waiting: "#c9c9c9", preempted: "#c9c9c9", prefill: "#f28e2b", decoding: "#4e79a7"};
const FINISHED_COLOR = "#222", PREEMPTED_COLOR = "#d62728", WAITING_LINE = "#7f7f7f", AXIS = "#888";
const MARGIN = {left: 44, right: 8, top: 6, bottom: 18};

const state = {
  origin: null,  // the server's origin_unix: a new one means a new server, so start over
  since: 0,  // the last step received
  steps: [],  // in step order, the last WINDOW_S seconds
  requests: new Map(),  // id -> the request's latest record
  serverNow: 0,  // the server's clock (s) when the last answer was made ...
  receivedAt: 0,  // ... and performance.now() when it arrived
  rows: [],  // the requests drawn last, top to bottom (for the tooltip)
  failing: false,  // the status line shows why polling fails
};

const $ = (id) => document.getElementById(id);

function say(message) {
  $("status").textContent = message;
}

function fail(message) {
  state.failing = true;
  say(message);
}

function authHeaders() {
  const key = $("key").value.trim();
  return key ? {"Authorization": "Bearer " + key} : {};
}

// ---- data ----

async function poll() {
  try {
    const resp = await fetch(`/timeline?since=${state.since}`, {headers: authHeaders(), cache: "no-store"});
    if (resp.status === 401) {
      fail("This server needs its API key: type it into the key field.");
    } else if (!resp.ok) {
      fail(`/timeline answered HTTP ${resp.status}`);
    } else {
      merge(await resp.json());
    }
  } catch (e) {
    fail("cannot reach the server: " + e.message);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function merge(data) {
  if (data.origin_unix !== state.origin) {
    const increment = state.since !== 0;
    Object.assign(state, {origin: data.origin_unix, since: 0, steps: []});
    state.requests.clear();
    if (increment) return;  // an increment of another server's steps: ask again for everything
  }
  for (const step of data.steps) state.steps.push(step);
  for (const request of data.requests) state.requests.set(request.id, request);
  Object.assign(state, {since: data.step, serverNow: data.now, receivedAt: performance.now()});
  forgetBefore(data.now - WINDOW_S);
  showServer(data);
}

function forgetBefore(t) {
  const first = state.steps.findIndex((s) => s.start + s.duration >= t);
  state.steps.splice(0, first === -1 ? state.steps.length : first);
  for (const [id, r] of state.requests) {
    if (r.finish !== null && r.finish < t) state.requests.delete(id);
  }
}

function serverTime() {
  const elapsed = (performance.now() - state.receivedAt) / 1000;
  return state.serverNow + Math.min(elapsed, MAX_EXTRAPOLATION_S);
}

function phaseNow(request) {
  const phase = request.phases[request.phases.length - 1][1];
  return phase === "preempted" ? "waiting" : phase;
}

// ---- text ----

function showServer(data) {
  $("policy").textContent = data.policy;
  $("model").textContent = `${data.model} (${data.weights} weights) on ${data.device}, ${data.dtype}; ` +
    `MAX_BATCH ${data["max-batch"]}; worker pid ${data.pid}`;
  $("warning").hidden = !data.warning;
  $("warning").textContent = data.warning ? "Note: " + data.warning : "";
  if (state.failing) {
    state.failing = false;
    say("");
  }
}

function showFigures(now) {
  const recent = state.steps.filter((s) => s.start >= now - RATE_WINDOW_S);
  const tokens = recent.reduce((sum, s) => sum + s.sampled, 0);
  const last = state.steps[state.steps.length - 1];
  const busy = last && now - (last.start + last.duration) < IDLE_S;
  $("tokens-per-s").textContent = (tokens / RATE_WINDOW_S).toFixed(1);
  $("batch").textContent = busy ? last.running : 0;
  $("waiting").textContent = busy ? last.waiting : 0;
  $("kv-usage").textContent = busy ? `${(100 * last.kv_usage).toFixed(1)}%` : "0.0%";
}

function showSummary(rows) {
  const count = {waiting: 0, prefill: 0, decoding: 0, finished: 0};
  for (const r of rows) count[phaseNow(r)] += 1;
  $("summary").textContent = `${rows.length} requests in view: ${count.waiting} waiting, ` +
    `${count.prefill} in prefill, ${count.decoding} decoding, ${count.finished} finished`;
  const canvas = $("timeline");  // for tests and scripts
  canvas.dataset.rows = rows.length;
  canvas.dataset.finished = count.finished;
}

// ---- drawing ----

function surface(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const plot = {x: MARGIN.left, y: MARGIN.top, w: width - MARGIN.left - MARGIN.right,
                h: height - MARGIN.top - MARGIN.bottom};
  return {ctx, plot};
}

// x pixel of server time t, now at the right edge
function xScale(plot, now) {
  return (t) => plot.x + (t - now + WINDOW_S) / WINDOW_S * plot.w;
}

function timeAxis(ctx, plot, x, now) {
  ctx.fillStyle = AXIS;
  ctx.strokeStyle = "#eee";
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "center";
  for (let ago = WINDOW_S; ago >= 0; ago -= 5) {
    const px = x(now - ago);
    ctx.beginPath();
    ctx.moveTo(px, plot.y);
    ctx.lineTo(px, plot.y + plot.h);
    ctx.stroke();
    ctx.fillText(ago === 0 ? "now" : `−${ago} s`, Math.min(px, plot.x + plot.w - 12), plot.y + plot.h + 13);
  }
}

function drawCounts(now) {
  const {ctx, plot} = surface($("counts"));
  const x = xScale(plot, now);
  timeAxis(ctx, plot, x, now);
  const top = Math.max(1, ...state.steps.map((s) => Math.max(s.running, s.waiting)));
  const y = (v) => plot.y + plot.h - v / top * plot.h;
  ctx.fillStyle = PHASE_COLORS.decoding;
  for (const s of state.steps) {
    const x0 = x(s.start);
    ctx.fillRect(x0, y(s.running), Math.max(x(s.start + s.duration) - x0, 1), plot.h + plot.y - y(s.running));
  }
  ctx.strokeStyle = WAITING_LINE;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  state.steps.forEach((s, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(s.start), y(s.waiting)));
  ctx.stroke();
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.fillStyle = AXIS;
  ctx.fillText(String(top), plot.x - 4, plot.y + 9);
  ctx.fillText("0", plot.x - 4, plot.y + plot.h);
  ctx.textAlign = "left";
  ctx.fillStyle = PHASE_COLORS.decoding;
  ctx.fillText("running", plot.x + 4, plot.y + 10);
  ctx.fillStyle = WAITING_LINE;
  ctx.fillText("waiting", plot.x + 56, plot.y + 10);
}

function drawTimeline(now) {
  const {ctx, plot} = surface($("timeline"));
  const x = xScale(plot, now);
  timeAxis(ctx, plot, x, now);
  const rows = [...state.requests.values()].sort((a, b) => a.arrival - b.arrival || a.id - b.id);
  const rowH = Math.min(14, plot.h / Math.max(rows.length, 1));
  const barH = Math.max(rowH > 4 ? rowH - 2 : rowH, 0.5);
  ctx.save();
  ctx.beginPath();
  ctx.rect(plot.x, plot.y, plot.w, plot.h);
  ctx.clip();
  rows.forEach((r, i) => {
    const y = plot.y + i * rowH;
    r.phases.forEach(([t, phase], k) => {
      if (phase === "finished") return;
      const end = k + 1 < r.phases.length ? r.phases[k + 1][0] : now;
      ctx.fillStyle = PHASE_COLORS[phase];
      ctx.fillRect(x(t), y, Math.max(x(end) - x(t), 1), barH);
      if (phase === "preempted") mark(ctx, x(t), y, rowH, PREEMPTED_COLOR);
    });
    if (r.finish !== null) mark(ctx, x(r.finish), y, rowH, FINISHED_COLOR);
  });
  ctx.restore();
  state.rows = rows;
  showSummary(rows);
  return {plot, rowH};
}

function mark(ctx, px, y, height, color) {
  ctx.fillStyle = color;
  ctx.fillRect(px - 1, y - 0.5, 2, height + 1);
}

let layout = null;
let lastFrame = 0;

function frame(t) {
  if (state.origin !== null && t - lastFrame >= FRAME_MS) {
    lastFrame = t;
    const now = serverTime();
    drawCounts(now);
    layout = drawTimeline(now);
    showFigures(now);
  }
  requestAnimationFrame(frame);
}

// ---- interaction ----

function describe(r) {
  const since = (t) => (t === null ? "–" : `${(t - r.arrival).toFixed(2)} s`);
  const lines = [
    `${r.request_id}: ${r.prompt_tokens} prompt tokens, ${r.max_tokens} asked, now ${phaseNow(r)}`,
    `waited ${since(r.admitted ?? serverTime())}; first token after ${since(r.first_token)}; ` +
      `preempted ${r.preemptions}×`,
  ];
  if (r.finish !== null) lines.push(`finished (${r.finish_reason}) after ${since(r.finish)}`);
  return lines.join("\n");
}

function onHover(event) {
  if (!layout) return;
  const canvas = $("timeline");
  const row = Math.floor((event.offsetY - layout.plot.y) / layout.rowH);
  canvas.title = row >= 0 && row < state.rows.length ? describe(state.rows[row]) : "";
}

async function fireBurst() {
  const body = {requests: Number($("burst-requests").value), wait: Number($("burst-wait").value)};
  try {
    const resp = await fetch("/demo-burst", {method: "POST", body: JSON.stringify(body),
                                             headers: {"Content-Type": "application/json", ...authHeaders()}});
    const answer = await resp.json();
    say(resp.ok ? `sent ${answer.requests} requests, U(0,1) × ${answer.wait} s apart`
                : `the burst was refused: ${answer.error ? answer.error.message : resp.status}`);
  } catch (e) {
    fail("cannot reach the server: " + e.message);
  }
}

$("key").value = localStorage.getItem(KEY_STORE) || "";
$("key").addEventListener("input", () => localStorage.setItem(KEY_STORE, $("key").value.trim()));
$("burst").addEventListener("click", fireBurst);
$("timeline").addEventListener("mousemove", onHover);
poll();
requestAnimationFrame(frame);
