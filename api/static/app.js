// The TID dashboard: jobs, a job's live plots, compare. Plain JS over the REST API (no build);
// the job page follows the job's Server-Sent Events (read with fetch, which can send the key).
"use strict";

const KEY = "tid.apiKey";
const FINAL = ["succeeded", "failed", "cancelled"];
const PALETTE = ["#2f5bea", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#0b7285", "#5c940d"];
const EXAMPLE_SPEC = {
  name: "my-job",
  student: { arch: "fcos", backbone: "resnet18", fpn_channels: 64 },
  dataset: { builtin: "shapes", num_train: 64, num_val: 16, image_size: 64 },
  schedule: { epochs: 2, batch_size: 8, log_every: 1 },
  resources: { num_workers: 0 },
};
let leave = () => {};  // stops the current page's streams and timers

// --- helpers --------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children.flat()) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

class ApiError extends Error {}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY)}`, ...options.headers };
  const response = await fetch(path, { ...options, headers });
  if (response.ok) return response;
  let detail = response.statusText;
  try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
  if (response.status === 401) {  // a wrong or revoked key: back to the login form
    sessionStorage.removeItem(KEY);
    if (!document.getElementById("login-form")) route();
  }
  throw new ApiError(`${response.status} ${detail}`);
}

const json = async (path, options) => (await api(path, options)).json();
const fmt = (v, digits = 1) => (v === null || v === undefined ? "-" : Number(v).toFixed(digits));
const stateBadge = (state) => el("span", { class: `state ${state}`, "data-state": state }, state);

function duration(job) {
  if (!job.started_at) return "-";
  const end = job.finished_at ? new Date(job.finished_at) : new Date();
  const s = Math.round((end - new Date(job.started_at)) / 1000);
  return s < 120 ? `${s} s` : s < 7200 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`;
}

function modelName(m) {
  return m ? `${m.arch} ${m.backbone}-FPN${m.fpn_channels ?? ""}` : "-";
}

// Server-Sent Events over fetch: EventSource cannot send an Authorization header.
async function followEvents(jobId, onEvent, signal) {
  let after = 0;
  while (!signal.aborted) {
    try {
      const response = await api(`/v1/jobs/${jobId}/events`, {
        headers: { "Last-Event-ID": String(after) }, signal,
      });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;  // the server ends the stream once the job is final
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const fields = {};
          for (const line of frame.split("\n")) {
            const at = line.indexOf(":");
            if (at > 0) fields[line.slice(0, at)] = line.slice(at + 1).trimStart();
          }
          if (fields.data === undefined) continue;  // a keep-alive comment
          after = Number(fields.id);
          onEvent(fields.event, JSON.parse(fields.data));
        }
      }
    } catch (err) {
      if (signal.aborted || err instanceof ApiError) return;
      await new Promise((r) => setTimeout(r, 2000));  // dropped: resume after the last event
    }
  }
}

// Tick labels for small values such as learning rates (uPlot's default keeps 3 decimals, so
// 0.0015 and 0.002 both read "0.002"): scientific notation with the fewest significant digits
// that write every tick exactly enough for the spacing between ticks (so they differ), trailing
// zeros trimmed: 5e-4, 1e-3, 1.5e-3, 2e-3.
function sciTicks(splits) {
  const shown = splits.filter((v) => v !== null && v !== undefined);
  let gap = Infinity;
  for (let i = 1; i < shown.length; i++) gap = Math.min(gap, Math.abs(shown[i] - shown[i - 1]));
  const label = (v, digits) => (v === 0 ? "0"
    : v.toExponential(digits).replace(/\.?0+e/, "e").replace("e+", "e"));
  let digits = 0;
  while (digits < 15 && !shown.every((v) => Math.abs(Number(label(v, digits)) - v) <= gap * 1e-3)) {
    digits++;
  }
  return splits.map((v) => (v === null || v === undefined ? v : label(v, digits)));
}

// An axis as wide as its longest tick label (uPlot's y axis is a fixed 50 px).
function fitAxis(u, values, axisIdx, cycleNum) {
  const axis = u.axes[axisIdx];
  if (cycleNum > 1) return axis._size;
  const longest = (values || []).map(String).reduce((a, v) => (v.length > a.length ? v : a), "");
  u.ctx.font = axis.font[0];
  const text = longest ? u.ctx.measureText(longest).width / devicePixelRatio : 0;
  return Math.max(50, Math.ceil(axis.ticks.size + axis.gap + text + 4));
}

// A uPlot chart whose series grow; `data-points` tells tests (and curious people) its size and,
// with a `yTicks` format, `data-y-ticks` the y tick labels last drawn (a canvas hides them).
class Chart {
  constructor(parent, title, { xLabel = "step", log = false, yTicks = null } = {}) {
    this.box = el("div", { class: "card chart", "data-title": title, "data-points": "0" },
      el("h2", {}, title));
    this.box.hidden = true;  // until it has a point: a plain-training job has no TID terms
    parent.append(this.box);
    this.xLabel = xLabel;
    this.log = log;
    this.yTicks = yTicks;  // (splits) -> labels, or null for uPlot's own format
    this.names = [];
    this.rows = new Map();  // x -> {name: y}
    this.plot = null;
    new ResizeObserver(() => this.plot?.setSize(this.size())).observe(this.box);
  }

  size() { return { width: Math.max(280, this.box.clientWidth - 34), height: 240 }; }

  add(x, values) {
    const row = this.rows.get(x) || {};
    for (const [name, y] of Object.entries(values)) {
      if (typeof y !== "number" || !Number.isFinite(y)) continue;
      if (!this.names.includes(name)) { this.names.push(name); this.reset(); }
      row[name] = y;
    }
    this.rows.set(x, row);
    this.dirty = true;
  }

  reset() { if (this.plot) { this.plot.destroy(); this.plot = null; } }

  draw() {
    if (!this.dirty || !this.names.length) return;
    this.dirty = false;
    this.box.hidden = false;
    const xs = [...this.rows.keys()].sort((a, b) => a - b);
    const data = [xs, ...this.names.map((n) => xs.map((x) => this.rows.get(x)[n] ?? null))];
    if (!this.plot) {
      const y = !this.yTicks ? {} : { size: fitAxis, values: (u, splits) => {
        const labels = this.yTicks(splits);
        this.box.dataset.yTicks = JSON.stringify(labels.filter((v) => v != null));
        return labels;
      } };
      this.plot = new uPlot({
        ...this.size(),
        scales: { x: { time: false }, y: this.log ? { distr: 3 } : {} },
        axes: [{ label: this.xLabel }, y],
        series: [{ label: this.xLabel }, ...this.names.map((n, i) => ({
          label: n, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: true,
          points: { show: xs.length < 60 },
        }))],
      }, data, this.box);
    } else {
      this.plot.setData(data);
    }
    this.box.dataset.points = String(xs.length);
  }
}

// The ETA `tid watch` shows (cli/terminal.py's Follower, rich's TimeRemainingColumn): the pace
// is the steps of the step events that arrive while the page is open, over the last 30 s of
// them; the stream's opening burst of history (the attempt running on arrival, up to the step
// it was at, and earlier attempts) would read as a pace of seconds, so it does not count. A
// later attempt's `start` (maybe resumed from a checkpoint) begins the pace anew.
class Eta {
  static WINDOW_MS = 30_000;  // rich's speed_estimate_period

  constructor(job) {
    this.attempt = job.attempt || 0;
    this.attachedAt = job.step || 0;
    this.total = job.total_steps ?? null;
    this.completed = this.attachedAt;
    this.samples = [];  // [arrival ms, steps since the previous sample]
  }

  live(data) {  // a `start` or `step` event that is news rather than replayed history
    const attempt = data.attempt ?? this.attempt;
    if (attempt !== this.attempt) return attempt > this.attempt;
    return data.step >= this.attachedAt;
  }

  apply(kind, data, now = performance.now()) {
    if (kind === "start" && this.live(data)) {
      this.samples = [];
      this.total = data.total_steps ?? this.total;
      this.completed = data.step;
      return;
    }
    if (!["state", "phase", "step", "eval"].includes(kind)) return;
    if (kind === "step" && !this.live(data)) return;
    while (this.samples.length && this.samples[0][0] < now - Eta.WINDOW_MS) this.samples.shift();
    if (kind === "step") {
      const advanced = data.step - this.completed;
      this.completed = data.step;
      if (advanced > 0) this.samples.push([now, advanced]);
    }
  }

  seconds() {  // null while there is no pace yet
    if (this.total === null) return null;
    if (this.completed >= this.total) return 0;
    if (this.samples.length < 2) return null;
    const time = (this.samples.at(-1)[0] - this.samples[0][0]) / 1000;
    const steps = this.samples.slice(1).reduce((sum, [, n]) => sum + n, 0);
    return time > 0 && steps > 0 ? Math.ceil((this.total - this.completed) / (steps / time)) : null;
  }

  text() {
    const s = this.seconds();
    if (s === null) return "-:--:--";
    const two = (n) => String(n).padStart(2, "0");
    return `${Math.floor(s / 3600)}:${two(Math.floor(s / 60) % 60)}:${two(s % 60)}`;
  }
}

// --- pages ----------------------------------------------------------------------------------

function login(view) {
  view.replaceChildren(document.getElementById("login").content.cloneNode(true));
  document.getElementById("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, document.getElementById("api-key").value.trim());
    try {
      await json("/v1/jobs?limit=1");
      route();
    } catch (err) {
      document.getElementById("login-error").textContent = `Key refused: ${err.message}`;
    }
  });
}

async function jobsPage(view) {
  const body = el("tbody");
  const error = el("p", { class: "error", role: "alert" });
  const spec = el("textarea", { id: "spec", spellcheck: "false" },
    JSON.stringify(EXAMPLE_SPEC, null, 2));
  const form = el("form", { id: "submit-form" }, spec,
    el("div", { class: "actions" }, el("button", { type: "submit" }, "Submit job")), error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    try {
      const job = await json("/v1/jobs", {
        method: "POST", body: spec.value, headers: { "Content-Type": "application/json" },
      });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) { error.textContent = err.message; }
  });
  const selected = new Set();
  const compare = el("button", { class: "secondary", disabled: "" , onclick: () => {
    location.hash = `#/compare?ids=${[...selected].join(",")}`;
  } }, "Compare selected");
  view.replaceChildren(
    el("h1", {}, "Jobs"),
    el("div", { class: "actions" }, compare),
    el("table", { id: "jobs" }, el("thead", {}, el("tr", {},
      el("th", {}, ""), el("th", {}, "name"), el("th", {}, "state"), el("th", {}, "method"),
      el("th", {}, "teacher → student"), el("th", { class: "num" }, "best mAP"),
      el("th", { class: "num" }, "step"), el("th", { class: "num" }, "duration"))), body),
    el("h2", {}, "Submit a job spec"), el("div", { class: "card" }, form),
  );
  async function refresh() {
    const { data } = await json("/v1/jobs?limit=100");
    body.replaceChildren(...data.map((job) => {
      const box = el("input", { type: "checkbox", "aria-label": `select ${job.name}` });
      box.checked = selected.has(job.id);
      box.addEventListener("change", () => {
        box.checked ? selected.add(job.id) : selected.delete(job.id);
        compare.disabled = selected.size < 1;
      });
      return el("tr", { "data-job": job.id },
        el("td", {}, box),
        el("td", {}, el("a", { href: `#/jobs/${job.id}` }, job.name)),
        el("td", {}, stateBadge(job.state)),
        el("td", {}, job.method),
        el("td", {}, `${modelName(job.spec.teacher)} → ${modelName(job.spec.student)}`),
        el("td", { class: "num" }, fmt(job.best_ap)),
        el("td", { class: "num" }, `${job.step}/${job.total_steps ?? "?"}`),
        el("td", { class: "num" }, duration(job)));
    }));
  }
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 5000);
  leave = () => clearInterval(timer);
}

async function jobPage(view, jobId) {
  const job = await json(`/v1/jobs/${jobId}`);
  const state = el("span", {}, stateBadge(job.state));
  const facts = el("div", { class: "facts" });
  const timeline = el("ol", { class: "timeline", id: "timeline" });
  const logs = el("pre", { class: "logs", id: "logs" });
  const error = el("p", { class: "error", role: "alert" }, job.error || "");
  const warnings = el("div", { id: "warnings" });  // the trainer's warning events
  const charts = el("div", { class: "grid" });
  const loss = new Chart(charts, "loss terms");
  const lr = new Chart(charts, "learning rate", { yTicks: sciTicks });
  const map = new Chart(charts, "mAP per evaluation");
  const areas = new Chart(charts, "TID key / weak area fractions");
  const cancel = el("button", { class: "secondary", id: "cancel", onclick: async () => {
    try { await json(`/v1/jobs/${jobId}/cancel`, { method: "POST" }); }
    catch (err) { error.textContent = err.message; }
  } }, "Cancel");
  const downloads = ["student.safetensors", "student.pt"].map((name) => el("button", {
    class: "secondary download", "data-artifact": name, onclick: () => download(jobId, name, error),
  }, `Download ${name}`));
  let current = job;
  let gradRatio = null;  // the distillation/detection gradient ratio a distillation job measured
  const eta = new Eta(job);
  const etaFact = el("span", { id: "eta-fact" }, "eta ", el("b", { id: "eta" }, eta.text()));
  // a job on several workers: its spec's resources.nnodes (left out of the spec at 1)
  const nodes = (resources) => resources?.nnodes ?? 1;
  const showEta = () => { etaFact.lastChild.textContent = eta.text(); };
  function showFacts() {
    cancel.disabled = FINAL.includes(current.state);
    for (const b of downloads) b.disabled = current.state !== "succeeded";
    facts.replaceChildren(
      el("span", {}, "method ", el("b", {}, current.method)),
      el("span", {}, "teacher ", el("b", {}, modelName(current.spec.teacher))),
      el("span", {}, "student ", el("b", {}, modelName(current.spec.student))),
      el("span", {}, "step ", el("b", { id: "step" }, `${current.step}/${current.total_steps ?? "?"}`)),
      el("span", {}, "attempt ", el("b", {}, `${current.attempt} of ${current.max_attempts}`)),
      nodes(current.spec.resources) > 1
        ? el("span", {}, "nodes ", el("b", {}, `${nodes(current.spec.resources)} × ${current.spec.resources.nproc_per_node ?? 1}`))
        : [],
      current.waiting_reason ? el("span", {}, "waiting ", el("b", {}, current.waiting_reason)) : [],
      el("span", {}, "best mAP ", el("b", { id: "best-ap" }, fmt(current.best_ap))),
      el("span", {}, "duration ", el("b", {}, duration(current))),
      gradRatio === null ? []
        : el("span", {}, "grad ratio ", el("b", { id: "grad-ratio" }, fmt(gradRatio, 2))),
      FINAL.includes(current.state) ? [] : etaFact);  // `tid watch`'s ETA, while it runs
  }
  showFacts();
  view.replaceChildren(
    el("h1", {}, `${job.name} `, state), facts,
    el("div", { class: "actions" }, cancel, ...downloads), error, warnings, charts,
    el("div", { class: "grid" },
      el("div", { class: "card" }, el("h2", {}, "state timeline"), timeline),
      el("div", { class: "card" }, el("h2", {}, "trainer log"), logs)));

  const controller = new AbortController();
  const draw = setInterval(() => [loss, lr, map, areas].forEach((c) => c.draw()), 500);
  async function refresh() {
    current = await json(`/v1/jobs/${jobId}`);
    state.replaceChildren(stateBadge(current.state));
    error.textContent = current.error || "";
    showFacts();
    logs.textContent = await (await api(`/v1/jobs/${jobId}/logs?tail=80`)).text();
  }
  const poll = setInterval(() => refresh().catch(() => {}), 3000);
  leave = () => { controller.abort(); clearInterval(draw); clearInterval(poll); };
  refresh().catch(() => {});
  followEvents(jobId, (kind, data) => {
    eta.apply(kind, data);
    showEta();
    if (kind === "state") {
      const why = data.error || data.reason;
      timeline.append(el("li", {}, stateBadge(data.state), why ? ` ${why}` : ""));
      refresh().catch(() => {});
    } else if (kind === "step") {
      loss.add(data.step, data.losses || {});
      lr.add(data.step, { lr: data.lr });
      const stats = data.stats || {};
      if ("tid_key_frac" in stats) {
        areas.add(data.step, { key: stats.tid_key_frac, weak: stats.tid_weak_frac });
      }
    } else if (kind === "eval") {
      const m = data.metrics || {};
      map.add(data.step, { AP: m.AP, AP50: m.AP50, AP75: m.AP75 });
    } else if (kind === "grad_ratio") {
      gradRatio = data.ratio;
      showFacts();
    } else if (kind === "warning") {
      warnings.append(el("p", { class: "warning", role: "status" }, `warning: ${data.message}`));
    } else if (kind === "start") {
      timeline.append(el("li", { class: "muted" }, `attempt ${data.attempt} started at step ${data.step}`));
    } else if (["interrupted", "end", "error"].includes(kind)) {
      timeline.append(el("li", { class: "muted" }, `${kind} at step ${data.step}`));
    }
  }, controller.signal);
}

async function download(jobId, name, error) {
  try {
    const blob = await (await api(`/v1/jobs/${jobId}/artifacts/${name}`)).blob();
    const link = el("a", { href: URL.createObjectURL(blob), download: name });
    document.body.append(link);
    link.click();
    link.remove();
  } catch (err) { error.textContent = err.message; }
}

async function comparePage(view, ids) {
  const charts = el("div", {});
  view.replaceChildren(el("h1", {}, "Compare"), el("p", { class: "muted" },
    "mAP of each job's evaluations by epoch. Select jobs on the Jobs page."), charts);
  if (!ids.length) return;
  const chart = new Chart(charts, "mAP (AP) per epoch", { xLabel: "epoch" });
  const table = el("tbody");
  charts.append(el("table", { id: "compare" }, el("thead", {}, el("tr", {},
    el("th", {}, "job"), el("th", {}, "method"), el("th", { class: "num" }, "AP"),
    el("th", { class: "num" }, "AP50"), el("th", { class: "num" }, "AP75"))), table));
  for (const id of ids) {
    const [job, metrics] = await Promise.all([
      json(`/v1/jobs/${id}`), json(`/v1/jobs/${id}/metrics?name=eval/AP`),
    ]);
    const label = `${job.name} (${job.method})`;
    for (const e of metrics.evaluations) chart.add(e.epoch, { [label]: e.ap });
    const last = metrics.evaluations.at(-1) || {};
    table.append(el("tr", {}, el("td", {}, label), el("td", {}, job.method),
      el("td", { class: "num" }, fmt(last.ap)), el("td", { class: "num" }, fmt(last.ap50)),
      el("td", { class: "num" }, fmt(last.ap75))));
  }
  chart.draw();
}

// --- routing --------------------------------------------------------------------------------

async function route() {
  leave();
  leave = () => {};
  const view = document.getElementById("view");
  const loggedIn = Boolean(sessionStorage.getItem(KEY));
  document.getElementById("logout").hidden = !loggedIn;
  if (!loggedIn) return login(view);
  const [path, query] = location.hash.slice(1).split("?");
  try {
    const job = path.match(/^\/jobs\/([0-9a-f]{32})$/);
    if (job) return await jobPage(view, job[1]);
    if (path === "/compare") {
      const ids = new URLSearchParams(query || "").get("ids");
      return await comparePage(view, ids ? ids.split(",") : []);
    }
    return await jobsPage(view);
  } catch (err) {
    if (sessionStorage.getItem(KEY)) {  // else the login form is already showing
      view.replaceChildren(el("p", { class: "error", role: "alert" }, err.message));
    }
  }
}

document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  route();
});
window.addEventListener("hashchange", route);
route();
