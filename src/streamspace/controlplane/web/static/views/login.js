import {
  adoptSignOn,
  api,
  finishLogin,
  login,
  passkeyLogin,
  problemKind,
  signOnProviders,
  verifyMfa,
  verifyMfaPasskey,
} from "../api.js";
import { h, totpEnrolment } from "../ui.js";

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
    h("button", {
      type: "button",
      class: "btn btn-block",
      dataset: { testid: "passkey-login" },
      onclick: async () => {
        error.hidden = true;
        try {
          await passkeyLogin();
          done();
        } catch (err) {
          error.textContent = err.message;
          error.hidden = false;
        }
      },
    }, "Sign in with a passkey"),
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
      done();
    } catch (err) {
      const kind = problemKind(err);
      if (kind === "mfa-required") return codeStep(err.problem.mfa_token, err.problem.methods || []);
      if (kind === "mfa-enrolment-required") return enrolStep(err.problem.mfa_token);
      error.textContent = err.message;
      error.hidden = false;
      password.select();
      password.focus();
    } finally {
      submit.disabled = false;
      submit.textContent = "Log in";
    }
  });
  function done() {
    const next = params.get("next");
    location.replace(next && next.startsWith("#/") && !next.startsWith("#/login") ? next : "#/catalog");
  }

  function codeStep(mfaToken, methods) {
    const code = h("input", { id: "mfa-code", autocomplete: "one-time-code", required: true, maxlength: 16, dataset: { testid: "mfa-code" } });
    const err = h("p", { class: "form-error", role: "alert", hidden: true, dataset: { testid: "mfa-error" } });
    const step = h(
      "form",
      { class: "login-form", dataset: { testid: "mfa-form" }, novalidate: true },
      h("label", { for: "mfa-code" }, "Code from your authenticator app (or a recovery code)"),
      code,
      err,
      h("button", { type: "submit", class: "btn btn-primary btn-block", dataset: { testid: "mfa-submit" } }, "Verify"),
      methods.includes("webauthn")
        ? h("button", {
            type: "button",
            class: "btn btn-block",
            dataset: { testid: "mfa-passkey" },
            onclick: async () => {
              err.hidden = true;
              try {
                await verifyMfaPasskey(mfaToken);
                done();
              } catch (ex) {
                err.textContent = ex.message;
                err.hidden = false;
              }
            },
          }, "Use a passkey")
        : null,
    );
    step.addEventListener("submit", async (e) => {
      e.preventDefault();
      err.hidden = true;
      try {
        await verifyMfa(mfaToken, code.value.trim());
        done();
      } catch (ex) {
        err.textContent = problemKind(ex) === "unauthorized" ? `${ex.message} — start again` : ex.message;
        err.hidden = false;
        code.select();
      }
    });
    form.replaceWith(step);
    code.focus();
  }

  function enrolStep(mfaToken) {
    const box = h(
      "div",
      { class: "login-form" },
      h("p", { class: "notice", role: "status" }, "Your account must use a second factor. Set up an authenticator app to continue."),
      totpEnrolment(
        () => api("POST", "/api/v1/auth/mfa/totp", { mfa_token: mfaToken }, { retry: false }),
        (code) => api("POST", "/api/v1/auth/mfa/totp/confirm", { mfa_token: mfaToken, code }, { retry: false }),
        (answer) => {
          finishLogin(answer.login);
          done();
        },
      ),
    );
    form.replaceWith(box);
  }

  const signOn = h("div", { class: "login-sso", dataset: { testid: "sso-buttons" }, hidden: true });
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
        signOn,
      ),
    ),
  );
  username.focus();
  showSignOn(signOn);
  if (params.get("sso")) finishSignOn();
  if (params.get("mfa_token")) {
    // Back from an identity provider that asks for a second step: the mfa_token came in this
    // fragment, which no server sees.
    const mfaToken = params.get("mfa_token");
    history.replaceState(null, "", params.get("next") ? `#/login?next=${encodeURIComponent(params.get("next"))}` : "#/login");
    if (params.get("mfa") === "mfa-enrolment-required") enrolStep(mfaToken);
    else codeStep(mfaToken, (params.get("methods") || "").split(",").filter(Boolean));
  }

  async function finishSignOn() {
    if (await adoptSignOn()) {
      done();
    } else {
      error.textContent = "The single sign-on did not complete; please try again.";
      error.hidden = false;
    }
  }
}

// "Sign in with …": plain links, since the identity provider's pages are a full navigation.
async function showSignOn(box) {
  const providers = await signOnProviders();
  for (const p of providers) {
    box.append(
      h("a", { class: "btn btn-block", href: p.login_url, dataset: { testid: `sso-${p.id}` } }, `Sign in with ${p.name}`),
    );
  }
  box.hidden = providers.length === 0;
}
