// InstructEdit's page: plain JavaScript over the public API (/v1/edits), no build step.
"use strict";

const KEY_STORAGE = "instructedit.apiKey";
const FINAL = ["succeeded", "failed", "canceled"];
const GRID_IMAGE = [1.0, 1.5, 2.0]; // S_I, rows
const GRID_TEXT = [5, 7.5, 10]; // S_T, columns
const EXT = { png: "png", jpeg: "jpg", webp: "webp" };

const $ = (id) => document.getElementById(id);
const state = {
  key: localStorage.getItem(KEY_STORAGE) || "",
  input: null, // {blob, name, url}: the photo the next edit starts from
  chain: [], // [{url, prompt, jobId}]; chain[0] is the original photo
  inputDepth: 0, // how many chain steps led to the current input
  job: null, // the job being followed
  abort: null,
  result: null, // {job, index, depth}
  gridRun: 0,
};

// -- the API ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network", `Could not reach the API: ${err.message}`);
  }
  if (response.ok) return response;
  let code = `http_${response.status}`;
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) ({ code, message } = body.error);
  } catch (_) { /* not JSON: keep the status line */ }
  if (response.status === 401) showAuth(message);
  throw new ApiError(response.status, code, message);
}

const apiJSON = async (path, options) => (await api(path, options)).json();

// -- errors and the key -----------------------------------------------------------------

function showError(err) {
  if (!err || err.name === "AbortError") return;
  const box = $("error");
  box.textContent = err.message || String(err);
  box.dataset.code = err.code || "";
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function showAuth(message) {
  $("auth").hidden = false;
  $("key-toggle").hidden = false;
  if (message) $("auth-hint").textContent = `${message}. The key is kept in this browser only.`;
}

function saveKey() {
  state.key = $("api-key").value.trim();
  if (state.key) localStorage.setItem(KEY_STORAGE, state.key);
  else localStorage.removeItem(KEY_STORAGE);
  clearError();
  loadHistory().then((ok) => { if (ok) $("auth").hidden = true; });
}

// -- bounds from the API's own schema -------------------------------------------------

async function applySchemaBounds() {
  // The page's inputs are written with EditParams' bounds; the live schema wins if it says
  // otherwise (a newer server).
  try {
    const schema = await (await fetch("/openapi.json")).json();
    const forms = Object.values(schema.components?.schemas || {});
    const props = forms.find((s) => s.properties?.image_guidance_scale)?.properties;
    if (!props) return;
    for (const input of document.querySelectorAll("#edit-form [name]")) {
      const p = props[input.name];
      if (!p || input.type === "file") continue;
      if (p.minimum !== undefined) input.min = p.minimum;
      if (p.maximum !== undefined) input.max = p.maximum;
    }
  } catch (_) { /* the hard-coded bounds stand */ }
}

// -- the photo -------------------------------------------------------------------------

function setInput(blob, name, depth) {
  // Object URLs are kept: the chain, the grid and the result view may still show them.
  state.input = { blob, name, url: URL.createObjectURL(blob) };
  state.inputDepth = depth;
  const preview = $("preview");
  preview.hidden = false;
  preview.onerror = () => { preview.hidden = true; };
  preview.src = state.input.url;
}

function pickPhoto(file) {
  if (!file) return;
  clearError();
  setInput(file, file.name, 0);
  state.chain = [{ url: state.input.url, prompt: "Original", jobId: null }];
  renderChain();
}

function fileName(blob, base) {
  const ext = (blob.type.split("/")[1] || "png").replace("jpeg", "jpg");
  return `${base}.${ext}`;
}

// -- submitting ------------------------------------------------------------------------

function formFields(overrides = {}) {
  const fields = {
    prompt: $("prompt").value.trim(),
    image_guidance_scale: $("image-guidance").value,
    guidance_scale: $("text-guidance").value,
    num_inference_steps: $("steps").value,
    num_outputs: $("outputs").value,
    output_format: $("format").value,
    ...overrides,
  };
  if (!$("seed-random").checked && $("seed").value !== "" && !("seed" in overrides)) {
    fields.seed = $("seed").value;
  }
  return fields;
}

function buildForm(fields) {
  const form = new FormData();
  form.append("image", state.input.blob, state.input.name);
  const mask = $("mask-input").files[0];
  if (mask) form.append("mask", mask, mask.name);
  for (const [name, value] of Object.entries(fields)) {
    if (value !== undefined && value !== null) form.append(name, String(value));
  }
  return form;
}

function checkReady() {
  if (!state.input) throw new ApiError(0, "no_image", "Choose a photo to edit first.");
  if (!$("prompt").value.trim()) {
    throw new ApiError(0, "no_prompt", "Write an instruction: what should change?");
  }
}

async function submitEdit(event) {
  event.preventDefault();
  clearError();
  try {
    checkReady();
    const depth = state.inputDepth;
    const before = state.input.url;
    const job = await apiJSON("/v1/edits", { method: "POST", body: buildForm(formFields()) });
    await follow(job, depth, before);
  } catch (err) {
    showError(err);
  }
}

// -- following a job -------------------------------------------------------------------

function showProgress(job, queuePosition) {
  $("job").hidden = false;
  const status = job.status;
  const step = job.progress?.step ?? 0;
  const total = job.progress?.total ?? 0;
  let text;
  if (status === "queued") {
    const pos = queuePosition ?? job.queue_position;
    text = pos ? `Queued — position ${pos} in line` : "Queued";
  } else if (status === "running") {
    text = `Running — step ${step} / ${total}`;
  } else if (status === "succeeded") {
    text = `Done — step ${step} / ${total}`;
  } else if (status === "failed") {
    text = `Failed at step ${step} / ${total}`;
  } else {
    text = `Canceled at step ${step} / ${total}`;
  }
  $("progress-text").textContent = text;
  $("progress").dataset.status = status;
  $("progress").dataset.jobId = job.id;
  $("progress-bar").value = total ? step / total : 0;
  $("cancel").hidden = FINAL.includes(status);
  $("cancel").disabled = false;
}

async function follow(job, depth, before) {
  if (state.abort) state.abort.abort();
  const abort = new AbortController();
  state.abort = abort;
  state.job = job;
  $("submit").disabled = true;
  showProgress(job);
  try {
    let finished = null;
    try {
      finished = await followEvents(job, abort.signal);
    } catch (err) {
      // A stream that fails for any reason but the job itself: poll instead.
      if (err.name === "AbortError" || err.status === 401 || err.status === 404) throw err;
    }
    if (!finished) finished = await poll(job, abort.signal);
    finish(finished, depth, before);
  } catch (err) {
    showError(err);
  } finally {
    if (state.abort === abort) {
      state.abort = null;
      $("submit").disabled = false;
    }
  }
}

// EventSource cannot send an Authorization header: read the stream with fetch and parse
// the server-sent events here. Resolves with the finished job, or null if the stream
// ended early (the caller polls then).
async function followEvents(job, signal) {
  const response = await api(`/v1/edits/${job.id}/events`, {
    headers: { Accept: "text/event-stream" },
    signal,
  });
  if (!response.body) return null;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let current = { ...job };
  let buffer = "";
  let event = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return null;
    buffer += value;
    let match;
    while ((match = /\r\n|\r|\n/.exec(buffer))) {
      // A lone "\r" at the end may be half of a "\r\n" still on its way.
      if (match[0] === "\r" && match.index === buffer.length - 1) break;
      const line = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      if (line === "") {
        if (data.length) {
          const done = handleEvent(event, data.join("\n"), current);
          if (done) {
            reader.cancel().catch(() => {});
            return done;
          }
        }
        event = "message";
        data = [];
        continue;
      }
      if (line.startsWith(":")) continue; // a heartbeat
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let text = colon < 0 ? "" : line.slice(colon + 1);
      if (text.startsWith(" ")) text = text.slice(1);
      if (field === "event") event = text;
      else if (field === "data") data.push(text);
    }
  }
}

function handleEvent(name, text, current) {
  let body;
  try {
    body = JSON.parse(text);
  } catch (_) {
    return null;
  }
  if (name === "status") {
    current.status = body.status;
    current.progress = body.progress;
    showProgress(current);
  } else if (name === "progress") {
    current.status = "running";
    current.progress = body;
    showProgress(current);
  } else if (name === "queue_position") {
    showProgress(current, body.queue_position);
  } else if (name === "completed" || name === "failed" || name === "canceled") {
    return body;
  }
  return null;
}

const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => {
    clearTimeout(timer);
    reject(new DOMException("aborted", "AbortError"));
  });
});

async function poll(job, signal) {
  for (;;) {
    const current = await apiJSON(`/v1/edits/${job.id}`, { signal });
    showProgress(current);
    if (FINAL.includes(current.status)) return current;
    await sleep(700, signal);
  }
}

async function cancelJob() {
  if (!state.job) return;
  $("cancel").disabled = true;
  try {
    const job = await apiJSON(`/v1/edits/${state.job.id}/cancel`, { method: "POST" });
    showProgress(job);
  } catch (err) {
    $("cancel").disabled = false;
    showError(err);
  }
}

function finish(job, depth, before) {
  showProgress(job);
  loadHistory();
  if (job.status === "failed") {
    showError(new ApiError(0, job.error?.code, job.error?.message || "The edit failed."));
    return;
  }
  if (job.status !== "succeeded") return;
  showResult(job, 0, depth, before);
}

// -- the result ------------------------------------------------------------------------

function showResult(job, index, depth, beforeUrl) {
  state.result = { job, index, depth };
  $("result").hidden = false;
  $("before-image").src = beforeUrl;
  const output = job.outputs[index];
  $("result-image").src = output.url;
  const download = $("download");
  download.href = output.url;
  download.download = `${job.id}-${index}.${EXT[job.params.output_format] || "png"}`;
  const p = job.params;
  $("result-meta").textContent =
    `“${p.prompt}” · S_I ${p.image_guidance_scale} · S_T ${p.guidance_scale} · ` +
    `${p.num_inference_steps} steps · seed ${p.seed}`;
  const variants = $("variants");
  variants.replaceChildren();
  if (job.outputs.length > 1) {
    job.outputs.forEach((out, i) => {
      const img = document.createElement("img");
      img.src = out.url;
      img.alt = `Output ${i + 1}`;
      img.className = i === index ? "on" : "";
      img.onclick = () => showResult(job, i, depth, beforeUrl);
      variants.append(img);
    });
  }
  // The edit joins the chain where its input stood: an edit of an earlier photo replaces
  // what followed that photo.
  if (depth !== null) {
    state.chain = state.chain.slice(0, depth + 1);
    state.chain.push({ url: output.url, prompt: p.prompt, jobId: job.id, index });
    renderChain();
  }
}

async function editAgain() {
  if (!state.result) return;
  clearError();
  const { job, index } = state.result;
  const button = $("edit-again");
  button.disabled = true;
  try {
    // The signed URL needs no key; the blob is sent as the next edit's photo.
    const response = await fetch(job.outputs[index].url);
    if (!response.ok) throw new ApiError(response.status, "output", `Could not fetch the output (${response.status})`);
    const blob = await response.blob();
    const depth = state.chain.findIndex((c) => c.jobId === job.id && c.index === index);
    setInput(blob, fileName(blob, `${job.id}-${index}`), depth < 0 ? 0 : depth);
    if (depth < 0) {
      state.chain = [{ url: state.input.url, prompt: "Original", jobId: null }];
    }
    renderChain();
    $("prompt").value = "";
    $("prompt").focus();
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
}

function renderChain() {
  const list = $("chain");
  list.replaceChildren();
  state.chain.forEach((item, i) => {
    const li = document.createElement("li");
    li.dataset.testid = i === 0 ? "chain-origin" : "chain-step";
    if (i === state.inputDepth) li.className = "tip";
    li.title = i === 0 ? "The original photo" : `Step ${i}: ${item.prompt}`;
    const img = document.createElement("img");
    img.src = item.url;
    img.alt = item.prompt;
    const caption = document.createElement("span");
    caption.textContent = i === 0 ? "Original" : `${i}. ${item.prompt}`;
    li.append(img, caption);
    li.onclick = async () => {
      // Continue from this step: its image becomes the input.
      try {
        const blob = await (await fetch(item.url)).blob();
        setInput(blob, fileName(blob, item.jobId || "original"), i);
        renderChain();
      } catch (err) {
        showError(err);
      }
    };
    list.append(li);
  });
  $("chain-panel").hidden = state.chain.length < 2;
}

// -- the guidance grid -----------------------------------------------------------------

async function runGrid() {
  clearError();
  try {
    checkReady();
  } catch (err) {
    showError(err);
    return;
  }
  const run = ++state.gridRun;
  let seed = $("seed").value;
  if ($("seed-random").checked || seed === "") {
    seed = crypto.getRandomValues(new Uint32Array(1))[0];
  }
  const before = state.input.url;
  const depth = state.inputDepth;
  const grid = $("grid");
  grid.replaceChildren();
  $("grid-panel").hidden = false;
  $("grid-meta").textContent = `“${$("prompt").value.trim()}” · seed ${seed}`;
  const add = (cls, text, style) => {
    const el = document.createElement("div");
    el.className = cls;
    el.textContent = text;
    if (style) el.style.cssText = style;
    grid.append(el);
    return el;
  };
  add("axis axis-x", "Text guidance S_T → follow the instruction", "grid-row: 1");
  add("axis axis-y", "Image guidance S_I → keep the photo");
  add("tick", "", "grid-row: 2; grid-column: 2");
  GRID_TEXT.forEach((t, c) => add("tick", `S_T ${t}`, `grid-row: 2; grid-column: ${c + 3}`));
  const cells = [];
  GRID_IMAGE.forEach((si, r) => {
    add("tick", `S_I ${si.toFixed(1)}`, `grid-row: ${r + 3}; grid-column: 2`);
    GRID_TEXT.forEach((st, c) => {
      const cell = document.createElement("button");
      cell.type = "button";
      cell.className = "cell";
      cell.dataset.testid = "grid-cell";
      cell.dataset.imageGuidance = si;
      cell.dataset.textGuidance = st;
      cell.dataset.status = "submitting";
      cell.style.cssText = `grid-row: ${r + 3}; grid-column: ${c + 3}`;
      cell.title = `S_I ${si}, S_T ${st}: click to use these scales`;
      cell.textContent = "…";
      cell.onclick = () => pickCell(cell, before, depth);
      grid.append(cell);
      cells.push(cell);
    });
  });
  $("grid-button").disabled = true;
  try {
    // Submitted one by one (the jobs then queue in order, one at a time is enough).
    for (const cell of cells) {
      const fields = formFields({
        image_guidance_scale: cell.dataset.imageGuidance,
        guidance_scale: cell.dataset.textGuidance,
        num_outputs: 1,
        seed,
      });
      cell.job = await apiJSON("/v1/edits", { method: "POST", body: buildForm(fields) });
      cell.dataset.status = cell.job.status;
      cell.textContent = cell.job.status;
    }
    // Nine event streams would take the browser's every connection to this host: poll.
    let open = cells;
    while (open.length && run === state.gridRun) {
      await sleep(500);
      for (const cell of open) {
        const job = await apiJSON(`/v1/edits/${cell.job.id}`);
        cell.job = job;
        updateCell(cell);
      }
      open = open.filter((cell) => !FINAL.includes(cell.job.status));
    }
    loadHistory();
  } catch (err) {
    showError(err);
  } finally {
    $("grid-button").disabled = false;
  }
}

function updateCell(cell) {
  const job = cell.job;
  if (cell.dataset.status === job.status && job.status !== "running") return;
  cell.dataset.status = job.status;
  if (job.status === "succeeded") {
    const img = document.createElement("img");
    img.src = job.outputs[0].url;
    img.alt = `S_I ${cell.dataset.imageGuidance}, S_T ${cell.dataset.textGuidance}`;
    cell.replaceChildren(img);
  } else if (job.status === "running") {
    cell.textContent = `${job.progress.step} / ${job.progress.total}`;
  } else {
    cell.textContent = job.status;
    cell.classList.toggle("failed", job.status === "failed");
  }
}

function pickCell(cell, before, depth) {
  setSlider("image-guidance", cell.dataset.imageGuidance);
  setSlider("text-guidance", cell.dataset.textGuidance);
  for (const other of document.querySelectorAll("#grid .cell")) other.classList.remove("on");
  cell.classList.add("on");
  if (cell.job && cell.job.status === "succeeded") showResult(cell.job, 0, depth, before);
}

function setSlider(id, value) {
  $(id).value = value;
  $(`${id}-value`).textContent = $(id).value;
}

// -- history ---------------------------------------------------------------------------

async function loadHistory() {
  let page;
  try {
    page = await apiJSON("/v1/edits?limit=10");
  } catch (err) {
    if (err.status !== 401) showError(err);
    return false;
  }
  if (state.key) $("key-toggle").hidden = false;
  const list = $("history");
  list.replaceChildren();
  if (!page.data.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "No jobs yet.";
    list.append(li);
  }
  for (const job of page.data) {
    const li = document.createElement("li");
    li.dataset.testid = "history-item";
    li.dataset.jobId = job.id;
    const thumb = document.createElement("div");
    thumb.className = "thumb";
    if (job.status === "succeeded" && job.outputs.length) {
      const img = document.createElement("img");
      img.src = job.outputs[0].url;
      img.alt = job.params.prompt;
      img.title = "Edit this image";
      img.onclick = () => useOutput(job);
      thumb.append(img);
    } else {
      thumb.textContent = job.status;
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    const prompt = document.createElement("div");
    prompt.className = "prompt";
    prompt.textContent = job.params.prompt;
    prompt.title = job.params.prompt;
    const badge = document.createElement("span");
    badge.className = `badge ${job.status}`;
    badge.textContent = job.status;
    const when = document.createElement("span");
    when.className = "hint";
    when.textContent = ` ${new Date(job.created_at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}`;
    meta.append(prompt, badge, when);
    li.append(thumb, meta);
    list.append(li);
  }
  return true;
}

async function useOutput(job) {
  try {
    const blob = await (await fetch(job.outputs[0].url)).blob();
    pickPhoto(new File([blob], fileName(blob, job.id), { type: blob.type }));
  } catch (err) {
    showError(err);
  }
}

// -- wiring ----------------------------------------------------------------------------

function init() {
  $("api-key").value = state.key;
  $("api-key-save").onclick = saveKey;
  $("api-key").addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      saveKey();
    }
  });
  $("key-toggle").onclick = () => { $("auth").hidden = !$("auth").hidden; };

  $("image-input").addEventListener("change", (e) => pickPhoto(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pickPhoto(e.dataTransfer.files[0]);
  });
  $("mask-input").addEventListener("change", () => {
    $("mask-clear").hidden = !$("mask-input").files.length;
  });
  $("mask-clear").onclick = () => {
    $("mask-input").value = "";
    $("mask-clear").hidden = true;
  };

  for (const id of ["image-guidance", "text-guidance"]) {
    $(id).addEventListener("input", () => setSlider(id, $(id).value));
  }
  $("seed-random").addEventListener("change", () => {
    $("seed").disabled = $("seed-random").checked;
    if (!$("seed-random").checked && $("seed").value === "") {
      $("seed").value = state.result?.job.params.seed ?? 42;
    }
  });

  $("edit-form").addEventListener("submit", submitEdit);
  $("cancel").onclick = cancelJob;
  $("edit-again").onclick = editAgain;
  $("grid-button").onclick = runGrid;
  $("history-refresh").onclick = () => { clearError(); loadHistory(); };

  const compare = $("compare");
  $("compare-slider").addEventListener("input", (e) => {
    compare.style.setProperty("--split", `${e.target.value}%`);
  });
  const view = (side) => {
    compare.classList.toggle("side-view", side);
    compare.classList.toggle("slider-view", !side);
    $("view-side").classList.toggle("on", side);
    $("view-slider").classList.toggle("on", !side);
  };
  $("view-side").onclick = () => view(true);
  $("view-slider").onclick = () => view(false);

  applySchemaBounds();
  loadHistory().then((ok) => {
    if (ok && !state.key) $("key-toggle").hidden = true; // auth is off
  });
}

document.addEventListener("DOMContentLoaded", init);
