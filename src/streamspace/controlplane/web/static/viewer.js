// The session viewer: noVNC over the control plane's stream tunnel, one fresh ticket per connect.
import { ApiError, get, post } from "./api.js";
import { soundControl } from "./audio.js";
import { microphoneControl } from "./microphone.js";
import { appIcon, busy, copyText, h, shortId, showError, stateBadge, toast } from "./ui.js";
import { filesPanel } from "./files.js";

const SCALE_KEY = "streamspace.viewer.scale";
const RESIZE_KEY = "streamspace.viewer.resize";
const SHARP_KEY = "streamspace.viewer.sharp";
let RFBClass = null;

/**
 * noVNC's RFB, able to ask the server for a desktop in device pixels rather than CSS pixels
 * ("Sharp (HiDPI)"): on a screen with devicePixelRatio 2 a desktop the element's CSS size is
 * half the device resolution and the browser upscales it, blurred.
 *
 * noVNC has no public hook for the size it requests, so this overrides two private methods of
 * the vendored noVNC (pinned: Debian's novnc 1.3, see scripts/vendor-novnc.sh) and nothing else:
 * `_requestRemoteResize` marks the moment the size is asked for, and `_screenSize` multiplies by
 * the ratio only then. noVNC's autoscale and clipping keep reading the CSS size, so with
 * scaleViewport on the canvas is shown at 1/ratio, fills the element and lands 1:1 on device
 * pixels; pointer positions stay right because noVNC divides them by its display scale.
 * tests/e2e/test_viewer_resize.py fails if a noVNC upgrade renames these.
 */
function withSharp(RFB) {
  return class SharpRFB extends RFB {
    constructor(...args) {
      super(...args);
      this.sharp = false;
      this.sizingRemote = false;
    }

    _requestRemoteResize() {
      this.sizingRemote = true;
      try {
        super._requestRemoteResize();
      } finally {
        this.sizingRemote = false;
      }
    }

    _screenSize() {
      const size = super._screenSize();
      if (!this.sharp || !this.sizingRemote) return size;
      const ratio = window.devicePixelRatio || 1;
      return { w: Math.floor(size.w * ratio), h: Math.floor(size.h * ratio) };
    }
  };
}

async function loadRFB() {
  if (!RFBClass) {
    try {
      RFBClass = withSharp((await import("/vendor/novnc/core/rfb.js")).default);
    } catch (err) {
      throw new Error(
        "the noVNC client is not installed on this server (run `make vendor`); the viewer cannot start",
      );
    }
  }
  return RFBClass;
}

const WAITING = {
  pending: "Waiting for a place to run this session…",
  scheduled: "The session is being placed on an agent…",
  starting: "The session is starting…",
  waking: "The session is waking up…",
};

export async function viewerView(main, { match, ctx, setTitle }) {
  const id = match[1];
  let session = null;
  let template = null;
  let rfb = null;
  let connecting = false;
  let attempt = 0;
  let retryTimer = null;
  let countdownTimer = null;
  let disposed = false;
  let scale = localStorage.getItem(SCALE_KEY) !== "off";
  // Resize the remote desktop to the window (noVNC sends ExtendedDesktopSize requests, debounced,
  // on every window, fullscreen and panel change), unless the template pins its size.
  let resize = localStorage.getItem(RESIZE_KEY) === "on";
  // Sharp (HiDPI): while resizing, ask for the screen's size in device pixels and show it at
  // 1/devicePixelRatio (Fit to window is forced on meanwhile; the user's choice comes back after).
  let sharp = localStorage.getItem(SHARP_KEY) === "on";

  // ---- layout ------------------------------------------------------------------------------
  const screen = h("div", { class: "screen", dataset: { testid: "screen" }, "aria-label": "Remote screen" });
  const overlay = h("div", { class: "overlay", dataset: { testid: "viewer-overlay" }, hidden: true });
  const badgeSlot = h("span", { class: "badge-slot" });
  const connStatus = h("span", {
    class: "conn-status",
    role: "status",
    "aria-live": "polite",
    dataset: { testid: "connection-status", status: "connecting" },
  });
  const titleText = h("span", { class: "viewer-name", dataset: { testid: "session-name" } }, "Session ", shortId(id));
  const iconSlot = h("span", { class: "viewer-icon" });

  const reconnectBtn = h(
    "button",
    { type: "button", class: "btn btn-bar", dataset: { testid: "reconnect" }, onclick: () => reconnectNow() },
    "Reconnect",
  );
  const scaleBtn = h(
    "button",
    {
      type: "button",
      class: "btn btn-bar",
      "aria-pressed": String(scale),
      title: "Fit the remote screen into the window",
      dataset: { testid: "toggle-scale" },
      onclick: () => setScale(!scale),
    },
    "Fit to window",
  );
  const resizeBtn = h(
    "button",
    {
      type: "button",
      class: "btn btn-bar",
      "aria-pressed": String(resize),
      title: "Resize the remote desktop to this window (Ctrl+Alt+Shift+R)",
      dataset: { testid: "toggle-resize" },
      onclick: () => setResize(!resize),
    },
    "Resize desktop",
  );
  const sharpBtn = h(
    "button",
    {
      type: "button",
      class: "btn btn-bar",
      "aria-pressed": String(sharp),
      dataset: { testid: "toggle-sharp" },
      onclick: () => setSharp(!sharp),
    },
    "Sharp (HiDPI)",
  );
  const clipBtn = h(
    "button",
    {
      type: "button",
      class: "btn btn-bar",
      "aria-expanded": "false",
      "aria-controls": "clipboard-panel",
      dataset: { testid: "toggle-clipboard" },
      onclick: () => toggleClipboard(),
    },
    "Clipboard",
  );
  const fsBtn = h(
    "button",
    {
      type: "button",
      class: "btn btn-bar",
      "aria-pressed": "false",
      dataset: { testid: "fullscreen" },
      onclick: () => toggleFullscreen(),
      hidden: !document.fullscreenEnabled,
    },
    "Fullscreen",
  );

  const sound = soundControl({ sessionId: id, running: () => session?.state === "running" });
  const mic = microphoneControl({ sessionId: id, running: () => session?.state === "running" });

  const sendText = h("textarea", {
    id: "clip-send",
    rows: 4,
    placeholder: "Type or paste text here, then send it to the session's clipboard.",
    dataset: { testid: "clipboard-input" },
  });
  const received = h("textarea", {
    id: "clip-received",
    rows: 4,
    readonly: true,
    placeholder: "Text copied inside the session appears here.",
    dataset: { testid: "clipboard-received" },
  });
  const clipPanel = h(
    "aside",
    { class: "clipboard-panel", id: "clipboard-panel", "aria-label": "Clipboard", hidden: true, dataset: { testid: "clipboard-panel" } },
    h(
      "div",
      { class: "panel-head" },
      h("h2", {}, "Clipboard"),
      h("button", { type: "button", class: "btn btn-ghost btn-small", onclick: () => toggleClipboard(false), "aria-label": "Close the clipboard panel" }, "Close"),
    ),
    h("label", { for: "clip-send" }, "Send to the session"),
    sendText,
    h(
      "button",
      {
        type: "button",
        class: "btn btn-primary btn-small",
        dataset: { testid: "clipboard-send" },
        onclick: () => {
          if (!rfb) {
            showError("not connected; the text can be sent once the session is connected");
            return;
          }
          rfb.clipboardPasteFrom(sendText.value);
          toast("Sent to the session's clipboard — paste it there");
        },
      },
      "Send to session",
    ),
    h("label", { for: "clip-received" }, "Received from the session"),
    received,
    h(
      "button",
      { type: "button", class: "btn btn-small", onclick: () => copyText(received.value, received) },
      "Copy to my clipboard",
    ),
  );

  const files = filesPanel(id, screen);

  const backLinkBar = h("a", { class: "btn btn-bar", href: "#/sessions", dataset: { testid: "back" } }, "← Sessions");
  const bar = h(
    "header",
    { class: "viewer-bar" },
    h("p", { class: "sr-only" }, "The remote screen takes all keys while it has focus. Press Control+Alt+Shift+T to come back to this toolbar."),
    backLinkBar,
    h("div", { class: "viewer-title" }, iconSlot, h("h1", {}, titleText), badgeSlot),
    connStatus,
    h("div", { class: "viewer-tools", role: "toolbar", "aria-label": "Viewer", title: "Ctrl+Alt+Shift+T moves the keyboard focus from the remote screen back here" }, reconnectBtn, scaleBtn, resizeBtn, sharpBtn, clipBtn, files.button, fsBtn, ...sound.elements, ...mic.elements),
  );
  const root = h(
    "div",
    { class: "viewer", dataset: { testid: "viewer" } },
    bar,
    h("div", { class: "viewer-body" }, screen, overlay, clipPanel, files.panel),
  );
  main.append(root);
  setConn("connecting", "Connecting…");

  // ---- status helpers ----------------------------------------------------------------------
  function setConn(status, text) {
    connStatus.dataset.status = status;
    connStatus.textContent = text;
    root.dataset.conn = status;
  }

  function setSession(s) {
    session = s;
    badgeSlot.replaceChildren(stateBadge(s.state, "session-state"));
    reconnectBtn.disabled = ["stopping", "stopped", "failed"].includes(s.state);
  }

  function showOverlay(message, ...actions) {
    overlay.replaceChildren(
      h("div", { class: "overlay-card" }, h("p", { dataset: { testid: "overlay-message" } }, message), actions.length ? h("div", { class: "overlay-actions" }, actions) : null),
    );
    overlay.hidden = false;
  }

  function hideOverlay() {
    overlay.hidden = true;
    overlay.replaceChildren();
  }

  function stopTimers() {
    clearTimeout(retryTimer);
    clearInterval(countdownTimer);
    retryTimer = null;
    countdownTimer = null;
  }

  function backLink() {
    return h("a", { class: "btn", href: "#/sessions" }, "Back to sessions");
  }

  /** Explain a session that cannot be viewed right now, with what the user can do. */
  function explainState() {
    const s = session;
    if (!s || s.state === "running") return;
    if (WAITING[s.state]) {
      setConn("disconnected", "Waiting for the session");
      showOverlay(`${WAITING[s.state]}${s.status_message ? ` (${s.status_message})` : ""} The viewer connects as soon as it is running.`, backLink());
      return;
    }
    if (s.state === "hibernating" || s.state === "hibernated") {
      setConn("disconnected", "Disconnected");
      const wake = (s.allowed_actions || []).includes("wake")
        ? h(
            "button",
            {
              type: "button",
              class: "btn btn-primary",
              dataset: { testid: "viewer-wake" },
              onclick: (e) =>
                busy(e.currentTarget, async () => {
                  setSession(await post(`/api/v1/sessions/${id}/wake`));
                  explainState();
                }),
            },
            "Wake it",
          )
        : null;
      showOverlay(s.state === "hibernating" ? "The session is hibernating." : "This session is hibernated.", wake, backLink());
      return;
    }
    if (s.state === "failed") {
      setConn("disconnected", "Disconnected");
      showOverlay(`This session failed${s.failure_reason ? `: ${s.failure_reason}` : "."}`, backLink());
      return;
    }
    setConn("disconnected", "Disconnected");
    showOverlay(s.state === "stopping" ? "This session is stopping." : "This session has ended.", backLink());
  }

  // ---- connecting --------------------------------------------------------------------------
  function dropRfb() {
    const old = rfb;
    rfb = null;
    if (old) {
      try {
        old.disconnect();
      } catch {
        // already closed
      }
    }
  }

  async function connect() {
    stopTimers();
    if (disposed || connecting) return;
    dropRfb();
    connecting = true;
    setConn("connecting", "Connecting…");
    let ticket;
    try {
      const RFB = await loadRFB();
      ticket = await post(`/api/v1/sessions/${id}/connect`);
      if (disposed) return;
      mic.allow(ticket.microphone);
      const proto = location.protocol === "https:" ? "wss:" : "ws:";
      const url = `${proto}//${location.host}${ticket.ws_path}?ticket=${encodeURIComponent(ticket.ticket)}`;
      screen.replaceChildren();
      const client = new RFB(screen, url, { wsProtocols: ["binary"], shared: true });
      rfb = client;
      client.sharp = sharpOn();
      client.scaleViewport = scale || sharpOn();
      client.resizeSession = resize && resizable();
      client.clipViewport = false;
      client.focusOnClick = true;
      client.background = "#1b1d23";
      client.addEventListener("connect", () => {
        if (client !== rfb) return;
        attempt = 0;
        setConn("connected", "Connected");
        hideOverlay();
        client.focus();
      });
      client.addEventListener("disconnect", (e) => onDisconnect(client, e.detail));
      client.addEventListener("credentialsrequired", () => {
        showError("the session asked for a VNC password, which StreamSpace does not expect");
        client.disconnect();
      });
      client.addEventListener("securityfailure", (e) => {
        showError(`the session refused the connection: ${e.detail?.reason || "security failure"}`);
      });
      client.addEventListener("clipboard", (e) => {
        received.value = e.detail.text;
        if (!copyToLocal(e.detail.text) && clipPanel.hidden) clipBtn.classList.add("has-news");
      });
      client.addEventListener("desktopname", (e) => {
        if (e.detail?.name) screen.setAttribute("aria-label", `Remote screen: ${e.detail.name}`);
      });
    } catch (err) {
      if (disposed) return;
      if (err instanceof ApiError && err.status === 409) {
        await refreshSession();
        if (session?.state === "running") retryLater(err.message);
        else explainState();
      } else if (err instanceof ApiError && err.status === 404) {
        setConn("disconnected", "Disconnected");
        showOverlay(err.message, backLink());
      } else if (err instanceof ApiError) {
        retryLater(err.message);
      } else {
        setConn("disconnected", "Disconnected");
        showError(err);
        showOverlay(err.message, backLink());
      }
    } finally {
      connecting = false;
    }
  }

  async function onDisconnect(client, detail) {
    if (client !== rfb || disposed) return;
    rfb = null;
    setConn("disconnected", detail?.clean ? "Disconnected" : "Connection lost");
    await refreshSession();
    if (disposed || rfb || connecting) return;
    if (session?.state === "running") retryLater("the connection dropped");
    else explainState();
  }

  function retryLater(why) {
    stopTimers();
    if (disposed) return;
    const delay = Math.min(30, 2 ** attempt);
    attempt = Math.min(attempt + 1, 5);
    let left = delay;
    const tick = () => {
      setConn("disconnected", `Disconnected — reconnecting in ${left} s`);
    };
    tick();
    showOverlay(
      `Disconnected: ${why}. Reconnecting automatically…`,
      h("button", { type: "button", class: "btn btn-primary", dataset: { testid: "overlay-reconnect" }, onclick: () => reconnectNow() }, "Reconnect now"),
      backLink(),
    );
    countdownTimer = setInterval(() => {
      left = Math.max(0, left - 1);
      tick();
    }, 1000);
    retryTimer = setTimeout(() => {
      clearInterval(countdownTimer);
      connect();
    }, delay * 1000);
  }

  async function reconnectNow() {
    attempt = 0;
    stopTimers();
    await refreshSession();
    if (session && session.state !== "running") {
      explainState();
      return;
    }
    connect();
  }

  async function refreshSession() {
    try {
      const s = await get(`/api/v1/sessions/${id}`);
      if (!disposed) setSession(s);
    } catch (err) {
      if (!disposed && err.status !== 404) showError(err);
      if (err.status === 404) session = null;
    }
  }

  // ---- tools -------------------------------------------------------------------------------
  function setScale(on) {
    scale = on;
    localStorage.setItem(SCALE_KEY, on ? "on" : "off");
    showTools();
  }

  function resizable() {
    return template?.spec?.display?.resizable !== false;
  }

  function sharpOn() {
    return sharp && resize && resizable();
  }

  function setResize(on) {
    resize = on;
    localStorage.setItem(RESIZE_KEY, on ? "on" : "off");
    showTools();
  }

  function setSharp(on) {
    sharp = on;
    localStorage.setItem(SHARP_KEY, on ? "on" : "off");
    showTools();
  }

  /** Bring the display buttons and the connection in line with resize, sharp and scale. */
  function showTools() {
    const can = resizable();
    const sharpNow = sharpOn();
    resizeBtn.disabled = !can;
    resizeBtn.setAttribute("aria-pressed", String(resize));
    resizeBtn.title = can
      ? "Resize the remote desktop to this window (Ctrl+Alt+Shift+R)"
      : "This app has a fixed screen size; use Fit to window";
    sharpBtn.disabled = !(can && resize);
    sharpBtn.setAttribute("aria-pressed", String(sharp));
    sharpBtn.title = !can
      ? "This app has a fixed screen size, so it cannot follow the screen's pixel density"
      : !resize
        ? "Sharp (HiDPI) works with Resize desktop: turn that on first"
        : "Give the remote desktop this screen's device pixels, for sharp text on HiDPI screens (Ctrl+Alt+Shift+H)";
    scaleBtn.disabled = sharpNow;
    scaleBtn.setAttribute("aria-pressed", String(scale || sharpNow));
    scaleBtn.title = sharpNow
      ? "Sharp (HiDPI) fits the remote screen into the window while it is on"
      : "Fit the remote screen into the window";
    if (!rfb) return;
    const wantResize = resize && can;
    const askAgain = rfb.sharp !== sharpNow || rfb.resizeSession !== wantResize;
    rfb.sharp = sharpNow;
    rfb.scaleViewport = scale || sharpNow;
    // Assigning resizeSession true makes noVNC ask for the size again, now in the new unit.
    if (askAgain) rfb.resizeSession = wantResize;
  }

  // The ratio changes when the window moves to a screen of another density (or on zoom, which
  // noVNC notices anyway as a size change); a media query on the current ratio tells which.
  let ratioQuery = null;
  function watchRatio() {
    ratioQuery?.removeEventListener("change", onRatio);
    ratioQuery = window.matchMedia(`(resolution: ${window.devicePixelRatio}dppx)`);
    ratioQuery.addEventListener("change", onRatio);
  }
  function onRatio() {
    watchRatio();
    if (rfb && sharpOn()) rfb.resizeSession = true;
  }
  watchRatio();

  // Seamless clipboard where the browser allows it (the async Clipboard API: Chromium-based
  // browsers write for a focused page and ask the user once before reading); the panel stays
  // the fallback. Local text goes to the session when the page gains focus, so what was copied
  // elsewhere is there to paste; text copied in the session lands on the local clipboard.
  let lastShared = null;
  function copyToLocal(text) {
    if (!navigator.clipboard?.writeText || !document.hasFocus()) return false;
    lastShared = text;
    navigator.clipboard.writeText(text).catch(() => {
      lastShared = null;
      if (clipPanel.hidden) clipBtn.classList.add("has-news");
    });
    return true;
  }
  async function sendLocalClipboard() {
    if (!rfb || !navigator.clipboard?.readText || document.visibilityState !== "visible") return;
    try {
      const text = await navigator.clipboard.readText();
      if (text && text !== lastShared && rfb) {
        lastShared = text;
        rfb.clipboardPasteFrom(text);
      }
    } catch {
      // Reading was not allowed: the panel remains.
    }
  }
  window.addEventListener("focus", sendLocalClipboard);
  document.addEventListener("visibilitychange", sendLocalClipboard);

  function toggleClipboard(force) {
    const open = force === undefined ? clipPanel.hidden : force;
    clipPanel.hidden = !open;
    clipBtn.setAttribute("aria-expanded", String(open));
    clipBtn.classList.remove("has-news");
    if (open) sendText.focus();
    else if (rfb) rfb.focus();
  }

  async function toggleFullscreen() {
    try {
      if (document.fullscreenElement) await document.exitFullscreen();
      else await root.requestFullscreen();
    } catch (err) {
      showError(`fullscreen is not available: ${err.message}`);
    }
  }

  const onFullscreen = () => {
    const on = document.fullscreenElement === root;
    fsBtn.setAttribute("aria-pressed", String(on));
    fsBtn.textContent = on ? "Exit fullscreen" : "Fullscreen";
  };
  document.addEventListener("fullscreenchange", onFullscreen);

  // Keyboard users: the remote screen swallows every key (Tab included), so offer a way out.
  const onKey = (e) => {
    if (e.ctrlKey && e.altKey && e.shiftKey && e.code === "KeyT") {
      e.preventDefault();
      e.stopPropagation();
      backLinkBar.focus();
    } else if (e.ctrlKey && e.altKey && e.shiftKey && e.code === "KeyF") {
      e.preventDefault();
      e.stopPropagation();
      files.toggle();
    } else if (e.ctrlKey && e.altKey && e.shiftKey && e.code === "KeyR") {
      e.preventDefault();
      e.stopPropagation();
      if (resizable()) setResize(!resize);
    } else if (e.ctrlKey && e.altKey && e.shiftKey && e.code === "KeyH") {
      e.preventDefault();
      e.stopPropagation();
      if (resize && resizable()) setSharp(!sharp);
    } else if (e.ctrlKey && e.altKey && e.shiftKey && e.code === "KeyS") {
      e.preventDefault();
      e.stopPropagation();
      sound.toggle();
    } else if (e.ctrlKey && e.altKey && e.shiftKey && e.code === "KeyM") {
      e.preventDefault();
      e.stopPropagation();
      mic.toggle();
    }
  };
  window.addEventListener("keydown", onKey, true);

  // ---- live session state ------------------------------------------------------------------
  const unsubscribe = ctx.live.subscribe(({ event, data }) => {
    if (disposed) return;
    if (event === "session" && data?.session?.id === id) {
      const before = session?.state;
      setSession(data.session);
      if (data.session.state === "running") {
        sound.resume();
        if (!rfb && !connecting && before !== "running") {
          attempt = 0;
          connect();
        }
      } else {
        stopTimers();
        if (!rfb) explainState();
      }
    } else if (event === "hello" && !rfb && !connecting) {
      refreshSession().then(() => {
        if (!disposed && session?.state === "running" && !rfb && !connecting && !retryTimer) connect();
      });
    }
  });

  // ---- start -------------------------------------------------------------------------------
  try {
    setSession(await get(`/api/v1/sessions/${id}`));
  } catch (err) {
    setConn("disconnected", "Disconnected");
    showOverlay(err.message, backLink());
    return () => {
      disposed = true;
      unsubscribe();
      sound.stop();
    mic.stop();
      mic.stop();
      document.removeEventListener("fullscreenchange", onFullscreen);
      window.removeEventListener("keydown", onKey, true);
      ratioQuery.removeEventListener("change", onRatio);
      window.removeEventListener("focus", sendLocalClipboard);
      document.removeEventListener("visibilitychange", sendLocalClipboard);
      files.dispose();
    };
  }
  try {
    template = (await ctx.templates()).get(session.template) || null;
  } catch {
    template = null;
  }
  showTools();
  const name = template?.display_name || session.template;
  titleText.replaceChildren(name, " ", h("code", { class: "muted" }, shortId(id)));
  iconSlot.replaceChildren(appIcon(template || { name: session.template }, 24));
  setTitle(name);
  if (session.state === "running") {
    connect();
    sound.resume();
  } else explainState();

  return () => {
    disposed = true;
    stopTimers();
    unsubscribe();
    dropRfb();
    sound.stop();
    mic.stop();
    document.removeEventListener("fullscreenchange", onFullscreen);
    window.removeEventListener("keydown", onKey, true);
    ratioQuery.removeEventListener("change", onRatio);
    window.removeEventListener("focus", sendLocalClipboard);
    document.removeEventListener("visibilitychange", sendLocalClipboard);
    files.dispose();
    if (document.fullscreenElement) document.exitFullscreen().catch(() => {});
  };
}
