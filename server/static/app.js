// The playground: chat with a session, every token coloured by surprise, the session's memory
// beside it. Only the public /v1 API is used. Each turn sends just the new message: the session
// already holds the conversation in its weights (and would skip a re-sent history anyway).
import { ApiError, auth, call, chatStream, sessionPath } from "./api.js";
import { drawSurprise } from "./plot.js";
import { ReplyBuilder, alignTokens, describe, mean, promptMessages, renderPieces } from "./tokens.js";

const $ = (id) => document.getElementById(id);
const SESSION_ITEM = "hope.playground.session";
const SETTINGS_ITEM = "hope.playground.settings";
const KEPT_MESSAGES = 200; // of each session's transcript, in this browser's localStorage
const SESSION_ID = /^[A-Za-z0-9_@+-][A-Za-z0-9._@+-]{0,127}$/;
const LEVELS = ["fast", "mid", "titans"]; // CMS levels, then the attention memory
const EXAMPLE = "My favourite colour is teal and my cat is called Pixel.";

const state = {
  id: null, // the session talked to
  transcript: [], // {role: user|assistant|note, text, pieces, losses, mean, state, note}
  info: null, // GET /v1/sessions/{id}; null: not stored yet
  seen: null, // the info shown before, for the deltas
  controller: null, // AbortController of the running turn
  after: null, // the session list's next page
};
const elements = new WeakMap(); // message -> its <article>

// ---- small helpers ---------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.dataset[k.slice(5).replace(/-(.)/g, (_, c) => c.toUpperCase())] = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

function setStatus(text, kind = "") {
  $("status").textContent = text;
  $("status").className = `status ${kind}`;
}

function showError(err) {
  if (err instanceof ApiError && err.status === 401) showKeyForm(err.message);
  // fetch's own TypeError ("Failed to fetch") means the server could not be reached
  const message = err instanceof TypeError ? `lost the connection to the server (${err.message})` : err.message;
  setStatus(message || String(err), "error");
}

const bytes = (n) => (n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${(n / 1024).toFixed(1)} KiB`);
function when(seconds) {
  const date = new Date(seconds * 1000);
  const today = date.toDateString() === new Date().toDateString();
  return today ? date.toLocaleTimeString() : date.toLocaleDateString();
}
const randomId = () => `play-${Math.random().toString(36).slice(2, 8)}`;

// a transcript is kept per API key (another key is another tenant, with other sessions)
function scope() {
  let h = 0x811c9dc5;
  for (const c of auth.key) h = Math.imul(h ^ c.charCodeAt(0), 0x01000193) >>> 0;
  return auth.key ? h.toString(36) : "open";
}
const transcriptItem = (id) => `hope.playground.t.${scope()}.${id}`;

function loadTranscript(id) {
  try {
    return JSON.parse(localStorage.getItem(transcriptItem(id))) || [];
  } catch {
    return [];
  }
}

function saveTranscript(id = state.id, transcript = state.transcript) {
  const kept = transcript.filter((m) => m.state !== "streaming").slice(-KEPT_MESSAGES);
  try {
    localStorage.setItem(transcriptItem(id), JSON.stringify(kept));
  } catch {
    // storage full: the page still works, the transcript is just not kept
  }
}

// ---- dialogs ---------------------------------------------------------------------------------

// A modal question; resolves to the input's value (or true without an input), null if cancelled.
function ask({ title, text, value = null, ok = "OK", danger = false, check = null }) {
  const dialog = $("dialog");
  const input = $("dialog-input");
  $("dialog-title").textContent = title;
  $("dialog-text").textContent = text;
  $("dialog-error").textContent = "";
  input.hidden = value === null;
  input.value = value ?? "";
  $("dialog-ok").textContent = ok;
  $("dialog-ok").classList.toggle("danger", danger);
  return new Promise((resolve) => {
    const finish = (answer) => {
      dialog.removeEventListener("cancel", onCancel);
      $("dialog-ok").onclick = $("dialog-cancel").onclick = input.onkeydown = null;
      dialog.close();
      resolve(answer);
    };
    const accept = () => {
      const problem = value !== null && check ? check(input.value.trim()) : null;
      if (problem) $("dialog-error").textContent = problem;
      else finish(value === null ? true : input.value.trim());
    };
    const onCancel = (e) => {
      e.preventDefault();
      finish(null);
    };
    dialog.addEventListener("cancel", onCancel);
    $("dialog-ok").onclick = accept;
    $("dialog-cancel").onclick = () => finish(null);
    input.onkeydown = (e) => {
      if (e.key === "Enter") {
        e.preventDefault();
        accept();
      }
    };
    dialog.showModal();
    (value === null ? $("dialog-ok") : input).focus();
    if (value !== null) input.select();
  });
}

const checkId = (id) => (SESSION_ID.test(id) ? null
  : "1-128 letters, digits or . _ - @ + (not starting with a dot)");

// ---- transcript ------------------------------------------------------------------------------

function renderMessage(m) {
  let node = elements.get(m);
  if (!node) {
    node = m.role === "note"
      ? el("p", { class: "note" })
      : el("article", { class: `msg ${m.role}` }, el("div", { class: "who" }), el("div", { class: "body" }),
        el("div", { class: "meta" }));
    elements.set(m, node);
  }
  if (m.role === "note") {
    node.textContent = m.text;
    return node;
  }
  node.dataset.role = m.role;
  node.dataset.state = m.state;
  node.dataset.meanLoss = m.mean ?? "";
  node.dataset.tokens = String(m.losses?.length ?? 0);
  if (m.chunks) node.dataset.chunks = String(m.chunks);
  node.classList.toggle("discarded", m.state === "stopped" || m.state === "error");
  node.querySelector(".who").textContent = m.role === "user" ? "you" : "HOPE";
  const body = node.querySelector(".body");
  if (m.pieces?.length) renderPieces(body, m.pieces);
  else body.textContent = m.text || (m.state === "streaming" ? "…" : "");
  const meta = [];
  if (m.mean != null) meta.push(`${m.losses.length} tokens \u00b7 mean surprise ${m.mean.toFixed(2)} nats`);
  if (m.note) meta.push(m.note);
  node.querySelector(".meta").textContent = meta.join(" \u00b7 ");
  if (m.role === "user" && m.state === "done") {
    const again = el("button", { type: "button", class: "link again", title: "Send this message again" }, "send again");
    again.addEventListener("click", () => {
      if (state.controller) return; // a reply is streaming: keep what is being typed
      $("input").value = m.text;
      send();
    });
    node.querySelector(".meta").append(" ", again);
  }
  node.classList.toggle("learned", Boolean(m.learnedFrom));
  return node;
}

function renderTranscript() {
  const box = $("transcript");
  const messages = state.transcript.map(renderMessage);
  box.replaceChildren($("intro"), ...messages);
  $("intro").hidden = state.transcript.some((m) => m.role !== "note");
  if (!state.transcript.length && state.info?.tokens_absorbed > 1) {
    box.append(el("p", { class: "note" }, `This session already holds ${state.info.tokens_absorbed} tokens in `
      + "its memory; this browser has no transcript of them."));
  }
  box.scrollTop = box.scrollHeight;
  drawPlot();
}

function appendMessage(m) {
  state.transcript.push(m);
  $("intro").hidden = true;
  const box = $("transcript");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  box.append(renderMessage(m));
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function updateMessage(m) {
  const box = $("transcript");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  renderMessage(m);
  if (atBottom) box.scrollTop = box.scrollHeight;
}

const drawPlot = () => drawSurprise($("plot"), state.transcript.filter((m) => m.state === "done"));

// The user's message as the model read it: its content tokens from the first chunk's surprise.
function scoreUserMessage(m, surprise) {
  const users = promptMessages(surprise.tokens, surprise.loss).filter((x) => x.role === "user");
  const tokens = users.at(-1)?.tokens || [];
  m.pieces = alignTokens(tokens, m.text);
  m.losses = tokens.map((t) => Math.round(t.loss * 1000) / 1000);
  m.mean = tokens.length ? Math.round(mean(tokens.map((t) => t.loss)) * 1000) / 1000 : null;
  const before = state.transcript.findLast((x) => x !== m && x.role === "user" && x.state === "done"
    && x.mean != null && x.text.trim() === m.text.trim());
  if (before && m.mean != null) {
    const delta = m.mean - before.mean;
    m.note = `said before: ${before.mean.toFixed(2)} \u2192 ${m.mean.toFixed(2)} nats (${delta < 0 ? "\u2212" : "+"}`
      + `${Math.abs(delta).toFixed(2)})${delta < 0 ? ", the session learned it" : ""}`;
    m.learnedFrom = delta < 0 ? before.mean : null;
  }
  updateMessage(m);
}

// ---- a turn ----------------------------------------------------------------------------------

function readSettings() {
  const num = (id, fallback) => {
    const v = $(id).value.trim();
    return v === "" || Number.isNaN(Number(v)) ? fallback : Number(v);
  };
  return {
    temperature: num("temperature", 0.8),
    top_p: num("top_p", 1),
    top_k: Math.max(0, Math.trunc(num("top_k", 0))),
    max_tokens: Math.max(1, Math.trunc(num("max_tokens", 64))),
    seed: num("seed", null),
    learn: $("learn").checked,
  };
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  for (const id of ["new-session", "fork", "import", "delete", "export"]) $(id).disabled = busy;
  $("session-list").classList.toggle("busy", busy);
  if (!busy) updateActions();
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || state.controller || !state.id) return;
  $("input").value = "";
  const settings = readSettings();
  const id = state.id;
  const versionBefore = state.info?.id === id ? state.info.version : 0;
  const user = { role: "user", text, state: "streaming" };
  const reply = { role: "assistant", text: "", pieces: [], losses: [], state: "streaming" };
  appendMessage(user);
  appendMessage(reply);
  const builder = new ReplyBuilder();
  state.controller = new AbortController();
  setBusy(true);
  setStatus("thinking…");
  const request = {
    model: "hope", session_id: id, messages: [{ role: "user", content: text }],
    stream_options: { include_usage: true, include_surprise: true },
    temperature: settings.temperature, top_p: settings.top_p, top_k: settings.top_k,
    max_tokens: settings.max_tokens, learn: settings.learn,
  };
  if (settings.seed !== null) request.seed = Math.trunc(settings.seed);
  const started = performance.now();
  let chunks = 0;
  let finished = null;
  let closed = false; // the final chunk (with the session) arrived
  try {
    for await (const chunk of chatStream(request, state.controller.signal)) {
      chunks += 1;
      const choice = chunk.choices?.[0];
      if (choice?.delta?.role && chunk.surprise) {
        scoreUserMessage(user, chunk.surprise);
        continue;
      }
      if (choice) {
        reply.chunks = chunks;
        builder.push(choice.delta?.content || "", chunk.surprise);
        reply.text += choice.delta?.content || "";
        reply.pieces = builder.pieces;
        reply.losses = builder.losses;
        finished = choice.finish_reason || finished;
        $("panel-status").textContent = `streaming: ${builder.losses.length} tokens, learning as it goes`;
        updateMessage(reply);
      }
      if (chunk.session) {
        closed = true;
        const s = chunk.session;
        user.note = [user.note, s.learned ? null : "read without learning"].filter(Boolean).join(" \u00b7 ") || null;
        if (s.resent_messages) reply.note = `${s.resent_messages} message(s) already absorbed`;
      }
      if (chunk.usage) {
        const seconds = (performance.now() - started) / 1000;
        const rate = `${Math.round(chunk.usage.completion_tokens / Math.max(seconds, 0.001))} tokens/s`;
        reply.note = [reply.note, `${seconds.toFixed(1)} s, ${rate}`,
          finished === "length" ? "cut at max_tokens" : "ended its turn"].filter(Boolean).join(" \u00b7 ");
      }
    }
    if (!closed) throw new Error("the stream ended before the reply was complete");
    reply.mean = builder.losses.length ? Math.round(mean(builder.losses) * 1000) / 1000 : null;
    user.state = reply.state = "done";
    setStatus("ready", "ok");
  } catch (err) {
    const stopped = err.name === "AbortError";
    user.state = reply.state = stopped ? "stopped" : "error";
    reply.note = stopped ? "stopped: nothing was stored" : `error: ${err.message}; nothing was stored`;
    if (stopped) setStatus("stopped");
    else showError(err);
  } finally {
    $("transcript").dataset.chunks = String(chunks);
    state.controller = null;
    setBusy(false);
    await refreshInfo();
    // a Stop (or a lost connection) may come after the server finished and stored the turn: the
    // chunks that said so were still unread. The session's version tells, once the commit that
    // may be under way has landed: asked again for a second before "nothing was stored".
    const stored = () => id === state.id && (state.info?.version ?? 0) > versionBefore;
    for (let i = 0; user.state !== "done" && settings.learn && !stored() && i < 5; i++) {
      await new Promise((resolve) => setTimeout(resolve, 200));
      await refreshInfo();
    }
    if (user.state !== "done" && settings.learn && stored()) {
      user.state = reply.state = "done";
      reply.note = "stopped after the server had finished: stored (the reply shown may be cut short)";
      setStatus("ready", "ok");
    }
    updateMessage(user);
    updateMessage(reply);
    if (id === state.id) {
      saveTranscript();
      drawPlot();
    }
    await loadSessions();
  }
}

// ---- the session panel -----------------------------------------------------------------------

async function refreshInfo() {
  const id = state.id;
  try {
    const info = await call("GET", sessionPath(id));
    if (id !== state.id) return;
    state.seen = state.info?.id === id ? state.info : null;
    state.info = info;
  } catch (err) {
    if (id !== state.id) return;
    if (!(err instanceof ApiError && err.status === 404)) return showError(err);
    state.seen = null;
    state.info = null;
  }
  renderPanel();
}

function renderPanel() {
  const { info, seen } = state;
  $("panel-id").textContent = state.id;
  const delta = (now, before) => (before != null && now > before ? ` (+${now - before})` : "");
  if (!info) {
    $("panel-status").textContent = "not stored yet: the first message creates it";
    $("stats").replaceChildren();
    $("levels").replaceChildren(...LEVELS.map((lvl) => el("tr", {}, el("td", {}, lvl), el("td", {}, "0"),
      el("td", {}, "–"))));
    updateActions();
    return;
  }
  $("panel-status").textContent = `stored, version ${info.version}`;
  const rows = [
    ["version", String(info.version)],
    ["tokens absorbed", `${info.tokens_absorbed}${delta(info.tokens_absorbed, seen?.tokens_absorbed)}`],
    ["messages logged", String(info.messages_logged)],
    ["state size", bytes(info.state_bytes)],
    ["created", when(info.created)],
    ["updated", when(info.updated)],
    ["checkpoint", info.checkpoint.slice(0, 12)],
  ];
  $("stats").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k),
    el("dd", { "data-stat": k.replace(/ /g, "_") }, v)]));
  const norms = info.last_update_norms || {};
  $("levels").replaceChildren(...LEVELS.map((lvl) => el("tr", { "data-level": lvl },
    el("td", {}, lvl),
    el("td", {}, `${info.updates?.[lvl] ?? 0}${delta(info.updates?.[lvl] ?? 0, seen?.updates?.[lvl])}`),
    el("td", {}, norms[lvl] == null ? "–" : norms[lvl].toExponential(2)))));
  updateActions();
}

function updateActions() {
  const stored = Boolean(state.info);
  for (const id of ["fork", "export", "delete"]) $(id).disabled = !stored || Boolean(state.controller);
}

// ---- sessions --------------------------------------------------------------------------------

async function loadSessions(more = false) {
  let page;
  try {
    const query = new URLSearchParams({ limit: "50" });
    if (more && state.after) query.set("after", state.after);
    page = await call("GET", `/v1/sessions?${query}`);
  } catch (err) {
    return showError(err);
  }
  const list = $("session-list");
  if (!more) list.replaceChildren();
  const listed = new Set([...list.querySelectorAll("button.session")].map((b) => b.dataset.id));
  // the current session is listed first when it is not on the first page; a later page that
  // holds it does not list it twice
  for (const s of page.data) {
    if (!listed.has(s.id)) list.append(sessionItem(s.id, summary(s)));
  }
  if (!more && !page.data.some((s) => s.id === state.id)) {
    list.prepend(sessionItem(state.id, state.info?.id === state.id ? summary(state.info) : "new"));
  }
  state.after = page.has_more ? page.last_id : null;
  $("more-sessions").hidden = !page.has_more;
  markCurrent();
}

const summary = (info) => `${info.tokens_absorbed} tok \u00b7 v${info.version}`;

function sessionItem(id, detail) {
  const button = el("button", { type: "button", class: "session", "data-id": id }, el("span", {}, id),
    el("small", {}, detail));
  button.addEventListener("click", () => state.controller || selectSession(id));
  return el("li", {}, button);
}

function markCurrent() {
  for (const b of $("session-list").querySelectorAll("button.session")) {
    b.classList.toggle("current", b.dataset.id === state.id);
  }
}

async function selectSession(id) {
  state.id = id;
  state.info = state.seen = null;
  localStorage.setItem(SESSION_ITEM, id);
  state.transcript = loadTranscript(id);
  renderPanel();
  markCurrent();
  await refreshInfo();
  renderTranscript();
}

async function newSession() {
  const id = await ask({ title: "New session", text: "A session is created by its first message. Its id "
    + "(or the id of an existing session, to open it):", value: randomId(), ok: "Open", check: checkId });
  if (!id) return;
  await selectSession(id);
  await loadSessions();
  $("input").focus();
}

async function forkSession() {
  const from = state.id;
  const id = await ask({ title: "Fork session", text: `Copy \u201c${from}\u201d, its memories and message history, `
    + "into a new session:", value: `${from}-fork`, ok: "Fork", check: checkId });
  if (!id) return;
  try {
    await call("POST", `${sessionPath(from)}/fork`, { json: { new_id: id } });
  } catch (err) {
    return showError(err);
  }
  saveTranscript(id, [...state.transcript, { role: "note", text: `forked from \u201c${from}\u201d` }]);
  setStatus(`forked ${from} \u2192 ${id}`, "ok");
  await selectSession(id);
  await loadSessions();
}

async function deleteSession() {
  const id = state.id;
  const ok = await ask({ title: "Delete session", text: `Delete \u201c${id}\u201d and everything it learned? `
    + "This cannot be undone.", ok: "Delete", danger: true });
  if (!ok) return;
  try {
    await call("DELETE", sessionPath(id));
  } catch (err) {
    return showError(err);
  }
  localStorage.removeItem(transcriptItem(id));
  setStatus(`deleted ${id}`, "ok");
  const others = [...$("session-list").querySelectorAll("button.session")].map((b) => b.dataset.id);
  await selectSession(others.find((x) => x !== id) || randomId());
  await loadSessions();
}

async function exportSession() {
  const id = state.id;
  try {
    const response = await call("GET", `${sessionPath(id)}/state`, { raw: true });
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: `${id}.safetensors` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    setStatus(`exported ${id} (version ${response.headers.get("X-Session-Version")})`, "ok");
  } catch (err) {
    showError(err);
  }
}

async function importSession(file) {
  const stem = file.name.replace(/\.safetensors$/, "").replace(/[^A-Za-z0-9._@+-]/g, "-").replace(/^\./, "_");
  const id = await ask({ title: "Import state", text: `Load \u201c${file.name}\u201d into the session below. A session `
    + "with that id is replaced, and its message history starts over.", value: stem.slice(0, 128) || randomId(),
  ok: "Import", danger: true, check: checkId });
  if (!id) return;
  try {
    await call("PUT", `${sessionPath(id)}/state`, { body: file });
  } catch (err) {
    return showError(err);
  }
  saveTranscript(id, [{ role: "note", text: `state imported from \u201c${file.name}\u201d` }]);
  setStatus(`imported ${file.name} into ${id}`, "ok");
  await selectSession(id);
  await loadSessions();
}

// ---- start -----------------------------------------------------------------------------------

function showKeyForm(message) {
  // opened with the key in use; once open, its field is the user's: a later refusal (a refresh
  // of the panel, the list) must not wipe what they are typing
  if ($("key-form").hidden) {
    $("key-form").hidden = false;
    $("api-key").value = auth.key;
    $("api-key").focus();
  }
  if (message) $("api-key").title = message;
}

async function connect() {
  try {
    const models = await call("GET", "/v1/models");
    $("model").textContent = models.data[0]?.id || "";
    setStatus("ready", "ok");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      showKeyForm();
      setStatus(auth.key ? "that API key was refused" : "this server needs an API key", "error");
    } else {
      setStatus(`cannot reach the server: ${err.message}`, "error");
    }
    return false;
  }
  if (auth.key && $("key-form").hidden) { // the key in use, so that "Use key" keeps it
    $("key-form").hidden = false;
    $("api-key").value = auth.key;
  }
  return true;
}

function restoreSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_ITEM)) || {};
    for (const [k, v] of Object.entries(saved)) {
      if (!$(k)) continue;
      if (k === "learn") $(k).checked = Boolean(v);
      else $(k).value = v;
    }
  } catch {
    // no saved settings
  }
}

function saveSettings() {
  const values = {};
  for (const id of ["temperature", "top_p", "top_k", "max_tokens", "seed"]) values[id] = $(id).value;
  values.learn = $("learn").checked;
  localStorage.setItem(SETTINGS_ITEM, JSON.stringify(values));
}

function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("example").addEventListener("click", () => {
    $("input").value = EXAMPLE;
    send();
  });
  $("new-session").addEventListener("click", newSession);
  $("refresh-sessions").addEventListener("click", async () => {
    await loadSessions();
    await refreshInfo();
  });
  $("more-sessions").addEventListener("click", () => loadSessions(true));
  $("fork").addEventListener("click", forkSession);
  $("delete").addEventListener("click", deleteSession);
  $("export").addEventListener("click", exportSession);
  $("import").addEventListener("click", () => $("import-file").click());
  $("import-file").addEventListener("change", async (e) => {
    const [file] = e.target.files;
    e.target.value = "";
    if (file) await importSession(file);
  });
  document.querySelector(".settings").addEventListener("change", saveSettings);
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (state.controller) { // starting over mid-reply would lose the turn from the transcript
      setStatus("stop the reply or let it finish, then change the key", "error");
      return;
    }
    auth.set($("api-key").value);
    await start();
  });

  const tip = $("tip");
  $("transcript").addEventListener("mouseover", (e) => {
    const span = e.target.closest(".tok");
    if (!span) return;
    tip.textContent = describe({ t: span.textContent, l: Number(span.dataset.loss), k: Number(span.dataset.tokens) });
    tip.hidden = false;
    const r = span.getBoundingClientRect();
    tip.style.left = `${Math.min(r.left, window.innerWidth - tip.offsetWidth - 8)}px`;
    tip.style.top = `${r.top - tip.offsetHeight - 6 < 0 ? r.bottom + 6 : r.top - tip.offsetHeight - 6}px`;
  });
  $("transcript").addEventListener("mouseout", (e) => {
    if (e.target.closest(".tok")) tip.hidden = true;
  });
  window.addEventListener("resize", drawPlot);
  setInterval(() => {
    // (no session before the server accepted us: nothing to refresh)
    if (state.id && !state.controller && document.visibilityState === "visible") refreshInfo();
  }, 15000);
}

async function start() {
  if (!(await connect())) return;
  state.id ??= localStorage.getItem(SESSION_ITEM) || randomId();
  await selectSession(state.id);
  await loadSessions();
}

restoreSettings();
wire();
start();
