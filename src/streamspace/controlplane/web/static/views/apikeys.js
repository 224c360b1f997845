// API keys: the signed-in user's keys for scripts and the CLI (shown once at creation).
import { del, get, post, qs } from "../api.js";
import { busy, clear, copyText, emptyState, h, loading, pager, timeEl, toast } from "../ui.js";
import { pageHead, table } from "./admin.js";

const SCOPES = [
  ["sessions:read", "Read sessions"],
  ["sessions:write", "Create and manage sessions"],
  ["templates:read", "Read the catalog"],
  ["admin", "Everything your role allows"],
];

export async function apiKeysView(main, { ctx }) {
  const PAGE = 20;
  let offset = 0;
  const body = h("div", {}, loading("Loading API keys…"));
  const shown = h("div", { class: "panel", hidden: true, dataset: { testid: "new-key-box" } });

  const name = h("input", { id: "key-name", required: true, maxlength: 64, autocomplete: "off", dataset: { testid: "key-name" } });
  const expires = h("input", { id: "key-expires", type: "date", dataset: { testid: "key-expires" } });
  const boxes = SCOPES.filter(([s]) => s !== "admin" || ctx.isAdmin).map(([scope, label]) =>
    h("label", { class: "check" }, h("input", { type: "checkbox", value: scope, dataset: { testid: `scope-${scope}` } }), ` ${label} (${scope})`),
  );
  const form = h(
    "form",
    { class: "inline-form card-form", "aria-label": "New API key", dataset: { testid: "new-key-form" } },
    h("h2", {}, "New API key"),
    h("div", { class: "form-grid" },
      h("div", { class: "field" }, h("label", { for: "key-name" }, "Name (what it is for)"), name),
      h("div", { class: "field" }, h("label", { for: "key-expires" }, "Expires (optional)"), expires),
    ),
    h("fieldset", { class: "field" }, h("legend", {}, "Scopes"), boxes),
    h("div", { class: "form-actions" }, h("button", { type: "submit", class: "btn btn-primary", dataset: { testid: "create-key" } }, "Create key")),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const scopes = boxes.map((b) => b.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    busy(form.querySelector("button[type=submit]"), async () => {
      const req = { name: name.value.trim(), scopes };
      if (expires.value) req.expires_at = new Date(`${expires.value}T23:59:59`).toISOString();
      const k = await post("/api/v1/auth/api-keys", req);
      const pre = h("pre", { class: "command", dataset: { testid: "new-key" }, tabindex: "0" }, k.key);
      shown.replaceChildren(
        h("h2", {}, `Key “${k.name}” created`),
        h("p", {}, "Copy it now: it is shown only once. Use it as ", h("code", {}, "Authorization: Bearer …"), " or with ", h("code", {}, "streamspace login --api-key"), "."),
        pre,
        h("button", { type: "button", class: "btn btn-small", onclick: () => copyText(k.key, pre) }, "Copy key"),
        h("button", { type: "button", class: "btn btn-ghost btn-small", onclick: () => (shown.hidden = true) }, "Done"),
      );
      shown.hidden = false;
      form.reset();
      pre.focus();
      await load();
    });
  });

  main.append(pageHead("API keys", "Keys let scripts and the CLI act as you, limited to the scopes you choose."), shown, form, body);

  function row(k) {
    return h(
      "tr",
      { dataset: { testid: "key-row", keyId: k.id } },
      h("td", {}, k.name),
      h("td", {}, h("code", {}, `${k.prefix}…`)),
      h("td", {}, k.scopes.join(", ")),
      h("td", {}, timeEl(k.created_at)),
      h("td", {}, k.last_used_at ? timeEl(k.last_used_at) : "never"),
      h("td", {}, k.expires_at ? timeEl(k.expires_at) : "never"),
      h(
        "td",
        {},
        h(
          "button",
          {
            type: "button",
            class: "btn btn-small btn-danger",
            dataset: { testid: "delete-key" },
            "aria-label": `Delete key ${k.name}`,
            onclick: (e) =>
              busy(e.currentTarget, async () => {
                await del(`/api/v1/auth/api-keys/${k.id}`);
                toast(`Deleted key ${k.name}: it no longer works`);
                await load();
              }),
          },
          "Delete",
        ),
      ),
    );
  }

  async function load() {
    const page = await get(`/api/v1/auth/api-keys${qs({ limit: PAGE, offset })}`);
    clear(body);
    if (page.total === 0) {
      body.append(emptyState("No API keys", "Create one above for a script or the CLI."));
      return;
    }
    body.append(
      table(["Name", "Key", "Scopes", "Created", "Last used", "Expires", ""], page.items.map(row), { caption: "Your API keys", testid: "keys-table" }),
      pager(page, (o) => {
        offset = o;
        load();
      }, "keys"),
    );
  }
  await load();
}
