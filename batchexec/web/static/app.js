/*
 * batchexec's page: enter a key, choose a spreadsheet, check it, run it, follow it.
 *
 * Plain ES module, no build step, no framework. The server's CSP allows no
 * inline script or style, so everything the page does is here, and every text
 * that comes from the server or a model is set with textContent.
 *
 * Every URL is relative to the page, so it works wherever batchexec is mounted.
 * The API key lives in sessionStorage (this tab only) and is sent as the
 * Integrations-API-Key header; it never goes into a URL or a log.
 *
 * Elements a test (or a reader) can rely on; each has this id and the same
 * data-testid:
 *   api-key            the key's password input
 *   save-key           the button that uses (and checks) the key
 *   forget-key         forgets the key (shown once one is kept)
 *   key-status         what became of the key
 *   drop-zone          where a file can be dropped
 *   file-input         <input type=file> for a CSV or XLSX
 *   paste-csv          textarea for pasted CSV (checked as you type)
 *   validate           checks the pasted CSV now
 *   validation-status  the outcome of the check
 *   problems           list of problems (one <li> each, data-index = the row)
 *   model-select       model for rows that name none
 *   model-note         what the chosen model is
 *   side-by-side       the models side by side (shown when two can be called):
 *                      side-by-side-models holds a checkbox a model (value = its
 *                      name), side-by-side-status says what the ticks do
 *   schema             <details> of the answer schema; response-schema its textarea
 *   start              starts the batch (disabled while there are problems)
 *   batch              the current batch's section; batch-id its id
 *   batch-status       its status and message
 *   progress           <progress>: rows ended of all rows
 *   progress-text      the same in words
 *   counts             the counts; count-succeeded, count-failed, count-skipped,
 *                      count-cancelled, count-running, count-pending
 *   cancel, retry, download-xlsx, download-csv   the batch's actions
 *   rows               table of rows; each <tr> has data-index (the execution's
 *                      index) and data-status; side by side, its Row cell is the
 *                      input row, and its Model cell the model it runs on
 *   batches            list of past batches; each <li> has data-invocation-id and
 *                      an "Open" button; refresh-batches reloads it
 *   error              the error area (role=alert, kept in sight): error-message
 *                      (the server's detail), error-list (its problems, if any),
 *                      dismiss-error
 */

const ROUTES = {
  models: "system/batch_execution/models",
  validate: "system/batch_execution/validate",
  upload: "system/batch_execution/upload/invoke",
  results: "system/batch_execution/results",
  cancel: "system/batch_execution/cancel",
  retry: "system/batch_execution/retry",
  batches: "system/batch_execution/batches?limit=20",
  events: (id) => `system/batch_execution/events/${encodeURIComponent(id)}`,
  download: (name) => `public/batch_execution_results/${encodeURIComponent(name)}`,
};
const KEY_HEADER = "Integrations-API-Key";
/* Two batchexec mounts on one origin keep their keys apart. */
const SCOPE = `batchexec:${new URL(".", document.baseURI).pathname}`;
const STORED_KEY = `${SCOPE}:api-key`;
const STORED_BATCH = `${SCOPE}:invocation-id`;
const STORED_MODELS = `${SCOPE}:side-by-side`;
/* How many batches' models side by side the tab keeps: the list of batches shows 20. */
const KEPT_MODELS = 20;
const FINISHED = new Set(["completed", "failed", "cancelled"]);
const COUNT_NAMES = ["succeeded", "failed", "skipped", "cancelled", "running", "pending"];
/* A row the server has not yet reported ended: it says when a row ends, not when it starts. */
const UNENDED = "waiting or running";
/* A stream quiet this long is taken as dropped: the server sends a keep-alive every 15 s. */
const QUIET_MS = 40_000;
/* How long typing in the textarea waits before the CSV is checked. */
const PASTE_PAUSE_MS = 600;
/* Row results are fetched at most this often while rows end. */
const RESULTS_GAP_MS = 400;
const RECONNECT_FIRST_MS = 1000;
const RECONNECT_MAX_MS = 30000;

const $ = (id) => document.getElementById(id);

/* ---------------------------------------------------------------- the API */

/** A refusal or failure of an API call, with the server's words. */
class ApiError extends Error {
  constructor(message, { status = null, errors = [] } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.errors = errors;
  }
}

const session = {
  get key() {
    return sessionStorage.getItem(STORED_KEY) || "";
  },
  set key(value) {
    if (value) sessionStorage.setItem(STORED_KEY, value);
    else sessionStorage.removeItem(STORED_KEY);
  },
  get batchId() {
    return sessionStorage.getItem(STORED_BATCH) || "";
  },
  set batchId(value) {
    if (value) sessionStorage.setItem(STORED_BATCH, value);
    else sessionStorage.removeItem(STORED_BATCH);
  },
  /*
   * The models side by side of the batches this tab started (none for the
   * others): the results route does not say them, and the rows table needs
   * them to show each line's input row.
   */
  modelsOf(id) {
    const known = parseJson(sessionStorage.getItem(STORED_MODELS) || "{}");
    return known && Array.isArray(known[id]) ? known[id] : [];
  },
  rememberModels(id, models) {
    if (!models.length) return;
    const known = parseJson(sessionStorage.getItem(STORED_MODELS) || "{}") || {};
    delete known[id];
    known[id] = models;
    const kept = Object.entries(known).slice(-KEPT_MODELS);
    sessionStorage.setItem(STORED_MODELS, JSON.stringify(Object.fromEntries(kept)));
  },
  forgetModels() {
    sessionStorage.removeItem(STORED_MODELS);
  },
};

/**
 * Call the API at `path` (relative to the page). `json` or `form` is the body.
 * Answers the parsed JSON, or the Response itself with `raw`; throws ApiError
 * with the server's `detail` (and `errors`) for any refusal.
 */
async function call(path, { method, json, form, signal, raw = false, key = session.key } = {}) {
  if (!key) {
    throw new ApiError("Enter your API key first (step 1).", { status: 401 });
  }
  const headers = { [KEY_HEADER]: key };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser writes the multipart boundary
  }
  let response;
  try {
    response = await fetch(path, {
      method: method || (body === undefined ? "GET" : "POST"),
      headers,
      body,
      signal,
      cache: "no-store",
      credentials: "omit",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(
      "Could not reach the batchexec server (a network error): check that it is running and try again.",
    );
  }
  if (!response.ok) throw await refusal(response);
  if (raw) return response;
  try {
    return await response.json();
  } catch {
    throw new ApiError(`The server answered ${response.status} with a body that is not JSON.`, {
      status: response.status,
    });
  }
}

/** The ApiError of a refused response: its `detail`, never only a status code. */
async function refusal(response) {
  let detail = "";
  let errors = [];
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    detail = typeof body.detail === "string" ? body.detail : "";
    errors = Array.isArray(body.errors) ? body.errors : [];
  } catch {
    detail = text.trim().slice(0, 300);
  }
  let message = detail || `The server answered ${response.status} ${response.statusText}.`;
  const wait = response.headers.get("Retry-After");
  if (wait) message += ` Try again in ${wait} s.`;
  if (response.status === 401) keyRefused(message);
  return new ApiError(message, { status: response.status, errors });
}

function isAbort(error) {
  return error && error.name === "AbortError";
}

/**
 * One read of `reader`, or an error once the stream has been quiet for `ms`:
 * a connection dropped on the way (a proxy, a suspended laptop) is noticed
 * and joined again, rather than waited on for ever.
 */
function readWithin(reader, ms) {
  let timer;
  const quiet = new Promise((resolve, reject) => {
    timer = setTimeout(() => {
      reader.cancel().catch(() => {});
      reject(new Error("The connection to the server went quiet."));
    }, ms);
  });
  return Promise.race([reader.read(), quiet]).finally(() => clearTimeout(timer));
}

/**
 * The server-sent events of a response body, as {name, data} with data parsed
 * from JSON. Lines end with LF, CRLF or CR; comments (":") are skipped.
 */
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let name = "";
  let data = [];
  for (;;) {
    const { value, done } = await readWithin(reader, QUIET_MS);
    if (done && !buffer.endsWith("\r")) return;
    // At the end, a CR held back for a CRLF that never came ends its line.
    buffer += done ? "\n" : value;
    // A CR at the end may be the first half of a CRLF: keep it for the next chunk.
    const cut = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
    const lines = buffer.slice(0, cut).split(/\r\n|\r|\n/);
    buffer = lines.pop() + buffer.slice(cut);
    for (const line of lines) {
      if (line === "") {
        if (data.length) {
          const parsed = parseJson(data.join("\n"));
          if (parsed !== undefined) yield { name: name || "message", data: parsed };
        }
        name = "";
        data = [];
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
      }
    }
  }
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        reject(new DOMException("Aborted", "AbortError"));
      },
      { once: true },
    );
  });
}

/* --------------------------------------------------------------- messages */

function showError(error, context = "") {
  if (isAbort(error)) return;
  const message = error instanceof ApiError ? error.message : String(error.message || error);
  $("error-message").textContent = context ? `${context}: ${message}` : message;
  const list = $("error-list");
  list.replaceChildren(...(error.errors || []).map(problemItem));
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-message").textContent = "";
  $("error-list").replaceChildren();
}

/** One problem of a refused input: which row, which field, what. */
function problemItem(problem) {
  const item = document.createElement("li");
  const where = document.createElement("strong");
  where.textContent = problem.index == null ? "All rows" : `Row ${problem.index}`;
  if (problem.index != null) item.dataset.index = String(problem.index);
  item.append(where, problem.field ? ` (${problem.field}): ` : ": ", problem.message || "");
  return item;
}

/* -------------------------------------------------------------------- key */

/* Whether a key is kept, as the key's controls show it. */
function showKeyKept(kept) {
  $("forget-key").hidden = !kept;
  $("api-key").placeholder = kept ? "A key is kept in this tab; enter another to change it" : "";
}

function keyRefused(message) {
  session.key = "";
  showKeyKept(false);
  $("key-status").textContent = `${message} Enter the API key again.`;
  $("api-key").value = "";
  $("api-key").focus();
  updateStart();
}

async function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) {
    $("key-status").textContent = "Enter an API key first.";
    return;
  }
  clearError();
  $("key-status").textContent = "Checking the key…";
  try {
    const catalog = await call(ROUTES.models, { key });
    if (key !== session.key) closeBatch(); // a batch belongs to the key that made it
    session.key = key;
    showKeyKept(true);
    $("key-status").textContent = "Key accepted. It is kept in this tab only, until you close it.";
    showCatalog(catalog);
    loadBatches();
    checkInput();
  } catch (error) {
    // A refused key is said where the key is entered (keyRefused); anything else here.
    if (error.status !== 401) {
      $("key-status").textContent = "The key could not be checked.";
      showError(error, "Checking the key");
    }
  }
}

function forgetKey() {
  closeBatch();
  session.key = "";
  session.forgetModels();
  $("batches").replaceChildren();
  loadBatches();
  $("api-key").value = "";
  showKeyKept(false);
  $("key-status").textContent = "The key is forgotten. Enter it again to go on.";
  $("api-key").focus();
  updateStart();
}

/* ---------------------------------------------------------------- catalog */

let catalog = null;

function showCatalog(body) {
  catalog = body;
  const select = $("model-select");
  const previous = select.value;
  const options = body.models.map((model) => {
    const option = document.createElement("option");
    option.value = model.name;
    const notes = [];
    if (model.name === body.default_model) notes.push("server default");
    if (!model.configured) notes.push("not configured on this server");
    option.textContent = notes.length ? `${model.name} (${notes.join(", ")})` : model.name;
    option.disabled = !model.configured;
    return option;
  });
  select.replaceChildren(...options);
  const usable = body.models.filter((model) => model.configured).map((model) => model.name);
  const chosen = [previous, body.default_model].find((name) => usable.includes(name)) || usable[0];
  if (chosen) select.value = chosen;
  else {
    const none = document.createElement("option");
    none.value = "";
    none.textContent = "No model can be called as this server is configured";
    select.prepend(none);
    select.value = "";
  }
  showSideBySide(usable);
}

/* A checkbox for each model that can be called, the ticked ones kept; shown when there are two. */
function showSideBySide(usable) {
  const ticked = new Set(tickedModels());
  $("side-by-side-models").replaceChildren(...usable.map((name) => modelChoice(name, ticked.has(name))));
  $("side-by-side").hidden = usable.length < 2;
  describeSideBySide();
}

function modelChoice(name, checked) {
  const label = document.createElement("label");
  const box = document.createElement("input");
  box.type = "checkbox";
  box.name = "models";
  box.value = name;
  box.checked = checked;
  label.append(box, ` ${name}`);
  return label;
}

function describeSideBySide() {
  const ticked = tickedModels();
  const models = sideBySideModels();
  // Side by side, every row runs on the ticked models: the single choice does not apply.
  $("model-select").disabled = models.length > 0;
  const status = $("side-by-side-status");
  if (models.length) {
    status.textContent = `Every row runs on ${models.join(", ")}: ${models.length} results a row.`;
  } else if (ticked.length === 1) {
    status.textContent = "Tick one more to run side by side; until then the rows run as chosen above.";
  } else {
    status.textContent = "";
  }
  describeModel();
}

function describeModel() {
  const note = $("model-note");
  if (sideBySideModels().length) {
    note.textContent = "Not used while models are ticked side by side below.";
    return;
  }
  const model = catalog && catalog.models.find((entry) => entry.name === $("model-select").value);
  if (!model) {
    note.textContent = catalog ? "Every row must then name a model (or an assistant) that can be called." : "";
    return;
  }
  const parts = [`Provider ${model.provider}, model ${model.model_id}.`];
  if (model.description) parts.push(model.description);
  if (model.name !== catalog.default_model) {
    const fallback = catalog.models.find((entry) => entry.name === catalog.default_model);
    parts.push(
      fallback && !fallback.configured
        ? `(The server's default, ${catalog.default_model}, is not configured here.)`
        : `(The server's default is ${catalog.default_model}.)`,
    );
  }
  note.textContent = parts.join(" ");
}

function chosenModel() {
  return $("model-select").value;
}

function tickedModels() {
  if ($("side-by-side").hidden) return [];
  return [...$("side-by-side-models").querySelectorAll("input:checked")].map((box) => box.value);
}

/* The models the rows run on side by side: two or more ticked, else none. */
function sideBySideModels() {
  const ticked = tickedModels();
  return ticked.length > 1 ? ticked : [];
}

/* How the rows are to run, as chosen in step 3: sent with the check and the start alike. */
function choices() {
  const models = sideBySideModels();
  const schema = $("response-schema").value;
  return { models, model: models.length ? "" : chosenModel(), schema: schema.trim() ? schema : "" };
}

/* ------------------------------------------------------------------ input */

/* What would run: {file} or {text}, and what the server said of it. */
const input = { file: null, text: "", valid: false, checking: false, controller: null };
let pasteTimer = 0;

function chooseFile(file) {
  if (!file) return;
  input.file = file;
  $("paste-csv").value = "";
  input.text = "";
  checkInput();
}

function pasted() {
  input.text = $("paste-csv").value;
  if (input.text.trim()) {
    input.file = null;
    $("file-input").value = "";
  }
  checkSoon();
}

/* Check again once typing pauses; nothing can start until then. */
function checkSoon() {
  input.valid = false;
  updateStart();
  clearTimeout(pasteTimer);
  pasteTimer = setTimeout(checkInput, PASTE_PAUSE_MS);
}

/* What is chosen, to begin a sentence with. */
function inputName() {
  return input.file ? input.file.name : "The pasted CSV";
}

/*
 * The form of the chosen input and `choice`: the pasted CSV as a file, so it
 * is checked and started as the same upload, read the same way.
 */
function formOf(choice) {
  const form = new FormData();
  const file = input.file || new File([input.text], "pasted.csv", { type: "text/csv" });
  form.append("file", file, file.name);
  if (choice.models.length) form.append("models", choice.models.join(","));
  if (choice.model) form.append("model", choice.model);
  if (choice.schema) form.append("response_schema", choice.schema);
  return form;
}

/** Ask the server to check the chosen input: every problem, by row, before anything runs. */
async function checkInput() {
  clearTimeout(pasteTimer);
  if (input.controller) input.controller.abort();
  input.valid = false;
  const status = $("validation-status");
  if (!input.file && !input.text.trim()) {
    input.checking = false;
    status.textContent = "Nothing chosen yet.";
    showProblems([]);
    updateStart();
    return;
  }
  if (!session.key) {
    status.textContent = `${inputName()}: it is checked once your API key is entered.`;
    updateStart();
    return;
  }
  const controller = new AbortController();
  input.controller = controller;
  input.checking = true;
  updateStart();
  status.textContent = `${inputName()}: checking…`;
  const choice = choices();
  try {
    const body = await call(ROUTES.validate, { form: formOf(choice), signal: controller.signal });
    input.valid = true;
    showProblems([]);
    status.textContent = summary(body, choice);
    clearError();
  } catch (error) {
    if (isAbort(error)) return;
    if (error.status === 422) {
      status.textContent = `${inputName()} cannot run yet. ${error.message}`;
      showProblems(error.errors);
    } else {
      status.textContent = `${inputName()}: it could not be checked.`;
      showProblems([]);
      showError(error, "Checking the input");
    }
  } finally {
    if (input.controller === controller) {
      input.controller = null;
      input.checking = false;
      updateStart();
    }
  }
}

/** What a successful check of `choice` says: the server's message, the columns, the models. */
function summary(body, choice) {
  const parts = [`${inputName()}: ${body.message || "ready to run."}`];
  const columns = names(body.columns);
  if (columns.length) parts.push(`Columns: ${columns.join(", ")}.`);
  const models = names(body.models);
  if (models.length) parts.push(`${models.length === 1 ? "Model" : "Models"}: ${models.join(", ")}.`);
  if (choice.models.length && Number.isInteger(body.rows)) {
    parts.push(`Side by side: ${body.rows * choice.models.length} runs, each row once on each model.`);
  }
  if (choice.schema) parts.push("Each answer must match the answer schema.");
  return parts.join(" ");
}

/* A list of names, whether given as strings, as objects with a name, or as an object's keys. */
function names(value) {
  if (Array.isArray(value)) {
    return value.map((entry) => (typeof entry === "string" ? entry : entry && entry.name)).filter(Boolean);
  }
  if (value && typeof value === "object") return Object.keys(value);
  return [];
}

function showProblems(problems) {
  const list = $("problems");
  list.replaceChildren(...problems.map(problemItem));
  list.hidden = problems.length === 0;
  // A refused schema is shown where it is written, even if its box was closed.
  if (problems.some((problem) => problem.field === "response_schema")) $("schema").open = true;
}

function updateStart() {
  $("start").disabled = !(session.key && input.valid && !input.checking && !starting);
}

/* ------------------------------------------------------------------ start */

let starting = false;

async function start() {
  if ($("start").disabled) return;
  const choice = choices();
  const form = formOf(choice);
  form.append("execute", "true");
  starting = true;
  updateStart();
  clearError();
  $("validation-status").textContent = `${inputName()}: starting…`;
  try {
    const body = await call(ROUTES.upload, { form });
    session.rememberModels(body.invocationId, choice.models);
    $("validation-status").textContent = `${inputName()}: started as batch ${body.invocationId}.`;
    follow(body.invocationId, { focus: true });
    loadBatches();
  } catch (error) {
    if (error.status === 422) {
      input.valid = false;
      $("validation-status").textContent = `${inputName()} cannot run. ${error.message}`;
      showProblems(error.errors);
    } else {
      $("validation-status").textContent = `${inputName()}: the batch did not start.`;
      showError(error, "Starting the batch");
    }
  } finally {
    starting = false;
    updateStart();
  }
}

/* ------------------------------------------------------------------ batch */

/*
 * The batch on show: what the results route last said, its rows by index, and
 * its models side by side, if it has them and this tab started it.
 */
let batch = null;
let following = null;

function emptyBatch(id) {
  return {
    id,
    models: session.modelsOf(id),
    status: "",
    message: "",
    progress: null,
    xlsxUrl: null,
    csvContent: null,
    cursor: 0,
    rows: new Map(),
  };
}

function stopFollowing() {
  if (following) following.abort();
  following = null;
}

/* Stop showing the batch on show. */
function closeBatch() {
  stopFollowing();
  session.batchId = "";
  batch = null;
  $("batch").hidden = true;
}

/** Show batch `id` and follow it live until it ends. */
async function follow(id, { focus = false } = {}) {
  stopFollowing();
  const controller = new AbortController();
  following = controller;
  const { signal } = controller;
  forgetEndedRows();
  session.batchId = id;
  batch = emptyBatch(id);
  $("batch").hidden = false;
  $("batch-id").textContent = id;
  $("rows").toggleAttribute("data-side-by-side", batch.models.length > 0);
  $("rows-caption").textContent = batch.models.length
    ? `Rows, as each ends: each input row once on each model (${batch.models.join(", ")})`
    : "Rows, as each ends";
  $("rows").tBodies[0].replaceChildren();
  $("batch-status").textContent = "Loading…";
  renderBatch();
  if (focus) {
    $("batch-heading").focus();
    $("batch").scrollIntoView({ block: "start" });
  }
  try {
    applyResults(await call(ROUTES.results, { json: { invocation_id: id }, signal }));
    if (!FINISHED.has(batch.status)) await stream(id, signal);
  } catch (error) {
    if (isAbort(error)) return;
    if (error.status === 404) session.batchId = "";
    $("batch-status").textContent = "The batch could not be followed.";
    showError(error, `Batch ${id}`);
  }
}

/**
 * Follow the events route until `done`. A stream that ends early, or an
 * `interrupted` server, is joined again with a growing pause.
 */
async function stream(id, signal) {
  let pause = RECONNECT_FIRST_MS;
  for (;;) {
    let last = null;
    try {
      const response = await call(ROUTES.events(id), { raw: true, signal });
      for await (const event of serverSentEvents(response.body)) {
        pause = RECONNECT_FIRST_MS;
        last = event;
        onEvent(event, signal);
        if (event.name === "done" || event.name === "interrupted") break;
      }
    } catch (error) {
      if (isAbort(error) || signal.aborted) throw error;
      if (error.status && error.status < 500 && error.status !== 429) throw error;
      $("batch-status").textContent = `${error.message} Following again in ${Math.round(pause / 1000)} s…`;
    }
    if (last && last.name === "done") {
      await finalResults(signal);
      return;
    }
    if (last && last.name === "interrupted") {
      $("batch-status").textContent = `${last.data.message || "The server is stopping."} Following again in ${Math.round(pause / 1000)} s…`;
    }
    // The stream ended without "done": the batch may have ended all the same.
    try {
      applyResults(await call(ROUTES.results, { json: { invocation_id: id }, signal }));
      if (FINISHED.has(batch.status)) return;
    } catch (error) {
      if (isAbort(error) || signal.aborted) throw error;
      if (error.status && error.status < 500 && error.status !== 429) throw error;
    }
    await sleep(pause, signal);
    pause = Math.min(pause * 2, RECONNECT_MAX_MS);
  }
}

function onEvent(event, signal) {
  const data = event.data || {};
  if (event.name === "started") {
    // Shown running until its end comes; a row whose end is known already stays ended.
    if (!batch.rows.has(data.index)) {
      renderRow({ index: data.index, status: "running", model: data.model || "", result: null });
    }
  } else if (event.name === "execution") {
    const row = batch.rows.get(data.index) || { index: data.index, model: "", result: null };
    Object.assign(row, {
      status: data.status,
      error: data.error,
      latency_ms: data.latency_ms,
      attempts: data.attempts,
    });
    batch.rows.set(data.index, row);
    renderRow(row);
    fetchEndedRows(signal);
  } else if (event.name === "progress") {
    batch.progress = data;
    if (batch.status === "queued" && data.running + endedCount(data) > 0) batch.status = "processing";
    renderBatch();
  } else if (event.name === "done") {
    batch.status = data.status;
    batch.message = data.message;
    renderBatch();
  }
}

/* Rows' results, which execution events do not carry, asked for at most every RESULTS_GAP_MS. */
let endedRows = { timer: 0, busy: false, again: false };

function fetchEndedRows(signal) {
  if (endedRows.busy) {
    endedRows.again = true;
    return;
  }
  if (endedRows.timer) return;
  endedRows.timer = setTimeout(async () => {
    endedRows.timer = 0;
    endedRows.busy = true;
    const id = batch.id;
    try {
      const body = await call(ROUTES.results, {
        json: { invocation_id: id, since: batch.cursor },
        signal,
      });
      if (batch?.id === id) applyResults(body);
    } catch (error) {
      // A lost connection is the stream's to report (and recover from); a refusal is news.
      if (!isAbort(error) && error.status && error.status < 500) showError(error, "Reading the rows' results");
    } finally {
      endedRows.busy = false;
      if (endedRows.again && !signal.aborted) {
        endedRows.again = false;
        fetchEndedRows(signal);
      }
    }
  }, RESULTS_GAP_MS);
}

function forgetEndedRows() {
  clearTimeout(endedRows.timer);
  endedRows = { timer: 0, busy: false, again: false };
}

async function finalResults(signal) {
  forgetEndedRows();
  applyResults(await call(ROUTES.results, { json: { invocation_id: batch.id }, signal }));
  loadBatches();
}

/** Take in a results answer (whole, or only the rows since a cursor). */
function applyResults(body) {
  // An answer overtaken by a newer one (a slow poll landing after "done") still
  // brings its rows, but not its older status.
  const cursor = body.cursor || 0;
  const stale = cursor < batch.cursor || (FINISHED.has(batch.status) && !FINISHED.has(body.status));
  if (!stale) {
    batch.status = body.status;
    batch.message = body.message;
    batch.progress = body.progress;
    batch.cursor = cursor;
  }
  if (body.xlsx_url) batch.xlsxUrl = body.xlsx_url;
  if (typeof body.csv_content === "string") batch.csvContent = body.csv_content;
  for (const execution of body.executions || []) {
    const row = { ...execution };
    batch.rows.set(execution.index, row);
    renderRow(row);
  }
  renderBatch();
}

function endedCount(progress) {
  return progress.succeeded + progress.failed + progress.skipped + progress.cancelled;
}

function renderBatch() {
  if (!batch) return;
  const progress = batch.progress;
  const total = progress ? progress.total : 0;
  const ended = progress ? endedCount(progress) : 0;
  const bar = $("progress");
  bar.max = Math.max(total, 1);
  bar.value = ended;
  $("progress-text").textContent = progressText(ended, total);
  for (const name of COUNT_NAMES) $(`count-${name}`).textContent = String(progress ? progress[name] : 0);
  if (batch.status) {
    const status = batch.status[0].toUpperCase() + batch.status.slice(1);
    $("batch-status").textContent = batch.message ? `${status}: ${batch.message}` : status;
  }
  $("batch").dataset.status = batch.status;
  // Every row has a line from the start, filled in as it ends.
  const body = $("rows").tBodies[0];
  for (let index = body.rows.length + 1; index <= total; index += 1) {
    if (!batch.rows.has(index)) renderRow({ index, status: "pending", model: "", result: null, error: null });
  }
  const finished = FINISHED.has(batch.status);
  $("cancel").disabled = !batch.status || finished;
  $("retry").disabled = !(finished && progress && progress.failed + progress.skipped + progress.cancelled > 0);
  $("download-xlsx").disabled = !batch.xlsxUrl;
  $("download-csv").disabled = batch.csvContent == null;
}

function progressText(ended, total) {
  if (!batch.progress) return "";
  const width = batch.models.length;
  if (width) return `${ended} of ${total} ended (each row once on each of ${width} models).`;
  return `${ended} of ${total} ${total === 1 ? "row" : "rows"} ended.`;
}

/*
 * Where execution `index` comes from: its input row and, side by side, the
 * model it runs on (input row i on model k is execution (i - 1) * models + k).
 */
function origin(index) {
  const width = batch.models.length;
  if (!width) return { row: index, model: "", startsRow: false };
  const position = (index - 1) % width;
  return { row: Math.ceil(index / width), model: batch.models[position], startsRow: position === 0 };
}

/** Write one row's line of the table, making it (and any before it) if need be. */
function renderRow(row) {
  const body = $("rows").tBodies[0];
  while (body.rows.length < row.index) {
    const line = body.insertRow();
    const index = body.rows.length;
    const from = origin(index);
    line.dataset.index = String(index);
    for (let cell = 0; cell < 5; cell += 1) line.insertCell();
    line.cells[0].textContent = String(from.row);
    line.cells[1].textContent = UNENDED;
    line.cells[2].textContent = from.model;
    line.classList.toggle("starts-row", from.startsRow);
    line.dataset.status = "pending";
  }
  const line = body.rows[row.index - 1];
  const status = row.status || "pending";
  line.dataset.status = status;
  line.cells[1].textContent = status === "pending" ? UNENDED : status.replace("_", " ");
  line.cells[2].textContent = row.model || origin(row.index).model;
  const text = line.cells[3];
  if (row.error) {
    text.textContent = row.error;
    text.className = "error-text";
  } else {
    text.textContent = row.result == null ? "" : row.result;
    text.className = "";
  }
  line.cells[4].textContent = row.latency_ms == null ? "" : `${row.latency_ms} ms`;
}

async function cancel() {
  const id = batch.id;
  $("cancel").disabled = true;
  try {
    const body = await call(ROUTES.cancel, { json: { invocation_id: id } });
    if (batch?.id === id) applyResults(body);
  } catch (error) {
    showError(error, "Cancelling");
    if (batch?.id === id) renderBatch();
  }
}

async function retry() {
  $("retry").disabled = true;
  try {
    const body = await call(ROUTES.retry, { json: { invocation_id: batch.id } });
    // A retry runs on the same models side by side.
    session.rememberModels(body.invocationId, batch.models);
    clearError();
    follow(body.invocationId, { focus: true });
    loadBatches();
  } catch (error) {
    showError(error, "Retrying");
    renderBatch(); // the button again as the batch allows
  }
}

/* -------------------------------------------------------------- downloads */

/** Download the workbook with the key in a header, never in the URL. */
async function downloadXlsx() {
  const button = $("download-xlsx");
  button.disabled = true;
  try {
    const url = workbookPath(batch.xlsxUrl);
    const response = await call(url, { raw: true });
    const name = fileNameOf(response) || decodeURIComponent(url.split("/").pop()) || `batch_execution_${batch.id}.xlsx`;
    save(await response.blob(), name);
  } catch (error) {
    showError(error, "Downloading the workbook");
  } finally {
    button.disabled = !batch?.xlsxUrl;
  }
}

/*
 * The workbook's URL as the page fetches it: its file name, from xlsx_url,
 * under this page's own server. xlsx_url itself may name another path (a proxy
 * that strips a prefix, a SERVER_NAME), and the key is sent to the page's
 * server only.
 */
function workbookPath(xlsxUrl) {
  const url = new URL(xlsxUrl, document.baseURI);
  return ROUTES.download(decodeURIComponent(url.pathname.split("/").pop()));
}

function fileNameOf(response) {
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = /filename="?([^";]+)"?/i.exec(disposition);
  return match ? match[1] : "";
}

function downloadCsv() {
  if (batch.csvContent == null) return;
  save(new Blob([batch.csvContent], { type: "text/csv;charset=utf-8" }), `batch_execution_${batch.id}.csv`);
}

function save(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  // Long enough for the download to begin; the object URL then goes.
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

/* ---------------------------------------------------------- past batches */

async function loadBatches() {
  const status = $("batches-status");
  if (!session.key) {
    status.textContent = "Enter your API key to see your batches.";
    return;
  }
  status.textContent = "Loading…";
  try {
    const body = await call(ROUTES.batches);
    $("batches").replaceChildren(...body.batches.map(batchItem));
    status.textContent = body.batches.length ? "" : "No batches yet.";
  } catch (error) {
    status.textContent = "The list could not be loaded.";
    showError(error, "Listing your batches");
  }
}

function batchItem(summary) {
  const item = document.createElement("li");
  item.dataset.invocationId = summary.invocationId;
  item.dataset.status = summary.status;
  const open = document.createElement("button");
  open.type = "button";
  open.textContent = "Open";
  open.setAttribute("aria-label", `Open batch ${summary.invocationId}`);
  open.addEventListener("click", () => {
    clearError();
    follow(summary.invocationId, { focus: true });
  });
  const what = document.createElement("div");
  const title = document.createElement("p");
  const id = document.createElement("code");
  id.textContent = summary.invocationId;
  const state = document.createElement("span");
  state.className = "badge";
  state.textContent = summary.status;
  title.append(state, " ", id);
  const detail = document.createElement("p");
  detail.className = "note";
  const progress = summary.progress;
  const when = new Date(summary.created_at);
  const parts = [
    Number.isNaN(when.getTime()) ? summary.created_at : when.toLocaleString(),
    `${progress.succeeded} of ${progress.total} succeeded`,
  ];
  if (summary.retry_of) parts.push(`retry of ${summary.retry_of}`);
  detail.textContent = `${parts.join(" · ")}. ${summary.message}`;
  what.append(title, detail);
  item.append(open, what);
  return item;
}

/* ------------------------------------------------------------------ setup */

/*
 * A file dropped anywhere is taken, rather than opened by the browser (which
 * would leave the page); dragged text still drops into the textarea.
 */
function dropZone() {
  const zone = $("drop-zone");
  const carriesFiles = (event) => event.dataTransfer && event.dataTransfer.types.includes("Files");
  zone.addEventListener("dragenter", (event) => {
    if (carriesFiles(event)) zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", (event) => {
    if (!zone.contains(event.relatedTarget)) zone.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => {
    if (carriesFiles(event)) event.preventDefault();
  });
  document.addEventListener("drop", (event) => {
    zone.classList.remove("dragging");
    if (!carriesFiles(event)) return;
    event.preventDefault();
    chooseFile(event.dataTransfer.files[0]);
  });
}

async function init() {
  $("key-form").addEventListener("submit", useKey);
  $("forget-key").addEventListener("click", forgetKey);
  $("dismiss-error").addEventListener("click", clearError);
  $("file-input").addEventListener("change", (event) => chooseFile(event.target.files[0]));
  $("paste-csv").addEventListener("input", pasted);
  $("response-schema").addEventListener("input", checkSoon);
  $("validate").addEventListener("click", () => {
    input.text = $("paste-csv").value;
    if (input.text.trim()) input.file = null;
    checkInput();
  });
  $("model-select").addEventListener("change", () => {
    describeModel();
    checkInput(); // whether a model can be called is part of the check
  });
  $("side-by-side-models").addEventListener("change", () => {
    describeSideBySide();
    checkInput(); // rows that name a model of their own cannot run side by side
  });
  $("start").addEventListener("click", start);
  $("cancel").addEventListener("click", cancel);
  $("retry").addEventListener("click", retry);
  $("download-xlsx").addEventListener("click", downloadXlsx);
  $("download-csv").addEventListener("click", downloadCsv);
  $("refresh-batches").addEventListener("click", loadBatches);
  dropZone();

  if (!session.key) {
    loadBatches();
    return;
  }
  showKeyKept(true);
  $("key-status").textContent = "Using the key kept in this tab.";
  try {
    showCatalog(await call(ROUTES.models));
  } catch (error) {
    showError(error, "Loading the models");
    return;
  }
  loadBatches();
  if (session.batchId) follow(session.batchId);
}

init();
