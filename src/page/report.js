"use strict";
// runner report: everything below reads DATA (written by `runner report`) and builds the page
// with DOM calls; no text from the data is ever parsed as HTML.
const DATA = JSON.parse(document.getElementById("runner-data").textContent);
const RUNS = DATA.runs;
const BY_ID = new Map(RUNS.map((r) => [r.run_id, r]));
// Maps, not the parsed objects: a run id such as `__proto__` is an id like any other.
const CONFIGS = new Map(Object.entries(DATA.configs));
const EPOCHS = new Map(Object.entries(DATA.epochs));
const EVALUATIONS = new Map(Object.entries(DATA.evaluations));
const plural = (n, word) => n + " " + word + (n === 1 ? "" : "s");
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];
// At most this many selected runs get curves, config columns and evaluations (the table keeps all).
const DETAIL_LIMIT = 24;
const SVG = "http://www.w3.org/2000/svg";

const fmtAcc = (v) => (v == null ? "" : Number(v).toFixed(3));
const fmtNum = (v) => (v == null ? "" : String(v));
const fmtLr = (v) => (v == null ? "" : Number(Number(v).toPrecision(3)).toExponential());
function fmtSeconds(v) {
  if (v == null) return "";
  const s = Math.round(Number(v));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}
const COLUMNS = [
  { key: "run_id", label: "run", cls: "id" },
  { key: "experiment", label: "experiment" },
  { key: "status", label: "status" },
  { key: "best_val_acc", label: "best val_acc", num: true, fmt: fmtAcc, bestFirst: true },
  { key: "final_val_acc", label: "final val_acc", num: true, fmt: fmtAcc, bestFirst: true },
  { key: "test_acc", label: "test_acc", num: true, fmt: fmtAcc, bestFirst: true },
  { key: "epochs", label: "epochs", num: true, fmt: fmtNum },
  { key: "seconds", label: "time", num: true, fmt: fmtSeconds },
  { key: "sweep_point", label: "sweep point" },
  { key: "backbone", label: "backbone" },
  { key: "trainable_from", label: "trainable from" },
  { key: "optimizer", label: "optimizer" },
  { key: "lr", label: "lr", num: true, fmt: fmtLr },
  { key: "started_at", label: "started" },
];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null) continue;
    if (k === "text") e.textContent = v;
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

const state = { sortKey: "started_at", desc: false, words: [], status: "", selected: [] };
const rowOf = new Map();
const textOf = new Map();

// ---- the runs table ----
function buildTable() {
  const head = document.querySelector("#runs thead tr");
  const all = el("input", { type: "checkbox", "aria-label": "select every run shown", id: "select-all" });
  // Ticked: every run shown is selected; unticking deselects the runs shown.
  all.addEventListener("change", () => {
    if (all.checked) selectShown();
    else setSelection(state.selected.filter((id) => rowOf.get(id).hidden));
  });
  head.append(el("th", { class: "pick" }, all));
  for (const c of COLUMNS) {
    const th = el("th", { "data-key": c.key, class: c.num ? "num" : null, text: c.label, title: "sort by " + c.label });
    th.addEventListener("click", () => sortBy(c.key));
    head.append(th);
  }
  const body = document.querySelector("#runs tbody");
  const frag = document.createDocumentFragment();
  for (const r of RUNS) {
    const box = el("input", { type: "checkbox", "aria-label": "select " + r.run_id });
    box.addEventListener("change", () => toggle(r.run_id, box.checked));
    const tr = el("tr", { "data-run": r.run_id }, el("td", { class: "pick" }, box));
    for (const c of COLUMNS) {
      const v = r[c.key];
      const td = el("td", { class: [c.num ? "num" : "", c.cls || ""].join(" ").trim() || null, text: c.fmt ? c.fmt(v) : v == null ? "" : String(v) });
      if (c.key === "status") td.className = "status status-" + v;
      if (c.key === "run_id" || c.key === "sweep_point") td.title = v == null ? "" : String(v);
      tr.append(td);
    }
    rowOf.set(r.run_id, tr);
    // What the filter matches: the cells, and every key = value of the run's config.
    const cfg = CONFIGS.get(r.run_id) || {};
    // Numbers also as the table writes them (`lr=2e-5` finds 0.00002).
    const cfgText = Object.entries(cfg)
      .map(([k, v]) => {
        const plain = String(v).replace(/"/g, "");
        const n = Number(plain);
        return k + "=" + plain + (plain !== "" && isFinite(n) && n !== 0 ? " " + k + "=" + fmtLr(n) : "");
      })
      .join(" ");
    textOf.set(r.run_id, (tr.textContent + " " + (r.sweep_point || "").replace(/ /g, "") + " " + cfgText).toLowerCase());
    frag.append(tr);
  }
  body.append(frag);
  const statuses = [...new Set(RUNS.map((r) => r.status))].sort();
  const sel = document.getElementById("status-filter");
  for (const s of statuses) sel.append(el("option", { value: s, text: s + " (" + RUNS.filter((r) => r.status === s).length + ")" }));
  sel.addEventListener("change", () => { state.status = sel.value; applyFilter(); });
  const input = document.getElementById("filter");
  input.addEventListener("input", () => { state.words = input.value.toLowerCase().split(/\s+/).filter(Boolean); applyFilter(); });
  document.getElementById("select-shown").addEventListener("click", selectShown);
  document.getElementById("select-none").addEventListener("click", () => setSelection([]));
}

function compare(key, a, b) {
  const x = BY_ID.get(a)[key], y = BY_ID.get(b)[key];
  if (x == null && y == null) return 0;
  if (x == null) return 1; // empty cells last, either way
  if (y == null) return -1;
  const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true });
  return state.desc ? -c : c;
}

// First click: accuracies best (highest) first, everything else ascending; again: the other way.
function sortBy(key) {
  const col = COLUMNS.find((c) => c.key === key);
  state.desc = state.sortKey === key ? !state.desc : !!col.bestFirst;
  state.sortKey = key;
  applySort();
}

function applySort() {
  const key = state.sortKey;
  const ids = RUNS.map((r) => r.run_id).sort((a, b) => compare(key, a, b) || (a < b ? -1 : a > b ? 1 : 0));
  const body = document.querySelector("#runs tbody");
  const frag = document.createDocumentFragment();
  for (const id of ids) frag.append(rowOf.get(id));
  body.append(frag);
  for (const th of document.querySelectorAll("#runs th[data-key]")) {
    if (th.dataset.key === key) th.setAttribute("aria-sort", state.desc ? "descending" : "ascending");
    else th.removeAttribute("aria-sort");
  }
}

function shown(id) {
  const r = BY_ID.get(id);
  if (state.status && r.status !== state.status) return false;
  const t = textOf.get(id);
  return state.words.every((w) => t.includes(w));
}

function applyFilter() {
  let n = 0;
  for (const r of RUNS) {
    const vis = shown(r.run_id);
    rowOf.get(r.run_id).hidden = !vis;
    n += vis;
  }
  document.getElementById("run-count").textContent = n === RUNS.length ? plural(RUNS.length, "run") : n + " of " + plural(RUNS.length, "run") + " shown";
  syncSelectAll();
}

function syncSelectAll() {
  const shownIds = RUNS.map((r) => r.run_id).filter((id) => !rowOf.get(id).hidden);
  const box = document.getElementById("select-all");
  box.checked = shownIds.length > 0 && shownIds.every((id) => state.selected.includes(id));
}

// ---- selection ----
function toggle(id, on) {
  const s = state.selected.filter((x) => x !== id);
  if (on) s.push(id);
  setSelection(s);
}
function selectShown() {
  const ids = [...document.querySelectorAll("#runs tbody tr")].filter((tr) => !tr.hidden).map((tr) => tr.dataset.run);
  setSelection(ids);
}
function setSelection(ids) {
  state.selected = [...new Set(ids)].filter((id) => BY_ID.has(id));
  for (const [id, tr] of rowOf) {
    const on = state.selected.includes(id);
    tr.classList.toggle("selected", on);
    tr.querySelector("input").checked = on;
  }
  syncSelectAll();
  const hash = "#runs=" + state.selected.map(encodeURIComponent).join(",");
  if (location.hash !== hash) history.replaceState(null, "", hash);
  renderSelection();
}

// The runs an address names (`#runs=ID,ID`), or null; ids not in this folder are said once.
function fromAddress() {
  const m = /^#runs=(.*)$/.exec(location.hash);
  if (!m) return null;
  const ids = m[1].split(",").filter(Boolean).map((x) => {
    try { return decodeURIComponent(x); } catch (e) { return x; }
  });
  const unknown = ids.filter((id) => !BY_ID.has(id));
  state.unknown = unknown;
  return ids.filter((id) => BY_ID.has(id));
}

function initialSelection() {
  const named = fromAddress();
  if (named) return named;
  // The best completed run (else the best of any), ties by run id; else the latest run.
  const scored = RUNS.filter((r) => r.best_val_acc != null);
  const completed = scored.filter((r) => r.status === "completed");
  const pool = completed.length ? completed : scored;
  if (!pool.length) return RUNS.length ? [RUNS[RUNS.length - 1].run_id] : [];
  pool.sort((a, b) => b.best_val_acc - a.best_val_acc || (a.run_id < b.run_id ? -1 : 1));
  return [pool[0].run_id];
}

function renderSelection() {
  const ids = state.selected.slice(0, DETAIL_LIMIT);
  const note = document.getElementById("selection-note");
  if (!state.selected.length) note.textContent = "Select runs in the table (the box at the left of a row) to see their curves, config differences and test evaluation.";
  else if (state.selected.length > DETAIL_LIMIT) note.textContent = state.selected.length + " runs selected: the first " + DETAIL_LIMIT + " are shown below.";
  else note.textContent = plural(state.selected.length, "run") + " selected.";
  if (state.unknown && state.unknown.length) {
    note.textContent += " Not in this folder (named by the address): " + state.unknown.join(", ") + ".";
    state.unknown = [];
  }
  const color = new Map(ids.map((id, i) => [id, COLORS[i % COLORS.length]]));
  const legend = document.getElementById("legend");
  legend.replaceChildren(...ids.map((id) => el("span", { class: "item" }, el("span", { class: "swatch", style: "background:" + color.get(id) }), id)));
  if (ids.length) legend.append(el("span", { class: "item note", text: "solid: validation, dashed: training; dotted verticals: a new phase" }));
  renderCurves(ids, color);
  renderDiff(ids);
  renderEvaluations(ids);
}

// ---- curves ----
function renderCurves(ids, color) {
  const box = document.getElementById("curves");
  box.replaceChildren();
  const withEpochs = ids.filter((id) => EPOCHS.has(id) && EPOCHS.get(id).epoch.length);
  if (!withEpochs.length) {
    if (ids.length) box.append(el("p", { class: "note", text: "No epoch has finished in the selected runs." }));
    return;
  }
  box.append(chart("Accuracy", "acc", withEpochs, color), chart("Loss", "loss", withEpochs, color));
}

function niceTicks(lo, hi, n) {
  const span = hi - lo || 1;
  const step0 = span / n;
  const mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= step0);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

function chart(title, metric, ids, color) {
  const W = 560, H = 300, L = 52, R = 12, T = 18, B = 34;
  const series = [];
  let maxEpoch = 1, lo = Infinity, hi = -Infinity;
  for (const id of ids) {
    const e = EPOCHS.get(id);
    for (const split of ["train", "val"]) {
      const ys = e[split + "_" + metric];
      const pts = [];
      e.epoch.forEach((ep, i) => {
        const y = ys[i];
        if (y == null || !isFinite(y)) return;
        pts.push([ep, y]);
        lo = Math.min(lo, y);
        hi = Math.max(hi, y);
      });
      maxEpoch = Math.max(maxEpoch, ...e.epoch);
      series.push({ id, split, pts });
    }
  }
  if (!isFinite(lo)) { lo = 0; hi = 1; }
  const pad = (hi - lo) * 0.05 || 0.05;
  lo -= pad; hi += pad;
  if (metric === "acc") { lo = Math.max(0, lo); hi = Math.min(1, hi); }
  const x = (ep) => L + ((ep - 1) / Math.max(1, maxEpoch - 1)) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  const s = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, "data-chart": metric, role: "img", "aria-label": title + " per epoch" });
  for (const t of niceTicks(lo, hi, 5)) {
    s.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(t), y2: y(t) }));
    const label = svg("text", { x: L - 6, y: y(t) + 4, "text-anchor": "end" });
    label.textContent = metric === "acc" ? t.toFixed(2) : String(+t.toPrecision(3));
    s.append(label);
  }
  for (const t of niceTicks(1, maxEpoch, Math.min(10, maxEpoch)).filter((t) => Number.isInteger(t))) {
    const label = svg("text", { x: x(t), y: H - B + 16, "text-anchor": "middle" });
    label.textContent = String(t);
    s.append(label);
  }
  const xl = svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" });
  xl.textContent = "epoch";
  s.append(xl);
  s.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }), svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  // Phase boundaries: a dotted line before the first epoch of each later phase; with one run,
  // each phase named (a second row where the name before it is still running).
  for (const id of ids) {
    const e = EPOCHS.get(id);
    const named = ids.length === 1 && e.phase.some((p) => p !== e.phase[0]);
    const ends = [-Infinity, -Infinity];
    const label = (x, text) => {
      const row = x < ends[0] ? 1 : 0;
      const t = svg("text", { x, y: T + 10 + 12 * row });
      t.textContent = text;
      s.append(t);
      ends[row] = x + 6.5 * text.length;
    };
    if (named) label(L + 3, e.phase[0]);
    for (let i = 1; i < e.epoch.length; i++) {
      if (e.phase[i] === e.phase[i - 1]) continue;
      const px = x(e.epoch[i] - 0.5);
      s.append(svg("line", { class: "phase", x1: px, x2: px, y1: T, y2: H - B, stroke: color.get(id), "data-phase": e.phase[i] }));
      if (named) label(px + 3, e.phase[i]);
    }
  }
  for (const { id, split, pts } of series) {
    if (!pts.length) continue;
    const d = pts.map(([ep, v], i) => (i ? "L" : "M") + x(ep).toFixed(1) + " " + y(v).toFixed(1)).join(" ");
    s.append(svg("path", { d, fill: "none", stroke: color.get(id), "stroke-width": 1.8, "stroke-dasharray": split === "train" ? "5 3" : "none", "data-run": id, "data-split": split }));
    if (pts.length <= 60) {
      for (const [ep, v] of pts) {
        const c = svg("circle", { cx: x(ep), cy: y(v), r: 2.6, fill: split === "val" ? color.get(id) : "#fff", stroke: color.get(id) });
        const tip = svg("title", {});
        tip.textContent = id + "\nepoch " + ep + ", " + (split === "val" ? "validation " : "training ") + metric + " " + (+v.toPrecision(4));
        c.append(tip);
        s.append(c);
      }
    }
  }
  return el("figure", {}, el("figcaption", { text: title + " (training dashed, validation solid)" }), s);
}

// ---- config differences ----
function renderDiff(ids) {
  const box = document.getElementById("config-diff");
  box.replaceChildren();
  const cfgs = ids.map((id) => CONFIGS.get(id));
  if (!ids.length) return;
  if (ids.length === 1) {
    const cfg = cfgs[0];
    if (!cfg) { box.append(el("p", { class: "note", text: "This run's resolved config (" + ids[0] + ".toml) is not in the results folder." })); return; }
    const table = el("table", { class: "diff", id: "config-table" });
    for (const [k, v] of Object.entries(cfg)) table.append(el("tr", { "data-key": k }, el("td", { class: "key", text: k }), el("td", { class: "value", text: v })));
    box.append(el("p", { class: "note", text: "Select two or more runs to see only the keys that differ. This run's resolved config:" }), el("details", {}, el("summary", { text: Object.keys(cfg).length + " keys" }), table));
    return;
  }
  const keys = [...new Set(cfgs.flatMap((c) => Object.keys(c || {})))].sort();
  const differing = keys.filter((k) => new Set(cfgs.map((c) => (c && k in c ? c[k] : "\u2014"))).size > 1);
  if (!differing.length) {
    box.append(el("p", { class: "note", text: "The selected runs have the same resolved config." + (cfgs.some((c) => !c) ? " (Some runs have no config file.)" : "") }));
    return;
  }
  const table = el("table", { class: "diff", id: "config-diff-table" });
  table.append(el("tr", {}, el("th", { text: "key" }), ...ids.map((id) => el("th", { title: id, text: id }))));
  const rows = differing.map((k) => el("tr", { "data-key": k }, el("td", { class: "key", text: k }), ...cfgs.map((c) => el("td", { class: "value", text: c && k in c ? c[k] : "\u2014" }))));
  table.append(...rows);
  box.append(el("p", { class: "note", text: differing.length + " of " + keys.length + " keys differ." }), table);
  // A long difference (another head, other phases) shows its first rows until asked.
  const FIRST = 16;
  if (rows.length > FIRST + 4) {
    rows.slice(FIRST).forEach((r) => (r.hidden = true));
    const more = el("button", { type: "button", id: "diff-more", text: "Show all " + rows.length + " keys" });
    more.addEventListener("click", () => { rows.forEach((r) => (r.hidden = false)); more.remove(); });
    box.append(more);
  }
}

// ---- test evaluations ----
function renderEvaluations(ids) {
  const box = document.getElementById("evaluations");
  box.replaceChildren();
  const evaluated = ids.filter((id) => EVALUATIONS.has(id));
  if (ids.length && !evaluated.length) box.append(el("p", { class: "note", text: "None of the selected runs has a test evaluation (a test/ split, and a run that completed)." }));
  for (const id of evaluated) box.append(evaluation(id, EVALUATIONS.get(id)));
}

// Up to this many classes the whole confusion matrix is drawn; above, its largest confusions.
const MATRIX_LIMIT = 30;

function matrix(id, ev) {
  const t = el("table", { class: "confusion", "data-run": id });
  t.append(el("tr", {}, el("th", { text: "true \\ predicted" }), ...ev.classes.map((c) => el("th", { text: c }))));
  ev.matrix.forEach((row, i) => {
    const total = row.reduce((a, b) => a + b, 0);
    t.append(el("tr", {}, el("th", { text: ev.classes[i] }), ...row.map((n, j) => el("td", { class: (i === j ? "hit" : "miss") + (n ? " some" : ""), "data-count": n, title: n + " of " + total + " " + ev.classes[i] + " images predicted " + ev.classes[j], text: String(n) + (total ? " (" + Math.round((100 * n) / total) + " %)" : "") }))));
  });
  return el("div", { class: "matrix-wrap" }, t);
}

function confusions(id, ev) {
  const pairs = [];
  ev.matrix.forEach((row, i) => row.forEach((n, j) => { if (i !== j && n) pairs.push([n, i, j]); }));
  pairs.sort((a, b) => b[0] - a[0] || a[1] - b[1] || a[2] - b[2]);
  const t = el("table", { class: "confusion-pairs diff", "data-run": id });
  t.append(el("tr", {}, el("th", { text: "true class" }), el("th", { text: "predicted" }), el("th", { text: "images" })));
  for (const [n, i, j] of pairs.slice(0, 20)) t.append(el("tr", {}, el("td", { text: ev.classes[i] }), el("td", { text: ev.classes[j] }), el("td", { text: String(n) })));
  return el("div", {}, el("p", { class: "note", text: ev.classes.length + " classes: the " + Math.min(20, pairs.length) + " most frequent confusions of " + pairs.length + " (the matrix is drawn up to " + MATRIX_LIMIT + " classes)." }), t);
}

function evaluation(id, ev) {
  const right = ev.matrix.reduce((s, row, i) => s + row[i], 0);
  const div = el("div", { class: "evaluation", "data-run": id });
  div.append(el("h4", { text: id }), el("p", { class: "note", text: right + " of " + ev.images + " test images right (" + (ev.images ? ((100 * right) / ev.images).toFixed(1) : "0") + " %). Rows: the true class; columns: the predicted class." }));
  div.append(ev.classes.length <= MATRIX_LIMIT ? matrix(id, ev) : confusions(id, ev));
  if (ev.wrong && !ev.shown.length) {
    div.append(el("p", { class: "note", text: plural(ev.wrong, "test image") + " misclassified (none shown: --misclassified 0)." }));
  } else if (ev.wrong) {
    div.append(el("p", { class: "note", text: (ev.shown.length < ev.wrong ? "The " + ev.shown.length + " most confidently misclassified of " + ev.wrong : "All " + ev.wrong + " misclassified") + " test images, most confident first:" }));
    const grid = el("div", { class: "misclassified" });
    for (const m of ev.shown) {
      const img = DATA.images[m.image];
      const pic = img && img.src ? el("img", { src: img.src, alt: m.path }) : el("div", { class: "gone", text: "not found: " + ((img && img.missing) || "") });
      grid.append(el("figure", { title: m.path, "data-path": m.path }, pic, el("figcaption", {}, el("span", { text: m.label }), " \u2192 ", el("span", { class: "wrongclass", text: m.predicted }), " " + Number(m.probability).toFixed(3), el("br"), el("span", { class: "note", text: m.path.split("/").pop() }))));
    }
    div.append(grid);
  } else div.append(el("p", { class: "note", text: "No test image misclassified." }));
  return div;
}

// ---- failed runs, notes, header ----
function renderFailed() {
  const bad = RUNS.filter((r) => ["failed", "diverged", "stopped", "interrupted", "running"].includes(r.status));
  if (!bad.length) return;
  document.getElementById("failed-section").hidden = false;
  const list = document.getElementById("failed");
  for (const r of bad) {
    const resume = "`runner resume " + r.run_id + " --results " + DATA.folder + "` continues it.";
    let why = r.error || (r.status === "stopped" ? "No process holds its log: it was killed or crashed. " + resume : r.status === "running" ? "Still training." : r.status === "interrupted" ? "Interrupted; " + resume : "");
    if (why.length > 4000) why = why.slice(0, 4000) + "\u2026 (" + why.length + " characters; the whole error is in the run's log)";
    list.append(el("li", { "data-run": r.run_id }, el("span", { class: "status status-" + r.status, text: r.status }), " ", el("code", { text: r.run_id }), " (" + r.experiment + (r.sweep_point ? ", " + r.sweep_point : "") + ", " + plural(r.epochs || 0, "epoch") + ")", why ? el("pre", { text: why }) : null));
  }
}

function renderHeader() {
  const done = RUNS.filter((r) => r.status === "completed").length;
  document.getElementById("about").textContent = RUNS.length + " runs (" + done + " completed) in " + DATA.folder + "; written by runner " + DATA.version + " at " + DATA.generated + ". Click a column to sort, type to filter, tick runs to compare.";
  if (DATA.notes.length) {
    document.getElementById("notes-section").hidden = false;
    document.getElementById("notes").replaceChildren(...DATA.notes.map((n) => el("li", { text: n })));
  }
}

renderHeader();
buildTable();
applySort();
applyFilter();
renderFailed();
setSelection(initialSelection());
// A link pasted into an open page selects what it names.
window.addEventListener("hashchange", () => {
  const named = fromAddress();
  if (named && named.join(",") !== state.selected.join(",")) setSelection(named);
});
document.body.dataset.ready = "true";
