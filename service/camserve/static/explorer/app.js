// camserve explorer: upload images, see top-5 predictions and class activation maps.
// Plain ES module, no build step, no external resources. The server sends grayscale heatmaps; colormap and
// opacity are applied here on canvases, so changing them never costs a request.
import { COLORMAP_TABLES, colormapTable } from "./colormaps.js";

const FALLBACK_METHODS = [
  "gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "guided-gradcam", "scorecam", "ablationcam", "eigencam",
  "rise", "reciprocam",
];
const TOP_K = 5;
const DISPLAY_MAX = 720; // longest side of an on-screen canvas, in canvas pixels
const START_TIMEOUT_MS = 30_000; // /models and /openapi.json: past this the page says so and tries again
const SLOW_MS = 5_000; // a start-up still waiting this long says so
const RETRY_S = [1, 2, 3, 5, 8, 10]; // waits between start-up attempts after a failure; the last one repeats

const $ = (selector, root = document) => root.querySelector(selector);
const el = {
  keyForm: $("#key-form"), keyHelp: $("#key-help"), key: $("#api-key"),
  model: $("#model"), method: $("#method"), layer: $("#layer"), counterfactual: $("#counterfactual"),
  faithfulness: $("#faithfulness"),
  colormap: $("#colormap"), opacity: $("#opacity"), opacityValue: $("#opacity-value"),
  files: $("#files"), drop: $("#drop"), status: $("#status"), error: $("#error"),
  results: $("#results"), labels: $("#labels"),
  startup: $("#startup"), startupMessage: $("#startup-message"), retry: $("#retry"),
};

const state = {
  apiKey: sessionStorage.getItem("camserve-api-key") || "",
  models: [],
  methods: FALLBACK_METHODS,
  defaultMethod: "gradcampp",
  layers: new Map(), // model -> {defaultLayer, spatial: [names]}
  labels: new Map(), // model -> [label by index]
  cards: [],
  waiting: 0, // images chosen before the models were known: explained once they are
};

// Settled once the models (and methods) are known: input that arrives earlier waits on it rather than being dropped.
let markReady;
const ready = new Promise((resolve) => {
  markReady = resolve;
});

// ---------------------------------------------------------------- requests

class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
  }
}

function authHeaders() {
  return state.apiKey ? { Authorization: `Bearer ${state.apiKey}` } : {};
}

function shellQuote(text) {
  return `'${String(text).replaceAll("'", `'"'"'`)}'`;
}

/** The curl command for a request the page made: same URL, headers and image. */
function curlFor(method, url, headers, fileName) {
  const parts = ["curl -sS"];
  if (method !== "GET" && !fileName) parts.push(`-X ${method}`);
  for (const [name, value] of Object.entries(headers)) parts.push(`-H ${shellQuote(`${name}: ${value}`)}`);
  if (fileName) parts.push(`-F ${shellQuote(`image=@${fileName}`)}`);
  parts.push(shellQuote(url));
  return parts.join(" ");
}

/** fetch with the key; returns {data, ms, curl}; throws ApiError with the server's own message. */
async function api(path, { params = [], file = null, timeoutMs = 0 } = {}) {
  const query = new URLSearchParams(params).toString();
  const url = new URL(path + (query ? `?${query}` : ""), location.href).href;
  const headers = authHeaders();
  const init = { headers };
  if (timeoutMs) init.signal = AbortSignal.timeout(timeoutMs);
  if (file) {
    const form = new FormData();
    form.append("image", file, file.name || "image");
    init.method = "POST";
    init.body = form;
  }
  const started = performance.now();
  busy(+1);
  let response;
  let text;
  try {
    response = await fetch(url, init);
    text = await response.text();
  } catch (error) {
    if (error.name === "TimeoutError") {
      throw new ApiError("timeout", `no answer from ${path} within ${seconds(timeoutMs)}`);
    }
    const failed = new ApiError("network", `the server cannot be reached (${error.message})`);
    failed.cause = error.message;
    throw failed;
  } finally {
    busy(-1);
  }
  const ms = performance.now() - started;
  const curl = curlFor(init.method || "GET", url, headers, file ? file.name || "image" : null);
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const detail = data && (data.detail ?? data.error);
    const message =
      typeof detail === "string" ? detail : detail ? JSON.stringify(detail) : response.statusText || text.slice(0, 300);
    const error = new ApiError(response.status, message);
    error.ms = ms;
    error.curl = curl;
    throw error;
  }
  return { data, ms, curl };
}

let inFlight = 0;

/** `data-busy` on the body while requests are in flight (a progress cursor; tests wait for it to go). */
function busy(change) {
  inFlight += change;
  document.body.toggleAttribute("data-busy", inFlight > 0);
}

/** Busy from now until `work` settles, rendering included (not only the fetch). */
async function whileBusy(work) {
  busy(+1);
  try {
    return await work;
  } finally {
    busy(-1);
  }
}

function seconds(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function setStatus(text) {
  el.status.textContent = text;
}

function showError(error) {
  el.error.textContent = error ? String(error.message || error) : "";
  el.error.hidden = !error;
}

// ---------------------------------------------------------------- start-up: key, models, methods, layers

/** GET /models and the default model's layers: "ok", "key" (401: the key form is shown) or an ApiError. */
async function loadModels() {
  try {
    const { data } = await api("/models", { timeoutMs: START_TIMEOUT_MS });
    state.models = data.models;
  } catch (error) {
    if (error.status === 401) {
      el.keyForm.hidden = false;
      el.keyHelp.textContent = state.apiKey
        ? `The key was refused: ${error.detail}`
        : "This server requires an API key.";
      el.key.focus();
      return "key";
    }
    return error;
  }
  el.keyForm.hidden = true;
  showError(null);
  el.model.replaceChildren(
    ...state.models.map((m) => {
      const text = m.architecture === m.name ? `${m.name} (${m.device})` : `${m.name} (${m.architecture}, ${m.device})`;
      return new Option(text, m.name, m.default, m.default);
    }),
  );
  el.model.disabled = false;
  await loadLayers();
  return "ok";
}

let attempt = 0; // start-up failures in a row
let retryTimer = null;
let connecting = null;

/** While the page waits for /models: a spinner and words in the status line, and more words if it takes long. */
function setLoading(on) {
  clearTimeout(setLoading.slow);
  document.body.toggleAttribute("data-loading", on);
  if (!on) return;
  const again = attempt ? ` (attempt ${attempt + 1})` : "";
  startupStatus(`Loading the server's models${again}…`);
  setLoading.slow = setTimeout(() => {
    startupStatus(`Still loading the server's models: no answer for ${seconds(SLOW_MS)}${again}…`);
  }, SLOW_MS);
}

let startupText = "";

/** The status line before the models are known, with how many chosen images wait for them. */
function startupStatus(text = startupText) {
  startupText = text;
  const n = state.waiting;
  const note = n ? ` ${n} image${n === 1 ? "" : "s"} will be explained once they are loaded.` : "";
  setStatus(`${text}${note}`.trim());
}

/** Why the models could not be listed, in words, and what happens next. */
function startupProblem(error, retryIn) {
  let why;
  if (error.status === 503) why = `The server is not ready yet (${error.message}).`;
  else if (error.status === "network") why = `The server cannot be reached (${error.cause}). Is it running at ${location.origin}?`;
  else if (error.status === "timeout") why = `The server did not answer: ${error.detail}.`;
  else if (error.status === "page") why = `The page could not read the server's models: ${error.detail}.`;
  else if (error.status >= 500) {
    why = `The server failed to list its models (${error.message}). Its log has the cause.`;
  } else why = `The server refused to list its models (${error.message}).`;
  const next = retryIn ? `Trying again in ${retryIn} s.` : "Check the server and the page's address, then retry.";
  return `${why} ${next}`;
}

/** Load the models; on a failure say why and try again (5xx, 503 while models load, no answer) with a backoff. */
function connect() {
  clearTimeout(retryTimer);
  retryTimer = null;
  connecting ??= (async () => {
    setLoading(true);
    const outcome = await loadModels().catch((error) => new ApiError("page", String(error.message || error)));
    setLoading(false);
    if (outcome === "ok") {
      attempt = 0;
      el.startup.hidden = true;
      await methodsLoaded;
      markReady();
      const n = state.models.length;
      setStatus(`${n} model${n === 1 ? "" : "s"} served. Choose, drop or paste images.`);
      return;
    }
    if (outcome === "key") {
      el.model.replaceChildren();
      el.layer.replaceChildren();
      startupStatus(state.waiting ? "Enter the API key." : "");
      return;
    }
    const transient = ["network", "timeout"].includes(outcome.status) || outcome.status >= 500;
    const wait = transient ? RETRY_S[Math.min(attempt, RETRY_S.length - 1)] : 0;
    attempt += 1;
    el.startupMessage.textContent = startupProblem(outcome, wait);
    el.startup.hidden = false;
    startupStatus(`GET /models: ${outcome.status}.`);
    if (wait) retryTimer = setTimeout(connect, wait * 1000);
  })().finally(() => {
    connecting = null;
  });
  return connecting;
}

/** Every method the server offers, read from its OpenAPI document (the /explain `method` parameter). */
async function loadMethods() {
  try {
    const { data } = await api("/openapi.json", { timeoutMs: START_TIMEOUT_MS });
    const parameter = data.paths["/explain"].post.parameters.find((p) => p.name === "method");
    const listed = /:\s*([^()]+)/.exec(parameter.description)[1].split(",").map((s) => s.trim()).filter(Boolean);
    if (listed.length) state.methods = listed;
    if (parameter.schema && parameter.schema.default) state.defaultMethod = parameter.schema.default;
    const colormap = data.paths["/explain"].post.parameters.find((p) => p.name === "colormap");
    const offered = /:\s*([^()]+)/.exec(colormap.description)[1].split(",").map((s) => s.trim());
    fillColormaps(offered.filter((name) => name in COLORMAP_TABLES));
  } catch {
    fillColormaps(Object.keys(COLORMAP_TABLES)); // an older server: the lists this page knows
  }
  el.method.replaceChildren(
    ...state.methods.map((m) => new Option(m, m, m === state.defaultMethod, m === state.defaultMethod)),
  );
  el.method.disabled = false;
}

function fillColormaps(names) {
  el.colormap.replaceChildren(...names.map((name, i) => new Option(name, name, i === 0, i === 0)));
  el.colormap.disabled = false;
}

function currentModel() {
  return state.models.find((m) => m.name === el.model.value);
}

async function loadLayers() {
  const model = currentModel();
  if (!model) return;
  if (!state.layers.has(model.name)) {
    let spatial = [];
    try {
      const { data } = await api(`/models/${encodeURIComponent(model.name)}/layers`);
      spatial = data.layers.filter((layer) => layer.spatial).map((layer) => layer.name);
    } catch (error) {
      if (error.status !== 404) showError(error); // a server without the route: the default layer only
    }
    state.layers.set(model.name, { defaultLayer: model.default_layer, spatial });
  }
  const { defaultLayer, spatial } = state.layers.get(model.name);
  const names = spatial.length ? spatial : defaultLayer ? [defaultLayer] : [];
  el.layer.replaceChildren(
    ...names.map((name) => {
      const text = name === defaultLayer ? `${name} (default)` : name;
      return new Option(text, name, name === defaultLayer, name === defaultLayer);
    }),
  );
  el.layer.disabled = names.length === 0;
}

// ---------------------------------------------------------------- pictures

function colorize(out, image, heat, alpha, table) {
  const keep = 1 - alpha;
  for (let i = 0, p = 0; i < heat.length; i++, p += 4) {
    const c = heat[i] * 3;
    out[p] = keep * image[p] + alpha * table[c];
    out[p + 1] = keep * image[p + 1] + alpha * table[c + 1];
    out[p + 2] = keep * image[p + 2] + alpha * table[c + 2];
    out[p + 3] = 255;
  }
}

function canvasOf(width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  return canvas;
}

/** RGBA pixels of a bitmap drawn at width x height. */
function pixelsOf(bitmap, width, height) {
  const context = canvasOf(width, height).getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0, width, height);
  return context.getImageData(0, 0, width, height).data;
}

/** The red channel of a grayscale bitmap drawn at width x height. */
function grayOf(bitmap, width, height) {
  const rgba = pixelsOf(bitmap, width, height);
  const gray = new Uint8Array(width * height);
  for (let i = 0; i < gray.length; i++) gray[i] = rgba[4 * i];
  return gray;
}

/** Whether a file is DICOM ("DICM" after its 128-byte preamble), which browsers cannot draw. */
async function isDicom(file) {
  const magic = new Uint8Array(await file.slice(128, 132).arrayBuffer());
  return String.fromCharCode(...magic) === "DICM";
}

function base64Blob(base64, type) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

function download(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

function slug(text) {
  return String(text).toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "");
}

function displaySize(width, height) {
  const scale = Math.min(1, DISPLAY_MAX / Math.max(width, height));
  return [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
}

/** One explanation on a canvas: the grayscale heatmap colorized over the photo in the page's colormap and opacity. */
class MapFigure {
  constructor(card, explanation, context) {
    this.card = card;
    this.explanation = explanation;
    this.context = context; // {method, layers, counterfactual, ms, curl}
    this.node = $("#map-figure").content.firstElementChild.cloneNode(true);
    this.canvas = $("canvas", this.node);
    const cf = context.counterfactual ? " · counterfactual" : "";
    $(".title", this.node).textContent = explanation.label;
    $(".meta", this.node).textContent =
      `#${explanation.index} · ${(explanation.score * 100).toFixed(1)}% · ${context.method} · ${context.layers.join(" + ")}${cf}`;
    $(".time", this.node).textContent = `${context.method}: ${seconds(context.ms)}`;
    if (explanation.faithfulness) this.showFaithfulness(explanation.faithfulness);
    this.canvas.setAttribute("role", "img");
    this.canvas.setAttribute("aria-label", `${context.method} map of ${explanation.label} over ${card.name}`);
    this.node.dataset.method = context.method;
    this.node.dataset.index = explanation.index;
    this.wire();
  }

  /** The map's faithfulness scores (faithfulness=true), each with which way is better. */
  showFaithfulness(scores) {
    const list = $(".faithfulness", this.node);
    const rows = [
      ["drop", "Average Drop term: the class probability lost when the image is multiplied by the map (lower is better)", `${(scores.drop * 100).toFixed(1)}%`],
      ["increase", "Increase in Confidence: 1 when the masked image scores higher", scores.increase ? "yes" : "no"],
      ["deletion AUC", `class probability as the most salient pixels are deleted, ${scores.steps} steps (lower is better)`, scores.deletion_auc.toFixed(3)],
      ["insertion AUC", `class probability as they are restored into a blurred copy, ${scores.steps} steps (higher is better)`, scores.insertion_auc.toFixed(3)],
    ];
    list.replaceChildren(
      ...rows.flatMap(([term, help, value]) => {
        const dt = document.createElement("dt");
        dt.textContent = term;
        dt.title = help;
        const dd = document.createElement("dd");
        dd.textContent = value;
        return [dt, dd];
      }),
    );
    list.hidden = false;
  }

  async decode() {
    const { width, height } = this.card;
    const blob = base64Blob(this.explanation.heatmap, "image/png");
    const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    this.heat = grayOf(bitmap, width, height); // full resolution: the value under the pointer, the download
    const [w, h] = displaySize(width, height);
    this.canvas.width = w;
    this.canvas.height = h;
    this.canvas.style.aspectRatio = `${width} / ${height}`;
    this.displayHeat = w === width && h === height ? this.heat : grayOf(bitmap, w, h);
    bitmap.close();
  }

  render() {
    const { width, height } = this.canvas;
    const context = this.canvas.getContext("2d");
    const out = context.createImageData(width, height);
    colorize(out.data, this.card.displayPixels(width, height), this.displayHeat, opacity(), colormapTable(el.colormap.value));
    context.putImageData(out, 0, 0);
  }

  wire() {
    const value = $(".value", this.node);
    const show = (x, y) => {
      const { width, height } = this.card;
      this.probe = [Math.min(width - 1, Math.max(0, Math.round(x))), Math.min(height - 1, Math.max(0, Math.round(y)))];
      const [px, py] = this.probe;
      value.textContent = `value: ${(this.heat[py * width + px] / 255).toFixed(2)} at (${px}, ${py})`;
    };
    this.canvas.addEventListener("pointermove", (event) => {
      if (!this.heat) return;
      const box = this.canvas.getBoundingClientRect();
      show(
        Math.floor(((event.clientX - box.left) / box.width) * this.card.width),
        Math.floor(((event.clientY - box.top) / box.height) * this.card.height),
      );
    });
    this.canvas.addEventListener("pointerleave", () => {
      value.textContent = "value: –";
    });
    // by keyboard: focus the map, arrows move the probe (Shift: bigger steps)
    this.canvas.tabIndex = 0;
    this.canvas.addEventListener("keydown", (event) => {
      const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
      if (!this.heat || !(event.key in moves)) return;
      event.preventDefault();
      const step = Math.max(1, Math.round(Math.max(this.card.width, this.card.height) / (event.shiftKey ? 10 : 50)));
      const [x, y] = this.probe || [this.card.width / 2, this.card.height / 2];
      show(x + moves[event.key][0] * step, y + moves[event.key][1] * step);
    });
    const name = `${slug(this.card.name)}-${slug(this.explanation.label)}-${this.context.method}`;
    $(".download-overlay", this.node).addEventListener("click", () => {
      const { width, height } = this.card;
      const canvas = canvasOf(width, height);
      const context = canvas.getContext("2d");
      const out = context.createImageData(width, height);
      colorize(out.data, this.card.displayPixels(width, height), this.heat, opacity(), colormapTable(el.colormap.value));
      context.putImageData(out, 0, 0);
      canvas.toBlob((blob) => download(blob, `${name}-overlay.png`), "image/png");
    });
    $(".download-heatmap", this.node).addEventListener("click", () => {
      download(base64Blob(this.explanation.heatmap, "image/png"), `${name}-heatmap.png`);
    });
    $(".copy-curl", this.node).addEventListener("click", async (event) => {
      const pre = $(".curl", this.node);
      pre.textContent = this.context.curl;
      pre.hidden = false;
      try {
        await navigator.clipboard.writeText(this.context.curl);
        event.target.textContent = "Copied";
      } catch {
        event.target.textContent = "Select and copy below";
      }
      setTimeout(() => {
        event.target.textContent = "Copy as curl";
      }, 2000);
    });
    $(".close", this.node).addEventListener("click", () => this.card.removeFigure(this));
  }
}

function opacity() {
  return Number(el.opacity.value);
}

// ---------------------------------------------------------------- one image

class ImageCard {
  constructor(file) {
    this.file = file;
    this.name = file.name || "pasted image";
    this.figures = []; // the classes explained side by side
    this.compareFigures = [];
    this.cache = new Map(); // display size -> photo pixels
    this.node = $("#image-card").content.firstElementChild.cloneNode(true);
    $(".name", this.node).textContent = this.name;
    this.maps = $(".maps", this.node);
    this.error = $(".card-error", this.node);
    $(".compare", this.node).addEventListener("click", () => whileBusy(this.compareMethods()));
    $(".remove", this.node).addEventListener("click", () => {
      this.node.remove();
      state.cards = state.cards.filter((card) => card !== this);
    });
    const form = $(".explain-label", this.node);
    const input = form.elements.target;
    input.addEventListener("focus", () => loadLabels());
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const target = input.value.trim();
      if (target) this.explain([target], { add: true }).then((ok) => ok && (input.value = ""));
    });
  }

  showCardError(error) {
    this.error.textContent = error ? error.message : "";
    this.error.hidden = !error;
    showError(error ? `${this.name}: ${error.message}` : null);
  }

  displayPixels(width, height) {
    const key = `${width}x${height}`;
    if (!this.cache.has(key)) this.cache.set(key, pixelsOf(this.bitmap, width, height));
    return this.cache.get(key);
  }

  explainParams(targets, method = el.method.value) {
    const params = [["model", el.model.value], ["method", method], ["top_k", String(TOP_K)]];
    // a browser cannot draw DICOM: the first answer brings the picture the model saw (an overlay of opacity 0)
    if (this.dicom && !this.bitmap) params.push(["overlay", "true"], ["alpha", "0"]);
    const { defaultLayer } = state.layers.get(el.model.value) || {};
    if (el.layer.value && el.layer.value !== defaultLayer) params.push(["layer", el.layer.value]);
    if (el.counterfactual.checked) params.push(["counterfactual", "true"]);
    if (el.faithfulness.checked) params.push(["faithfulness", "true"]);
    for (const target of targets) params.push(["target", String(target)]);
    return params;
  }

  /** POST /explain for these targets (none: the top-1); returns the figures, or null after showing the error. */
  async request(targets, method) {
    await ready; // nothing asked before the models are known is sent with an empty model
    if (this.dicom === undefined) this.dicom = await isDicom(this.file);
    const busy = `${this.name}: ${method}${targets.length ? ` of ${targets.join(", ")}` : ""}…`;
    setStatus(busy);
    this.node.setAttribute("aria-busy", "true");
    try {
      const { data, ms, curl } = await api("/explain", { params: this.explainParams(targets, method), file: this.file });
      const result = data.results[0];
      await this.setPhoto(result);
      this.setPredictions(result.predictions, data.head);
      const context = { method: data.method, layers: data.layers, counterfactual: data.counterfactual, ms, curl };
      const figures = result.explanations.map((explanation) => new MapFigure(this, explanation, context));
      await Promise.all(figures.map((figure) => figure.decode()));
      figures.forEach((figure) => figure.render());
      setStatus(`POST /explain (${this.name}, ${data.method}): 200 in ${seconds(ms)}`);
      this.showCardError(null);
      return figures;
    } catch (error) {
      setStatus(`POST /explain (${this.name}): ${error.status ?? "failed"}${error.ms ? ` in ${seconds(error.ms)}` : ""}`);
      this.showCardError(error);
      return null;
    } finally {
      this.node.removeAttribute("aria-busy");
    }
  }

  async setPhoto(result) {
    if (this.bitmap && this.width === result.width && this.height === result.height) return;
    this.width = result.width;
    this.height = result.height;
    $(".size", this.node).textContent = `${result.width} × ${result.height}`;
    this.cache.clear();
    const picture = this.dicom ? result.explanations[0]?.overlay : null;
    const source = picture ? base64Blob(picture, "image/png") : this.file;
    this.bitmap = await createImageBitmap(source, { imageOrientation: "from-image" });
  }

  /** The top predictions as buttons, under a heading that says what the scores are (the model's head). */
  setPredictions(predictions, head) {
    const list = $(".predictions", this.node);
    const heading = list.previousElementSibling;
    heading.textContent = head === "sigmoid"
      ? "Top-5 predictions · sigmoid: each class scored on its own (they need not sum to 100%)"
      : "Top-5 predictions · softmax";
    list.dataset.head = head;
    list.replaceChildren(
      ...predictions.map((p) => {
        const item = document.createElement("li");
        const button = document.createElement("button");
        button.type = "button";
        button.className = "prediction";
        button.dataset.index = p.index;
        button.title = `explain ${p.label} (class ${p.index})`;
        const label = document.createElement("span");
        label.className = "label";
        label.textContent = p.label;
        const score = document.createElement("span");
        score.className = "score";
        score.textContent = `${(p.score * 100).toFixed(1)}%`;
        const bar = document.createElement("span");
        bar.className = "bar";
        bar.style.setProperty("--p", `${Math.max(0.5, p.score * 100)}%`);
        bar.setAttribute("aria-hidden", "true");
        button.append(label, score, bar);
        button.addEventListener("click", () => whileBusy(this.explain([p.index], { add: true })));
        item.append(button);
        return item;
      }),
    );
  }

  /** Explain targets with the page's settings; `add` puts new classes beside the ones shown, else replaces them. */
  async explain(targets, { add = false } = {}) {
    if (add) {
      const shown = this.figures.find((f) => targets.length === 1 && String(f.explanation.index) === String(targets[0]));
      if (shown) {
        shown.canvas.scrollIntoView({ block: "nearest" });
        return true;
      }
    }
    const figures = await this.request(targets, el.method.value);
    if (!figures) return false;
    if (!add) {
      this.figures = [];
      this.maps.replaceChildren();
    }
    for (const figure of figures) {
      const same = this.figures.find((f) => f.explanation.index === figure.explanation.index);
      if (same) this.removeFigure(same);
      this.figures.push(figure);
      this.maps.append(figure.node);
    }
    return true;
  }

  /** After a change of method, layer, counterfactual or model: the same classes again, in one request. */
  async refresh({ keepClasses = true } = {}) {
    const targets = keepClasses ? this.figures.map((f) => f.explanation.index) : [];
    await this.explain(targets);
    if (!$(".compare-section", this.node).hidden) await this.compareMethods();
  }

  removeFigure(figure) {
    figure.node.remove();
    this.figures = this.figures.filter((f) => f !== figure);
    this.compareFigures = this.compareFigures.filter((f) => f !== figure);
  }

  /** Every method side by side for the first class shown: one request per method. */
  async compareMethods() {
    const section = $(".compare-section", this.node);
    const grid = $(".compare-grid", this.node);
    const target = this.figures.length ? [this.figures[0].explanation.index] : [];
    section.hidden = false;
    grid.replaceChildren();
    this.compareFigures = [];
    const slots = state.methods.map((method) => {
      const slot = document.createElement("div");
      slot.className = "slot";
      slot.textContent = `${method}…`;
      grid.append(slot);
      return slot;
    });
    const started = performance.now();
    await Promise.all(
      state.methods.map(async (method, i) => {
        const figures = await this.request(target, method);
        if (figures) {
          slots[i].replaceWith(figures[0].node);
          this.compareFigures.push(figures[0]);
        } else {
          slots[i].textContent = `${method}: failed (see above)`;
        }
      }),
    );
    setStatus(`compared ${state.methods.length} methods on ${this.name} in ${seconds(performance.now() - started)}`);
    section.scrollIntoView({ block: "nearest" });
  }

  rerender() {
    [...this.figures, ...this.compareFigures].forEach((figure) => figure.render());
  }
}

/** The model's labels for the datalist, in index order: GET /models/{name}/labels, once per model. */
async function loadLabels() {
  const model = currentModel();
  if (!model || state.labels.has(model.name)) return;
  state.labels.set(model.name, []);
  try {
    const { data } = await api(`/models/${encodeURIComponent(model.name)}/labels`);
    state.labels.set(model.name, data.labels);
    if (currentModel() === model) fillLabels();
  } catch {
    state.labels.delete(model.name); // try again on the next focus
  }
}

function fillLabels() {
  const labels = state.labels.get(el.model.value) || [];
  el.labels.replaceChildren(...labels.filter(Boolean).map((label) => new Option(label)));
}

// ---------------------------------------------------------------- input: choose, drop, paste

/** New cards for these images, explained now, or as soon as the models are known when they are not yet. */
async function addFiles(files) {
  const list = [...files];
  if (!list.length) return;
  const cards = list.map((file) => new ImageCard(file));
  for (const card of cards) {
    state.cards.push(card);
    el.results.prepend(card.node);
  }
  if (!state.models.length) {
    state.waiting += cards.length;
    cards.forEach((card) => ($(".waiting", card.node).hidden = false));
    startupStatus();
    await ready;
    state.waiting -= cards.length;
    cards.forEach((card) => ($(".waiting", card.node).hidden = true));
  }
  const kept = cards.filter((card) => state.cards.includes(card)); // not removed while waiting
  await whileBusy(Promise.all(kept.map((card) => card.explain([]))));
}

el.files.addEventListener("change", () => {
  addFiles(el.files.files);
  el.files.value = "";
});
el.drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  el.drop.classList.add("over");
});
el.drop.addEventListener("dragleave", () => el.drop.classList.remove("over"));
el.drop.addEventListener("drop", (event) => {
  event.preventDefault();
  el.drop.classList.remove("over");
  addFiles(event.dataTransfer.files);
});
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  event.preventDefault();
  if (!el.drop.contains(event.target)) addFiles(event.dataTransfer.files);
});
document.addEventListener("paste", (event) => {
  if (event.target instanceof HTMLInputElement && event.target.type === "text") return;
  const files = [...event.clipboardData.files];
  if (files.length) {
    event.preventDefault();
    addFiles(files);
  }
});

// ---------------------------------------------------------------- settings

function refreshAll(options) {
  return whileBusy(Promise.all(state.cards.map((card) => card.refresh(options))));
}

el.method.addEventListener("change", () => refreshAll());
el.layer.addEventListener("change", () => refreshAll());
el.counterfactual.addEventListener("change", () => refreshAll());
el.faithfulness.addEventListener("change", () => refreshAll());
el.model.addEventListener("change", () =>
  whileBusy(
    (async () => {
      await loadLayers();
      fillLabels();
      await refreshAll({ keepClasses: false }); // other model, other classes: its top-1 again
    })(),
  ),
);
el.colormap.addEventListener("change", () => state.cards.forEach((card) => card.rerender()));
el.opacity.addEventListener("input", () => {
  el.opacityValue.textContent = `${Math.round(opacity() * 100)}%`;
  state.cards.forEach((card) => card.rerender());
});
el.keyForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  state.apiKey = el.key.value.trim();
  sessionStorage.setItem("camserve-api-key", state.apiKey);
  await connect();
});
el.retry.addEventListener("click", () => connect());

// images chosen before this script ran: the input still holds them
if (el.files.files.length) {
  addFiles(el.files.files);
  el.files.value = "";
}
const methodsLoaded = loadMethods();
await connect(); // the first attempt, whatever its outcome; failures go on retrying on their own
document.body.dataset.ready = "true";
