// Sign-in security: the user's second factor (TOTP) and recovery codes.
import { del, get, passkeyAnswer, post } from "../api.js";
import { busy, clear, h, loading, recoveryCodes, timeEl, toast, totpEnrolment } from "../ui.js";
import { pageHead } from "./admin.js";

export async function securityView(main) {
  const body = h("div", { class: "panel" }, loading());
  const keysBox = h("div", { class: "panel", dataset: { testid: "passkeys" } });
  main.append(pageHead("Security", "A second factor keeps your account safe if your password leaks."), body, keysBox);

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
  await Promise.all([load(), loadKeys()]);
}
