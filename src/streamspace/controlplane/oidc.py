"""OpenID Connect relying party: discovery, the authorization request (code + PKCE S256), the
code exchange and the ID token check, one `OpenIdProvider` per configured provider.

The ID token is checked here, not trusted because it came over TLS from the token endpoint:
signature against the provider's published keys (`jwks_uri`; an unknown `kid` fetches the keys
again, at most once per `oidc_keys_refetch_seconds`, so a rotation is followed and a flood of forged
key ids cannot turn into a flood of fetches), only asymmetric algorithms, `iss` exactly the
configured issuer, `aud` holding the client id (and `azp` naming it when there are several),
`exp`/`iat`/`nbf` against `clock` with the configured skew, and the login's `nonce`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt

from streamspace import logs
from streamspace.config import OidcProvider, Settings

log = logs.get_logger("streamspace.oidc")

JWKS_REFETCH_SECONDS = 5.0
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class ProviderUnavailable(Exception):
    """The provider could not be asked (network, a bad answer); the reason is for the logs."""


class TokenRejected(Exception):
    """The provider's answer does not prove who the user is; the reason names the check."""


def pkce_pair() -> tuple[str, str]:
    """A code verifier and its S256 challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True)
class Metadata:
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    end_session_endpoint: str | None
    algorithms: frozenset[str]


class OpenIdProvider:
    """One provider: its metadata and keys (cached), and the calls a login makes."""

    def __init__(
        self,
        *,
        config: OidcProvider,
        http: httpx.AsyncClient,
        skew_seconds: int,
        clock: Callable[[], float] = time.time,
        refetch_seconds: float = JWKS_REFETCH_SECONDS,
    ) -> None:
        self.config = config
        self._http = http
        self._skew = skew_seconds
        self._clock = clock
        self._refetch_seconds = refetch_seconds
        self._metadata: Metadata | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._keys_fetched_at: float | None = None

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            resp = await self._http.get(url, headers={"Accept": "application/json"})
            resp.raise_for_status()
            body = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ProviderUnavailable(f"{what}: {type(exc).__name__}: {exc}"[:300]) from None
        if not isinstance(body, dict):
            raise ProviderUnavailable(f"{what}: not a JSON object")
        return body

    async def metadata(self) -> Metadata:
        if self._metadata is not None:
            return self._metadata
        url = f"{self.config.issuer}/.well-known/openid-configuration"
        doc = await self._get_json(url, "discovery")
        if str(doc.get("issuer", "")).rstrip("/") != self.config.issuer:
            raise ProviderUnavailable(
                f"discovery names issuer {doc.get('issuer')!r}, not {self.config.issuer!r}"
            )
        try:
            algs = doc.get("id_token_signing_alg_values_supported") or ["RS256"]
            self._metadata = Metadata(
                authorization_endpoint=str(doc["authorization_endpoint"]),
                token_endpoint=str(doc["token_endpoint"]),
                jwks_uri=str(doc["jwks_uri"]),
                userinfo_endpoint=doc.get("userinfo_endpoint"),
                end_session_endpoint=doc.get("end_session_endpoint"),
                algorithms=frozenset(str(a) for a in algs) & ASYMMETRIC,
            )
        except KeyError as exc:
            raise ProviderUnavailable(f"discovery lacks {exc}") from None
        return self._metadata

    def redirect_uri(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/api/v1/auth/oidc/{self.config.id}/callback"

    async def authorization_url(
        self, *, redirect_uri: str, state: str, nonce: str, challenge: str
    ) -> str:
        meta = await self.metadata()
        scopes = ["openid", *(s for s in self.config.scopes if s != "openid")]
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.config.client_id,
                "redirect_uri": redirect_uri,
                "scope": " ".join(scopes),
                "state": state,
                "nonce": nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        sep = "&" if "?" in meta.authorization_endpoint else "?"
        return f"{meta.authorization_endpoint}{sep}{query}"

    async def exchange(self, *, code: str, verifier: str, redirect_uri: str) -> dict[str, Any]:
        """The token endpoint's answer for `code`; TokenRejected when the provider refuses
        it (a used, expired or foreign code)."""
        meta = await self.metadata()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        auth: httpx.Auth = httpx.BasicAuth(self.config.client_id, self.config.client_secret)
        if not self.config.client_secret:
            auth = _NoAuth()
            form["client_id"] = self.config.client_id
        try:
            resp = await self._http.post(meta.token_endpoint, data=form, auth=auth)
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"token: {type(exc).__name__}: {exc}"[:300]) from None
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code >= 500 or not isinstance(body, dict):
            raise ProviderUnavailable(f"token: HTTP {resp.status_code}")
        if resp.status_code != 200:
            raise TokenRejected(f"the provider refused the code: {body.get('error', 'error')}")
        if not isinstance(body.get("id_token"), str):
            raise TokenRejected("the provider's answer has no id_token")
        return body

    async def userinfo(self, access_token: str) -> dict[str, Any]:
        meta = await self.metadata()
        if not meta.userinfo_endpoint:
            return {}
        try:
            resp = await self._http.get(
                meta.userinfo_endpoint, headers={"Authorization": f"Bearer {access_token}"}
            )
            resp.raise_for_status()
            body = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ProviderUnavailable(f"userinfo: {type(exc).__name__}: {exc}"[:300]) from None
        return body if isinstance(body, dict) else {}

    async def _key(self, kid: str | None) -> jwt.PyJWK:
        key = self._pick(kid)
        if key is not None:
            return key
        now = time.monotonic()
        if self._keys_fetched_at is None or now - self._keys_fetched_at >= self._refetch_seconds:
            self._keys_fetched_at = now
            meta = await self.metadata()
            doc = await self._get_json(meta.jwks_uri, "jwks")
            keys: dict[str, jwt.PyJWK] = {}
            for index, item in enumerate(doc.get("keys") or []):
                if not isinstance(item, dict) or item.get("use", "sig") != "sig":
                    continue
                try:
                    keys[str(item.get("kid", f"#{index}"))] = jwt.PyJWK(item)
                except jwt.PyJWTError:
                    continue
            self._keys = keys
            log.event("oidc_keys_fetched", provider=self.config.id, keys=sorted(keys))
            key = self._pick(kid)
            if key is not None:
                return key
        raise TokenRejected(f"the ID token is signed with an unknown key id {kid!r}")

    def _pick(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is not None:
            return self._keys.get(kid)
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    async def verify_id_token(self, token: str, *, nonce: str) -> dict[str, Any]:
        """The ID token's claims, once every check in the module docstring passed."""
        meta = await self.metadata()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"the ID token is malformed: {exc}") from None
        alg = str(header.get("alg", ""))
        if alg not in meta.algorithms:
            raise TokenRejected(f"the ID token's algorithm {alg!r} is not accepted")
        kid = header.get("kid")
        key = await self._key(str(kid) if kid is not None else None)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"the ID token's signature does not verify: {exc}") from None
        self._check_claims(claims, nonce)
        return claims

    def _check_claims(self, claims: dict[str, Any], nonce: str) -> None:
        cfg = self.config
        if claims.get("iss") != cfg.issuer:
            raise TokenRejected(f"the ID token's issuer is {claims.get('iss')!r}")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if cfg.client_id not in audiences:
            raise TokenRejected(f"the ID token is for another client (aud {aud!r})")
        if len(audiences) > 1 and claims.get("azp") != cfg.client_id:
            raise TokenRejected("the ID token names several audiences and another azp")
        now = self._clock()
        exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
        if not isinstance(exp, int | float) or now > exp + self._skew:
            raise TokenRejected("the ID token has expired")
        if not isinstance(iat, int | float) or iat > now + self._skew:
            raise TokenRejected("the ID token was issued in the future")
        if isinstance(nbf, int | float) and nbf > now + self._skew:
            raise TokenRejected("the ID token is not valid yet")
        got = claims.get("nonce")
        if not isinstance(got, str) or not same(got, nonce):
            raise TokenRejected("the ID token's nonce is not this login's")
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise TokenRejected("the ID token has no subject")

    async def end_session_url(self, *, id_token: str, post_logout_redirect_uri: str) -> str | None:
        meta = await self.metadata()
        if not meta.end_session_endpoint:
            return None
        query = urlencode(
            {
                "id_token_hint": id_token,
                "post_logout_redirect_uri": post_logout_redirect_uri,
                "client_id": self.config.client_id,
            }
        )
        sep = "&" if "?" in meta.end_session_endpoint else "?"
        return f"{meta.end_session_endpoint}{sep}{query}"


class _NoAuth(httpx.Auth):
    """A public client: no client authentication, its `client_id` is in the form."""


class OpenIdProviders:
    """The configured providers by id, sharing one HTTP client."""

    def __init__(self, *, settings: Settings, http: httpx.AsyncClient) -> None:
        self.http = http
        self.by_id = {
            p.id: OpenIdProvider(
                config=p,
                http=http,
                skew_seconds=settings.oidc_clock_skew_seconds,
                refetch_seconds=settings.oidc_keys_refetch_seconds,
            )
            for p in settings.oidc_providers
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenIdProviders:
        http = httpx.AsyncClient(timeout=settings.oidc_timeout_seconds, follow_redirects=False)
        return cls(settings=settings, http=http)

    async def close(self) -> None:
        await self.http.aclose()


def claim_text(claims: dict[str, Any], name: str) -> str:
    value = claims.get(name)
    return value if isinstance(value, str) else ""


def claim_list(claims: dict[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name)
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.startswith("[") else [value]
        except ValueError:
            value = [value]
    if not isinstance(value, list):
        return ()
    return tuple(str(v) for v in value if isinstance(v, str | int))
