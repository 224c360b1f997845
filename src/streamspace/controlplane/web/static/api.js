// API client: the access token in memory only, the refresh token in an HttpOnly cookie the
// page never sees (a reload restores the session through it), one shared refresh on 401,
// problem+json errors, and the live event stream (SSE over fetch: EventSource cannot send
// headers).

const CSRF_HEADER = "X-StreamSpace-CSRF";
// Not a credential: only whether this browser holds a refresh cookie worth trying on load
// (the cookie itself is HttpOnly), so a first visit does not start with a failed refresh.
const HAS_SESSION_KEY = "streamspace.hasSession";
const listeners = new Set();
const channel = "BroadcastChannel" in window ? new BroadcastChannel("streamspace-auth") : null;

export class ApiError extends Error {
  constructor(status, problem) {
    const detail = (problem && (problem.detail || problem.title)) || `request failed (HTTP ${status})`;
    super(detail);
    this.status = status;
    this.problem = problem || {};
  }
}

// ---- the session (memory only) --------------------------------------------------------------

let session = null; // {access_token, user}

export const auth = {
  get user() {
    return session?.user || null;
  },
  get loggedIn() {
    return Boolean(session?.access_token);
  },
  save(tokens) {
    session = { access_token: tokens.access_token, user: tokens.user };
    localStorage.setItem(HAS_SESSION_KEY, "1");
    notify();
  },
  setUser(user) {
    if (!session) return;
    session.user = user;
    notify();
  },
  clear() {
    session = null;
    localStorage.removeItem(HAS_SESSION_KEY);
    notify();
  },
  onChange(fn) {
    listeners.add(fn);
    return () => listeners.delete(fn);
  },
};

function notify() {
  for (const fn of listeners) fn(auth.user);
}

// Other tabs: a logout there ends this tab's session too; a login there can be picked up here
// through the shared cookie.
if (channel) {
  channel.onmessage = (e) => {
    if (e.data === "logout" && session) auth.clear();
    else if (e.data === "login" && !session) refreshTokens(null);
  };
}

// ---- refresh (rotating tokens: exactly one refresh at a time, across tabs too) ---------------

let refreshing = null;

async function doRefresh(failedAccess) {
  // Another request refreshed while ours was in flight: just use the new token.
  if (failedAccess && session?.access_token && session.access_token !== failedAccess) return true;
  const resp = await fetch("/api/v1/auth/refresh", {
    method: "POST",
    headers: { Accept: "application/json", [CSRF_HEADER]: "1" },
    credentials: "same-origin",
    signal: AbortSignal.timeout ? AbortSignal.timeout(15000) : undefined,
  });
  if (!resp.ok) {
    if (resp.status === 401) localStorage.removeItem(HAS_SESSION_KEY);
    return false;
  }
  auth.save(await resp.json());
  return true;
}

/** Get a fresh access token through the refresh cookie; false if there is no live session. */
export function refreshTokens(failedAccess) {
  if (!refreshing) {
    const run = () => doRefresh(failedAccess).catch(() => false);
    // One tab at a time: each refresh rotates the cookie, and a replayed one revokes them all.
    const p = navigator.locks ? navigator.locks.request("streamspace-refresh", run) : run();
    refreshing = p.finally(() => {
      refreshing = null;
    });
  }
  return refreshing;
}

/** On page load: resume the session the refresh cookie holds, if any. */
export async function restoreSession() {
  if (!localStorage.getItem(HAS_SESSION_KEY)) return false;
  return refreshTokens(null);
}

/** After a single sign-on: the server set the refresh cookie on the redirect back here. */
export async function adoptSignOn() {
  localStorage.setItem(HAS_SESSION_KEY, "1");
  const ok = await refreshTokens(null);
  if (ok) channel?.postMessage("login");
  return ok;
}

/** The identity providers the login page offers ("Sign in with …"). */
export async function signOnProviders() {
  const saml = api("GET", "/api/v1/auth/saml", undefined, { retry: false }).catch(() => []);
  const oidc = api("GET", "/api/v1/auth/oidc/providers", undefined, { retry: false })
    .then(({ providers }) =>
      providers.map((p) => ({ ...p, login_url: `/api/v1/auth/oidc/${encodeURIComponent(p.id)}/login` })),
    )
    .catch(() => []);
  return [...(await oidc), ...(await saml)];
}

let onAuthLost = () => {};
export function setAuthLostHandler(fn) {
  onAuthLost = fn;
}

function authLost() {
  auth.clear();
  onAuthLost();
}

/** The user is being sent to the login page: callers need not show this error. */
function lostError(problem) {
  const err = new ApiError(401, problem);
  err.silent = true;
  return err;
}

// ---- requests -------------------------------------------------------------------------------

async function parseError(resp) {
  let problem = null;
  try {
    problem = await resp.json();
  } catch {
    problem = null;
  }
  if (problem && typeof problem.detail !== "string") {
    // FastAPI's plain errors carry a list or object in `detail`; keep the message readable.
    problem.detail = problem.title || `request failed (HTTP ${resp.status})`;
  }
  return new ApiError(resp.status, problem);
}

/**
 * Call the API. `body` is sent as JSON. Returns the parsed JSON (or null for 204).
 * On 401 one token refresh is tried; if that fails the user is sent to the login page.
 */
export async function api(method, path, body, { headers = {}, signal, retry = true, as = "json" } = {}) {
  const access = session?.access_token;
  const init = {
    method,
    headers: { Accept: "application/json", ...headers },
    signal,
  };
  if (access) init.headers.Authorization = `Bearer ${access}`;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { detail: "cannot reach the StreamSpace server; check your connection" });
  }
  const authPath =
    path.startsWith("/api/v1/auth/login") ||
    path.startsWith("/api/v1/auth/refresh") ||
    path.startsWith("/api/v1/auth/passkey/") ||
    (!access && path.startsWith("/api/v1/auth/mfa"));
  if (resp.status === 401 && !authPath) {
    if (retry && access && (await refreshTokens(access))) {
      return api(method, path, body, { headers, signal, retry: false, as });
    }
    const problem = (await parseError(resp)).problem;
    authLost();
    throw lostError(problem);
  }
  if (!resp.ok) throw await parseError(resp);
  if (resp.status === 204) return null;
  if (as === "blob") return resp.blob();
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

/** The Authorization header, for requests `api` cannot make (uploads that report progress). */
export function authHeaders() {
  return session?.access_token ? { Authorization: `Bearer ${session.access_token}` } : {};
}

export const get = (path, opts) => api("GET", path, undefined, opts);
/** GET an image or file with the bearer token (an <img src> could not send it) as a Blob. */
export const getBlob = (path, opts) => api("GET", path, undefined, { ...opts, as: "blob", headers: { Accept: "*/*" } });
export const post = (path, body, opts) => api("POST", path, body === undefined ? {} : body, opts);
export const patch = (path, body, opts) => api("PATCH", path, body, opts);
export const put = (path, body, opts) => api("PUT", path, body, opts);
export const del = (path, opts) => api("DELETE", path, undefined, opts);

export function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v === undefined || v === null || v === "" || v === false) continue;
    u.set(k, String(v));
  }
  const s = u.toString();
  return s ? `?${s}` : "";
}

/** Throws an ApiError whose `problem.mfa_token` starts a second step when one is needed
 * (`problem.type` ends in /mfa-required or /mfa-enrolment-required). */
export async function login(username, password) {
  const tokens = await api("POST", "/api/v1/auth/login", { username, password }, { retry: false });
  return finishLogin(tokens);
}

export function finishLogin(tokens) {
  auth.save(tokens);
  channel?.postMessage("login");
  return tokens.user;
}

export async function verifyMfa(mfaToken, code) {
  const tokens = await api("POST", "/api/v1/auth/mfa/verify", { mfa_token: mfaToken, code }, { retry: false });
  return finishLogin(tokens);
}

/** Ask the browser's authenticator to answer `options` (the API's publicKey JSON). */
export async function passkeyAnswer(options, create = false) {
  if (!window.PublicKeyCredential?.parseRequestOptionsFromJSON) {
    throw new ApiError(0, { detail: "this browser cannot use passkeys" });
  }
  const cred = create
    ? await navigator.credentials.create({ publicKey: PublicKeyCredential.parseCreationOptionsFromJSON(options) })
    : await navigator.credentials.get({ publicKey: PublicKeyCredential.parseRequestOptionsFromJSON(options) });
  return cred.toJSON();
}

export async function verifyMfaPasskey(mfaToken) {
  const o = await api("POST", "/api/v1/auth/mfa/webauthn/options", { mfa_token: mfaToken }, { retry: false });
  const credential = await passkeyAnswer(o.options);
  const tokens = await api(
    "POST",
    "/api/v1/auth/mfa/verify",
    { mfa_token: mfaToken, webauthn: { challenge_id: o.challenge_id, credential } },
    { retry: false },
  );
  return finishLogin(tokens);
}

export async function passkeyLogin() {
  const o = await api("POST", "/api/v1/auth/passkey/options", {}, { retry: false });
  const credential = await passkeyAnswer(o.options);
  const tokens = await api("POST", "/api/v1/auth/passkey/login", { challenge_id: o.challenge_id, credential }, { retry: false });
  return finishLogin(tokens);
}

export function problemKind(err) {
  return String(err?.problem?.type || "").split("/").pop();
}

export async function logout() {
  try {
    if (session?.access_token) await api("POST", "/api/v1/auth/logout", {}, { retry: false });
  } catch {
    // The session is dropped locally whatever the server said.
  }
  auth.clear();
  channel?.postMessage("logout");
}

export function newIdempotencyKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

// ---- live events ----------------------------------------------------------------------------

/**
 * One Server-Sent Events connection to /api/v1/events, reconnected with backoff.
 * Handlers: subscribe(fn) gets {event, data}; onStatus(fn) gets "connecting"|"live"|"offline".
 */
class LiveEvents {
  constructor() {
    this.handlers = new Set();
    this.statusHandlers = new Set();
    this.status = "offline";
    this.controller = null;
    this.timer = null;
    this.attempt = 0;
    this.all = false;
    this.running = false;
  }

  subscribe(fn) {
    this.handlers.add(fn);
    return () => this.handlers.delete(fn);
  }

  onStatus(fn) {
    this.statusHandlers.add(fn);
    fn(this.status);
    return () => this.statusHandlers.delete(fn);
  }

  setStatus(s) {
    if (s === this.status) return;
    this.status = s;
    for (const fn of this.statusHandlers) fn(s);
  }

  start(all) {
    if (this.running && this.all === all) return;
    this.stop();
    this.all = all;
    this.running = true;
    this.attempt = 0;
    this.connect();
  }

  stop() {
    this.running = false;
    clearTimeout(this.timer);
    this.timer = null;
    if (this.controller) this.controller.abort();
    this.controller = null;
    this.setStatus("offline");
  }

  emit(event, data) {
    for (const fn of [...this.handlers]) {
      try {
        fn({ event, data });
      } catch (err) {
        console.warn("event handler failed", err);
      }
    }
  }

  scheduleReconnect() {
    if (!this.running) return;
    this.setStatus("offline");
    const delay = Math.min(30000, 1000 * 2 ** this.attempt) * (0.75 + Math.random() * 0.5);
    this.attempt = Math.min(this.attempt + 1, 5);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  async connect() {
    if (!this.running) return;
    this.setStatus("connecting");
    const controller = new AbortController();
    this.controller = controller;
    const access = session?.access_token;
    if (!access) {
      this.stop();
      return;
    }
    let resp;
    try {
      resp = await fetch(`/api/v1/events${this.all ? "?all=true" : ""}`, {
        headers: { Authorization: `Bearer ${access}`, Accept: "text/event-stream" },
        signal: controller.signal,
        cache: "no-store",
      });
    } catch {
      if (controller.signal.aborted) return;
      this.scheduleReconnect();
      return;
    }
    if (resp.status === 401) {
      if (await refreshTokens(access)) {
        this.connect();
      } else {
        this.stop();
        authLost();
      }
      return;
    }
    if (!resp.ok || !resp.body) {
      this.scheduleReconnect();
      return;
    }
    try {
      await this.read(resp.body.getReader(), controller);
    } catch {
      // dropped: fall through to reconnect
    }
    if (controller.signal.aborted || !this.running) return;
    this.scheduleReconnect();
  }

  async read(reader, controller) {
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done || controller.signal.aborted) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        this.dispatch(frame);
      }
    }
  }

  dispatch(frame) {
    let event = "message";
    const data = [];
    for (const line of frame.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const i = line.indexOf(":");
      const field = i < 0 ? line : line.slice(0, i);
      const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length && event === "message") return;
    let parsed = null;
    try {
      parsed = data.length ? JSON.parse(data.join("\n")) : null;
    } catch {
      parsed = null;
    }
    if (event === "hello") {
      this.attempt = 0;
      this.setStatus("live");
    }
    this.emit(event, parsed);
  }
}

export const live = new LiveEvents();
