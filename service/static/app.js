// The galmorph page: cutouts through POST /classify/batch (in chunks the server accepts) and
// sky positions through GET /classify/sky into one results table; one galaxy's details, with
// its neighbours from POST /similar; the model card from GET /model. One vendored library
// (vendor/hyparquet-writer.js, imported for the Parquet download), no request beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
// How often the page asks /readyz while the server has no model (the server checks every 5 s).
const READINESS_POLL_MS = 3000;
// A refused batch request (503: queue full, budget spent) is tried again after the server's
// Retry-After, at most this many times and never waiting longer than RETRY_CAP_S.
const RETRIES = 3;
const RETRY_CAP_S = 30;
// Bytes a multipart part adds to its file (boundary and headers), for chunking by size.
const PART_OVERHEAD_BYTES = 1024;
const OOD_SENTENCE = "unlike the training data: the class is unreliable";
const SCALE_BAR_ARCSEC = [1, 2, 5, 10, 20, 30, 60, 120, 300, 600];
const DOWNLOADS = ["download-csv", "download-parquet", "download-json"];

let model = null; // GET /model
const rows = []; // {id, label, file, sky, status: pending|ok|error, result, error}
let nextRowId = 1;
let sort = { key: null, direction: 1 };
let selectedId = null;

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function errorText(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    return response.statusText;
  }
}

// Numbers for people: 4 significant digits (a float32 pixel scale 1.0479999780654907 is 1.048);
// counts in full.
function number(value, digits = 4) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "—";
  if (Number.isInteger(value)) return String(value);
  return String(Number(value.toPrecision(digits)));
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

function element(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function oodThreshold() {
  const threshold = model && model.card.ood ? model.card.ood.threshold : undefined;
  return threshold === undefined ? null : threshold;
}

// The flag shown wherever a class is: null when the image is like the training data or the
// model has no OOD score.
function oodFlag(result, short) {
  if (result.in_distribution !== false) return null;
  return element("span", {
    className: "ood-flag",
    textContent: short ? "unlike the training data" : OOD_SENTENCE,
    title: `${OOD_SENTENCE} (OOD score ${number(result.ood_score)} > threshold ` +
      `${number(oodThreshold())})`,
  });
}

// ---- the model ----------------------------------------------------------------------------

async function loadModelInfo() {
  const response = await fetch("/model", { headers: headers() });
  if (!response.ok) {
    $("model-line").textContent = `model: ${response.status} ${await errorText(response)}`;
    return;
  }
  model = await response.json();
  $("model-line").textContent =
    `${model.name} · version ${model.version} · ${model.providers.join(", ")} · ` +
    `${model.input.shape.slice(1, 3).join("×")} px input · ` +
    `${number(model.card.pixel_scale)}″/px`;
  const select = $("stretch");
  select.replaceChildren(select.options[0]);
  for (const name of model.preprocessing.stretches || []) {
    const option = element("option", { value: name });
    option.textContent = name === model.preprocessing.stretch ? `${name} (model default)` : name;
    select.appendChild(option);
  }
  const classes = $("filter-class");
  classes.replaceChildren(classes.options[0]);
  for (const name of model.class_names) {
    classes.appendChild(element("option", { value: name, textContent: name }));
  }
  renderModelCard();
}

function scalars(record) {
  return Object.entries(record || {})
    .filter(([, value]) => ["number", "string", "boolean"].includes(typeof value))
    .map(([key, value]) => `${key} ${typeof value === "number" ? number(value) : value}`)
    .join(" · ");
}

function calibrationText(calibration) {
  if (!calibration || !Object.keys(calibration).length) return "none recorded in the model file";
  const parts = [`temperature ${number(calibration.temperature)}`];
  if (calibration.applied === false) parts[0] += ` (not applied: ${calibration.reason})`;
  if (calibration.ece_before !== undefined) {
    parts.push(`ECE ${number(calibration.ece_before, 3)} → ${number(calibration.ece_after, 3)}`);
  }
  if (calibration.num_images !== undefined) {
    parts.push(`on ${calibration.num_images} held-out images`);
  }
  return parts.join(" · ");
}

// Each field names where its value is in GET /model's answer (data-source) and carries that
// value as JSON (data-value), so what the panel shows can be checked against the API.
function modelCardFields() {
  const card = model.card;
  const fov = model.preprocessing.field_of_view_arcsec;
  const targets = card.targets === "votes"
    ? "votes: the probabilities are expected vote fractions"
    : "labels: the probabilities are class probabilities";
  return [
    ["name", "name", model.name],
    ["version", "version", model.version],
    ["SHA-256", "sha256", model.sha256],
    ["classes", "class_names", model.class_names.join(", ")],
    ["targets", "card.targets", targets],
    ["input", "preprocessing.input_size", `${model.preprocessing.input_size.join("×")} px`],
    ["pixel scale", "card.pixel_scale", `${number(card.pixel_scale)}″/px`],
    ["field of view", "preprocessing.field_of_view_arcsec",
      `${fov.map((v) => number(v)).join("″ × ")}″`],
    ["stretch", "card.stretch", card.stretch],
    ["bands", "card.bands", Object.entries(card.bands).map(([c, b]) => `${c}←${b}`).join(", ")],
    ["calibration", "card.calibration", calibrationText(card.calibration)],
    ["OOD score", "card.ood", scalars(card.ood) || "none in the model file"],
    ["test metrics", "card.metrics", scalars(card.metrics) || "none recorded"],
    ["training data", "card.training_data", scalars(card.training_data) || "none recorded"],
    ["precision", "card.precision", card.precision],
    ["created", "card.created", card.created || "—"],
  ];
}

function lookup(path) {
  return path.split(".").reduce((value, key) => value[key], model);
}

function renderModelCard() {
  const list = $("model-card-fields");
  list.replaceChildren();
  for (const [term, source, text] of modelCardFields()) {
    const dd = element("dd", { textContent: text });
    dd.dataset.source = source;
    dd.dataset.value = JSON.stringify(lookup(source));
    list.append(element("dt", { textContent: term }), dd);
  }
}

// Until the server is ready, show why (for a missing model: the commands that make one), then
// load the model's description once it is.
async function watchReadiness() {
  let body;
  try {
    body = await (await fetch("/readyz")).json();
  } catch (err) {
    body = { ready: false, reason: `the server did not answer: ${err}` };
  }
  $("not-ready").hidden = body.ready;
  if (body.ready) {
    await loadModelInfo();
    return;
  }
  $("not-ready-reason").textContent = body.reason;
  $("model-line").textContent = "no model is being served yet";
  setTimeout(watchReadiness, READINESS_POLL_MS);
}

// ---- sending ------------------------------------------------------------------------------

function classifyParams() {
  const params = new URLSearchParams({ return_image: "true" });
  if ($("stretch").value) params.set("stretch", $("stretch").value);
  return params;
}

// fetch, again after Retry-After while the server answers 503 (queue full, budget spent).
async function fetchPolitely(url, options) {
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(url, options);
    // Seconds only: an absent header or an HTTP date is not waited for.
    const wait = Number(response.headers.get("Retry-After") ?? NaN);
    if (response.status !== 503 || attempt >= RETRIES || !(wait >= 0)) return response;
    $("status").textContent = `the server is busy: trying again in ${wait} s`;
    await new Promise((resolve) => setTimeout(resolve, 1000 * Math.min(wait, RETRY_CAP_S)));
  }
}

// Consecutive rows in requests of at most the server's max batch files and body bytes (a file
// larger than the body limit alone goes alone, and gets the server's 413).
function chunks(batch) {
  const maxFiles = Number(document.body.dataset.maxBatchFiles);
  const maxBytes = Number(document.body.dataset.maxBatchBytes);
  const out = [];
  let current = [];
  let bytes = 0;
  for (const row of batch) {
    const size = row.file.size + PART_OVERHEAD_BYTES;
    if (current.length && (current.length >= maxFiles || bytes + size > maxBytes)) {
      out.push(current);
      current = [];
      bytes = 0;
    }
    current.push(row);
    bytes += size;
  }
  if (current.length) out.push(current);
  return out;
}

async function sendChunk(chunk) {
  const form = new FormData();
  for (const row of chunk) form.append("files", row.file, row.file.name);
  let response;
  try {
    response = await fetchPolitely(`/classify/batch?${classifyParams()}`, {
      method: "POST", body: form, headers: headers(),
    });
  } catch (err) {
    for (const row of chunk) fail(row, 0, `request failed: ${err}`);
    return;
  }
  if (!response.ok) {
    const detail = await errorText(response);
    for (const row of chunk) fail(row, response.status, detail);
    return;
  }
  const body = await response.json();
  body.items.forEach((item, i) => {
    if (item.result) succeed(chunk[i], item.result);
    else fail(chunk[i], item.error.status, item.error.detail);
  });
}

async function classifySky(row) {
  const params = classifyParams();
  params.set("ra", row.sky.ra);
  params.set("dec", row.sky.dec);
  try {
    const response = await fetchPolitely(`/classify/sky?${params}`, { headers: headers() });
    if (response.ok) succeed(row, await response.json());
    else fail(row, response.status, await errorText(response));
  } catch (err) {
    fail(row, 0, `request failed: ${err}`);
  }
}

function succeed(row, result) {
  row.status = "ok";
  row.result = result;
}

function fail(row, status, detail) {
  row.status = "error";
  row.error = { status, detail };
}

function errorLine(row) {
  return row.error.status ? `${row.error.status}: ${row.error.detail}` : row.error.detail;
}

// One run: its rows (already in the table, pending) sent a request at a time with the progress
// shown, then the first row's details (its result or its error, never the previous run's).
async function run(batch, send) {
  if (!batch.length) return;
  delete document.body.dataset.state;
  $("error").hidden = true;
  const started = performance.now();
  const progress = $("progress");
  progress.max = batch.length;
  progress.value = 0;
  $("progress-line").hidden = false;
  renderTable();
  for (const part of send) {
    $("status").textContent = `classifying ${progress.value + 1}–` +
      `${progress.value + part.rows.length} of ${batch.length}…`;
    await part.go();
    progress.value += part.rows.length;
    renderTable();
  }
  const failed = batch.filter((row) => row.status === "error");
  const unlike = batch.filter((row) => row.status === "ok" && row.result.in_distribution === false);
  $("status").textContent =
    `${batch.length} sent in ${((performance.now() - started) / 1000).toFixed(1)} s: ` +
    `${batch.length - failed.length} classified, ${failed.length} refused, ` +
    `${unlike.length} unlike the training data`;
  if (failed.length === batch.length) {
    $("error").textContent = batch.length === 1
      ? errorLine(batch[0])
      : `none of the ${batch.length} could be classified: the table says why`;
    $("error").hidden = false;
  }
  showDetails(batch[0]);
  document.body.dataset.state = failed.length === batch.length ? "error" : "done";
}

// Runs one after another: a drop while files are being sent waits for them.
let runs = Promise.resolve();

function enqueue(batch, send) {
  rows.push(...batch);
  renderTable();
  runs = runs.then(() => run(batch, send)).catch((err) => {
    $("error").textContent = `the page failed: ${err}`;
    $("error").hidden = false;
    document.body.dataset.state = "error";
  });
}

function classifyFiles(files) {
  const batch = files.map((file) => ({
    id: nextRowId++, label: file.webkitRelativePath || file.name, file, status: "pending",
  }));
  enqueue(batch, chunks(batch).map((part) => ({ rows: part, go: () => sendChunk(part) })));
}

// Sexagesimal to decimal degrees, the server's unit: RA in hours ("12h30m49.4s",
// "12:30:49.4", "12 30 49.4"), Dec in degrees ("+12d23m28s", "+12°23′28″", "+12:23:28").
// Anything else goes as typed, and the server says what is wrong with it.
const SEXAGESIMAL =
  /^([+-]?)(\d+(?:\.\d+)?)[hd°:\s]\s*(\d+(?:\.\d+)?)[m′':\s]\s*(\d+(?:\.\d+)?)?[s″"]?$/i;

function degrees(text, hours) {
  const match = SEXAGESIMAL.exec(text.trim());
  if (!match) return text.trim();
  const [, sign, whole, minutes, seconds] = match;
  const sexagesimal = Number(whole) + Number(minutes) / 60 + Number(seconds || 0) / 3600;
  const value = hours ? 15 * sexagesimal : sexagesimal;
  return String(sign === "-" ? -value : value);
}

// "ra dec" pairs as typed: the two fields, then one pair a line (a space or a comma between;
// six words are "h m s d m s").
function positions() {
  const pairs = [];
  if ($("sky-ra").value.trim() || $("sky-dec").value.trim()) {
    pairs.push([$("sky-ra").value.trim(), $("sky-dec").value.trim()]);
  }
  for (const line of $("sky-list").value.split("\n")) {
    const words = line.trim().split(/[\s,]+/).filter(Boolean);
    if (words.length === 6) pairs.push([words.slice(0, 3).join(" "), words.slice(3).join(" ")]);
    else if (words.length) pairs.push([words[0], words.slice(1).join(" ")]);
  }
  return pairs;
}

function classifyPositions() {
  const batch = positions().map(([ra, dec]) => ({
    id: nextRowId++,
    label: `ra ${ra}, dec ${dec}`,
    sky: { ra: degrees(ra, true), dec: degrees(dec, false) },
    status: "pending",
  }));
  enqueue(batch, batch.map((row) => ({ rows: [row], go: () => classifySky(row) })));
}

// A folder holds other files too: only the cutout formats' extensions are sent.
function cutoutsOnly(files) {
  const suffixes = $("file-input").accept.split(",").filter((s) => s.startsWith("."));
  const kept = files.filter((f) => suffixes.some((s) => f.name.toLowerCase().endsWith(s)));
  if (kept.length < files.length) {
    $("status").textContent = `${files.length - kept.length} files that are not cutouts left out`;
  }
  return kept;
}

// ---- the table ----------------------------------------------------------------------------

const SORT_VALUES = {
  file: (row) => row.label.toLowerCase(),
  class: (row) => (row.status === "ok" ? row.result.top_class : null),
  probability: (row) => (row.status === "ok" ? row.result.top_probability : null),
  flag: (row) => (row.status === "ok" ? row.result.in_distribution : null),
  ood: (row) => (row.status === "ok" ? row.result.ood_score : null),
};

function shownRows() {
  const wantedClass = $("filter-class").value;
  const wantedFlag = $("filter-flag").value;
  const shown = rows.filter((row) => {
    if (wantedFlag === "error") return row.status === "error";
    if (row.status !== "ok") return !wantedClass && !wantedFlag;
    if (wantedClass && row.result.top_class !== wantedClass) return false;
    if (wantedFlag === "ood") return row.result.in_distribution === false;
    if (wantedFlag === "in") return row.result.in_distribution !== false;
    return true;
  });
  if (!sort.key) return shown;
  const value = SORT_VALUES[sort.key];
  // Rows without the value (errors, pending, no OOD score) stay last either way.
  return shown.sort((a, b) => {
    const [x, y] = [value(a), value(b)];
    if (x === null || x === undefined) return y === null || y === undefined ? 0 : 1;
    if (y === null || y === undefined) return -1;
    return sort.direction * (x < y ? -1 : x > y ? 1 : 0);
  });
}

function fileCell(row) {
  const button = element("button", { type: "button", className: "link", textContent: row.label });
  button.addEventListener("click", () => {
    showDetails(row);
    $("details-panel").scrollIntoView({ block: "start" });
  });
  button.disabled = row.status === "pending";
  const cell = element("td", {}, button);
  if (row.status === "ok" && row.result.cutout) {
    cell.append(element("small", {
      className: "cutout-url", textContent: `${row.result.cutout.source}: ${row.result.cutout.url}`,
    }));
  }
  return cell;
}

function tableRow(row) {
  const tr = element("tr", { className: row.id === selectedId ? "selected" : "" });
  tr.dataset.testid = "result-row";
  tr.dataset.status = row.status;
  tr.dataset.file = row.label;
  const thumb = element("td", { className: "thumb" });
  if (row.status === "ok") {
    thumb.append(element("img", {
      src: `data:image/png;base64,${row.result.image_png_base64}`, width: 48, height: 48,
      alt: `${row.label} as the model saw it`,
    }));
  }
  tr.append(thumb, fileCell(row));
  if (row.status !== "ok") {
    const text = row.status === "pending" ? "waiting…" : errorLine(row);
    tr.append(element("td", { colSpan: 4, className: `row-${row.status}`, textContent: text }));
    return tr;
  }
  const result = row.result;
  tr.dataset.probability = String(result.top_probability);
  const classCell = element("td", { textContent: result.top_class });
  const flag = oodFlag(result, true);
  if (flag) {
    flag.dataset.testid = "ood-flag";
    classCell.append(" ", flag);
  }
  const inDistribution = { true: "yes", false: "no" }[result.in_distribution] || "—";
  tr.append(
    classCell,
    element("td", { className: "number", textContent: percent(result.top_probability) }),
    element("td", { textContent: inDistribution }),
    element("td", { className: "number", textContent: number(result.ood_score) }),
  );
  return tr;
}

// A row's <tr> is made again only when its status or selection changed (a run re-renders the
// table after every request: thousands of thumbnails are not decoded again each time).
function rowElement(row) {
  const key = `${row.status} ${row.id === selectedId}`;
  if (row.element === undefined || row.elementKey !== key) {
    row.element = tableRow(row);
    row.elementKey = key;
  }
  return row.element;
}

function renderTable() {
  const shown = shownRows();
  $("results-body").replaceChildren(...shown.map(rowElement));
  $("results-table").hidden = rows.length === 0;
  $("table-empty").hidden = rows.length > 0;
  $("table-empty").textContent = "No results yet.";
  if (rows.length && !shown.length) {
    $("table-empty").hidden = false;
    $("table-empty").textContent = "No row matches the filters.";
  }
  for (const id of DOWNLOADS) $(id).disabled = shown.length === 0;
  $("clear").disabled = rows.length === 0;
  for (const th of document.querySelectorAll("#results-table th[aria-sort]")) {
    const key = th.querySelector("button").dataset.sort;
    const direction = sort.direction > 0 ? "ascending" : "descending";
    th.setAttribute("aria-sort", key === sort.key ? direction : "none");
  }
}

function sortBy(key) {
  // A first click sorts numbers from the largest down, names from A.
  const firstDirection = key === "file" || key === "class" ? 1 : -1;
  sort = { key, direction: sort.key === key ? -sort.direction : firstDirection };
  renderTable();
}

// ---- downloads ----------------------------------------------------------------------------

// The scorer's column names (galmorph.core.data.tables.class_columns).
function classColumn(name) {
  const ident = name.toLowerCase().replace(/[^0-9a-z]+/g, "_").replace(/^_+|_+$/g, "");
  return `p_${ident || "class"}`;
}

// A position as the scorer reads a catalog's: decimal degrees, null when it is not a number.
function degreesOrNull(text) {
  const value = text.trim() === "" ? NaN : Number(text);
  return Number.isFinite(value) ? value : null;
}

// The table in the scorer's columns (docs/scoring.md), with their Parquet types (`galmorph
// score`'s: int64 index, float32 probabilities and OOD score, float64 positions), after the
// file (or the position and its cutout request). null where a row has no value. The CSV and
// the Parquet download are both this.
function tableColumns(shown) {
  const answered = rows.find((row) => row.status === "ok");
  const classes = model
    ? model.class_names
    : Object.keys(answered ? answered.result.probabilities : {});
  const hasOod = model
    ? oodThreshold() !== null
    : Boolean(answered) && typeof answered.result.ood_score === "number";
  const column = (name, type, value) => ({
    name,
    type,
    data: shown.map((row) => {
      const result = row.status === "ok" ? row.result : null;
      const cell = value(row, result);
      return cell === undefined ? null : cell;
    }),
  });
  const answer = (name, type, value) => column(name, type, (row, r) => (r ? value(r) : null));
  return [
    column("file", "STRING", (row) => (row.file ? row.label : null)),
    column("ra", "DOUBLE", (row) => (row.sky ? degreesOrNull(row.sky.ra) : null)),
    column("dec", "DOUBLE", (row) => (row.sky ? degreesOrNull(row.sky.dec) : null)),
    answer("pred_label", "STRING", (r) => r.top_class),
    answer("pred_index", "INT64", (r) => BigInt(classes.indexOf(r.top_class))),
    answer("pred_prob", "FLOAT", (r) => r.top_probability),
    ...classes.map((name) => answer(classColumn(name), "FLOAT", (r) => r.probabilities[name])),
    ...(hasOod
      ? [answer("ood_score", "FLOAT", (r) => r.ood_score),
        answer("in_distribution", "BOOLEAN", (r) => r.in_distribution)]
      : []),
    // On every row, as the scorer writes it: the model that was asked, answer or not.
    column("model_sha256", "STRING", (row, r) => (r ? r.model.sha256 : model && model.sha256)),
    answer("cutout_url", "STRING", (r) => (r.cutout ? r.cutout.url : null)),
    column("error", "STRING", (row) => (row.status === "error" ? errorLine(row) : null)),
  ];
}

function csvField(value) {
  if (value === null) return "";
  const text = String(value);
  return /[",\n\r]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

function tableCsv(shown) {
  const columns = tableColumns(shown);
  const lines = [columns.map((c) => c.name).join(",")];
  shown.forEach((_, i) => lines.push(columns.map((c) => csvField(c.data[i])).join(",")));
  return `${lines.join("\r\n")}\r\n`;
}

// Written here by the vendored hyparquet-writer (plain JavaScript: the page's
// Content-Security-Policy allows no WebAssembly, so parquet-wasm cannot run), loaded on first use.
async function tableParquet(shown) {
  const { parquetWriteBuffer } = await import("/static/vendor/hyparquet-writer.js");
  return parquetWriteBuffer({ columnData: tableColumns(shown), createdBy: "galmorph web page" });
}

function tableJson(shown) {
  const answers = shown.map((row) => {
    const result = row.result ? { ...row.result, image_png_base64: undefined } : null;
    const file = row.file ? row.label : null;
    return { file, sky: row.sky || null, result, error: row.error || null };
  });
  return JSON.stringify(answers, null, 1);
}

function download(name, type, content) {
  const link = element("a", { download: name });
  link.href = URL.createObjectURL(new Blob([content], { type }));
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

// ---- one galaxy's details -----------------------------------------------------------------

function renderChart(result) {
  const chart = $("chart");
  chart.replaceChildren();
  for (const [name, probability] of Object.entries(result.probabilities)) {
    const row = element("div", {
      className: name === result.top_class ? "bar top" : "bar",
    });
    row.setAttribute("role", "listitem");
    row.dataset.className = name;
    row.dataset.probability = String(probability);
    const fill = element("span", { className: "bar-fill" });
    fill.style.display = "block";
    fill.style.width = `${(100 * probability).toFixed(2)}%`;
    row.append(
      element("span", { className: "bar-label", textContent: name }),
      element("span", { className: "bar-track" }, fill),
      element("span", { className: "bar-value", textContent: percent(probability) }),
    );
    chart.appendChild(row);
  }
}

function bandsText(bands) {
  if (bands.length > 1) return bands.join(", ");
  if (bands[0] === "L") return "grey (one channel)";
  return bands[0] === "band" ? "one band, unnamed (grey)" : `${bands[0]} (one band, grey)`;
}

function oodText(result) {
  if (result.ood_score === null || result.ood_score === undefined) {
    return "no OOD score in this model file";
  }
  const verdict = result.in_distribution ? "like the training data" : OOD_SENTENCE;
  return `${number(result.ood_score)} (threshold ${number(oodThreshold())}): ${verdict}`;
}

function renderDetails(row) {
  const result = row.result;
  const pre = result.preprocessing;
  const details = [
    ["file", row.file ? row.label : "—"],
    ["format", pre.format + (pre.compression ? ` (${pre.compression})` : "")],
    ["bands", bandsText(pre.bands_used)],
    ["original shape", pre.original_shape.join("×")],
    ["pixel scale", pre.pixel_scale ? `${number(pre.pixel_scale)}″/px` : "unknown"],
    ["fit", pre.fit],
    ["stretch", pre.stretch || "none (already rendered)"],
    ["OOD score", oodText(result)],
    ["model", `${result.model.name} ${result.model.version}`],
    ["timings", `decode ${result.timings.decode_ms.toFixed(1)} ms · queue ` +
      `${result.timings.queue_ms.toFixed(1)} ms · inference ` +
      `${result.timings.inference_ms.toFixed(1)} ms (batch ${result.timings.batch_size})`],
  ];
  if (result.cutout) {
    details.splice(1, 0,
      ["position", `ra ${number(result.cutout.ra, 9)}°, dec ${number(result.cutout.dec, 9)}°`],
      ["cutout request", `${result.cutout.url} (${result.cutout.source})`]);
  }
  const dl = $("details");
  dl.replaceChildren();
  for (const [term, value] of details) {
    dl.append(element("dt", { textContent: term }), element("dd", { textContent: value }));
  }
  $("warnings").replaceChildren(...pre.warnings.map((w) => element("li", { textContent: w })));
}

function niceArcsec(fieldArcsec) {
  const fitting = SCALE_BAR_ARCSEC.filter((a) => a <= fieldArcsec / 3);
  return fitting.length ? fitting[fitting.length - 1] : fieldArcsec / 3;
}

// A bar of a round number of arcsec under an image of `arcsecPerPixel` (image pixels) drawn
// `displayScale` CSS px per image pixel.
function drawScaleBar(bar, arcsecPerPixel, imagePixels, displayScale, assumed) {
  const arcsec = niceArcsec(arcsecPerPixel * imagePixels);
  const width = (arcsec / arcsecPerPixel) * displayScale;
  bar.querySelector("span").style.width = `${width.toFixed(1)}px`;
  bar.dataset.arcsec = String(arcsec);
  bar.dataset.widthPx = width.toFixed(2);
  const note = assumed ? " (scale assumed)" : "";
  bar.querySelector("small").textContent = `${number(arcsec)}″${note}`;
  bar.hidden = false;
}

// The upload's own arcsec/px: its header's, else what the model assumed when it framed it.
function uploadScale(result) {
  const pre = result.preprocessing;
  if (pre.pixel_scale) return { scale: pre.pixel_scale, assumed: false };
  if (pre.fit === "resize") {
    const width = pre.original_shape[1];
    return { scale: model.preprocessing.field_of_view_arcsec[1] / width, assumed: true };
  }
  return { scale: model.card.pixel_scale, assumed: true };
}

function showUpload(row) {
  const view = $("upload-view");
  const none = $("upload-none");
  view.hidden = true;
  $("upload-scale").hidden = true;
  view.removeAttribute("src");
  none.hidden = false;
  const format = row.result.preprocessing.format;
  if (!row.file || !["png", "jpeg"].includes(format)) {
    none.textContent = row.file
      ? `${format.toUpperCase()}: a browser cannot show it; the model's view is beside it`
      : "fetched by the server from the cutout service";
    return;
  }
  none.textContent = "reading…";
  // A data: URL, as the Content-Security-Policy allows no blob: images.
  const reader = new FileReader();
  reader.addEventListener("load", () => {
    if (selectedId !== row.id) return;
    view.addEventListener("load", () => {
      if (!model) return;
      const { scale, assumed } = uploadScale(row.result);
      const shown = Math.min(
        view.clientWidth / view.naturalWidth, view.clientHeight / view.naturalHeight);
      drawScaleBar($("upload-scale"), scale, view.naturalWidth, shown, assumed);
    }, { once: true });
    view.src = reader.result;
    view.hidden = false;
    none.hidden = true;
  });
  reader.readAsDataURL(row.file);
}

function showDetails(row) {
  selectedId = row.id;
  renderTable();
  $("empty-state").hidden = true;
  const problem = $("details-error");
  if (row.status !== "ok") {
    $("result").hidden = true;
    problem.textContent = `${row.label}: ${errorLine(row)}`;
    problem.hidden = false;
    return;
  }
  problem.hidden = true;
  const result = row.result;
  $("model-input").src = `data:image/png;base64,${result.image_png_base64}`;
  $("top-class").textContent = result.top_class;
  $("top-probability").textContent = percent(result.top_probability);
  const flag = oodFlag(result, false);
  $("headline-flag").hidden = !flag;
  if (flag) {
    $("headline-flag").textContent = flag.textContent;
    $("headline-flag").title = flag.title;
  }
  renderChart(result);
  renderDetails(row);
  $("result").hidden = false;
  $("model-scale").hidden = true;
  if (model) {
    const size = model.preprocessing.input_size[1];
    drawScaleBar($("model-scale"), model.card.pixel_scale, size,
      $("model-input").clientWidth / size, !result.preprocessing.pixel_scale);
  }
  showUpload(row);
  showNeighbours(row);
}

// ---- neighbours (POST /similar, when the server has a similarity index) --------------------

const NEIGHBOURS = 10;

// The index's galaxies nearest an uploaded file, which the server embeds as /classify does;
// asked once a row (the promise is kept on it).
function neighboursOf(row) {
  if (!row.neighbours) {
    const params = new URLSearchParams({ k: String(NEIGHBOURS) });
    if ($("stretch").value) params.set("stretch", $("stretch").value);
    const form = new FormData();
    form.append("file", row.file, row.file.name);
    row.neighbours = fetchPolitely(`/similar?${params}`, {
      method: "POST", body: form, headers: headers(),
    })
      .then(async (response) => (response.ok
        ? { answer: await response.json() }
        : { error: `${response.status}: ${await errorText(response)}` }))
      .catch((err) => ({ error: `request failed: ${err}` }));
  }
  return row.neighbours;
}

// The server keeps no images of its index's galaxies. A neighbour that is also a row of the
// table (the index was built from the files dropped here, say) is shown with that row's model
// view and opens its details; one with a position, with its cutout once fetched (below).
function answeredRow(id) {
  return rows.find((row) => row.status === "ok" && row.label === id);
}

function neighbourRow(neighbour) {
  const same = answeredRow(neighbour.id_str);
  const tr = element("tr");
  tr.dataset.testid = "neighbour-row";
  tr.dataset.id = neighbour.id_str;
  const thumb = element("td", { className: "thumb" });
  const image = same ? same.result.image_png_base64 : neighbour.image_png_base64;
  if (image) {
    thumb.append(element("img", {
      src: `data:image/png;base64,${image}`, width: 48, height: 48,
      alt: `${neighbour.id_str} as the model saw it`,
    }));
  } else if (neighbour.image_error) {
    thumb.append(element("small", { textContent: "no image", title: neighbour.image_error }));
  }
  let name = element("span", { textContent: neighbour.id_str });
  if (same) {
    name = element("button", { type: "button", className: "link", textContent: same.label });
    name.addEventListener("click", () => showDetails(same));
  }
  const classCell = element("td", { textContent: neighbour.pred_label ?? "—" });
  const flag = oodFlag(neighbour, true);
  if (flag) classCell.append(" ", flag);
  const placed = typeof neighbour.ra === "number" && typeof neighbour.dec === "number";
  const position = placed ? `${number(neighbour.ra, 7)}°, ${number(neighbour.dec, 7)}°` : "—";
  tr.append(
    thumb,
    element("td", { className: "number", textContent: String(neighbour.rank) }),
    element("td", {}, name),
    element("td", { className: "number", textContent: number(neighbour.distance, 3) }),
    classCell,
    element("td", {
      className: "number",
      textContent: typeof neighbour.pred_prob === "number" ? percent(neighbour.pred_prob) : "—",
    }),
    element("td", { textContent: { true: "yes", false: "no" }[neighbour.in_distribution] || "—" }),
    element("td", { textContent: position }),
  );
  return tr;
}

async function showNeighbours(row) {
  const section = $("neighbours");
  const note = $("neighbours-note");
  section.hidden = document.body.dataset.similar !== "true";
  $("neighbours-table").hidden = true;
  $("neighbour-cutouts").hidden = true;
  delete section.dataset.state;
  if (section.hidden) return;
  if (!row.file) {
    note.textContent = "Neighbours are searched for uploaded cutouts, not for positions.";
    section.dataset.state = "none";
    return;
  }
  note.textContent = "searching the server's similarity index…";
  const { answer, error } = await neighboursOf(row);
  if (selectedId !== row.id) return;
  section.dataset.state = error ? "error" : "done";
  if (error) {
    note.textContent = `no neighbours: ${error}`;
    return;
  }
  const shown = answer.neighbours.filter((n) => answeredRow(n.id_str)).length;
  note.textContent =
    `The ${answer.neighbours.length} nearest of the ${answer.index.count} galaxies in the ` +
    "server's index, by the cosine distance of the model's embeddings (0: the same " +
    `direction)${shown ? `; ${shown} of them are in the table above, with their image` : ""}.`;
  $("neighbours-body").replaceChildren(...answer.neighbours.map(neighbourRow));
  $("neighbours-table").hidden = answer.neighbours.length === 0;
  const button = $("neighbour-cutouts");
  button.hidden = document.body.dataset.sky !== "true" || !withoutImage(answer).length;
  button.onclick = () => fetchNeighbourCutouts(row, answer);
}

function withoutImage(answer) {
  return answer.neighbours.filter((n) => !n.image_png_base64 && !answeredRow(n.id_str) &&
    typeof n.ra === "number" && typeof n.dec === "number");
}

// With the sky route on, the neighbours' cutouts come through /classify/sky: the server's
// cutout cache (filled when their catalog was scored there), else the cutout service. Only on
// a click, as each may be a request to the survey.
async function fetchNeighbourCutouts(row, answer) {
  const button = $("neighbour-cutouts");
  const wanted = withoutImage(answer);
  button.disabled = true;
  for (const [i, neighbour] of wanted.entries()) {
    button.textContent = `fetching ${i + 1} of ${wanted.length}…`;
    const params = classifyParams();
    params.set("ra", String(neighbour.ra));
    params.set("dec", String(neighbour.dec));
    try {
      const response = await fetchPolitely(`/classify/sky?${params}`, { headers: headers() });
      if (response.ok) neighbour.image_png_base64 = (await response.json()).image_png_base64;
      else neighbour.image_error = `${response.status}: ${await errorText(response)}`;
    } catch (err) {
      neighbour.image_error = `request failed: ${err}`;
    }
  }
  button.disabled = false;
  button.textContent = "Show their cutouts";
  if (selectedId === row.id) showNeighbours(row);
}

// ---- wiring -------------------------------------------------------------------------------

function setUp() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (event) => {
    classifyFiles([...event.target.files]);
    event.target.value = "";
  });
  $("folder-input").addEventListener("change", (event) => {
    classifyFiles(cutoutsOnly([...event.target.files]));
    event.target.value = "";
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    classifyFiles([...event.dataTransfer.files]);
  });
  if (document.body.dataset.sky === "true") $("sky-form").hidden = false;
  $("sky-form").addEventListener("submit", (event) => {
    event.preventDefault();
    classifyPositions();
  });
  for (const button of document.querySelectorAll("#results-table th button")) {
    button.addEventListener("click", () => sortBy(button.dataset.sort));
  }
  $("filter-class").addEventListener("change", renderTable);
  $("filter-flag").addEventListener("change", renderTable);
  $("download-csv").addEventListener("click", () =>
    download("galmorph_results.csv", "text/csv", tableCsv(shownRows())));
  $("download-json").addEventListener("click", () =>
    download("galmorph_results.json", "application/json", tableJson(shownRows())));
  $("download-parquet").addEventListener("click", async () => {
    try {
      const parquet = await tableParquet(shownRows());
      download("galmorph_results.parquet", "application/vnd.apache.parquet", parquet);
    } catch (err) {
      $("error").textContent = `the Parquet file could not be written: ${err}`;
      $("error").hidden = false;
    }
  });
  $("clear").addEventListener("click", () => {
    rows.length = 0;
    selectedId = null;
    $("result").hidden = true;
    $("details-error").hidden = true;
    $("empty-state").hidden = false;
    $("progress-line").hidden = true;
    $("status").textContent = "";
    renderTable();
  });
  $("api-key").addEventListener("change", loadModelInfo);
  watchReadiness();
}

setUp();
