// StreamSpace web UI: shell, hash router and the live event stream.
import { auth, get, live, logout, restoreSession, setAuthLostHandler } from "./api.js";
import { clear, clearErrors, h, setBannerRoot, setToastRoot, showError } from "./ui.js";
import { loginView } from "./views/login.js";
import { catalogView } from "./views/catalog.js";
import { sessionsView } from "./views/sessions.js";
import { viewerView } from "./viewer.js";
import { agentsView, auditView, templatesAdminView, usersView } from "./views/admin.js";
import { securityView } from "./views/security.js";
import { apiKeysView } from "./views/apikeys.js";

const ROUTES = [
  { pattern: /^\/login$/, view: loginView, title: "Log in", public: true, bare: true },
  { pattern: /^\/catalog$/, view: catalogView, title: "Catalog", nav: "catalog" },
  { pattern: /^\/sessions$/, view: sessionsView, title: "My sessions", nav: "sessions" },
  { pattern: /^\/view\/([A-Za-z0-9_-]{1,64})$/, view: viewerView, title: "Viewer", bare: true },
  { pattern: /^\/account\/api-keys$/, view: apiKeysView, title: "API keys", nav: "api-keys" },
  { pattern: /^\/account\/security$/, view: securityView, title: "Security", nav: "security" },
  { pattern: /^\/admin\/agents$/, view: agentsView, title: "Agents", nav: "agents", roles: ["admin", "operator"] },
  { pattern: /^\/admin\/users$/, view: usersView, title: "Users", nav: "users", roles: ["admin"] },
  { pattern: /^\/admin\/templates$/, view: templatesAdminView, title: "Templates", nav: "templates", roles: ["admin"] },
  { pattern: /^\/admin\/audit$/, view: auditView, title: "Audit log", nav: "audit", roles: ["admin"] },
];

const NAV = [
  { id: "catalog", href: "#/catalog", label: "Catalog" },
  { id: "sessions", href: "#/sessions", label: "Sessions" },
  { id: "agents", href: "#/admin/agents", label: "Agents", roles: ["admin", "operator"] },
  { id: "users", href: "#/admin/users", label: "Users", roles: ["admin"] },
  { id: "templates", href: "#/admin/templates", label: "Templates", roles: ["admin"] },
  { id: "audit", href: "#/admin/audit", label: "Audit log", roles: ["admin"] },
];

// ---- shared app context (given to every view) -------------------------------------------------

let templatesCache = null;
const ctx = {
  get user() {
    return auth.user;
  },
  get isAdmin() {
    return auth.user?.role === "admin";
  },
  get isOperator() {
    return ["admin", "operator"].includes(auth.user?.role);
  },
  /** Templates by name (cached; `fresh` re-fetches). */
  async templates(fresh = false) {
    if (!templatesCache || fresh) {
      const list = await get("/api/v1/templates");
      templatesCache = new Map(list.map((t) => [t.name, t]));
    }
    return templatesCache;
  },
  invalidateTemplates() {
    templatesCache = null;
  },
  navigate(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  },
  live,
};

// ---- shell ----------------------------------------------------------------------------------

const root = document.getElementById("app");
let shell = null;
let cleanup = null;
let renderSeq = 0;

function buildShell() {
  const user = auth.user;
  const banner = h("div", { class: "banners", id: "banners" });
  const toasts = h("div", { class: "toasts", role: "status", "aria-live": "polite" });
  const liveDot = h(
    "span",
    { class: "live-status", dataset: { testid: "live-status" }, role: "status", "aria-live": "polite" },
    "",
  );
  const links = NAV.filter((n) => !n.roles || n.roles.includes(user?.role)).map((n) =>
    h("a", { href: n.href, class: "nav-link", dataset: { nav: n.id, testid: `nav-${n.id}` } }, n.label),
  );
  const adminStart = links.findIndex((a) => a.dataset.nav === "agents");
  if (adminStart > 0) links.splice(adminStart, 0, h("span", { class: "nav-sep", "aria-hidden": "true" }));
  const header = h(
    "header",
    { class: "topbar" },
    h("a", { class: "skip-link", href: "#main", onclick: skipToMain }, "Skip to content"),
    h(
      "a",
      { class: "brand", href: "#/catalog", "aria-label": "StreamSpace home" },
      h("img", { src: "/static/icons/logo.svg", alt: "", width: 28, height: 28 }),
      h("span", {}, "StreamSpace"),
    ),
    h("nav", { class: "nav", "aria-label": "Main" }, links),
    h(
      "div",
      { class: "userbox" },
      liveDot,
      h("a", { href: "#/account/security", class: "nav-link", dataset: { nav: "security", testid: "nav-security" } }, "Security"),
      h("a", { href: "#/account/api-keys", class: "nav-link", dataset: { nav: "api-keys", testid: "nav-api-keys" } }, "API keys"),
      h(
        "span",
        { class: "user-name", dataset: { testid: "current-user" } },
        user?.display_name || user?.username || "",
        user && user.role !== "user" ? h("span", { class: "role-pill" }, user.role) : null,
      ),
      h(
        "button",
        {
          type: "button",
          class: "btn btn-ghost btn-small",
          dataset: { testid: "logout" },
          onclick: async () => {
            const viaProvider = (auth.user?.auth_source || "").startsWith("oidc:");
            live.stop();
            await logout();
            // An identity provider's sign-in ends there too (RP-initiated logout).
            if (viaProvider) location.assign("/api/v1/auth/oidc/logout");
            else location.hash = "#/login";
          },
        },
        "Log out",
      ),
    ),
  );
  const main = h("main", { id: "main", class: "content", tabindex: "-1" });
  setBannerRoot(banner);
  setToastRoot(toasts);
  const stopStatus = live.onStatus((s) => {
    liveDot.dataset.status = s;
    liveDot.textContent = s === "live" ? "Live" : s === "connecting" ? "Connecting…" : "Offline";
    liveDot.title =
      s === "live"
        ? "Receiving live session updates"
        : "Live updates are disconnected; reconnecting automatically";
  });
  return { header, main, banner, toasts, stopStatus, user: user?.id + ":" + user?.role };
}

function skipToMain(e) {
  e.preventDefault();
  document.getElementById("main")?.focus();
}

function ensureShell(bare) {
  const key = auth.user ? auth.user.id + ":" + auth.user.role : "";
  if (bare) {
    if (shell) {
      shell.stopStatus();
      shell = null;
    }
    clear(root);
    root.className = "bare";
    const banner = h("div", { class: "banners banners-floating" });
    const toasts = h("div", { class: "toasts", role: "status", "aria-live": "polite" });
    const main = h("main", { id: "main", class: "bare-main", tabindex: "-1" });
    setBannerRoot(banner);
    setToastRoot(toasts);
    root.append(banner, main, toasts);
    return main;
  }
  if (!shell || shell.user !== key || !shell.main.isConnected) {
    if (shell) shell.stopStatus();
    shell = buildShell();
    clear(root);
    root.className = "";
    root.append(shell.header, shell.banner, shell.main, shell.toasts);
  }
  clear(shell.main);
  return shell.main;
}

function setActiveNav(id) {
  for (const a of document.querySelectorAll(".nav-link")) {
    if (a.dataset.nav === id) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

// ---- router ---------------------------------------------------------------------------------

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query = ""] = raw.split("?");
  return { path, params: new URLSearchParams(query) };
}

async function route() {
  const seq = ++renderSeq;
  const { path, params } = parseHash();
  if (cleanup) {
    try {
      cleanup();
    } catch (err) {
      console.warn("cleanup failed", err);
    }
    cleanup = null;
  }
  const match = ROUTES.map((r) => ({ r, m: path.match(r.pattern) })).find((x) => x.m);
  if (!match) {
    location.replace(auth.loggedIn ? "#/catalog" : "#/login");
    return;
  }
  const { r, m } = match;
  if (!r.public && !auth.loggedIn) {
    const next = encodeURIComponent(location.hash);
    location.replace(`#/login?next=${next}`);
    return;
  }
  if (r.public && auth.loggedIn && path === "/login") {
    const next = params.get("next") || "";
    location.replace(next.startsWith("#/") && !next.startsWith("#/login") ? next : "#/catalog");
    return;
  }
  if (auth.loggedIn) live.start(ctx.isOperator);
  else live.stop();
  clearErrors();
  const main = ensureShell(Boolean(r.bare));
  setActiveNav(r.nav);
  document.title = `${r.title} · StreamSpace`;
  if (r.roles && !r.roles.includes(auth.user?.role)) {
    main.append(
      h("h1", {}, r.title),
      h("p", { class: "empty", dataset: { testid: "forbidden" } }, "This page needs the ", r.roles.join(" or "), " role."),
    );
    return;
  }
  try {
    const result = await r.view(main, { params, match: m, ctx, setTitle });
    if (seq !== renderSeq) {
      if (typeof result === "function") result();
      return;
    }
    cleanup = typeof result === "function" ? result : null;
  } catch (err) {
    if (seq === renderSeq) showError(err);
  }
  if (seq === renderSeq && !r.bare && document.activeElement === document.body) {
    main.focus({ preventScroll: true });
  }
}

function setTitle(t) {
  document.title = `${t} · StreamSpace`;
}

setAuthLostHandler(() => {
  live.stop();
  if (!location.hash.startsWith("#/login")) {
    location.replace(`#/login?next=${encodeURIComponent(location.hash)}&expired=1`);
  }
});

let wasLoggedIn = false;
auth.onChange(() => {
  // Logged out in another tab, or logged in there while this tab shows the login page.
  if (!auth.loggedIn && !location.hash.startsWith("#/login")) {
    live.stop();
    location.replace("#/login");
  } else if (auth.loggedIn && !wasLoggedIn && location.hash.startsWith("#/login")) {
    route();
  }
  wasLoggedIn = auth.loggedIn;
});

window.addEventListener("hashchange", route);
window.addEventListener("unhandledrejection", (e) => {
  if (e.reason?.name === "AbortError") return;
  showError(e.reason);
});

// Nothing is kept in the page's storage: a reload resumes the session through the HttpOnly
// refresh cookie (which also brings the current user and role) before the first render.
await restoreSession();
route();
