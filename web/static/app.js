"use strict";
// The page: a form of every job option, the jobs under way (server-sent events), and a gallery of this
// browser's results kept in IndexedDB. Text from users and the service goes in with textContent only.

const $ = (id) => document.getElementById(id);
const PENDING = "imagine.pending"; // jobs under way, followed again after a reload
let config = null;

// The gallery, in IndexedDB: a result survives a reload without the service keeping it --------------
const galleryDb = new Promise((resolve, reject) => {
  const request = indexedDB.open("imagine", 1);
  request.onupgradeneeded = () => request.result.createObjectStore("results", {keyPath: "job_id"});
  request.onsuccess = () => resolve(request.result);
  request.onerror = () => reject(request.error);
});

async function store(mode, work) {
  const db = await galleryDb;
  return new Promise((resolve, reject) => {
    const transaction = db.transaction("results", mode);
    const request = work(transaction.objectStore("results"));
    transaction.oncomplete = () => resolve(request && request.result);
    transaction.onerror = () => reject(transaction.error);
  });
}

const pending = () => JSON.parse(localStorage.getItem(PENDING) || "{}");
function setPending(jobId, prompt) {
  const jobs = pending();
  if (prompt === null) delete jobs[jobId]; else jobs[jobId] = prompt;
  localStorage.setItem(PENDING, JSON.stringify(jobs));
}

// The form ------------------------------------------------------------------------------------------
function option(select, value, label) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = label ?? value;
  select.append(element);
}

async function loadConfig() {
  const answer = await fetch("/api/config");
  if (!answer.ok) throw new Error(`the server answered ${answer.status}`);
  const loaded = await answer.json();
  for (const style of loaded.styles) option($("style"), style.name, style.description ? `${style.name}: ${style.description}` : style.name);
  config = loaded;
  for (const [ratio, [width, height]] of Object.entries(config.aspects)) option($("aspect"), ratio, `${ratio} (${width}×${height})`);
  for (const name of config.schedulers) option($("scheduler"), name);
  const [low, high] = config.ranges.num_images_per_prompt;
  Object.assign($("count"), {min: low, max: high});
  $("steps").placeholder = config.defaults.num_inference_steps;
  $("steps").max = config.ranges.num_inference_steps[1];
  $("guidance").placeholder = config.defaults.guidance_scale;
  $("strength").placeholder = config.defaults.strength;
  $("service").textContent = config.adapters.length
    ? `adapters: ${config.adapters.join(", ")}` : "no worker online yet: jobs wait in the queue";
}

function addAdapterRow() {
  if ($("adapter-rows").children.length >= config.max_adapters) return;
  const row = document.createElement("div");
  row.className = "adapter-row";
  const name = document.createElement("select");
  name.className = "adapter-name";
  for (const adapter of [...config.adapters, "none"]) option(name, adapter);
  const scale = Object.assign(document.createElement("input"), {className: "adapter-scale", type: "number", step: "0.05", value: "1.0"});
  const remove = Object.assign(document.createElement("button"), {type: "button", textContent: "remove"});
  remove.addEventListener("click", () => row.remove());
  row.append(name, scale, remove);
  $("adapter-rows").append(row);
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(",", 2)[1]); // the base64 after "data:...;base64,"
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function readOptions() {
  const options = {prompt: $("prompt").value, negative_prompt: $("negative_prompt").value};
  const numbers = {num_inference_steps: "steps", guidance_scale: "guidance", seed: "seed",
    num_images_per_prompt: "count", width: "width", height: "height", strength: "strength"};
  for (const [name, id] of Object.entries(numbers)) {
    if ($(id).value !== "") options[name] = Number($(id).value);
  }
  if ($("scheduler").value) options.scheduler = $("scheduler").value;
  if ($("style").value) options.style = $("style").value;
  const file = $("image").files[0];
  if (file) {
    if (file.size > config.max_image_bytes) {
      throw new Error(`image is ${(file.size / 2 ** 20).toFixed(1)} MiB; at most ${(config.max_image_bytes / 2 ** 20).toFixed(1)} MiB: send a smaller file`);
    }
    options.image = await readFile(file);
  }
  // A chosen aspect ratio sets the size, unless width or height is typed; else the style's, the image's own
  // shape, or the service's default.
  if (!("width" in options) && !("height" in options) && $("aspect").value) {
    [options.width, options.height] = config.aspects[$("aspect").value];
  }
  const rows = [...document.querySelectorAll(".adapter-row")];
  if (rows.length === 1 && rows[0].querySelector(".adapter-name").value === "none") options.adapter = "none";
  else if (rows.length) {
    options.adapters = rows.map((row) => ({name: row.querySelector(".adapter-name").value, scale: Number(row.querySelector(".adapter-scale").value)}));
  }
  return options;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function post(url, body) {
  const answer = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await answer.json().catch(() => ({error: `the server answered ${answer.status}`}));
  if (!answer.ok) throw new Error(data.error || data.detail || `the server answered ${answer.status}`);
  return data;
}

async function submit(url, body, prompt) {
  showError("");
  try {
    const job = await post(url, body);
    setPending(job.job_id, prompt);
    follow(job.job_id, prompt, job);
  } catch (error) {
    showError(error.message);
  }
}

// Jobs under way ------------------------------------------------------------------------------------
function newCard(prompt) {
  const card = $("card").content.firstElementChild.cloneNode(true);
  card.querySelector(".prompt").textContent = prompt;
  return card;
}

function follow(jobId, prompt, submitted) {
  const card = newCard(prompt);
  card.dataset.job = jobId;
  const status = card.querySelector(".status");
  const estimate = submitted && submitted.estimated_wait_s != null ? ` (about ${Math.round(submitted.estimated_wait_s)} s)` : "";
  status.textContent = submitted ? `Queued: position ${submitted.position}${estimate}, seed ${submitted.seed}` : "Following…";
  const cancel = Object.assign(document.createElement("button"), {textContent: "Cancel"});
  cancel.addEventListener("click", () => post(`/api/jobs/${jobId}/cancel`, {}).catch((error) => showError(error.message)));
  card.querySelector(".actions").append(cancel);
  const preview = Object.assign(document.createElement("img"), {className: "preview", alt: "preview"});
  $("running").prepend(card);

  const events = new EventSource(`/api/jobs/${jobId}/events`);
  // The job is forgotten only once its outcome is kept: a reload before that follows it again.
  const end = (text, keep = false) => { events.close(); if (!keep) setPending(jobId, null); status.textContent = text; cancel.remove(); };
  events.onerror = () => {
    // The browser retries a dropped stream by itself; a refused one (an expired job) it gives up on.
    if (events.readyState === EventSource.CLOSED) end("The service no longer knows this job (expired?).");
  };
  events.addEventListener("queued", (e) => {
    const event = JSON.parse(e.data);
    status.textContent = `Queued: position ${event.position ?? "?"}${event.message ? ". " + event.message : ""}`;
  });
  events.addEventListener("started", (e) => { status.textContent = `Rendering on ${JSON.parse(e.data).worker}…`; });
  events.addEventListener("step", (e) => {
    const event = JSON.parse(e.data);
    status.textContent = `Rendering: step ${event.step}/${event.total}`;
    if (event.preview_png) {
      preview.src = `data:image/png;base64,${event.preview_png}`;
      if (!preview.isConnected) card.querySelector(".images").append(preview);
    }
  });
  events.addEventListener("done", async () => {
    end("Done: fetching the images…", true);
    try {
      const answer = await fetch(`/api/jobs/${jobId}/result`);
      if (!answer.ok) throw new Error((await answer.json()).detail);
      const result = {job_id: jobId, at: Date.now(), ...(await answer.json())};
      await store("readwrite", (results) => results.put(result));
      setPending(jobId, null);
      await post(`/api/jobs/${jobId}/delivered`, {});
      card.remove();
      $("gallery").prepend(resultCard(result));
    } catch (error) {
      status.textContent = `Done, but the result could not be fetched: ${error.message}`;
    }
  });
  events.addEventListener("failed", (e) => end(`Failed: ${JSON.parse(e.data).message}`));
  events.addEventListener("cancelled", () => end("Cancelled."));
  events.addEventListener("lost", (e) => end(e.data));
}

// Results -------------------------------------------------------------------------------------------
function button(label, onClick) {
  const element = Object.assign(document.createElement("button"), {type: "button", textContent: label});
  element.addEventListener("click", onClick);
  return element;
}

function resultCard(result) {
  const {meta} = result;
  const card = newCard(meta.prompt);
  card.dataset.job = result.job_id;
  card.querySelector(".status").remove();
  const adapters = (meta.adapters || []).map((use) => `${use.name} (${use.version}) × ${use.scale}`).join(", ") || "none (base model)";
  const parts = [`${meta.width}×${meta.height}`, `${meta.num_inference_steps} steps`, `guidance ${meta.guidance_scale}`,
    `adapters: ${adapters}`, meta.scheduler, meta.style ? `style ${meta.style}` : null,
    meta.init_image ? `from an image at strength ${meta.strength}` : null, `${meta.render_s.toFixed(1)} s on ${meta.worker}`];
  card.querySelector(".settings").textContent = parts.filter(Boolean).join(" · ") + (meta.negative_prompt ? ` · not: ${meta.negative_prompt}` : "");
  const followup = (action, image) => submit(`/api/jobs/${result.job_id}/followup`,
    {action, index: image ? image.index : 0, image: image ? image.png : undefined}, meta.prompt);
  for (const image of result.images) {
    const figure = document.createElement("figure");
    const source = `data:image/png;base64,${image.png}`;
    const img = Object.assign(document.createElement("img"), {src: source, alt: `seed ${image.seed}`, className: "result"});
    const caption = document.createElement("figcaption");
    const download = Object.assign(document.createElement("a"), {href: source, download: image.file, textContent: "Download"});
    caption.append(`seed ${image.seed} `, download,
      button(`Upscale`, () => followup("upscale", image)),
      button(`Vary (subtle)`, () => followup("subtle", image)),
      button(`Vary (strong)`, () => followup("strong", image)),
      button(`Variations`, () => followup("vary", image)));
    figure.append(img, caption);
    card.querySelector(".images").append(figure);
  }
  const withheld = meta.images.filter((image) => image.withheld).length;
  if (withheld || meta.warnings.length) {
    const notes = document.createElement("p");
    notes.className = "hint";
    notes.textContent = [...meta.warnings, withheld ? `${withheld} withheld by the safety checker` : ""].filter(Boolean).join(" ");
    card.append(notes);
  }
  card.querySelector(".actions").append(
    button("Reroll", () => followup("reroll", null)),
    button("Remove", async () => { await store("readwrite", (results) => results.delete(result.job_id)); card.remove(); }),
  );
  return card;
}

async function loadGallery() {
  const results = (await store("readonly", (results) => results.getAll())) || [];
  results.sort((a, b) => b.at - a.at);
  for (const result of results) $("gallery").append(resultCard(result));
}

window.addEventListener("DOMContentLoaded", async () => {
  $("job").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!config) {
      showError("The page could not load the service's options; reload it in a moment.");
      return;
    }
    let options;
    try {
      options = await readOptions();
    } catch (error) {
      showError(error.message);
      return;
    }
    submit("/api/jobs", {options}, options.prompt);
  });
  $("add-adapter").addEventListener("click", () => config && addAdapterRow());
  try {
    await loadConfig();
  } catch (error) {
    showError(`The service is not answering (${error.message}); reload the page in a moment.`);
  }
  await loadGallery();
  for (const [jobId, prompt] of Object.entries(pending())) follow(jobId, prompt, null);
  document.body.dataset.ready = "1";
});
