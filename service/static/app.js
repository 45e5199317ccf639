// The galmorph page: send a cutout to POST /classify and show what came back.
"use strict";

const $ = (id) => document.getElementById(id);
// How often the page asks /readyz while the server has no model (the server checks every 5 s).
const READINESS_POLL_MS = 3000;

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

async function loadModelInfo() {
  const response = await fetch("/model", { headers: headers() });
  if (!response.ok) {
    $("model-line").textContent = `model: ${response.status} ${await errorText(response)}`;
    return;
  }
  const info = await response.json();
  $("model-line").textContent =
    `${info.name} · version ${info.version} · ${info.providers.join(", ")} · ` +
    `${info.input.shape.slice(1, 3).join("×")} px input`;
  const select = $("stretch");
  select.replaceChildren(select.options[0]);
  for (const name of info.preprocessing.stretches || []) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name === info.preprocessing.stretch ? `${name} (model default)` : name;
    select.appendChild(option);
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

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

function renderChart(result) {
  const chart = $("chart");
  chart.replaceChildren();
  for (const [name, probability] of Object.entries(result.probabilities)) {
    const row = document.createElement("div");
    row.className = name === result.top_class ? "bar top" : "bar";
    row.dataset.className = name;
    row.dataset.probability = String(probability);
    const label = document.createElement("span");
    label.className = "bar-label";
    label.textContent = name;
    const track = document.createElement("span");
    track.className = "bar-track";
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.display = "block";
    fill.style.width = `${(100 * probability).toFixed(2)}%`;
    track.appendChild(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = percent(probability);
    row.append(label, track, value);
    chart.appendChild(row);
  }
}

function renderDetails(result) {
  const pre = result.preprocessing;
  const rows = [
    ["file", result.filename || "—"],
    ["format", pre.format + (pre.compression ? ` (${pre.compression})` : "")],
    ["bands", pre.bands_used.join(", ")],
    ["original shape", pre.original_shape.join("×")],
    ["pixel scale", pre.pixel_scale ? `${pre.pixel_scale.toFixed(3)}″/px` : "unknown"],
    ["stretch", pre.stretch || "none (already rendered)"],
    ["model", `${result.model.name} ${result.model.version}`],
    ["timings", `decode ${result.timings.decode_ms.toFixed(1)} ms · queue ` +
      `${result.timings.queue_ms.toFixed(1)} ms · inference ` +
      `${result.timings.inference_ms.toFixed(1)} ms (batch ${result.timings.batch_size})`],
  ];
  const dl = $("details");
  dl.replaceChildren();
  for (const [term, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dl.append(dt, dd);
  }
  const list = $("warnings");
  list.replaceChildren();
  for (const warning of pre.warnings) {
    const li = document.createElement("li");
    li.textContent = warning;
    list.appendChild(li);
  }
}

async function classify(file) {
  $("error").hidden = true;
  $("status").textContent = `classifying ${file.name}…`;
  const params = new URLSearchParams({ return_image: "true", top_k: "3" });
  if ($("stretch").value) params.set("stretch", $("stretch").value);
  const form = new FormData();
  form.append("file", file, file.name);
  let response;
  try {
    response = await fetch(`/classify?${params}`, { method: "POST", body: form, headers: headers() });
  } catch (err) {
    showError(`request failed: ${err}`);
    return;
  }
  if (!response.ok) {
    showError(`${response.status}: ${await errorText(response)}`);
    return;
  }
  const result = await response.json();
  $("model-input").src = `data:image/png;base64,${result.image_png_base64}`;
  $("top-class").textContent = result.top_class;
  $("top-probability").textContent = percent(result.top_probability);
  renderChart(result);
  renderDetails(result);
  $("result").hidden = false;
  $("status").textContent = `${file.name}: done in ${result.timings.total_ms.toFixed(0)} ms`;
  document.body.dataset.state = "done";
}

function showError(message) {
  $("status").textContent = "";
  $("error").textContent = message;
  $("error").hidden = false;
  document.body.dataset.state = "error";
}

function setUp() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (event) => {
    if (event.target.files.length) classify(event.target.files[0]);
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (event.dataTransfer.files.length) classify(event.dataTransfer.files[0]);
  });
  $("api-key").addEventListener("change", loadModelInfo);
  watchReadiness();
}

setUp();
