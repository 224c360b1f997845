// A real OpenID Provider for the tests: panva's `oidc-provider` (OpenID-certified), configured
// from the environment by tests/streamspace_testing/oidc.py.
//   OIDC_PROVIDER_MODULE  path of the installed package's lib/index.js (scripts/oidc-provider.sh)
//   OIDC_PORT             port on 127.0.0.1; the issuer is http://127.0.0.1:<port>
//   OIDC_JWKS             path of a JSON Web Key Set with private keys; the first key signs
//   OIDC_CLIENTS          JSON list of clients (client_id, client_secret, redirect_uris, ...)
//   OIDC_ACCOUNTS         JSON object: account id -> {name, email, groups}
//   OIDC_ID_TOKEN_TTL     seconds an ID token is valid (default 3600)
//   OIDC_CLOCK_BEHIND     seconds the provider's clock runs behind (default 0): its tokens
//                         are then issued, and expire, that much in the past
// The login page is the package's own development interaction (any password): the accounts
// it accepts are only the ones listed, and consent is granted without a page.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const behind = Number(process.env.OIDC_CLOCK_BEHIND || 0) * 1000;
if (behind) {
  const realNow = Date.now;
  Date.now = () => realNow() - behind;
}

const { default: Provider } = await import(pathToFileURL(process.env.OIDC_PROVIDER_MODULE).href);
const port = Number(process.env.OIDC_PORT);
const accounts = JSON.parse(process.env.OIDC_ACCOUNTS);
const jwks = JSON.parse(readFileSync(process.env.OIDC_JWKS, "utf8"));

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: JSON.parse(process.env.OIDC_CLIENTS),
  jwks,
  cookies: { keys: ["streamspace-test-cookie-key"] },
  scopes: ["openid", "profile", "email", "groups"],
  claims: {
    openid: ["sub"],
    profile: ["name", "preferred_username"],
    email: ["email", "email_verified"],
    groups: ["groups"],
  },
  conformIdTokenClaims: false,
  features: {
    devInteractions: { enabled: true },
    rpInitiatedLogout: { enabled: true },
  },
  pkce: { required: () => true },
  ttl: { IdToken: Number(process.env.OIDC_ID_TOKEN_TTL || 3600) },
  async findAccount(ctx, id) {
    const account = accounts[id];
    if (!account) return undefined;
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          preferred_username: id,
          name: account.name,
          email: account.email,
          email_verified: true,
          groups: account.groups,
        };
      },
    };
  },
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope("openid profile email groups");
    grant.addOIDCClaims(["name", "preferred_username", "email", "email_verified", "groups"]);
    await grant.save();
    return grant;
  },
});
provider.on("server_error", (ctx, err) => console.error("server_error", err));
provider.on("end_session.error", (ctx, err) => console.error("end_session.error", err, err.cause));
provider.listen(port, "127.0.0.1", () => console.log(`listening ${port}`));
