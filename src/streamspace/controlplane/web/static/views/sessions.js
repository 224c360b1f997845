import { del, get, getBlob, patch, post, qs } from "../api.js";
import {
  ALL_STATES,
  STATE_LABELS,
  appIcon,
  busy,
  cpu,
  emptyState,
  fullTime,
  h,
  loading,
  mem,
  pager,
  shortId,
  showError,
  stateBadge,
  timeEl,
  toast,
} from "../ui.js";

const PAGE_SIZE = 20;
const TAG_RE = /^[a-zA-Z0-9][a-zA-Z0-9._:/-]{0,63}$/;
const ACTIVE = new Set(["pending", "scheduled", "starting", "running", "hibernating", "hibernated", "waking", "stopping"]);
const SETTLING = new Set(["pending", "scheduled", "starting", "hibernating", "waking", "stopping"]);
const SETTLE_POLL_MS = 5000;
const THUMB_POLL_MS = 5000;

/** Microseconds since the epoch from the API's ISO timestamps (for ordering updates). */
function stamp(iso) {
  if (!iso) return 0;
  const frac = /\.(\d+)/.exec(iso);
  const micros = frac ? Number((frac[1] + "000000").slice(3, 6)) : 0;
  return Date.parse(iso) * 1000 + micros;
}

export async function sessionsView(main, { ctx, params }) {
  const filters = {
    status: params.get("status") || "active",
    template: params.get("template") || "",
    tag: params.get("tag") || "",
    everyone: ctx.isOperator && params.get("everyone") === "1",
    offset: Math.max(0, Number.parseInt(params.get("offset") || "0", 10) || 0),
  };
  let highlight = params.get("highlight") || "";
  const rows = new Map(); // id -> {data, el, expanded, confirming, addingTag, events, thumb}
  let page = null;
  let templates = new Map();
  let disposed = false;
  let reloadTimer = null;
  let quotaTimer = null;
  let loadSeq = 0;

  // ---- layout ------------------------------------------------------------------------------
  const quotaBox = h("section", { class: "quota", "aria-label": "Your quota", dataset: { testid: "quota" } });
  const list = h("div", { class: "session-list", "aria-live": "off" });
  const pagerBox = h("div", {});
  const heading = h("h1", {}, filters.everyone ? "All sessions" : "My sessions");

  const statusSel = h(
    "select",
    { id: "f-status", dataset: { testid: "filter-status" } },
    h("option", { value: "active" }, "Active"),
    h("option", { value: "all" }, "All states"),
    h("option", { value: "inactive" }, "Ended (stopped or failed)"),
    ALL_STATES.map((s) => h("option", { value: s }, STATE_LABELS[s])),
  );
  statusSel.value = filters.status;
  const templateSel = h("select", { id: "f-template", dataset: { testid: "filter-template" } }, h("option", { value: "" }, "Any app"));
  const tagInput = h("input", {
    id: "f-tag",
    type: "search",
    placeholder: "e.g. project-x",
    value: filters.tag,
    dataset: { testid: "filter-tag" },
  });
  const everyoneBox = ctx.isOperator
    ? h("input", { id: "f-everyone", type: "checkbox", checked: filters.everyone, dataset: { testid: "filter-everyone" } })
    : null;

  const filterForm = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter sessions" },
    h("div", { class: "field" }, h("label", { for: "f-status" }, "State"), statusSel),
    h("div", { class: "field" }, h("label", { for: "f-template" }, "App"), templateSel),
    h("div", { class: "field" }, h("label", { for: "f-tag" }, "Tag"), tagInput),
    everyoneBox
      ? h("div", { class: "field field-check" }, everyoneBox, h("label", { for: "f-everyone" }, "Everyone's sessions"))
      : null,
    h("button", { type: "submit", class: "btn btn-small" }, "Apply"),
  );
  filterForm.addEventListener("submit", (e) => {
    e.preventDefault();
    applyFilters();
  });
  statusSel.addEventListener("change", applyFilters);
  templateSel.addEventListener("change", applyFilters);
  everyoneBox?.addEventListener("change", applyFilters);

  main.append(
    h(
      "div",
      { class: "page-head" },
      h("div", {}, heading, h("p", { class: "muted" }, "Sessions update live. Open a running one to use it.")),
      h("a", { class: "btn btn-primary", href: "#/catalog" }, "+ New session"),
    ),
    quotaBox,
    filterForm,
    list,
    pagerBox,
  );
  list.append(loading("Loading sessions…"));

  function applyFilters() {
    filters.status = statusSel.value;
    filters.template = templateSel.value;
    filters.tag = tagInput.value.trim();
    filters.everyone = Boolean(everyoneBox?.checked);
    filters.offset = 0;
    heading.textContent = filters.everyone ? "All sessions" : "My sessions";
    syncHash();
    load();
  }

  function syncHash() {
    const q = qs({
      status: filters.status !== "active" ? filters.status : "",
      template: filters.template,
      tag: filters.tag,
      everyone: filters.everyone ? "1" : "",
      offset: filters.offset || "",
      highlight,
    });
    history.replaceState(null, "", `#/sessions${q}`);
  }

  // ---- data --------------------------------------------------------------------------------
  function apiQuery() {
    const q = { limit: PAGE_SIZE, offset: filters.offset, template: filters.template, tag: filters.tag };
    if (filters.status === "active") q.active = "true";
    else if (filters.status === "inactive") q.active = "false";
    else if (filters.status !== "all") q.state = filters.status;
    if (filters.everyone) q.all = "true";
    return qs(q);
  }

  function matches(s) {
    if (!filters.everyone && s.owner_id !== ctx.user?.id) return false;
    if (filters.template && s.template !== filters.template) return false;
    if (filters.tag && !(s.tags || []).includes(filters.tag)) return false;
    if (filters.status === "active") return ACTIVE.has(s.state);
    if (filters.status === "inactive") return !ACTIVE.has(s.state);
    if (filters.status !== "all") return s.state === filters.status;
    return true;
  }

  async function load() {
    const seq = ++loadSeq;
    try {
      const result = await get(`/api/v1/sessions${apiQuery()}`);
      if (disposed || seq !== loadSeq) return;
      if (result.total === 0 && filters.status === "active" && !filters.template && !filters.tag) {
        // Tell "never had a session" apart from "nothing running right now".
        const any = await get(`/api/v1/sessions${qs({ limit: 1, all: filters.everyone ? "true" : "" })}`);
        if (disposed || seq !== loadSeq) return;
        result.anyEnded = any.total > 0;
      }
      page = result;
      if (page.items.length === 0 && page.total > 0 && filters.offset > 0) {
        filters.offset = Math.max(0, page.total - PAGE_SIZE);
        syncHash();
        load();
        return;
      }
      renderList();
    } catch (err) {
      if (disposed || seq !== loadSeq) return;
      showError(err);
      if (!page) list.replaceChildren(emptyState("Sessions could not be loaded", err.message));
    }
  }

  function scheduleReload() {
    clearTimeout(reloadTimer);
    reloadTimer = setTimeout(load, 150);
  }

  async function loadQuota() {
    try {
      const q = await get("/api/v1/me/quota");
      if (!disposed) renderQuota(q);
    } catch (err) {
      if (!disposed) quotaBox.replaceChildren(h("p", { class: "muted" }, "Quota unavailable: ", err.message));
    }
  }

  function scheduleQuota() {
    clearTimeout(quotaTimer);
    quotaTimer = setTimeout(loadQuota, 400);
  }

  // ---- rendering ---------------------------------------------------------------------------
  function meter(label, used, max, fmt, testid) {
    const pct = max > 0 ? Math.min(100, Math.round((used / max) * 100)) : 100;
    return h(
      "div",
      { class: "meter", dataset: { testid } },
      h("div", { class: "meter-label" }, h("span", {}, label), h("span", { class: "meter-value" }, `${fmt(used)} of ${fmt(max)}`)),
      h(
        "div",
        {
          class: ["meter-bar", pct >= 100 ? "meter-full" : pct >= 80 ? "meter-high" : ""],
          role: "meter",
          "aria-label": label,
          "aria-valuemin": 0,
          "aria-valuemax": max,
          "aria-valuenow": used,
        },
        h("span", { style: { width: `${pct}%` } }),
      ),
    );
  }

  function renderQuota(q) {
    quotaBox.replaceChildren(
      meter("Sessions", q.used_sessions, q.limits.max_sessions, (n) => String(n), "quota-sessions"),
      meter("CPU", q.used_cpu_millis, q.limits.max_cpu_millis, cpu, "quota-cpu"),
      meter("Memory", q.used_memory_mb, q.limits.max_memory_mb, mem, "quota-memory"),
      h("p", { class: "muted small quota-source" }, q.source === "default quota" ? "Default quota" : "Quota set for you"),
    );
  }

  function renderList() {
    const previous = rows;
    const keep = new Map();
    for (const s of page.items) {
      const old = previous.get(s.id);
      keep.set(s.id, {
        data: s,
        el: null,
        expanded: old?.expanded || false,
        confirming: false,
        addingTag: old?.addingTag || false,
        tagDraft: old?.tagDraft || "",
        events: old?.events || null,
        thumb: old?.thumb || null,
      });
    }
    for (const [id, old] of previous) if (!keep.has(id)) dropThumb(old);
    rows.clear();
    for (const [k, v] of keep) rows.set(k, v);
    list.replaceChildren();
    if (!page.items.length) {
      const filtered = filters.status !== "active" || filters.template || filters.tag || filters.offset;
      if (!filtered && page.anyEnded) {
        list.append(
          emptyState(
            "No active sessions — pick an app in the catalog",
            "Your earlier sessions have ended.",
            h(
              "div",
              { class: "empty-actions" },
              h("a", { class: "btn btn-primary", href: "#/catalog" }, "Open the catalog"),
              h(
                "button",
                {
                  type: "button",
                  class: "btn",
                  dataset: { testid: "show-ended" },
                  onclick: () => {
                    statusSel.value = "all";
                    applyFilters();
                  },
                },
                "Show all sessions",
              ),
            ),
          ),
        );
      } else if (filtered) {
        list.append(
          emptyState(
            "No sessions match these filters",
            null,
            h("button", { type: "button", class: "btn", onclick: resetFilters, dataset: { testid: "clear-filters" } }, "Clear filters"),
          ),
        );
      } else {
        list.append(
          emptyState(
            "No sessions yet — pick an app in the catalog",
            "Your running, hibernated and recent sessions show up here.",
            h("a", { class: "btn btn-primary", href: "#/catalog" }, "Open the catalog"),
          ),
        );
      }
      pagerBox.replaceChildren();
      return;
    }
    const ul = h("ul", { class: "sessions", role: "list" });
    for (const row of rows.values()) {
      row.el = renderRow(row);
      ul.append(row.el);
      if (row.expanded) loadHistory(row);
    }
    list.append(ul);
    pagerBox.replaceChildren(
      pager(
        page,
        (offset) => {
          filters.offset = offset;
          syncHash();
          load();
          main.scrollIntoView({ block: "start" });
        },
        "sessions",
      ) || "",
    );
    if (highlight && rows.has(highlight)) {
      const el = rows.get(highlight).el;
      el.scrollIntoView({ block: "center" });
      el.focus({ preventScroll: true });
    }
  }

  function resetFilters() {
    statusSel.value = "active";
    templateSel.value = "";
    tagInput.value = "";
    if (everyoneBox) everyoneBox.checked = false;
    applyFilters();
  }

  function updateRow(row) {
    const old = row.el;
    const focused = old && old.contains(document.activeElement) ? document.activeElement : null;
    const focusKey = focused?.dataset?.testid;
    row.el = renderRow(row);
    old?.replaceWith(row.el);
    if (focused) {
      const again = focusKey && row.el.querySelector(`[data-testid="${CSS.escape(focusKey)}"]`);
      (again && !again.disabled ? again : row.el).focus({ preventScroll: true });
    }
  }

  function apply(row, s) {
    // An HTTP answer can arrive after a newer live event; never go back in time.
    if (stamp(s.updated_at) < stamp(row.data.updated_at)) return;
    const changedState = row.data.state !== s.state;
    row.data = { ...s, events: undefined };
    if (changedState) row.confirming = false;
    if (s.state !== "running") dropThumb(row);
    updateRow(row);
    if (changedState && s.state === "running") refreshThumb(row);
    if (row.expanded) loadHistory(row);
  }

  function renderRow(row) {
    const s = row.data;
    const t = templates.get(s.template);
    const name = t?.display_name || s.template;
    const actions = new Set(s.allowed_actions || []);
    const titleId = `s-${s.id}-title`;
    const historyId = `s-${s.id}-history`;

    const reason =
      s.state === "failed" && s.failure_reason
        ? h("p", { class: "reason reason-error", dataset: { testid: "reason" } }, s.failure_reason)
        : s.status_message && s.state !== "running" && s.state !== "stopped"
          ? h("p", { class: "reason", dataset: { testid: "reason" } }, s.status_message)
          : null;

    const act = (label, action, fn, cls = "btn btn-small") =>
      h(
        "button",
        {
          type: "button",
          class: cls,
          dataset: { testid: `action-${action}` },
          "aria-label": `${label} ${name} (${shortId(s.id)})`,
          onclick: (e) => busy(e.currentTarget, fn),
        },
        label,
      );

    const buttons = [];
    if (actions.has("connect")) {
      buttons.push(
        h(
          "a",
          {
            class: "btn btn-primary btn-small",
            href: `#/view/${s.id}`,
            dataset: { testid: "action-open" },
            "aria-label": `Open ${name} (${shortId(s.id)})`,
          },
          "Open",
        ),
      );
    }
    if (actions.has("wake")) {
      buttons.push(act("Wake", "wake", async () => apply(row, await post(`/api/v1/sessions/${s.id}/wake`)), "btn btn-primary btn-small"));
    }
    if (actions.has("hibernate")) {
      buttons.push(act("Hibernate", "hibernate", async () => apply(row, await post(`/api/v1/sessions/${s.id}/hibernate`))));
    }
    if (actions.has("stop")) {
      if (row.confirming) {
        buttons.push(
          h(
            "span",
            { class: "confirm", role: "group", "aria-label": "Confirm stop" },
            h("span", { class: "small" }, "Stop this session?"),
            act(
              "Stop session",
              "confirm-stop",
              async () => {
                const out = await del(`/api/v1/sessions/${s.id}`);
                row.confirming = false;
                apply(row, out);
                toast(`Stopping ${name}`);
              },
              "btn btn-danger btn-small",
            ),
            h(
              "button",
              {
                type: "button",
                class: "btn btn-ghost btn-small",
                dataset: { testid: "cancel-stop" },
                onclick: () => {
                  row.confirming = false;
                  updateRow(row);
                  row.el.querySelector('[data-testid="action-stop"]')?.focus();
                },
              },
              "Cancel",
            ),
          ),
        );
      } else {
        buttons.push(
          h(
            "button",
            {
              type: "button",
              class: "btn btn-small btn-danger-outline",
              dataset: { testid: "action-stop" },
              "aria-label": `Stop ${name} (${shortId(s.id)})`,
              onclick: () => {
                row.confirming = true;
                updateRow(row);
                row.el.querySelector('[data-testid="action-confirm-stop"]')?.focus();
              },
            },
            "Stop",
          ),
        );
      }
    }
    buttons.push(
      h(
        "button",
        {
          type: "button",
          class: "btn btn-ghost btn-small",
          "aria-expanded": row.expanded ? "true" : "false",
          "aria-controls": historyId,
          dataset: { testid: "toggle-history" },
          onclick: () => {
            row.expanded = !row.expanded;
            updateRow(row);
            if (row.expanded) loadHistory(row);
          },
        },
        row.expanded ? "Hide history" : "History",
      ),
    );

    const el = h(
      "li",
      {
        class: ["session", `session-${s.state}`, s.id === highlight && "highlight"],
        dataset: { testid: `session-${s.id}`, state: s.state, id: s.id },
        "aria-labelledby": titleId,
        tabindex: "-1",
      },
      h(
        "div",
        { class: "session-main" },
        appIcon(t || { name: s.template }, 40),
        h(
          "div",
          { class: "session-info" },
          h(
            "div",
            { class: "session-title" },
            h("h2", { id: titleId }, name),
            stateBadge(s.state),
            h("code", { class: "muted small", title: s.id }, shortId(s.id)),
          ),
          h(
            "p",
            { class: "meta muted small" },
            "Started ",
            timeEl(s.created_at),
            filters.everyone ? [" · by ", h("strong", {}, s.owner)] : null,
            s.cluster_id ? ` · cluster ${s.cluster_id}` : s.requested_cluster_id ? ` · wants cluster ${s.requested_cluster_id}` : null,
            s.state === "running" || s.state === "hibernated" ? [" · last active ", timeEl(s.last_activity)] : null,
            ` · ${cpu(s.resources?.cpu_millis || 0)}, ${mem(s.resources?.memory_mb || 0)}`,
          ),
          reason,
          renderTags(row, name),
        ),
        s.state === "running" ? thumbFor(row, name, actions.has("connect")) : null,
        h("div", { class: "session-actions" }, buttons),
      ),
      row.expanded ? renderHistory(row, historyId) : null,
    );
    return el;
  }

  // ---- live thumbnails ---------------------------------------------------------------------
  // One <img> per running row, kept across re-renders; its image is fetched with the bearer
  // token (an <img src> cannot send it) and shown through an object URL, renewed every few
  // seconds while this list is on screen. The control plane caches each session's image
  // briefly, so several open tabs cost the agent one capture.
  function thumbFor(row, name, linked) {
    if (!row.thumb) {
      row.thumb = {
        url: "",
        loading: false,
        img: h("img", {
          class: "session-thumb-img",
          alt: `Screen of ${name}`,
          width: 160,
          height: 100,
          dataset: { testid: "thumbnail" },
        }),
      };
      refreshThumb(row);
    }
    const box = linked
      ? h("a", { class: "session-thumb", href: `#/view/${row.data.id}`, tabindex: "-1", "aria-hidden": "true" }, row.thumb.img)
      : h("span", { class: "session-thumb" }, row.thumb.img);
    return box;
  }

  async function refreshThumb(row) {
    const t = row.thumb;
    if (!t || t.loading || disposed || row.data.state !== "running") return;
    t.loading = true;
    try {
      const blob = await getBlob(`/api/v1/sessions/${row.data.id}/thumbnail`);
      if (disposed || row.thumb !== t) return;
      const url = URL.createObjectURL(blob);
      const old = t.url;
      t.url = url;
      t.img.src = url;
      t.img.classList.remove("session-thumb-stale");
      if (old) URL.revokeObjectURL(old);
    } catch {
      // Not running any more, or the agent could not answer now: the next tick tries again.
      t.img.classList.add("session-thumb-stale");
    } finally {
      t.loading = false;
    }
  }

  function dropThumb(row) {
    if (row.thumb?.url) URL.revokeObjectURL(row.thumb.url);
    row.thumb = null;
  }

  const thumbTimer = setInterval(() => {
    if (disposed || document.hidden) return;
    for (const row of rows.values()) if (row.data.state === "running") refreshThumb(row);
  }, THUMB_POLL_MS);

  function renderTags(row, name) {
    const s = row.data;
    const setTags = async (tags) => apply(row, await patch(`/api/v1/sessions/${s.id}`, { tags }));
    const chips = (s.tags || []).map((tag) =>
      h(
        "span",
        { class: "chip chip-tag", dataset: { testid: `tag-${tag}` } },
        h(
          "button",
          {
            type: "button",
            class: "chip-filter",
            title: `Show sessions tagged ${tag}`,
            onclick: () => {
              tagInput.value = tag;
              applyFilters();
            },
          },
          tag,
        ),
        h(
          "button",
          {
            type: "button",
            class: "chip-remove",
            "aria-label": `Remove tag ${tag} from ${name}`,
            dataset: { testid: `remove-tag-${tag}` },
            onclick: (e) =>
              busy(e.currentTarget, async () => {
                await setTags(row.data.tags.filter((x) => x !== tag));
                row.el.querySelector('[data-testid="add-tag"]')?.focus();
              }),
          },
          "×",
        ),
      ),
    );
    let adder;
    if (row.addingTag) {
      const input = h("input", {
        type: "text",
        class: "tag-input",
        "aria-label": `New tag for ${name}`,
        placeholder: "new tag",
        maxlength: 64,
        value: row.tagDraft || "",
        dataset: { testid: "tag-input" },
      });
      // Live updates re-render the row; keep what was typed so far.
      input.addEventListener("input", () => {
        row.tagDraft = input.value;
      });
      adder = h(
        "form",
        { class: "tag-form" },
        input,
        h("button", { type: "submit", class: "btn btn-small", dataset: { testid: "tag-save" } }, "Add"),
        h(
          "button",
          {
            type: "button",
            class: "btn btn-ghost btn-small",
            onclick: () => {
              row.addingTag = false;
              updateRow(row);
            },
          },
          "Cancel",
        ),
      );
      adder.addEventListener("submit", (e) => {
        e.preventDefault();
        const tag = input.value.trim();
        if (!TAG_RE.test(tag)) {
          showError("A tag is 1–64 letters, digits, or . _ : / - and starts with a letter or digit.");
          input.focus();
          return;
        }
        busy(adder.querySelector("button[type=submit]"), async () => {
          await setTags([...(row.data.tags || []), tag]);
          row.addingTag = false;
          row.tagDraft = "";
          updateRow(row);
          row.el.querySelector('[data-testid="add-tag"]')?.focus();
        });
      });
      input.addEventListener("keydown", (e) => {
        if (e.key === "Escape") {
          row.addingTag = false;
          updateRow(row);
          row.el.querySelector('[data-testid="add-tag"]')?.focus();
        }
      });
      if (row.focusTag) {
        row.focusTag = false;
        queueMicrotask(() => input.focus());
      }
    } else {
      adder = h(
        "button",
        {
          type: "button",
          class: "chip chip-add",
          "aria-label": `Add a tag to ${name}`,
          dataset: { testid: "add-tag" },
          onclick: () => {
            row.addingTag = true;
            row.focusTag = true;
            row.tagDraft = "";
            updateRow(row);
          },
        },
        "+ tag",
      );
    }
    return h("div", { class: "chips tags", "aria-label": "Tags" }, chips, adder);
  }

  function renderHistory(row, id) {
    const box = h("div", { class: "history", id, dataset: { testid: "history" } });
    if (!row.events) {
      box.append(loading("Loading history…"));
    } else if (!row.events.length) {
      box.append(h("p", { class: "muted" }, "No events recorded."));
    } else {
      box.append(
        h(
          "ol",
          { class: "events" },
          row.events
            .slice()
            .reverse()
            .map((e) =>
              h(
                "li",
                { class: `event event-${e.kind}` },
                h("time", { datetime: e.at, class: "muted small" }, fullTime(e.at)),
                h("span", { class: "event-kind" }, e.kind),
                h("span", { class: "event-msg" }, e.message),
              ),
            ),
        ),
      );
    }
    return box;
  }

  async function loadHistory(row) {
    try {
      const full = await get(`/api/v1/sessions/${row.data.id}`);
      if (disposed || !rows.has(full.id)) return;
      row.events = full.events || [];
      const { events, ...rest } = full;
      if (stamp(rest.updated_at) >= stamp(row.data.updated_at)) row.data = rest;
      updateRow(row);
    } catch (err) {
      showError(err);
    }
  }

  // ---- live updates ------------------------------------------------------------------------
  const unsubscribe = ctx.live.subscribe(({ event, data }) => {
    if (disposed) return;
    if (event === "session" && data?.session) {
      const s = data.session;
      if (s.owner_id === ctx.user?.id) scheduleQuota();
      const row = rows.get(s.id);
      if (row) apply(row, s);
      else if (matches(s) && filters.offset === 0) scheduleReload();
    } else if (event === "resync" || event === "hello") {
      scheduleReload();
      scheduleQuota();
    }
  });

  // Live events carry every change, but one can be lost (a connection that dropped between two
  // events); while a row is in a passing state it is re-read every few seconds until it settles.
  // Row by row, like a live event: the list itself (and its filter) stays as the user sees it.
  const settleTimer = setInterval(async () => {
    if (disposed || document.hidden) return;
    const settling = [...rows.values()].filter((r) => SETTLING.has(r.data.state)).slice(0, 10);
    for (const { data } of settling) {
      try {
        const s = await get(`/api/v1/sessions/${data.id}`);
        const row = rows.get(s.id);
        if (disposed) return;
        if (row) apply(row, s);
      } catch {
        // the next tick (or a live event) brings it
      }
    }
  }, SETTLE_POLL_MS);

  // Highlight fades after a while so it doesn't stick to the bookmark.
  const highlightTimer = highlight
    ? setTimeout(() => {
        highlight = "";
        syncHash();
      }, 8000)
    : null;

  try {
    templates = await ctx.templates();
  } catch {
    templates = new Map();
  }
  for (const t of [...templates.values()].sort((a, b) => a.display_name.localeCompare(b.display_name))) {
    templateSel.append(h("option", { value: t.name }, t.display_name));
  }
  templateSel.value = filters.template;
  await Promise.all([load(), loadQuota()]);

  return () => {
    disposed = true;
    unsubscribe();
    clearTimeout(reloadTimer);
    clearTimeout(quotaTimer);
    clearTimeout(highlightTimer);
    clearInterval(settleTimer);
    clearInterval(thumbTimer);
    for (const row of rows.values()) dropThumb(row);
  };
}
