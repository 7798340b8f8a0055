// The live page: a lane per engine of the server (with one engine, no lane titles: the page as it always was).
// For each engine it polls GET /timeline?engine=N for what changed since that engine's last answer
// (?since=STEP: steps are numbered per engine), keeps the last 30 s, and draws them as the comparison's timeline
// figure does: running and waiting per step above, a row per request below (waiting, prefill, decoding; finished
// and preempted marked, and a green triangle at the admission of a request that found part of its prompt in the
// prefix cache: cached tokens take no time, so they get a mark, not a width). Each lane's figures line ends with
// the share of prompt tokens that came from the prefix cache over the 30 s. The figures at the top add the engines
// up. Vanilla JS and canvas, no build step.
"use strict";

const WINDOW_S = 30;  // seconds shown and kept
const POLL_MS = 500;  // between two rounds of /timeline requests
const FRAME_MS = 50;  // at most 20 redraws a second, however many requests are in view
const RATE_WINDOW_S = 5;  // tokens/s over the last 5 s
const IDLE_S = 1;  // no step for this long: the engine is idle, nothing runs or waits
const MAX_EXTRAPOLATION_S = 2;  // the clock runs on between answers, but freezes if they stop coming
const KEY_STORE = "effective-batching-key";
const PHASE_COLORS = {waiting: "#c9c9c9", preempted: "#c9c9c9", prefill: "#f28e2b", decoding: "#4e79a7"};
const FINISHED_COLOR = "#222", PREEMPTED_COLOR = "#d62728", CACHE_HIT_COLOR = "#2ca02c";
const WAITING_LINE = "#7f7f7f", AXIS = "#888";
const MARGIN = {left: 44, right: 8, top: 6, bottom: 18};

const page = {
  lanes: [],  // one per engine, in engine order
  failing: false,  // the status line shows why polling fails
};

const $ = (id) => document.getElementById(id);

function say(message) {
  $("status").textContent = message;
}

function fail(message) {
  page.failing = true;
  say(message);
}

function authHeaders() {
  const key = $("key").value.trim();
  return key ? {"Authorization": "Bearer " + key} : {};
}

// ---- lanes ----

// An engine's record and where it is drawn. Each engine has its own clock (origin) and step numbers.
function newLane(engine, section) {
  const lane = {
    engine,
    view: laneView(section, engine),
    origin: null,  // the engine's origin_unix: a new one means a new engine process, so start over
    since: 0,  // the last step received
    steps: [],  // in step order, the last WINDOW_S seconds
    requests: new Map(),  // id -> the request's latest record
    serverNow: 0,  // the engine's clock (s) when the last answer was made ...
    receivedAt: 0,  // ... and performance.now() when it arrived
    rows: [],  // the requests drawn last, top to bottom (for the tooltip)
    layout: null,  // where the rows were drawn last (for the tooltip)
  };
  lane.view.timeline.addEventListener("mousemove", (event) => onHover(lane, event));
  return lane;
}

// Engine 0's parts keep the ids the page has always had (scripts and tests use them); engine N's end in -N.
function laneId(name, engine) {
  return engine === 0 ? name : `${name}-${engine}`;
}

function laneView(section, engine) {
  const title = section.querySelector(".lane-title");
  const [counts, timeline, summary] = ["counts", "timeline", "summary"].map((name) => $(laneId(name, engine)));
  const figures = document.createElement("span");
  figures.className = "muted";
  title.replaceChildren(`Engine ${engine} `, figures);
  return {section, title, figures, counts, timeline, summary};
}

// Engine N >= 1's lane, from the template, after the last lane.
function addLane(engine) {
  const section = $("lane-template").content.firstElementChild.cloneNode(true);
  section.id = `lane-${engine}`;
  section.dataset.engine = engine;
  for (const name of ["counts", "timeline", "summary"]) section.querySelector("." + name).id = laneId(name, engine);
  page.lanes[page.lanes.length - 1].view.section.after(section);
  return newLane(engine, section);
}

function fitLanes(engines) {
  const count = Math.max(1, engines);
  while (page.lanes.length > count) page.lanes.pop().view.section.remove();
  while (page.lanes.length < count) page.lanes.push(addLane(page.lanes.length));
  const several = count > 1;
  if (several === document.body.classList.contains("several-engines")) return;
  document.body.classList.toggle("several-engines", several);
  // the legend explains every lane: above them all with several, above engine 0's rows with one
  if (several) $("lanes-heading").after($("legend"));
  else $("timeline").before($("legend"));
}

// ---- data ----

async function poll() {
  const failures = (await Promise.all(page.lanes.map(pollLane))).filter(Boolean);
  if (failures.length) {
    fail(failures[0]);
  } else if (page.failing) {
    page.failing = false;
    say("");
  }
  setTimeout(poll, POLL_MS);
}

// Asks for what changed on the lane's engine; returns why that failed, or null.
async function pollLane(lane) {
  const which = page.lanes.length > 1 ? `engine ${lane.engine}: ` : "";
  try {
    const resp = await fetch(`/timeline?engine=${lane.engine}&since=${lane.since}`,
                             {headers: authHeaders(), cache: "no-store"});
    if (resp.status === 401) return "This server needs its API key: type it into the key field.";
    if (!resp.ok) return `${which}/timeline answered HTTP ${resp.status}`;
    merge(lane, await resp.json());
    return null;
  } catch (e) {
    return "cannot reach the server: " + e.message;
  }
}

function merge(lane, data) {
  if (data.origin_unix !== lane.origin) {
    const increment = lane.since !== 0;
    Object.assign(lane, {origin: data.origin_unix, since: 0, steps: []});
    lane.requests.clear();
    if (increment) return;  // an increment of another process's steps: ask again for everything
  }
  for (const step of data.steps) lane.steps.push(step);
  for (const request of data.requests) lane.requests.set(request.id, request);
  Object.assign(lane, {since: data.step, serverNow: data.now, receivedAt: performance.now()});
  forgetBefore(lane, data.now - WINDOW_S);
  fitLanes(data.engines ?? 1);
  showServer(data);
}

function forgetBefore(lane, t) {
  const first = lane.steps.findIndex((s) => s.start + s.duration >= t);
  lane.steps.splice(0, first === -1 ? lane.steps.length : first);
  for (const [id, r] of lane.requests) {
    if (r.finish !== null && r.finish < t) lane.requests.delete(id);
  }
}

function serverTime(lane) {
  const elapsed = (performance.now() - lane.receivedAt) / 1000;
  return lane.serverNow + Math.min(elapsed, MAX_EXTRAPOLATION_S);
}

function phaseNow(request) {
  const phase = request.phases[request.phases.length - 1][1];
  return phase === "preempted" ? "waiting" : phase;
}

// ---- text ----

function showServer(data) {
  const engines = data.engines ?? 1;
  $("policy").textContent = data.policy;
  $("model").textContent = `${data.model} (${data.weights} weights) on ${data.device}, ${data.dtype}; ` +
    `MAX_BATCH ${data["max-batch"]}${engines > 1 ? ` per engine, ${engines} engines` : ""}; worker pid ${data.pid}`;
  $("warning").hidden = !data.warning;
  $("warning").textContent = data.warning ? "Note: " + data.warning : "";
}

function percent(share) {
  return `${(100 * share).toFixed(1)}%`;
}

// The share of prompt tokens found in the prefix cache, or "–" when no prompt came in.
function cacheShare(cached, computed) {
  return cached + computed ? percent(cached / (cached + computed)) : "–";
}

// What the lane's engine did over the last RATE_WINDOW_S, and runs now; its prompt tokens over the window, found
// in the prefix cache (cached) or prefilled (computed).
function laneFigures(lane, now) {
  const recent = lane.steps.filter((s) => s.start >= now - RATE_WINDOW_S);
  const last = lane.steps[lane.steps.length - 1];
  const busy = last && now - (last.start + last.duration) < IDLE_S;
  const sum = (steps, name) => steps.reduce((total, s) => total + (s[name] ?? 0), 0);
  return {tokensPerS: sum(recent, "sampled") / RATE_WINDOW_S,
          running: busy ? last.running : 0, waiting: busy ? last.waiting : 0, kvUsage: busy ? last.kv_usage : 0,
          cached: sum(lane.steps, "cached_tokens"), computed: sum(lane.steps, "prefill_tokens")};
}

function showLaneFigures(lane, f) {
  lane.view.figures.textContent = `${f.tokensPerS.toFixed(1)} tokens/s · batch ${f.running} · ` +
    `${f.waiting} waiting · KV ${percent(f.kvUsage)} · cache ${cacheShare(f.cached, f.computed)}`;
}

function showFigures(figures) {
  const total = (name) => figures.reduce((sum, f) => sum + f[name], 0);
  $("tokens-per-s").textContent = total("tokensPerS").toFixed(1);
  $("batch").textContent = total("running");
  $("waiting").textContent = total("waiting");
  // every engine has a KV cache of the same size, so the mean of their shares is the server's
  $("kv-usage").textContent = percent(total("kvUsage") / figures.length);
  $("cache-share").textContent = cacheShare(total("cached"), total("computed"));
}

function showSummary(lane, rows) {
  const count = {waiting: 0, prefill: 0, decoding: 0, finished: 0};
  for (const r of rows) count[phaseNow(r)] += 1;
  const hits = rows.filter(cacheHit).length;
  lane.view.summary.textContent = `${rows.length} requests in view: ${count.waiting} waiting, ` +
    `${count.prefill} in prefill, ${count.decoding} decoding, ${count.finished} finished` +
    (hits ? `; ${hits} found part of their prompt in the prefix cache` : "");
  const canvas = lane.view.timeline;  // for tests and scripts
  canvas.dataset.rows = rows.length;
  canvas.dataset.finished = count.finished;
  canvas.dataset.cacheHits = hits;
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

// The lanes share their scales, so that engines compare at a glance: the count at the top of the strips, and the
// row height (as for the lane with the most requests in view).
function sharedScale(lanes) {
  return {
    top: lanes.reduce((top, lane) => lane.steps.reduce((m, s) => Math.max(m, s.running, s.waiting), top), 1),
    rows: lanes.reduce((most, lane) => Math.max(most, lane.requests.size), 1),
  };
}

function drawCounts(lane, now, top) {
  const {ctx, plot} = surface(lane.view.counts);
  const x = xScale(plot, now);
  timeAxis(ctx, plot, x, now);
  const y = (v) => plot.y + plot.h - v / top * plot.h;
  ctx.fillStyle = PHASE_COLORS.decoding;
  for (const s of lane.steps) {
    const x0 = x(s.start);
    ctx.fillRect(x0, y(s.running), Math.max(x(s.start + s.duration) - x0, 1), plot.h + plot.y - y(s.running));
  }
  ctx.strokeStyle = WAITING_LINE;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  lane.steps.forEach((s, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(s.start), y(s.waiting)));
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

function drawTimeline(lane, now, maxRows) {
  const {ctx, plot} = surface(lane.view.timeline);
  const x = xScale(plot, now);
  timeAxis(ctx, plot, x, now);
  const rows = [...lane.requests.values()].sort((a, b) => a.arrival - b.arrival || a.id - b.id);
  const rowH = Math.min(14, plot.h / maxRows);
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
    if (cacheHit(r)) hitMark(ctx, x(r.admitted), y, rowH);
  });
  ctx.restore();
  lane.rows = rows;
  showSummary(lane, rows);
  return {plot, rowH};
}

function mark(ctx, px, y, height, color) {
  ctx.fillStyle = color;
  ctx.fillRect(px - 1, y - 0.5, 2, height + 1);
}

// Admitted with part of its prompt in the prefix cache (null before its admission)
function cacheHit(request) {
  return request.cached_tokens > 0;
}

// A triangle pointing into the prefill, centred on the row; at least 6 px tall, or thin rows would hide it.
function hitMark(ctx, px, y, rowH) {
  const h = Math.max(rowH + 1, 6), w = 0.8 * h, middle = y + rowH / 2;
  ctx.fillStyle = CACHE_HIT_COLOR;
  ctx.beginPath();
  ctx.moveTo(px - w / 2, middle - h / 2);
  ctx.lineTo(px + w / 2, middle);
  ctx.lineTo(px - w / 2, middle + h / 2);
  ctx.fill();
}

// Each lane on its engine's clock: every lane's right edge is now.
function draw(lanes) {
  const scale = sharedScale(lanes);
  const figures = lanes.map((lane) => {
    const now = serverTime(lane);
    drawCounts(lane, now, scale.top);
    lane.layout = drawTimeline(lane, now, scale.rows);
    const f = laneFigures(lane, now);
    showLaneFigures(lane, f);
    return f;
  });
  showFigures(figures);
}

let lastFrame = 0;

function frame(t) {
  const shown = page.lanes.filter((lane) => lane.origin !== null);
  if (shown.length && t - lastFrame >= FRAME_MS) {
    lastFrame = t;
    draw(shown);
  }
  requestAnimationFrame(frame);
}

// ---- interaction ----

function describe(lane, r) {
  const since = (t) => (t === null ? "–" : `${(t - r.arrival).toFixed(2)} s`);
  const cached = cacheHit(r) ? ` (${r.cached_tokens} found in the prefix cache)` : "";
  const lines = [
    `${r.request_id}: ${r.prompt_tokens} prompt tokens${cached}, ${r.max_tokens} asked, now ${phaseNow(r)}`,
    `waited ${since(r.admitted ?? serverTime(lane))}; first token after ${since(r.first_token)}; ` +
      `preempted ${r.preemptions}×`,
  ];
  if (r.finish !== null) lines.push(`finished (${r.finish_reason}) after ${since(r.finish)}`);
  return lines.join("\n");
}

function onHover(lane, event) {
  if (!lane.layout) return;
  const row = Math.floor((event.offsetY - lane.layout.plot.y) / lane.layout.rowH);
  lane.view.timeline.title = row >= 0 && row < lane.rows.length ? describe(lane, lane.rows[row]) : "";
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
page.lanes.push(newLane(0, $("lane-0")));  // the others once the server says how many engines it has
poll();
requestAnimationFrame(frame);
