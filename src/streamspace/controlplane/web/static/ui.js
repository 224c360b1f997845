// Small DOM helpers shared by the views: element builder, banners, toasts, formatting.

/**
 * h("button", {class: "btn", onclick: fn, dataset: {testid: "x"}}, "Label", child, ...)
 * Attributes starting with "on" become listeners; `dataset` and `style` objects are merged;
 * booleans toggle attributes; null/undefined/false children are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") {
      el.addEventListener(k.slice(2).toLowerCase(), v);
    } else if (k === "dataset") {
      Object.assign(el.dataset, v);
    } else if (k === "style" && typeof v === "object") {
      Object.assign(el.style, v);
    } else if (k === "class") {
      el.className = Array.isArray(v) ? v.filter(Boolean).join(" ") : v;
    } else if (k === "value" || k === "checked" || k === "selected") {
      el[k] = v;
    } else if (v === true) {
      el.setAttribute(k, "");
    } else {
      el.setAttribute(k, String(v));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

// ---- banners (errors) and toasts ------------------------------------------------------------

let bannerRoot = null;
let toastRoot = null;

export function setBannerRoot(el) {
  bannerRoot = el;
}

export function setToastRoot(el) {
  toastRoot = el;
}

/** Show an error (an ApiError, Error or string) in a dismissible banner. */
export function showError(err, { title } = {}) {
  if (err && (err.name === "AbortError" || err.silent)) return;
  const message = typeof err === "string" ? err : err?.message || "something went wrong";
  console.info("[streamspace] error:", message);
  if (!bannerRoot) return;
  // The same message twice: keep one banner.
  for (const b of bannerRoot.querySelectorAll(".banner")) {
    if (b.dataset.message === message) b.remove();
  }
  const banner = h(
    "div",
    { class: "banner banner-error", role: "alert", dataset: { testid: "error-banner", message } },
    h("span", { class: "banner-icon", "aria-hidden": "true" }, "!"),
    h(
      "div",
      { class: "banner-text" },
      title ? h("strong", {}, title, " ") : null,
      h("span", { dataset: { testid: "error-detail" } }, message),
    ),
    h(
      "button",
      {
        type: "button",
        class: "btn btn-ghost btn-small",
        "aria-label": "Dismiss this message",
        dataset: { testid: "dismiss-error" },
        onclick: () => banner.remove(),
      },
      "Dismiss",
    ),
  );
  bannerRoot.append(banner);
  while (bannerRoot.children.length > 4) bannerRoot.firstElementChild.remove();
}

export function clearErrors() {
  if (bannerRoot) clear(bannerRoot);
}

/** A short-lived, polite status message. */
export function toast(message) {
  if (!toastRoot) return;
  const t = h("div", { class: "toast", dataset: { testid: "toast" } }, message);
  toastRoot.append(t);
  while (toastRoot.children.length > 3) toastRoot.firstElementChild.remove();
  setTimeout(() => t.classList.add("toast-out"), 3500);
  setTimeout(() => t.remove(), 4000);
}

// ---- formatting -----------------------------------------------------------------------------

const rtf = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

export function relTime(iso) {
  if (!iso) return "never";
  const t = new Date(iso).getTime();
  const diff = (t - Date.now()) / 1000;
  const abs = Math.abs(diff);
  if (abs < 45) return "just now";
  if (abs < 3600) return rtf.format(Math.round(diff / 60), "minute");
  if (abs < 86400) return rtf.format(Math.round(diff / 3600), "hour");
  return rtf.format(Math.round(diff / 86400), "day");
}

const dtf = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

export function fullTime(iso) {
  return iso ? dtf.format(new Date(iso)) : "";
}

export function timeEl(iso) {
  return h("time", { datetime: iso || "", title: fullTime(iso) }, relTime(iso));
}

export function cpu(millis) {
  const n = millis / 1000;
  return `${Number.isInteger(n) ? n : n.toFixed(1)} CPU`;
}

export function mem(mb) {
  if (mb >= 1024) {
    const g = mb / 1024;
    return `${Number.isInteger(g) ? g : g.toFixed(1)} GiB`;
  }
  return `${mb} MiB`;
}

export function shortId(id) {
  return (id || "").slice(0, 8);
}

// ---- shared widgets -------------------------------------------------------------------------

export const STATE_LABELS = {
  pending: "Pending",
  scheduled: "Scheduled",
  starting: "Starting",
  running: "Running",
  hibernating: "Hibernating",
  hibernated: "Hibernated",
  waking: "Waking",
  stopping: "Stopping",
  stopped: "Stopped",
  failed: "Failed",
};

export const ALL_STATES = Object.keys(STATE_LABELS);
const BUSY = new Set(["pending", "scheduled", "starting", "hibernating", "waking", "stopping"]);

export function stateBadge(state, testid = "state") {
  return h(
    "span",
    {
      class: ["badge", `state-${state}`, BUSY.has(state) && "badge-busy"],
      dataset: { testid, state },
    },
    BUSY.has(state) ? h("span", { class: "spinner", "aria-hidden": "true" }) : null,
    STATE_LABELS[state] || state,
  );
}

export function iconUrl(template) {
  const icon = template?.icon || (template?.name ? `${template.name}.svg` : "");
  return icon && /^[a-z0-9][a-z0-9._-]*\.svg$/i.test(icon)
    ? `/static/icons/${icon}`
    : "/static/icons/default.svg";
}

export function appIcon(template, size = 40) {
  const img = h("img", {
    class: "app-icon",
    src: iconUrl(template),
    alt: "",
    width: size,
    height: size,
  });
  img.addEventListener("error", () => {
    if (!img.src.endsWith("/default.svg")) img.src = "/static/icons/default.svg";
  });
  return img;
}

export function emptyState(title, body, action) {
  return h(
    "div",
    { class: "empty", dataset: { testid: "empty" } },
    h("p", { class: "empty-title" }, title),
    body ? h("p", { class: "muted" }, body) : null,
    action || null,
  );
}

export function loading(label = "Loading…") {
  return h("p", { class: "loading muted", role: "status" }, h("span", { class: "spinner" }), label);
}

/** Prev/next pager for the API's Page shape. */
export function pager(page, onGo, noun = "items") {
  if (!page || page.total === 0) return null;
  const first = page.offset + 1;
  const last = page.offset + page.items.length;
  if (page.offset === 0 && (page.next_offset === null || page.next_offset === undefined)) {
    const one = { sessions: "session", users: "user", entries: "entry", items: "item" }[noun] || noun;
    return h("p", { class: "pager muted small", "aria-live": "polite" }, `${page.total} ${page.total === 1 ? one : noun}`);
  }
  return h(
    "nav",
    { class: "pager", "aria-label": "Pages" },
    h(
      "button",
      {
        type: "button",
        class: "btn btn-small",
        disabled: page.offset === 0,
        dataset: { testid: "page-prev" },
        onclick: () => onGo(Math.max(0, page.offset - page.limit)),
      },
      "← Previous",
    ),
    h("span", { class: "muted", "aria-live": "polite" }, `${first}–${last} of ${page.total} ${noun}`),
    h(
      "button",
      {
        type: "button",
        class: "btn btn-small",
        disabled: page.next_offset === null || page.next_offset === undefined,
        dataset: { testid: "page-next" },
        onclick: () => onGo(page.next_offset),
      },
      "Next →",
    ),
  );
}

/** Copy text; falls back to selecting it for old or insecure contexts. */
export async function copyText(text, fallbackEl) {
  try {
    await navigator.clipboard.writeText(text);
    toast("Copied to the clipboard");
    return true;
  } catch {
    if (fallbackEl) {
      const range = document.createRange();
      range.selectNodeContents(fallbackEl);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      toast("Selected — press Ctrl+C to copy");
    }
    return false;
  }
}

/** Run an async action with the button disabled; errors go to the banner. */
export async function busy(button, fn) {
  if (button) {
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
  }
  try {
    return await fn();
  } catch (err) {
    showError(err);
    return undefined;
  } finally {
    if (button && button.isConnected) {
      button.disabled = false;
      button.removeAttribute("aria-busy");
    }
  }
}

/** A QR code drawn from rows of "1"/"0" (the API's `qr`): no image URL or markup to allow. */
export function qrCanvas(rows, scale = 5) {
  const size = rows.length * scale;
  const c = h("canvas", { width: size, height: size, class: "qr", role: "img", "aria-label": "QR code for your authenticator app", dataset: { testid: "totp-qr" } });
  const g = c.getContext("2d");
  g.fillStyle = "#fff";
  g.fillRect(0, 0, size, size);
  g.fillStyle = "#000";
  rows.forEach((row, y) => {
    for (let x = 0; x < row.length; x++) if (row[x] === "1") g.fillRect(x * scale, y * scale, scale, scale);
  });
  return c;
}

/** Start TOTP enrolment and lead the user through scanning and confirming it. `onDone`
 * gets the confirm answer ({recovery_codes, login?}). */
export function totpEnrolment(start, confirm, onDone) {
  const box = h("div", { class: "totp-enrol", dataset: { testid: "totp-enrol" } }, loading("Preparing…"));
  (async () => {
    let s;
    try {
      s = await start();
    } catch (err) {
      box.replaceChildren(h("p", { class: "form-error", role: "alert" }, err.message));
      return;
    }
    const code = h("input", { id: "totp-code", inputmode: "numeric", autocomplete: "one-time-code", maxlength: 6, required: true, dataset: { testid: "totp-code" } });
    const err = h("p", { class: "form-error", role: "alert", hidden: true, dataset: { testid: "totp-error" } });
    const form = h(
      "form",
      {},
      h("p", {}, "Scan this with your authenticator app, then enter the code it shows."),
      qrCanvas(s.qr),
      h("p", { class: "small muted" }, "Cannot scan? Enter this key: ", h("code", { dataset: { testid: "totp-secret" } }, s.secret)),
      h("label", { for: "totp-code" }, "Code"),
      code,
      err,
      h("button", { type: "submit", class: "btn btn-primary", dataset: { testid: "totp-confirm" } }, "Turn on"),
    );
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      err.hidden = true;
      try {
        const done = await confirm(code.value.trim());
        box.replaceChildren(recoveryCodes(done.recovery_codes, () => onDone(done)));
      } catch (ex) {
        err.textContent = ex.message;
        err.hidden = false;
        code.select();
      }
    });
    box.replaceChildren(form);
    code.focus();
  })();
  return box;
}

export function recoveryCodes(codes, onContinue) {
  const list = h("pre", { class: "command", dataset: { testid: "recovery-codes" }, tabindex: "0" }, codes.join("\n"));
  return h(
    "div",
    {},
    h("h2", {}, "Recovery codes"),
    h("p", {}, "Each works once if you lose your device. They are shown only now: store them somewhere safe."),
    list,
    h("button", { type: "button", class: "btn btn-small", onclick: () => copyText(codes.join("\n"), list) }, "Copy codes"),
    " ",
    h("button", { type: "button", class: "btn btn-primary", dataset: { testid: "recovery-continue" }, onclick: onContinue }, "Continue"),
  );
}
