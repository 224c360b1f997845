// Admin pages: agents (operators too), users and quotas, templates, audit log.
import { del, get, patch, post, put, qs } from "../api.js";
import {
  appIcon,
  busy,
  copyText,
  cpu,
  emptyState,
  fullTime,
  h,
  loading,
  mem,
  pager,
  shortId,
  showError,
  timeEl,
  toast,
} from "../ui.js";

export function pageHead(title, subtitle, ...actions) {
  return h(
    "div",
    { class: "page-head" },
    h("div", {}, h("h1", {}, title), subtitle ? h("p", { class: "muted" }, subtitle) : null),
    actions.length ? h("div", { class: "head-actions" }, actions) : null,
  );
}

export function table(headers, rows, { caption, testid } = {}) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "table", dataset: testid ? { testid } : undefined },
      caption ? h("caption", { class: "sr-only" }, caption) : null,
      h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
      h("tbody", {}, rows),
    ),
  );
}

function pill(text, kind) {
  return h("span", { class: `pill pill-${kind}`, dataset: { testid: "status" } }, text);
}

function usageBar(used, max, fmt) {
  const pct = max > 0 ? Math.min(100, Math.round((used / max) * 100)) : 0;
  return h(
    "div",
    { class: "usage" },
    h("span", { class: "small" }, `${fmt(used)} / ${fmt(max)}`),
    h(
      "div",
      { class: ["meter-bar", "meter-thin", pct >= 100 ? "meter-full" : pct >= 80 ? "meter-high" : ""], "aria-hidden": "true" },
      h("span", { style: { width: `${pct}%` } }),
    ),
  );
}

// ---- agents -----------------------------------------------------------------------------------

export async function agentsView(main, { ctx }) {
  let showRevoked = false;
  let disposed = false;
  let confirmRevoke = null;
  const body = h("div", {}, loading("Loading agents…"));
  const enrolBox = h("div", { class: "enrol", hidden: true, dataset: { testid: "enrol-panel" } });
  const revokedBox = h("input", { id: "show-revoked", type: "checkbox" });
  revokedBox.addEventListener("change", () => {
    showRevoked = revokedBox.checked;
    load();
  });
  const refreshBtn = h("button", { type: "button", class: "btn", dataset: { testid: "refresh" }, onclick: (e) => busy(e.currentTarget, load) }, "Refresh");
  const enrolBtn = ctx.isAdmin
    ? h(
        "button",
        {
          type: "button",
          class: "btn btn-primary",
          dataset: { testid: "enrol-agent" },
          onclick: (e) => busy(e.currentTarget, enrol),
        },
        "Enrol agent",
      )
    : null;

  main.append(
    pageHead(
      "Agents",
      "Machines that run sessions, grouped by cluster.",
      h("div", { class: "field field-check" }, revokedBox, h("label", { for: "show-revoked" }, "Show revoked")),
      refreshBtn,
      enrolBtn,
    ),
    enrolBox,
    body,
  );

  async function enrol() {
    const t = await post("/api/v1/agents/join-tokens", {});
    const pre = h("pre", { class: "command", dataset: { testid: "join-command" }, tabindex: "0" }, t.command);
    enrolBox.replaceChildren(
      h(
        "div",
        { class: "panel-head" },
        h("h2", {}, "Enrol a new agent"),
        h("button", { type: "button", class: "btn btn-ghost btn-small", onclick: () => (enrolBox.hidden = true) }, "Close"),
      ),
      h("p", {}, "Run this on the new machine (replace CLUSTER and the cluster name). The join token works once and expires ", timeEl(t.expires_at), "."),
      pre,
      h("button", { type: "button", class: "btn btn-small", dataset: { testid: "copy-command" }, onclick: () => copyText(t.command, pre) }, "Copy command"),
    );
    enrolBox.hidden = false;
    pre.focus();
  }

  async function act(agent, action) {
    await post(`/api/v1/agents/${agent.id}/${action}`);
    toast(`Agent ${agent.name}: ${action === "undrain" ? "accepting sessions again" : action === "drain" ? "draining" : "revoked"}`);
    confirmRevoke = null;
    await load();
  }

  function row(a) {
    const status = a.revoked ? "revoked" : a.status;
    const statusKind = { online: "ok", stale: "warn", offline: "bad", revoked: "muted" }[status] || "muted";
    const actions = [];
    if (!a.revoked) {
      actions.push(
        a.draining
          ? h("button", { type: "button", class: "btn btn-small", dataset: { testid: "action-undrain" }, "aria-label": `Undrain ${a.name}`, onclick: (e) => busy(e.currentTarget, () => act(a, "undrain")) }, "Undrain")
          : h("button", { type: "button", class: "btn btn-small", dataset: { testid: "action-drain" }, "aria-label": `Drain ${a.name}`, onclick: (e) => busy(e.currentTarget, () => act(a, "drain")) }, "Drain"),
      );
      if (ctx.isAdmin) {
        if (confirmRevoke === a.id) {
          actions.push(
            h(
              "span",
              { class: "confirm", role: "group", "aria-label": "Confirm revoke" },
              h("button", { type: "button", class: "btn btn-danger btn-small", dataset: { testid: "action-confirm-revoke" }, onclick: (e) => busy(e.currentTarget, () => act(a, "revoke")) }, "Revoke for good"),
              h("button", { type: "button", class: "btn btn-ghost btn-small", onclick: () => { confirmRevoke = null; render(); } }, "Cancel"),
            ),
          );
        } else {
          actions.push(
            h("button", { type: "button", class: "btn btn-small btn-danger-outline", dataset: { testid: "action-revoke" }, "aria-label": `Revoke ${a.name}`, onclick: () => { confirmRevoke = a.id; render(); } }, "Revoke"),
          );
        }
      }
    }
    return h(
      "tr",
      { dataset: { testid: `agent-${a.id}` } },
      h("td", {}, h("strong", {}, a.name), h("div", { class: "muted small" }, `${a.backend} · `, h("code", { title: a.id }, shortId(a.id)))),
      h("td", {}, pill(status, statusKind), a.draining ? [" ", pill("draining", "warn")] : null),
      h("td", {}, a.healthy ? pill("healthy", "ok") : pill("unhealthy", "bad"), a.health_detail ? h("div", { class: "muted small" }, a.health_detail) : null),
      isolationCell(a),
      h(
        "td",
        { class: "usage-cell" },
        usageBar(a.load?.sessions || 0, a.capacity?.max_sessions || 0, (n) => `${n} sessions`),
        usageBar(a.load?.cpu_millis || 0, a.capacity?.cpu_millis || 0, cpu),
        usageBar(a.load?.memory_mb || 0, a.capacity?.memory_mb || 0, mem),
      ),
      h("td", { class: "small" }, (a.templates || []).length ? a.templates.join(", ") : h("span", { class: "muted" }, "none")),
      h("td", { class: "small" }, a.version || "—"),
      h("td", { class: "small" }, timeEl(a.last_seen)),
      h("td", { class: "actions" }, actions),
    );
  }

  function isolationCell(a) {
    const insecure = a.isolation === "insecure-shared-user";
    const label = { "uid-sandbox": "own uid + sandbox", "userns-sandbox": "user-namespace sandbox", container: "container", "insecure-shared-user": "INSECURE: shared user" }[a.isolation] || "unknown";
    return h(
      "td",
      { dataset: { testid: "isolation" } },
      pill(label, insecure ? "bad" : a.isolation ? "ok" : "warn"),
      a.limits_enforced ? null : h("div", { class: "small warn-text", dataset: { testid: "isolation-limits" } }, "limits not enforced"),
      a.isolation_detail ? h("div", { class: "muted small" }, a.isolation_detail) : null,
    );
  }

  let agents = [];
  function render() {
    if (!agents.length) {
      body.replaceChildren(
        emptyState(
          "No agents yet",
          ctx.isAdmin ? "Enrol one with the “Enrol agent” button; sessions wait as pending until an agent can run them." : "Ask an administrator to enrol an agent.",
        ),
      );
      return;
    }
    const clusters = new Map();
    for (const a of agents) {
      if (!clusters.has(a.cluster_id)) clusters.set(a.cluster_id, []);
      clusters.get(a.cluster_id).push(a);
    }
    body.replaceChildren(
      ...[...clusters.entries()].map(([cid, list]) => {
        const first = list[0];
        const online = list.filter((a) => a.status === "online" && !a.revoked).length;
        const hid = `cluster-${cid}`;
        return h(
          "section",
          { class: "cluster", "aria-labelledby": hid, dataset: { testid: `cluster-${cid}` } },
          h(
            "h2",
            { id: hid },
            first.cluster_name || cid,
            " ",
            h("span", { class: "muted small" }, `${cid}${first.region ? ` · ${first.region}` : ""} · ${online} of ${list.length} online`),
          ),
          table(["Agent", "Status", "Health", "Isolation", "Load", "Templates", "Version", "Last seen", "Actions"], list.map(row), { caption: `Agents in ${first.cluster_name || cid}` }),
        );
      }),
    );
  }

  async function load() {
    try {
      agents = await get(`/api/v1/agents${qs({ include_revoked: showRevoked ? "true" : "" })}`);
      if (!disposed) render();
    } catch (err) {
      if (!disposed) showError(err);
    }
  }

  await load();
  // Agent status (online/stale) changes with time; refresh gently while the page is visible.
  const timer = setInterval(() => {
    if (document.visibilityState === "visible" && !confirmRevoke) load();
  }, 15000);
  return () => {
    disposed = true;
    clearInterval(timer);
  };
}

// ---- users ------------------------------------------------------------------------------------

export async function usersView(main, { ctx }) {
  const PAGE = 50;
  let offset = 0;
  let q = "";
  let page = null;
  let disposed = false;
  const open = new Map(); // user id -> "quota" | "password"
  const body = h("div", {}, loading("Loading users…"));

  // New user form
  const f = {
    username: h("input", { id: "nu-username", required: true, autocomplete: "off", pattern: "[a-zA-Z0-9][a-zA-Z0-9._\\-]{0,63}", dataset: { testid: "new-username" } }),
    password: h("input", { id: "nu-password", type: "password", required: true, minlength: 12, autocomplete: "new-password", dataset: { testid: "new-password" } }),
    display: h("input", { id: "nu-display", autocomplete: "off" }),
    role: h("select", { id: "nu-role", dataset: { testid: "new-role" } }, h("option", { value: "user" }, "User"), h("option", { value: "operator" }, "Operator"), h("option", { value: "admin" }, "Admin")),
  };
  const createForm = h(
    "form",
    { class: "inline-form card-form", hidden: true, "aria-label": "New user", dataset: { testid: "new-user-form" } },
    h("h2", {}, "New user"),
    h("div", { class: "form-grid" },
      h("div", { class: "field" }, h("label", { for: "nu-username" }, "Username"), f.username),
      h("div", { class: "field" }, h("label", { for: "nu-password" }, "Password (12+ characters, not easy to guess)"), f.password),
      h("div", { class: "field" }, h("label", { for: "nu-display" }, "Display name"), f.display),
      h("div", { class: "field" }, h("label", { for: "nu-role" }, "Role"), f.role),
    ),
    h("div", { class: "form-actions" },
      h("button", { type: "submit", class: "btn btn-primary", dataset: { testid: "create-user" } }, "Create user"),
      h("button", { type: "button", class: "btn btn-ghost", onclick: () => (createForm.hidden = true) }, "Cancel"),
    ),
  );
  createForm.addEventListener("submit", (e) => {
    e.preventDefault();
    if (f.password.value.length < 12) {
      showError("the password needs at least 12 characters");
      f.password.focus();
      return;
    }
    busy(createForm.querySelector("button[type=submit]"), async () => {
      const u = await post("/api/v1/users", {
        username: f.username.value.trim(),
        password: f.password.value,
        display_name: f.display.value.trim(),
        role: f.role.value,
      });
      toast(`Created user ${u.username}`);
      createForm.reset();
      createForm.hidden = true;
      await load();
    });
  });

  const search = h("input", { id: "user-search", type: "search", placeholder: "username contains…", dataset: { testid: "user-search" } });
  let searchTimer = null;
  search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      q = search.value.trim();
      offset = 0;
      load();
    }, 250);
  });

  main.append(
    pageHead(
      "Users",
      "Accounts, roles and per-user quotas.",
      h("button", { type: "button", class: "btn btn-primary", dataset: { testid: "new-user" }, onclick: () => { createForm.hidden = false; f.username.focus(); } }, "New user"),
    ),
    createForm,
    h("div", { class: "filters", role: "search" }, h("div", { class: "field" }, h("label", { for: "user-search" }, "Search"), search)),
    body,
  );

  async function update(u, changes, message) {
    await patch(`/api/v1/users/${u.id}`, changes);
    toast(message);
    await load();
  }

  function userRow(u) {
    const roleSel = h(
      "select",
      { "aria-label": `Role of ${u.username}`, dataset: { testid: "role" } },
      ["user", "operator", "admin"].map((r) => h("option", { value: r, selected: u.role === r }, r)),
    );
    roleSel.addEventListener("change", () =>
      busy(roleSel, () => update(u, { role: roleSel.value }, `${u.username} is now ${roleSel.value}`)).then(() => {
        if (roleSel.isConnected) roleSel.value = u.role;
      }),
    );
    const self = u.id === ctx.user?.id;
    const rows = [
      h(
        "tr",
        { dataset: { testid: `user-${u.username}` } },
        h("td", {}, h("strong", {}, u.username), self ? h("span", { class: "muted small" }, " (you)") : null, u.auth_source === "ldap" ? h("span", { class: "muted small", dataset: { testid: "from-directory" } }, " (directory)") : null, u.email ? h("div", { class: "muted small" }, u.email) : null),
        h("td", {}, u.display_name || h("span", { class: "muted" }, "—")),
        h("td", {}, roleSel),
        h("td", {}, u.is_active ? pill("active", "ok") : pill("disabled", "muted")),
        h("td", { class: "small" }, timeEl(u.created_at)),
        h(
          "td",
          { class: "actions" },
          h("button", { type: "button", class: "btn btn-small", "aria-expanded": String(open.get(u.id) === "quota"), dataset: { testid: "edit-quota" }, onclick: () => toggle(u, "quota") }, "Quota"),
          h("button", { type: "button", class: "btn btn-small", "aria-expanded": String(open.get(u.id) === "password"), dataset: { testid: "edit-password" }, disabled: u.auth_source === "ldap", title: u.auth_source === "ldap" ? "The directory holds this user's password" : undefined, onclick: () => toggle(u, "password") }, "Password"),
          h(
            "button",
            {
              type: "button",
              class: u.is_active ? "btn btn-small btn-danger-outline" : "btn btn-small",
              dataset: { testid: u.is_active ? "deactivate" : "activate" },
              disabled: self && u.is_active,
              title: self ? "You cannot disable your own account" : u.is_active ? "Signs the user out everywhere and hibernates their sessions" : undefined,
              onclick: (e) => busy(e.currentTarget, () => update(u, { is_active: !u.is_active }, `${u.username} ${u.is_active ? "disabled" : "enabled"}`)),
            },
            u.is_active ? "Disable" : "Enable",
          ),
          h(
            "button",
            {
              type: "button",
              class: "btn btn-small",
              dataset: { testid: "sign-out-everywhere" },
              "aria-label": `Sign ${u.username} out everywhere`,
              disabled: self,
              title: self ? "Use Log out to sign yourself out" : "Ends every sign-in of this user and closes their open desktops and live updates",
              onclick: (e) =>
                busy(e.currentTarget, async () => {
                  await post(`/api/v1/users/${u.id}/sign-out`);
                  toast(`${u.username} was signed out everywhere`);
                }),
            },
            "Sign out everywhere",
          ),
        ),
      ),
    ];
    const mode = open.get(u.id);
    if (mode) {
      const cell = h("td", { colspan: 6, class: "detail-cell" });
      rows.push(h("tr", { class: "detail-row" }, cell));
      if (mode === "quota") renderQuota(u, cell);
      else renderPassword(u, cell);
    }
    return rows;
  }

  function toggle(u, mode) {
    if (open.get(u.id) === mode) open.delete(u.id);
    else open.set(u.id, mode);
    render();
  }

  function renderPassword(u, cell) {
    const input = h("input", { id: `pw-${u.id}`, type: "password", minlength: 12, autocomplete: "new-password", dataset: { testid: "password-input" } });
    const form = h(
      "form",
      { class: "inline-form" },
      h("input", { type: "text", autocomplete: "username", value: u.username, hidden: true, readonly: true, tabindex: "-1", "aria-hidden": "true" }),
      h("label", { for: `pw-${u.id}` }, `New password for ${u.username}`),
      input,
      h("button", { type: "submit", class: "btn btn-primary btn-small" }, "Set password"),
      h("span", { class: "muted small" }, "This signs the user out everywhere."),
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      if (input.value.length < 12) {
        showError("the password needs at least 12 characters");
        return;
      }
      busy(form.querySelector("button"), async () => {
        open.delete(u.id);
        await update(u, { password: input.value }, `Password of ${u.username} changed`);
      });
    });
    cell.append(form);
    queueMicrotask(() => input.focus());
  }

  async function renderQuota(u, cell) {
    cell.append(loading("Loading quota…"));
    let quota;
    try {
      quota = await get(`/api/v1/users/${u.id}/quota`);
    } catch (err) {
      cell.replaceChildren(h("p", { class: "muted" }, err.message));
      return;
    }
    const L = quota.limits;
    const num = (id, label, value, hint) => {
      const input = h("input", { id: `${id}-${u.id}`, type: "number", min: 0, step: 1, value: String(value), required: true, dataset: { testid: id } });
      return [h("div", { class: "field" }, h("label", { for: `${id}-${u.id}` }, label), input, h("span", { class: "muted small" }, hint)), input];
    };
    const [sF, sI] = num("quota-sessions", "Max sessions", L.max_sessions, `${quota.used_sessions} active`);
    const [cF, cI] = num("quota-cpu", "Max CPU (millicores)", L.max_cpu_millis, `${cpu(quota.used_cpu_millis)} in use`);
    const [mF, mI] = num("quota-memory", "Max memory (MiB)", L.max_memory_mb, `${mem(quota.used_memory_mb)} in use`);
    const form = h(
      "form",
      { class: "inline-form", "aria-label": `Quota of ${u.username}` },
      h("p", { class: "small" }, `Quota of ${u.username} — currently the `, h("strong", {}, quota.source), "."),
      h("div", { class: "form-grid" }, sF, cF, mF),
      h(
        "div",
        { class: "form-actions" },
        h("button", { type: "submit", class: "btn btn-primary btn-small", dataset: { testid: "save-quota" } }, "Save quota"),
        quota.source === "user quota"
          ? h(
              "button",
              {
                type: "button",
                class: "btn btn-small",
                onclick: (e) =>
                  busy(e.currentTarget, async () => {
                    await del(`/api/v1/users/${u.id}/quota`);
                    toast(`${u.username} uses the default quota again`);
                    render();
                  }),
              },
              "Use the default quota",
            )
          : null,
      ),
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      busy(form.querySelector("button[type=submit]"), async () => {
        await put(`/api/v1/users/${u.id}/quota`, {
          max_sessions: Number(sI.value),
          max_cpu_millis: Number(cI.value),
          max_memory_mb: Number(mI.value),
        });
        toast(`Quota of ${u.username} saved`);
        render();
      });
    });
    cell.replaceChildren(form);
  }

  function render() {
    if (!page.items.length) {
      body.replaceChildren(emptyState(q ? "No users match" : "No users", null));
      return;
    }
    body.replaceChildren(
      table(["Username", "Name", "Role", "Status", "Created", "Actions"], page.items.flatMap(userRow), { caption: "Users", testid: "users-table" }),
      pager(page, (o) => { offset = o; load(); }, "users") || "",
    );
  }

  async function load() {
    try {
      page = await get(`/api/v1/users${qs({ limit: PAGE, offset, q })}`);
      if (!disposed) render();
    } catch (err) {
      if (!disposed) showError(err);
    }
  }

  await load();
  return () => {
    disposed = true;
    clearTimeout(searchTimer);
  };
}

// ---- templates --------------------------------------------------------------------------------

export async function templatesAdminView(main, { ctx }) {
  let confirmDelete = null;
  let list = [];
  let disposed = false;
  const body = h("div", {}, loading("Loading templates…"));
  main.append(
    pageHead("Templates", "The app catalog. Disabled templates are hidden from users and cannot be launched."),
    body,
  );

  async function load() {
    try {
      list = await get("/api/v1/templates");
      ctx.invalidateTemplates();
      if (!disposed) render();
    } catch (err) {
      if (!disposed) showError(err);
    }
  }

  function row(t) {
    const toggle = h(
      "button",
      {
        type: "button",
        class: t.enabled ? "btn btn-small" : "btn btn-small btn-primary",
        dataset: { testid: t.enabled ? "action-disable" : "action-enable" },
        "aria-label": `${t.enabled ? "Disable" : "Enable"} ${t.display_name}`,
        onclick: (e) =>
          busy(e.currentTarget, async () => {
            await put(`/api/v1/templates/${t.name}`, { ...t.spec, enabled: !t.enabled });
            toast(`${t.display_name} ${t.enabled ? "disabled" : "enabled"}`);
            await load();
          }),
      },
      t.enabled ? "Disable" : "Enable",
    );
    const delBtn =
      confirmDelete === t.name
        ? h(
            "span",
            { class: "confirm", role: "group", "aria-label": "Confirm delete" },
            h(
              "button",
              {
                type: "button",
                class: "btn btn-danger btn-small",
                dataset: { testid: "action-confirm-delete" },
                onclick: (e) =>
                  busy(e.currentTarget, async () => {
                    await del(`/api/v1/templates/${t.name}`);
                    confirmDelete = null;
                    toast(`Deleted ${t.display_name}`);
                    await load();
                  }),
              },
              "Delete for good",
            ),
            h("button", { type: "button", class: "btn btn-ghost btn-small", onclick: () => { confirmDelete = null; render(); } }, "Cancel"),
          )
        : h(
            "button",
            {
              type: "button",
              class: "btn btn-small btn-danger-outline",
              dataset: { testid: "action-delete" },
              "aria-label": `Delete ${t.display_name}`,
              onclick: () => {
                confirmDelete = t.name;
                render();
                body.querySelector('[data-testid="action-confirm-delete"]')?.focus();
              },
            },
            "Delete",
          );
    const res = t.spec?.resources || {};
    return h(
      "tr",
      { dataset: { testid: `template-row-${t.name}` }, class: t.enabled ? "" : "row-muted" },
      h("td", { class: "icon-cell" }, appIcon(t, 32)),
      h("td", {}, h("strong", {}, t.display_name), h("div", { class: "muted small" }, h("code", {}, t.name))),
      h("td", {}, t.category),
      h("td", { class: "small" }, res.cpu_millis ? `${cpu(res.cpu_millis)}, ${mem(res.memory_mb)}` : "—"),
      h("td", { class: "small" }, Object.keys(t.spec?.launch || {}).filter((k) => t.spec.launch[k]).join(", ") || "—"),
      h("td", { class: "small" }, t.source),
      h("td", {}, t.enabled ? pill("enabled", "ok") : pill("disabled", "muted")),
      h(
        "td",
        { class: "small", dataset: { testid: `template-runs-${t.name}` } },
        t.available
          ? h("span", { class: "pill pill-ok" }, "yes")
          : [h("span", { class: "pill pill-muted" }, "no"), h("div", { class: "muted" }, t.unavailable_reason)],
      ),
      h("td", { class: "actions" }, toggle, delBtn),
    );
  }

  function render() {
    if (!list.length) {
      body.replaceChildren(emptyState("No templates", "Add YAML files to the templates directory, or POST /api/v1/templates."));
      return;
    }
    body.replaceChildren(table(["", "Template", "Category", "Resources", "Backends", "Source", "Status", "Runs now", "Actions"], list.map(row), { caption: "Templates", testid: "templates-table" }));
  }

  await load();
  return () => {
    disposed = true;
  };
}

// ---- audit log --------------------------------------------------------------------------------

export async function auditView(main) {
  const PAGE = 50;
  let offset = 0;
  let disposed = false;
  const body = h("div", {}, loading("Loading the audit log…"));
  const action = h("input", { id: "a-action", type: "search", placeholder: "e.g. session.create", dataset: { testid: "audit-action" } });
  const actor = h("input", { id: "a-actor", type: "search", placeholder: "username", dataset: { testid: "audit-actor" } });
  const rtype = h(
    "select",
    { id: "a-type" },
    ["", "session", "user", "agent", "template", "group"].map((t) => h("option", { value: t }, t || "Any")),
  );
  const form = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter the audit log" },
    h("div", { class: "field" }, h("label", { for: "a-action" }, "Action"), action),
    h("div", { class: "field" }, h("label", { for: "a-actor" }, "Actor"), actor),
    h("div", { class: "field" }, h("label", { for: "a-type" }, "Resource"), rtype),
    h("button", { type: "submit", class: "btn btn-small" }, "Apply"),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    offset = 0;
    load();
  });
  rtype.addEventListener("change", () => {
    offset = 0;
    load();
  });
  main.append(pageHead("Audit log", "Every change, who made it, and from where. Newest first."), form, body);

  function statusPill(code) {
    const kind = code >= 500 ? "bad" : code >= 400 ? "warn" : "ok";
    return pill(String(code), kind);
  }

  async function load() {
    let page;
    try {
      page = await get(`/api/v1/audit${qs({ limit: PAGE, offset, action: action.value.trim(), actor: actor.value.trim(), resource_type: rtype.value })}`);
    } catch (err) {
      if (!disposed) showError(err);
      return;
    }
    if (disposed) return;
    if (!page.items.length) {
      body.replaceChildren(emptyState("No audit entries", "Nothing matches these filters yet."));
      return;
    }
    body.replaceChildren(
      table(
        ["Time", "Actor", "Action", "Resource", "Result", "IP"],
        page.items.map((e) =>
          h(
            "tr",
            { dataset: { testid: "audit-row" } },
            h("td", { class: "small nowrap" }, h("time", { datetime: e.at, title: e.at }, fullTime(e.at))),
            h("td", {}, e.actor || h("span", { class: "muted" }, "anonymous")),
            h("td", {}, h("code", {}, e.action)),
            h("td", { class: "small" }, e.resource_type, e.resource_id ? [" ", h("code", { title: e.resource_id }, e.resource_id.length > 12 ? shortId(e.resource_id) : e.resource_id)] : null),
            h("td", {}, statusPill(e.status_code)),
            h("td", { class: "small" }, e.ip || "—"),
          ),
        ),
        { caption: "Audit log", testid: "audit-table" },
      ),
      pager(page, (o) => { offset = o; load(); }, "entries") || "",
    );
  }

  await load();
  return () => {
    disposed = true;
  };
}
