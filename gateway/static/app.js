// birdgen's web page: GET /api/v1/options fills the form; three buttons call the gateway's API.
// Plain browser JavaScript, no build step and nothing loaded from elsewhere. The API paths are
// relative to the page, so the gateway also works behind a path prefix.
"use strict";

(() => {
  const API = "api/v1/";
  const NAMED_SIZES = { 256: "small", 512: "medium", 1024: "large" };
  const SIZES = [256, 512, 768, 1024, 1536, 2048];
  const LOOK = ["pose", "behaviour", "season", "style", "lighting", "habitat"];
  const STAGES = { denoise: "Denoising", decode: "Decoding frames" };
  const $ = (id) => document.getElementById(id);

  const species = new Map(); // species_id -> {species_id, common_name, scientific_name, family}
  let busy = false;

  // -- filling the form from /api/v1/options -----------------------------------------------------

  function words(value) {
    return value.replace(/-/g, " ");
  }

  function option(value, text) {
    const element = document.createElement("option");
    element.value = value;
    element.textContent = text;
    return element;
  }

  function fillSelect(select, items, chosen) {
    select.replaceChildren(...items.map(([value, text]) => option(value, text)));
    if (chosen !== undefined && items.some(([value]) => value === chosen)) select.value = chosen;
  }

  function sizes(range) {
    const fits = (size) =>
      size >= range.min && size <= range.max && size % (range.multiple_of || 1) === 0;
    const picked = SIZES.filter(fits);
    return picked.length ? picked : [range.default];
  }

  function sizeItems(range) {
    return sizes(range).map((size) => {
      const name = NAMED_SIZES[size] ? ` (${NAMED_SIZES[size]})` : "";
      return [String(size), `${size} × ${size}${name}`];
    });
  }

  function numberInput(input, range) {
    input.min = range.min;
    input.max = range.max;
    input.value = range.default;
  }

  function fill(options) {
    for (const entry of options.species) species.set(entry.species_id, entry);
    fillSelect(
      $("species"),
      options.species.map((s) => [s.species_id, `${s.common_name} — ${s.scientific_name}`]),
      "amerob",
    );
    for (const field of LOOK) {
      const values = (options.vocabulary && options.vocabulary[field]) || [];
      const first = field === "habitat" ? "(any)" : "(default)";
      fillSelect($(field), [["", first], ...values.map((value) => [value, words(value)])]);
    }
    const image = options.image;
    fillSelect($("image-size"), sizeItems(image.width), String(image.width.default));
    fillSelect(
      $("image-format"),
      image.formats.filter((f) => f !== "eink").map((f) => [f, f.toUpperCase()]),
      "png",
    );
    const animation = options.animation;
    fillSelect($("animation-size"), sizeItems(animation.width), String(animation.width.default));
    fillSelect(
      $("animation-format"),
      animation.formats.map((f) => [f, { both: "WebP + GIF", webp: "WebP" }[f] || f.toUpperCase()]),
      "webp",
    );
    numberInput($("duration"), animation.duration_seconds);
    numberInput($("fps"), animation.fps);
    fillSelect(
      $("panel"),
      options.eink_panels.map((p) => [p, p]),
    );
    filterSpecies();
    describeSpecies();
    describeFrames();
  }

  function filterSpecies() {
    const select = $("species");
    const query = $("species-filter").value.trim().toLowerCase();
    let shown = 0;
    let firstShown = null;
    for (const element of select.options) {
      const entry = species.get(element.value);
      const text = `${entry.common_name} ${entry.scientific_name} ${entry.family} ${entry.species_id}`;
      element.hidden = query !== "" && !text.toLowerCase().includes(query);
      if (!element.hidden) {
        shown += 1;
        firstShown = firstShown || element;
      }
    }
    if (select.selectedOptions.length && select.selectedOptions[0].hidden && firstShown) {
      select.value = firstShown.value;
      describeSpecies();
    }
    const current = species.get(select.value);
    $("species-count").textContent = !query
      ? `${species.size} species in the catalogue.`
      : shown
        ? `${shown} of ${species.size} species match.`
        : `No species match; still chosen: ${current ? current.common_name : "none"}.`;
  }

  function describeSpecies() {
    const entry = species.get($("species").value);
    $("species-info").textContent = entry
      ? `${entry.scientific_name} · family ${entry.family} · id ${entry.species_id}`
      : "";
  }

  function describeFrames() {
    const frames = Number($("duration").value) * Number($("fps").value);
    $("frames-hint").textContent = Number.isFinite(frames) && frames > 0
      ? `${frames} frames (duration × frames per second must be a whole number).`
      : "";
  }

  // -- building requests -------------------------------------------------------------------------

  function subject() {
    const entry = species.get($("species").value);
    if (!entry) throw new FieldProblem("species", "pick a species from the list");
    return {
      species: entry.common_name,
      scientific_name: entry.scientific_name,
      species_id: entry.species_id,
    };
  }

  function chosen(fields) {
    const out = {};
    for (const field of fields) {
      const value = $(field).value;
      if (value) out[field] = value;
    }
    return out;
  }

  // A whole number as a number, anything else as typed (the gateway says what is wrong with it).
  function numeric(text) {
    const value = text.trim();
    if (value === "") return undefined;
    return /^-?\d+(\.\d+)?$/.test(value) ? Number(value) : value;
  }

  function withNumbers(body, values) {
    for (const [key, value] of Object.entries(values)) {
      const parsed = numeric(value);
      if (parsed !== undefined) body[key] = parsed;
    }
    return body;
  }

  // JSON text with the seed exactly as typed: seeds go up to 2^63 - 1, past a JavaScript number.
  function json(body) {
    const seed = $("seed").value.trim();
    const text = JSON.stringify(body);
    if (seed === "") return text;
    const value = /^-?\d+$/.test(seed) ? seed : JSON.stringify(seed);
    return `${text.slice(0, -1)},"seed":${value}}`;
  }

  function imageBody() {
    const body = {
      ...subject(),
      ...chosen(["pose", "season", "style", "lighting", "habitat"]),
      format: $("image-format").value,
    };
    return withNumbers(body, { resolution: $("image-size").value, steps: $("steps").value });
  }

  function animationBody() {
    const body = {
      ...subject(),
      ...chosen(["behaviour", "season", "style", "lighting", "habitat"]),
      format: $("animation-format").value,
    };
    return withNumbers(body, {
      resolution: $("animation-size").value,
      steps: $("steps").value,
      duration_seconds: $("duration").value,
      fps: $("fps").value,
    });
  }

  // -- errors ------------------------------------------------------------------------------------

  class FieldProblem extends Error {
    constructor(field, message) {
      super(message);
      this.field = field;
    }
  }

  // The form control a gateway field name belongs to, for the request kind that named it.
  function controlFor(field, kind) {
    const map = {
      species: "species",
      common_name: "species",
      scientific_name: "species",
      species_id: "species",
      family: "species",
      resolution: `${kind}-size`,
      width: `${kind}-size`,
      height: `${kind}-size`,
      format: `${kind}-format`,
      duration_seconds: "duration",
      poster_frame: "animation-format",
      panel: "panel",
      eink_panel: "panel",
    };
    const id = map[field] || field;
    const element = $(id);
    return element && element.form === $("controls") ? element : null;
  }

  function labelOf(control) {
    const label = control.labels && control.labels[0];
    if (!label) return control.id;
    const hint = label.querySelector(".hint");
    return (hint ? label.textContent.replace(hint.textContent, "") : label.textContent).trim();
  }

  function clearErrors() {
    $("form-error").hidden = true;
    $("form-error-list").replaceChildren();
    for (const element of document.querySelectorAll("[aria-invalid]")) {
      element.removeAttribute("aria-invalid");
      const note = $(`${element.id}-error`);
      if (note) note.remove();
      const described = (element.getAttribute("aria-describedby") || "")
        .split(" ")
        .filter((id) => id && id !== `${element.id}-error`);
      if (described.length) element.setAttribute("aria-describedby", described.join(" "));
      else element.removeAttribute("aria-describedby");
    }
  }

  function markField(control, message) {
    control.setAttribute("aria-invalid", "true");
    let note = $(`${control.id}-error`);
    if (!note) {
      note = document.createElement("p");
      note.id = `${control.id}-error`;
      note.className = "field-error";
      control.closest(".field").append(note);
      const described = control.getAttribute("aria-describedby");
      control.setAttribute("aria-describedby", described ? `${described} ${note.id}` : note.id);
    }
    note.textContent = note.textContent ? `${note.textContent} ${message}` : message;
  }

  // Problems by the form: [{field, message}]; a field the form has is also marked where it is.
  function showProblems(title, problems, kind) {
    const list = $("form-error-list");
    for (const { field, message } of problems) {
      const item = document.createElement("li");
      const control = field ? controlFor(field, kind) : null;
      if (control) {
        const link = document.createElement("a");
        link.href = `#${control.id}`;
        link.textContent = labelOf(control);
        link.addEventListener("click", (event) => {
          event.preventDefault();
          control.focus();
        });
        item.append(link, ` (${field}): ${message}`);
        markField(control, message);
      } else {
        item.textContent = field ? `${field}: ${message}` : message;
      }
      list.append(item);
    }
    $("form-error-title").textContent = title;
    $("form-error").hidden = false;
    $("form-error").focus({ preventScroll: true });
  }

  // An HTTP error answer: 422 names the fields, 429 and 503 say when to retry, others their detail.
  async function failed(response, kind) {
    let payload = null;
    try {
      payload = await response.json();
    } catch {
      payload = null;
    }
    const detail = payload && payload.detail;
    const retry = response.headers.get("Retry-After");
    if (response.status === 422 && Array.isArray(detail)) {
      const problems = detail.map((item) => {
        const loc = Array.isArray(item.loc) ? item.loc : [];
        return { field: String(loc.length ? loc[loc.length - 1] : "request"), message: item.msg };
      });
      return showProblems("The gateway refused a field:", problems, kind);
    }
    let message = typeof detail === "string" ? detail : detail ? JSON.stringify(detail) : response.statusText;
    if (retry) message += ` — try again in ${retry} s (Retry-After).`;
    const title = response.status === 429 ? "Too many requests (HTTP 429)." : `HTTP ${response.status}.`;
    return showProblems(title, [{ field: null, message }], kind);
  }

  // -- showing results ---------------------------------------------------------------------------

  function dataUrl(contentType, base64) {
    return `data:${contentType};base64,${base64}`;
  }

  function fact(list, term, value) {
    if (value === undefined || value === null || value === "") return;
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    list.append(dt, dd);
  }

  function show(kind, src, metadata, downloads) {
    const meta = metadata || {};
    const request = meta.request || {};
    const entry = species.get(meta.species_id || request.species_id) || {};
    const name = meta.species || request.species || entry.common_name || "bird";
    const what = { image: "Image", animation: "Animation", eink: "E-ink preview" }[kind];
    const action = request.behaviour || meta.behaviour || request.pose;
    const image = $("result-image");
    image.alt = `${meta.ai_generated ? "AI-generated " : ""}${what.toLowerCase()} of a ${name}${
      action ? `, ${words(action)}` : ""
    }`;
    image.className = kind === "eink" ? "eink" : "";
    image.removeAttribute("width");
    if (kind === "eink") {
      const twice = () => image.className === "eink" && (image.width = 2 * image.naturalWidth);
      image.addEventListener("load", twice, { once: true });
    }
    image.src = src;
    $("ai-label").hidden = meta.ai_generated !== true;
    $("result-title").textContent = `${what}: ${name}`;

    const list = $("metadata");
    list.replaceChildren();
    fact(list, "Species", name);
    fact(list, "Scientific name", meta.scientific_name || entry.scientific_name);
    fact(list, "Family", meta.family || entry.family);
    fact(list, "Seed", meta.seed);
    fact(list, "Model version", meta.model_version);
    if (meta.width && meta.height) {
      fact(list, kind === "eink" ? "Drawn at" : "Size", `${meta.width} × ${meta.height}`);
    }
    fact(list, "Steps", meta.steps);
    if (kind === "animation") {
      fact(list, "Frames", meta.frames);
      fact(list, "Frames per second", meta.fps);
      fact(list, "Duration", meta.duration_seconds === undefined ? undefined : `${meta.duration_seconds} s`);
    }
    if (kind === "eink" && meta.eink) {
      const e = meta.eink;
      fact(list, "Panel", `${e.panel} (${e.width} × ${e.height}, ${e.bits_per_pixel} bit)`);
      fact(list, "Palette", e.palette);
      fact(list, "Dither", e.dither);
    }
    fact(list, "Prompt", meta.prompt);

    const links = $("downloads");
    links.replaceChildren();
    for (const [label, href, file] of downloads) {
      const link = document.createElement("a");
      link.href = href;
      link.download = file;
      link.textContent = `Download ${label}`;
      links.append(link, " ");
    }
    $("result").hidden = false;
  }

  function extension(contentType) {
    const known = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif" };
    return known[contentType] || "bin";
  }

  // -- the three requests ------------------------------------------------------------------------

  async function generateImage() {
    const response = await fetch(`${API}generate/image`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: json(imageBody()),
    });
    if (!response.ok) return failed(response, "image");
    const payload = await response.json();
    const src = dataUrl(payload.content_type, payload.data);
    const suffix = extension(payload.content_type);
    const file = `${payload.metadata.species_id || "bird"}-${payload.metadata.seed}.${suffix}`;
    show("image", src, payload.metadata, [[suffix.toUpperCase(), src, file]]);
    return true;
  }

  function progress(line) {
    const bar = $("progress");
    bar.max = Math.max(Number(line.total) || 1, 1);
    bar.value = Math.min(Number(line.done) || 0, bar.max);
    bar.dataset.stage = line.stage;
    bar.dataset.updates = String(Number(bar.dataset.updates || 0) + 1);
    $("progress-text").textContent = `${STAGES[line.stage] || line.stage}: ${line.done} of ${line.total}`;
  }

  async function readLines(response, onLine) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffered += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline).trim();
        buffered = buffered.slice(newline + 1);
        if (line) onLine(JSON.parse(line));
      }
      if (done) break;
    }
    if (buffered.trim()) onLine(JSON.parse(buffered));
  }

  async function generateAnimation() {
    const bar = $("progress");
    bar.value = 0;
    bar.max = 1;
    bar.dataset.updates = "0";
    delete bar.dataset.stage;
    $("progress-text").textContent = "Waiting for the server…";
    $("progress-box").hidden = false;
    const response = await fetch(`${API}generate/gif`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/x-ndjson" },
      body: json(animationBody()),
    });
    if (!response.ok) return failed(response, "animation");
    let outcome = null;
    await readLines(response, (line) => {
      if (line.type === "progress") progress(line);
      else if (line.type === "result" || line.type === "error") outcome = line;
    });
    if (outcome === null) throw new Error("the animation stream ended without a result");
    if (outcome.type === "error") {
      return showProblems(`HTTP ${outcome.status}.`, [{ field: null, message: outcome.detail }], "animation");
    }
    if (Number(bar.dataset.updates) === 0) {
      bar.value = bar.max; // from the cache: finished before any progress
      $("progress-text").textContent = "Done (from the cache).";
    }
    const files = outcome.files;
    const main = files.webp || files.gif;
    const seed = outcome.metadata.seed;
    const id = outcome.metadata.species_id || "bird";
    const downloads = Object.entries(files).map(([name, file]) => [
      name === "poster" ? "poster (PNG)" : name.toUpperCase(),
      dataUrl(file.content_type, file.data),
      `${id}-${seed}${name === "poster" ? "-poster" : ""}.${extension(file.content_type)}`,
    ]);
    show("animation", dataUrl(main.content_type, main.data), outcome.metadata, downloads);
    return true;
  }

  async function generateEink() {
    const { species_id: id } = subject();
    const query = new URLSearchParams({ panel: $("panel").value });
    for (const field of ["pose", "season"]) if ($(field).value) query.set(field, $(field).value);
    if ($("seed").value.trim()) query.set("seed", $("seed").value.trim());
    const response = await fetch(`${API}eink/${encodeURIComponent(id)}?${query}`, {
      headers: { Accept: "application/json" },
    });
    if (!response.ok) return failed(response, "eink");
    const payload = await response.json();
    const src = dataUrl("image/png", payload.preview_png);
    const panel = (payload.metadata.eink && payload.metadata.eink.panel) || $("panel").value;
    show("eink", src, payload.metadata, [
      ["preview (PNG)", src, `${id}-${panel}.png`],
      ["panel buffer", dataUrl("application/octet-stream", payload.buffer), `${id}-${panel}.bin`],
    ]);
    return true;
  }

  // One request at a time: the buttons wait, the output says what is happening.
  async function run(kind, action, waiting) {
    if (busy) return;
    busy = true;
    const output = $("output");
    output.dataset.request = String(Number(output.dataset.request) + 1);
    output.dataset.kind = kind;
    output.dataset.state = "busy";
    output.setAttribute("aria-busy", "true");
    for (const button of document.querySelectorAll("button.primary")) button.disabled = true;
    clearErrors();
    $("result").hidden = true;
    $("progress-box").hidden = kind !== "animation";
    $("status").className = "status";
    $("status").textContent = waiting;
    let ok = false;
    try {
      ok = (await action()) === true;
    } catch (error) {
      if (error instanceof FieldProblem) {
        showProblems("Check the form:", [{ field: error.field, message: error.message }], kind);
      } else {
        const message = String(error.message || error);
        showProblems("The request did not complete.", [{ field: null, message }], kind);
      }
    } finally {
      $("status").textContent = ok ? "Done." : "Failed: see the message by the form.";
      if (!ok && kind === "animation") $("progress-text").textContent = "Stopped.";
      $("status").className = ok ? "status" : "status bad";
      output.dataset.state = ok ? "done" : "error";
      output.setAttribute("aria-busy", "false");
      for (const button of document.querySelectorAll("button.primary")) button.disabled = false;
      busy = false;
    }
  }

  async function start() {
    $("species-filter").addEventListener("input", filterSpecies);
    $("species").addEventListener("change", describeSpecies);
    $("duration").addEventListener("input", describeFrames);
    $("fps").addEventListener("input", describeFrames);
    $("random-seed").addEventListener("click", () => {
      $("seed").value = String(crypto.getRandomValues(new Uint32Array(1))[0]);
    });
    $("generate-image").addEventListener("click", () => run("image", generateImage, "Drawing the image…"));
    $("generate-animation").addEventListener("click", () =>
      run("animation", generateAnimation, "Animating…"),
    );
    $("generate-eink").addEventListener("click", () =>
      run("eink", generateEink, "Rendering for the panel…"),
    );
    try {
      const response = await fetch(`${API}options`, { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(`GET /api/v1/options answered HTTP ${response.status}`);
      fill(await response.json());
    } catch (error) {
      $("loading").textContent = `Could not load the options: ${error.message}`;
      $("loading").className = "field-error";
      return;
    }
    $("loading").hidden = true;
    $("controls").dataset.ready = "true";
    for (const button of document.querySelectorAll("button.primary")) button.disabled = false;
  }

  start();
})();
