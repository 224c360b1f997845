import { newIdempotencyKey, post } from "../api.js";
import { appIcon, busy, cpu, emptyState, h, loading, mem } from "../ui.js";

export async function catalogView(main, { ctx, params }) {
  const search = h("input", {
    id: "catalog-search",
    type: "search",
    placeholder: "Search apps, categories, tags…",
    autocomplete: "off",
    value: params.get("q") || "",
    dataset: { testid: "catalog-search" },
  });
  const count = h("p", { class: "muted", role: "status", "aria-live": "polite", dataset: { testid: "catalog-count" } });
  const body = h("div", { class: "catalog" }, loading("Loading the catalog…"));
  main.append(
    h(
      "div",
      { class: "page-head" },
      h("div", {}, h("h1", {}, "Catalog"), h("p", { class: "muted" }, "Pick an app to start it in its own session.")),
      h("div", { class: "search" }, h("label", { for: "catalog-search", class: "sr-only" }, "Search the catalog"), search),
    ),
    count,
    body,
  );

  // Templates no online agent can run come greyed with the reason (admins always; users when
  // the server does not hide them): launching one would only be refused.
  const templates = [...(await ctx.templates(true)).values()].filter((t) => t.enabled);
  const unavailable = templates.filter((t) => t.available === false).length;

  function render() {
    const q = search.value.trim().toLowerCase();
    const shown = templates.filter((t) =>
      !q
        ? true
        : [t.name, t.display_name, t.description, t.category, ...(t.tags || [])]
            .join(" ")
            .toLowerCase()
            .includes(q),
    );
    body.replaceChildren();
    if (!templates.length) {
      body.append(
        emptyState(
          "The catalog is empty",
          ctx.isAdmin
            ? "Add template files to the templates directory or create one through the API."
            : "Ask an administrator to add apps.",
        ),
      );
      count.textContent = "";
      return;
    }
    count.textContent = q
      ? `${shown.length} of ${templates.length} apps match “${search.value.trim()}”`
      : `${templates.length} apps${unavailable ? ` (${unavailable} cannot run now)` : ""}`;
    if (!shown.length) {
      body.append(
        emptyState(
          "No apps match your search",
          "Try another word, or clear the search.",
          h(
            "button",
            {
              type: "button",
              class: "btn",
              onclick: () => {
                search.value = "";
                render();
                search.focus();
              },
            },
            "Clear search",
          ),
        ),
      );
      return;
    }
    const byCategory = new Map();
    for (const t of shown) {
      if (!byCategory.has(t.category)) byCategory.set(t.category, []);
      byCategory.get(t.category).push(t);
    }
    for (const [category, items] of [...byCategory.entries()].sort((a, b) => a[0].localeCompare(b[0]))) {
      const id = `cat-${category.toLowerCase().replace(/[^a-z0-9]+/g, "-")}`;
      body.append(
        h(
          "section",
          { class: "category", "aria-labelledby": id },
          h("h2", { id }, category),
          h("ul", { class: "cards", role: "list" }, items.map(card)),
        ),
      );
    }
  }

  function card(t) {
    const res = t.spec?.resources || {};
    const off = t.available === false;
    const reasonId = `why-${t.name}`;
    const launch = h(
      "button",
      {
        type: "button",
        class: "btn btn-primary",
        disabled: off,
        title: off ? `Cannot run now: ${t.unavailable_reason}` : null,
        "aria-describedby": off ? reasonId : null,
        dataset: { testid: `launch-${t.name}` },
        "aria-label": `Launch ${t.display_name}`,
        onclick: () =>
          busy(launch, async () => {
            launch.textContent = "Launching…";
            try {
              const s = await post(
                "/api/v1/sessions",
                { template: t.name },
                { headers: { "Idempotency-Key": newIdempotencyKey() } },
              );
              ctx.navigate(`#/sessions?highlight=${encodeURIComponent(s.id)}`);
            } finally {
              launch.textContent = "Launch";
            }
          }),
      },
      "Launch",
    );
    return h(
      "li",
      {
        class: off ? "card card-unavailable" : "card",
        dataset: { testid: `template-${t.name}`, available: String(!off) },
      },
      h(
        "div",
        { class: "card-head" },
        appIcon(t, 48),
        h("div", {}, h("h3", {}, t.display_name), h("p", { class: "muted small" }, t.name)),
      ),
      h("p", { class: "card-desc" }, t.description || "No description."),
      off
        ? h(
            "p",
            { id: reasonId, class: "card-reason small", dataset: { testid: `unavailable-${t.name}` } },
            `Cannot run now: ${t.unavailable_reason}`,
          )
        : null,
      t.allowed_groups?.length
        ? h(
            "p",
            { class: "muted small", dataset: { testid: `allowed-${t.name}` } },
            `Only for members of: ${t.allowed_groups.join(", ")}`,
          )
        : null,
      h(
        "div",
        { class: "card-foot" },
        h(
          "div",
          { class: "chips" },
          (t.tags || []).map((tag) => h("span", { class: "chip" }, tag)),
          res.cpu_millis ? h("span", { class: "chip chip-muted", title: "Resources per session" }, `${cpu(res.cpu_millis)} · ${mem(res.memory_mb)}`) : null,
        ),
        launch,
      ),
    );
  }

  search.addEventListener("input", () => {
    render();
    const u = new URLSearchParams();
    if (search.value.trim()) u.set("q", search.value.trim());
    history.replaceState(null, "", `#/catalog${u.toString() ? `?${u}` : ""}`);
  });
  render();
}
