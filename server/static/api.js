// The /v1 API as the page uses it: JSON calls and the chat stream, with the API key if one is set.
import { sseData } from "./sse.js";

const KEY_ITEM = "hope.playground.apiKey";

export const auth = {
  key: localStorage.getItem(KEY_ITEM) || "",
  set(key) {
    this.key = key.trim();
    if (this.key) localStorage.setItem(KEY_ITEM, this.key);
    else localStorage.removeItem(KEY_ITEM);
  },
};

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = error?.code || null;
  }
}

function headers(extra = {}) {
  return auth.key ? { ...extra, Authorization: `Bearer ${auth.key}` } : extra;
}

async function failure(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    // not JSON: the status says enough
  }
  return new ApiError(response.status, error);
}

// fetch() a /v1 route; JSON bodies in and out, `raw` for the Response itself (a state download)
export async function call(method, path, { json, body, raw = false } = {}) {
  const init = { method, headers: headers(json === undefined ? {} : { "content-type": "application/json" }) };
  if (json !== undefined) init.body = JSON.stringify(json);
  else if (body !== undefined) init.body = body;
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return raw ? response : response.json();
}

// POST /v1/chat/completions with stream: true; yields each chunk (an error event is thrown)
export async function* chatStream(request, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers({ "content-type": "application/json" }),
    body: JSON.stringify({ ...request, stream: true }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  for await (const event of sseData(response.body)) {
    if (event.error) throw new ApiError(500, event.error);
    yield event;
  }
}

export const sessionPath = (id) => `/v1/sessions/${encodeURIComponent(id)}`;
