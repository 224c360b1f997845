// Account security: password, second factor (TOTP) and recovery codes, passkeys, API keys
// (their own page) and the active sign-ins, each of which can be signed out.
import { auth, del, finishLogin, get, logout, passkeyAnswer, post } from "../api.js";
import { busy, clear, h, loading, recoveryCodes, timeEl, toast, totpEnrolment } from "../ui.js";
import { pageHead } from "./admin.js";

export async function securityView(main) {
  const body = h("div", { class: "panel" }, loading());
  const keysBox = h("div", { class: "panel", dataset: { testid: "passkeys" } });
  const passwordBox = h("div", { class: "panel", dataset: { testid: "password-panel" } });
  const signInsBox = h("div", { class: "panel", dataset: { testid: "sign-ins" } }, loading());
  const apiKeysBox = h("div", { class: "panel" },
    h("h2", {}, "API keys"),
    h("p", { class: "muted small" }, "Keys let scripts and the CLI use your account with limited scopes. ",
      h("a", { href: "#/account/api-keys", dataset: { testid: "security-api-keys" } }, "Manage API keys")),
  );
  main.append(
    pageHead("Security", "Your password, second factor, passkeys, API keys and where you are signed in."),
    passwordBox, body, keysBox, apiKeysBox, signInsBox,
  );

  function showPassword() {
    if (auth.user?.auth_source === "ldap") {
      passwordBox.replaceChildren(h("h2", {}, "Password"), h("p", {}, "Your password is your directory's: change it there."));
      return;
    }
    const current = h("input", { id: "pw-current", type: "password", required: true, autocomplete: "current-password", dataset: { testid: "pw-current" } });
    const next = h("input", { id: "pw-new", type: "password", required: true, minlength: 12, autocomplete: "new-password", dataset: { testid: "pw-new" } });
    passwordBox.replaceChildren(
      h("h2", {}, "Password"),
      h("form", { class: "inline-form", onsubmit: (e) => {
        e.preventDefault();
        const form = e.currentTarget;
        busy(form.querySelector("button"), async () => {
          const tokens = await post("/api/v1/auth/password", { current_password: current.value, new_password: next.value });
          finishLogin(tokens);
          form.reset();
          toast("Password changed; your other sign-ins were signed out");
          await loadSignIns();
        });
      } },
        h("label", { for: "pw-current" }, "Current password"), current,
        h("label", { for: "pw-new" }, "New password (12+ characters)"), next,
        h("button", { type: "submit", class: "btn btn-small", dataset: { testid: "pw-change" } }, "Change password"),
      ),
    );
  }

  async function signedOutHere() {
    await logout();
    location.hash = "#/login";
  }

  async function loadSignIns() {
    const rows = await get("/api/v1/auth/sessions");
    const items = rows.map((s) =>
      h("li", { dataset: { testid: "sign-in-row", current: String(s.current) } },
        h("strong", {}, s.device), s.current ? h("span", { class: "badge" }, " this browser") : null,
        ` — ${s.ip || "unknown address"}, ${s.method || "sign-in"}, signed in `, timeEl(s.created_at),
        ", last used ", timeEl(s.last_used_at), " ",
        h("button", { type: "button", class: "btn btn-small btn-danger-outline", dataset: { testid: "sign-in-end" }, onclick: (e) => busy(e.currentTarget, async () => {
          await del(`/api/v1/auth/sessions/${s.id}`);
          if (s.current) return signedOutHere();
          toast(`Signed out ${s.device}`);
          await loadSignIns();
        }) }, "Sign out this one")),
    );
    signInsBox.replaceChildren(
      h("h2", {}, "Where you are signed in"),
      h("p", { class: "muted small" }, "Signing one out ends it at once. Your other sign-ins stay signed in, but a desktop open in any of them is disconnected (open it again)."),
      items.length ? h("ul", { dataset: { testid: "sign-in-list" } }, items) : h("p", {}, "No active sign-ins."),
      h("button", { type: "button", class: "btn btn-small btn-danger-outline", dataset: { testid: "sign-out-everywhere" }, onclick: (e) => busy(e.currentTarget, async () => {
        await post("/api/v1/auth/sessions/revoke-all");
        await signedOutHere();
      }) }, "Sign out everywhere"),
    );
  }

  async function loadKeys() {
    const page = await get("/api/v1/auth/mfa/webauthn");
    const name = h("input", { id: "passkey-name", maxlength: 64, placeholder: "e.g. laptop", dataset: { testid: "passkey-name" } });
    const add = h("form", { class: "inline-form", onsubmit: (e) => {
      e.preventDefault();
      busy(e.currentTarget.querySelector("button"), async () => {
        const o = await post("/api/v1/auth/mfa/webauthn/register/options", {});
        const credential = await passkeyAnswer(o.options, true);
        await post("/api/v1/auth/mfa/webauthn/register", { challenge_id: o.challenge_id, name: name.value.trim() || "passkey", credential });
        toast("Passkey added");
        await Promise.all([loadKeys(), load()]);
      });
    } },
      h("label", { for: "passkey-name" }, "Name"), name,
      h("button", { type: "submit", class: "btn btn-small", dataset: { testid: "passkey-add" } }, "Add a passkey"),
    );
    const rows = page.items.map((k) =>
      h("li", { dataset: { testid: "passkey-row" } }, `${k.name} — added `, timeEl(k.created_at), k.last_used_at ? [", last used ", timeEl(k.last_used_at)] : null, " ",
        h("button", { type: "button", class: "btn btn-small btn-danger-outline", dataset: { testid: "passkey-remove" }, onclick: (e) => busy(e.currentTarget, async () => {
          await del(`/api/v1/auth/mfa/webauthn/${k.id}`);
          toast(`Removed passkey ${k.name}`);
          await Promise.all([loadKeys(), load()]);
        }) }, "Remove")),
    );
    keysBox.replaceChildren(
      h("h2", {}, "Passkeys"),
      h("p", { class: "muted small" }, "A passkey signs you in without a password, or serves as your second factor."),
      rows.length ? h("ul", {}, rows) : h("p", {}, "No passkeys yet."),
      add,
    );
  }

  async function load() {
    const s = await get("/api/v1/auth/mfa");
    clear(body);
    if (!s.totp_enabled) {
      body.append(
        h("p", { dataset: { testid: "mfa-status" } }, s.required ? "Your account must use an authenticator app." : "No second factor is set up."),
        h("button", {
          type: "button",
          class: "btn btn-primary",
          dataset: { testid: "totp-start" },
          onclick: () => {
            clear(body);
            body.append(
              totpEnrolment(
                () => post("/api/v1/auth/mfa/totp", {}),
                (code) => post("/api/v1/auth/mfa/totp/confirm", { code }),
                () => {
                  toast("Authenticator app turned on");
                  load();
                },
              ),
            );
          },
        }, "Set up an authenticator app"),
      );
      return;
    }
    const password = h("input", { id: "mfa-off-password", type: "password", autocomplete: "current-password", dataset: { testid: "mfa-off-password" } });
    const code = h("input", { id: "mfa-regen-code", inputmode: "numeric", autocomplete: "one-time-code", maxlength: 6, dataset: { testid: "mfa-regen-code" } });
    const codesBox = h("div", {});
    body.append(
      h("p", { dataset: { testid: "mfa-status" } }, `Authenticator app on. ${s.recovery_codes_left} recovery codes left.`),
      codesBox,
      h("form", { class: "inline-form", onsubmit: (e) => {
        e.preventDefault();
        busy(e.currentTarget.querySelector("button"), async () => {
          const r = await post("/api/v1/auth/mfa/recovery-codes", { code: code.value.trim() });
          codesBox.replaceChildren(recoveryCodes(r.recovery_codes, () => load()));
        });
      } },
        h("label", { for: "mfa-regen-code" }, "New recovery codes (enter a code from the app)"), code,
        h("button", { type: "submit", class: "btn btn-small" }, "Make new codes"),
      ),
      s.required
        ? h("p", { class: "muted small" }, "Your role or group requires a second factor, so it cannot be turned off.")
        : h("form", { class: "inline-form", onsubmit: (e) => {
            e.preventDefault();
            busy(e.currentTarget.querySelector("button"), async () => {
              await post("/api/v1/auth/mfa/totp/disable", { password: password.value });
              toast("Authenticator app turned off");
              await load();
            });
          } },
            h("label", { for: "mfa-off-password" }, "Turn off (enter your password)"), password,
            h("button", { type: "submit", class: "btn btn-small btn-danger-outline", dataset: { testid: "mfa-off" } }, "Turn off"),
          ),
    );
  }
  showPassword();
  await Promise.all([load(), loadKeys(), loadSignIns()]);
}
