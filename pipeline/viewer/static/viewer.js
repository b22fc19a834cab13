// The live page: one WebSocket carries the state on connect, then every change, and binary previews.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const withToken = (url) => token ? `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}` : url;
const $ = (id) => document.getElementById(id);
// latencies: capture -> drawn on this page; transport: the server's send -> drawn (ms, last 300 each)
const stats = window.viewerStats = { previews: 0, latencies: [], transport: [], messages: 0 };
const view = { sweep: null, curve: [], best: null };

function fmt(value, digits = 1) { return value === null || value === undefined ? "-" : Number(value).toFixed(digits); }
function gaText(weeks) {
  if (weeks === null || weeks === undefined) return "GA -";
  const days = Math.round(weeks * 7);
  return `GA ${Math.floor(days / 7)}w ${days % 7}d`;
}

function showSweep(sweep) {
  view.sweep = sweep;
  $("sweep-state").textContent = sweep
    ? `sweep ${sweep.sweep_id} ${sweep.state} (${sweep.reason})${sweep.case !== null && sweep.case !== undefined ? ", case " + sweep.case : ""}`
    : "no sweep";
  $("sweep-state").dataset.state = sweep ? sweep.state : "none";
  $("curve-sweep").textContent = sweep ? `sweep ${sweep.sweep_id}` : "";
}

function drawCurve() {
  const canvas = $("curve"), g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.strokeStyle = "#333"; g.strokeRect(0, 0, canvas.width, canvas.height);
  const points = view.curve;
  $("curve-points").textContent = points.length;
  if (!points.length) return;
  const first = points[0][0], last = points[points.length - 1][0], span = Math.max(1, last - first);
  const x = (id) => 4 + (id - first) / span * (canvas.width - 8);
  const y = (score) => canvas.height - 4 - Math.max(0, Math.min(1, score)) * (canvas.height - 8);
  const sorted = [...points].sort((a, b) => a[0] - b[0]);
  g.strokeStyle = "#4af"; g.beginPath();
  sorted.forEach(([id, score], i) => i ? g.lineTo(x(id), y(score)) : g.moveTo(x(id), y(score)));
  g.stroke();
  const best = view.best && view.best.sweep_id === (view.sweep && view.sweep.sweep_id) ? view.best : null;
  if (best && best.frame_id !== null) {
    g.fillStyle = "#fc3"; g.beginPath(); g.arc(x(best.frame_id), y(best.score), 5, 0, 2 * Math.PI); g.fill();
  }
}

function showBest(best) {
  view.best = best;
  $("best").textContent = best && best.frame_id !== null ? `frame ${best.frame_id}, score ${fmt(best.score, 3)}` : "-";
  drawCurve();
}

function showHealth(h) {
  if (!h) return;
  $("health-fps").textContent = `${fmt(h.fps_in)} / ${fmt(h.fps_out)}`;
  $("health-e2e").textContent = h.e2e_ms ? `${fmt(h.e2e_ms.p50)} / ${fmt(h.e2e_ms.p99)} ms` : "-";
  $("health-frames").textContent = h.frames ? `${h.frames.read} / ${h.frames.scored} / ${h.frames.dropped}` : "-";
  $("health-drops").textContent = h.drops ? Object.entries(h.drops).map(([k, v]) => `${k} ${v}`).join(", ") : "-";
  const sum = (v) => typeof v === "object" && v !== null ? Object.values(v).reduce((a, b) => a + sum(b), 0) : (v || 0);
  const reconnects = (h.source ? h.source.reconnects : 0) + (h.engine ? h.engine.reconnects : 0);
  $("health-restarts").textContent = `${sum(h.restarts)} / ${reconnects}`;
  $("health-stages").textContent = h.stages ? Object.entries(h.stages).map(([k, v]) => `${k} ${v}`).join(", ") : "-";
}

function biometryText(b) {
  if (!b) return "AC measuring…";  // the final biometry follows its best frame
  if (b.status !== "ok") return `AC not measured (${b.status})`;
  const size = b.unit === "mm" ? `AC ${fmt(b.ac_mm)} mm` : `AC ${fmt(b.ac_px, 0)} px (uncalibrated)`;
  return `${size}, ${gaText(b.ga_weeks)}, confidence ${fmt(b.confidence, 2)}`;
}

function showCard(card) {
  const box = $("cards");
  box.querySelector(".empty")?.remove();
  let el = box.querySelector(`[data-sweep="${card.sweep_id}"]`);
  if (!el) {
    el = document.createElement("div");
    el.className = "card"; el.dataset.sweep = card.sweep_id;
    box.prepend(el);
  }
  el.innerHTML = "";
  if (card.annotated_png) {
    const img = document.createElement("img");
    img.className = "annotated"; img.alt = `sweep ${card.sweep_id} best frame`;
    img.src = withToken(card.annotated_png);
    el.append(img);
  }
  const caption = document.createElement("p");
  caption.textContent = card.frame_id === null
    ? `sweep ${card.sweep_id}: no best frame (${card.reason})`
    : `sweep ${card.sweep_id}, frame ${card.frame_id}, score ${fmt(card.score, 3)}: ${biometryText(card.biometry)}`;
  el.append(caption);
}

function showExam(exam) {
  const box = $("exams");
  box.querySelector(".empty")?.remove();
  const el = document.createElement("div");
  el.className = "exam";
  const flags = exam.flags && exam.flags.length ? ` [${exam.flags.join(", ")}]` : "";
  const head = document.createElement("p");
  head.innerHTML = `<b>exam ${exam.exam}</b> (case ${exam.case}, ${exam.reason}): ` +
    `AC ${fmt(exam.ac_mm)} mm &plusmn; ${fmt(exam.spread_mm)}, ${gaText(exam.ga_weeks)} ` +
    `from ${exam.used_sweeps ? exam.used_sweeps.length : 0} of ${exam.sweeps.length} sweeps ` +
    `(${exam.rule.replaceAll("_", " ")})<span class="flag">${flags}</span>`;
  el.append(head);
  if (exam.annotated_png) {
    const img = document.createElement("img");
    img.src = withToken(exam.annotated_png); img.alt = `exam ${exam.exam}`;
    el.append(img);
  }
  box.prepend(el);
}

function onMessage(message) {
  stats.messages += 1;
  switch (message.type) {
    case "state":
      showSweep(message.sweep);
      view.curve = message.curve;
      showBest(message.best);
      $("cards").innerHTML = ""; message.cards.forEach(showCard);
      $("exams").innerHTML = ""; message.exams.forEach(showExam);
      showHealth(message.health);
      break;
    case "score":
      if (view.sweep && message.sweep_id === view.sweep.sweep_id) { view.curve.push([message.frame_id, message.score]); drawCurve(); }
      break;
    case "sweep":
      if (!view.sweep || view.sweep.sweep_id !== message.sweep.sweep_id) { view.curve = []; view.best = null; }
      showSweep(message.sweep); drawCurve();
      break;
    case "best": showBest(message.best); break;
    case "card": showCard(message.card); break;
    case "exam": showExam(message.exam); break;
    case "health": showHealth(message.health); break;
  }
}

async function onPreview(buffer, socket) {
  const length = new DataView(buffer).getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, length)));
  const bitmap = await createImageBitmap(new Blob([new Uint8Array(buffer, 4 + length)], { type: "image/jpeg" }));
  const canvas = $("live"), g = canvas.getContext("2d");
  if (canvas.width !== header.width || canvas.height !== header.height) { canvas.width = header.width; canvas.height = header.height; }
  g.drawImage(bitmap, 0, 0);
  g.strokeStyle = "#fc3"; g.lineWidth = 1.5;
  for (const line of header.outline) {
    g.beginPath();
    line.forEach(([px, py], i) => i ? g.lineTo(px, py) : g.moveTo(px, py));
    g.closePath(); g.stroke();
  }
  socket.send("ack");
  const now = Date.now();
  stats.previews += 1;
  stats.latencies.push(now - header.t_capture * 1000);
  stats.transport.push(now - header.t_sent * 1000);
  if (stats.latencies.length > 300) { stats.latencies.shift(); stats.transport.shift(); }
  const sorted = [...stats.latencies].sort((a, b) => a - b);
  $("preview-count").textContent = stats.previews;
  $("preview-frame").textContent = header.frame_id;
  $("preview-latency").textContent = fmt(sorted[Math.floor(sorted.length / 2)], 0);
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(withToken(`${scheme}://${location.host}/ws`));
  socket.binaryType = "arraybuffer";
  socket.onopen = () => { $("connection").textContent = "live"; $("connection").className = "on"; };
  socket.onclose = () => {
    $("connection").textContent = "disconnected"; $("connection").className = "off";
    setTimeout(connect, 1000);
  };
  socket.onmessage = (e) => typeof e.data === "string" ? onMessage(JSON.parse(e.data)) : onPreview(e.data, socket);
}

async function command(name) {
  const reply = await fetch(withToken("/api/command"), {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ command: name }),
  }).then((r) => r.json()).catch((e) => ({ ok: false, error: String(e) }));
  $("command-reply").textContent = reply.ok ? `${name}: ok` : `${name}: ${reply.error}`;
}

$("start").onclick = () => command("start");
$("stop").onclick = () => command("stop");
$("exam-end").onclick = () => command("exam_end");
connect();
