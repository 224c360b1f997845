import { login } from "../api.js";
import { h } from "../ui.js";

export function loginView(main, { params }) {
  const error = h("p", {
    class: "form-error",
    role: "alert",
    dataset: { testid: "login-error" },
    hidden: true,
  });
  const username = h("input", {
    id: "login-username",
    name: "username",
    type: "text",
    autocomplete: "username",
    autocapitalize: "none",
    spellcheck: "false",
    required: true,
    dataset: { testid: "login-username" },
  });
  const password = h("input", {
    id: "login-password",
    name: "password",
    type: "password",
    autocomplete: "current-password",
    required: true,
    dataset: { testid: "login-password" },
  });
  const submit = h(
    "button",
    { type: "submit", class: "btn btn-primary btn-block", dataset: { testid: "login-submit" } },
    "Log in",
  );
  const form = h(
    "form",
    { class: "login-form", dataset: { testid: "login-form" }, novalidate: true },
    h("label", { for: "login-username" }, "Username"),
    username,
    h("label", { for: "login-password" }, "Password"),
    password,
    error,
    submit,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    error.hidden = true;
    if (!username.value.trim() || !password.value) {
      error.textContent = "Enter your username and password.";
      error.hidden = false;
      (username.value.trim() ? password : username).focus();
      return;
    }
    submit.disabled = true;
    submit.textContent = "Logging in…";
    try {
      await login(username.value.trim(), password.value);
      const next = params.get("next");
      location.replace(next && next.startsWith("#/") && !next.startsWith("#/login") ? next : "#/catalog");
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
      password.select();
      password.focus();
    } finally {
      submit.disabled = false;
      submit.textContent = "Log in";
    }
  });
  main.append(
    h(
      "div",
      { class: "login-page" },
      h(
        "section",
        { class: "login-card", "aria-labelledby": "login-title" },
        h(
          "div",
          { class: "login-brand" },
          h("img", { src: "/static/icons/logo.svg", alt: "", width: 48, height: 48 }),
          h("h1", { id: "login-title" }, "StreamSpace"),
        ),
        h("p", { class: "muted" }, "Desktop apps in your browser. Log in to continue."),
        params.get("expired")
          ? h("p", { class: "notice", role: "status" }, "Your session expired — please log in again.")
          : null,
        form,
      ),
    ),
  );
  username.focus();
}
