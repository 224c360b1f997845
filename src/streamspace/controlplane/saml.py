"""The SAML 2.0 service provider behind "Sign in with …" (python3-saml, over xmlsec).

python3-saml does the checks a SAML response needs: the XML signature against the IdP's
certificate (an assertion must be signed: `wantAssertionsSigned`; SHA-1 is refused), the
audience (our entity id), the recipient and destination (our ACS URL), NotBefore/NotOnOrAfter
(with its bounded clock drift) and InResponseTo (the AuthnRequest this browser began). What it
does not do is remember assertions: the caller keeps each assertion id until it expires, so a
replayed response is refused (`api/auth_saml.py`, table `saml_logins`).

The IdP's metadata is read over HTTP and kept for `METADATA_TTL`, so a rotated IdP key is
picked up without a restart; a response that fails its signature check reads it again once.
python3-saml and xmlsec are synchronous and CPU-bound, so each call runs in a worker thread.

The URLs python3-saml compares the response with are built from `public_url`, never from the
request's Host header: a response addressed to any other host is refused.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from onelogin.saml2.auth import OneLogin_Saml2_Auth
from onelogin.saml2.idp_metadata_parser import OneLogin_Saml2_IdPMetadataParser
from onelogin.saml2.settings import OneLogin_Saml2_Settings

from streamspace import logs
from streamspace.config import SamlProvider, Settings

log = logs.get_logger("streamspace.saml")

METADATA_TTL = 600.0
POST_BINDING = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"
NAME_ID_UNSPECIFIED = "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified"


class SamlUnavailable(Exception):
    """The IdP's metadata could not be read; the reason is for the log."""


class SamlRefused(Exception):
    """The response is not one this SP accepts; the reason is for the log and the audit row
    (the browser is told only that the sign-in failed)."""


@dataclass(frozen=True)
class SamlIdentity:
    username: str
    email: str
    display_name: str
    groups: tuple[str, ...]
    assertion_id: str
    not_on_or_after: float | None
    """Unix time the assertion stops being valid: how long its id must be remembered."""


def _attribute(
    attributes: dict[str, list[str]], friendly: dict[str, list[str]], name: str
) -> list[str]:
    values = attributes.get(name) or friendly.get(name)
    if values is None:
        # pysaml2, Shibboleth and ADFS often send `urn:…:uid` names with no FriendlyName.
        suffix = [v for k, v in attributes.items() if k.rsplit(":", 1)[-1] == name]
        values = suffix[0] if suffix else []
    return [str(v) for v in values]


class ServiceProvider:
    """One configured IdP, seen from this SP."""

    def __init__(self, provider: SamlProvider, public_url: str, client: httpx.AsyncClient):
        self.provider = provider
        base = public_url.rstrip("/")
        self.base = f"{base}/api/v1/auth/saml/{provider.id}"
        self.acs_url = f"{self.base}/acs"
        self.entity_id = provider.sp_entity_id or f"{self.base}/metadata"
        self._client = client
        self._idp: dict[str, Any] | None = None
        self._idp_read_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def id(self) -> str:
        return self.provider.id

    def _sp_settings(self) -> dict[str, Any]:
        return {
            "strict": True,
            "debug": False,
            "sp": {
                "entityId": self.entity_id,
                "assertionConsumerService": {"url": self.acs_url, "binding": POST_BINDING},
                "NameIDFormat": NAME_ID_UNSPECIFIED,
            },
            "security": {
                "authnRequestsSigned": False,
                "wantAssertionsSigned": True,
                "wantMessagesSigned": False,
                "wantNameId": True,
                "requestedAuthnContext": False,
                "rejectDeprecatedAlgorithm": True,
                "rejectUnsolicitedResponsesWithInResponseTo": True,
                "signatureAlgorithm": "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256",
                "digestAlgorithm": "http://www.w3.org/2001/04/xmlenc#sha256",
            },
        }

    def metadata(self) -> str:
        """This SP's metadata, for the IdP's administrator (no IdP needed to make it)."""
        settings = OneLogin_Saml2_Settings(self._sp_settings(), sp_validation_only=True)
        xml = settings.get_sp_metadata()
        return xml.decode() if isinstance(xml, bytes) else str(xml)

    async def _idp_settings(self, *, fresh: bool = False) -> dict[str, Any]:
        async with self._lock:
            stale = time.monotonic() - self._idp_read_at > METADATA_TTL
            if self._idp is None or stale or fresh:
                try:
                    r = await self._client.get(self.provider.idp_metadata_url, timeout=10)
                    r.raise_for_status()
                    parsed = await asyncio.to_thread(OneLogin_Saml2_IdPMetadataParser.parse, r.text)
                except Exception as exc:
                    raise SamlUnavailable(f"IdP metadata: {exc}") from exc
                if "idp" not in parsed:
                    raise SamlUnavailable("IdP metadata: no IDPSSODescriptor in it")
                self._idp, self._idp_read_at = parsed, time.monotonic()
            return OneLogin_Saml2_IdPMetadataParser.merge_settings(self._sp_settings(), self._idp)

    def _request_data(self, url: str, post: dict[str, str]) -> dict[str, Any]:
        parts = urlsplit(url)
        return {
            "https": "on" if parts.scheme == "https" else "off",
            "http_host": parts.netloc,
            "script_name": parts.path,
            "get_data": {},
            "post_data": post,
        }

    async def begin(self, relay_state: str) -> tuple[str, str]:
        """(the IdP URL to send the browser to, the AuthnRequest's ID)."""
        settings = await self._idp_settings()

        def make() -> tuple[str, str]:
            auth = OneLogin_Saml2_Auth(self._request_data(f"{self.base}/login", {}), settings)
            url = auth.login(return_to=relay_state)
            return str(url), str(auth.get_last_request_id())

        return await asyncio.to_thread(make)

    async def consume(self, saml_response: str, relay_state: str, request_id: str) -> SamlIdentity:
        """The identity a posted Response vouches for, or SamlRefused saying why not."""
        post = {"SAMLResponse": saml_response, "RelayState": relay_state}
        try:
            return await self._consume(await self._idp_settings(), post, request_id)
        except SamlRefused as exc:
            if "Signature" not in str(exc):
                raise
        # The IdP may have rotated its key since its metadata was read: read it again, once.
        return await self._consume(await self._idp_settings(fresh=True), post, request_id)

    async def _consume(
        self, settings: dict[str, Any], post: dict[str, str], request_id: str
    ) -> SamlIdentity:
        def check() -> SamlIdentity:
            auth = OneLogin_Saml2_Auth(self._request_data(self.acs_url, post), settings)
            try:
                auth.process_response(request_id=request_id)
            except Exception as exc:
                raise SamlRefused(f"unreadable response: {exc}") from exc
            if auth.get_errors() or not auth.is_authenticated():
                raise SamlRefused(auth.get_last_error_reason() or ", ".join(auth.get_errors()))
            return self._identity(auth)

        return await asyncio.to_thread(check)

    def _identity(self, auth: OneLogin_Saml2_Auth) -> SamlIdentity:
        p = self.provider
        attributes, friendly = auth.get_attributes(), auth.get_friendlyname_attributes()
        usernames = _attribute(attributes, friendly, p.username_attribute)
        if not usernames:
            raise SamlRefused(f"the assertion has no {p.username_attribute!r} attribute")
        first = lambda name: (_attribute(attributes, friendly, name) or [""])[0]  # noqa: E731
        assertion_id = auth.get_last_assertion_id()
        if not assertion_id:
            raise SamlRefused("the assertion has no ID")
        return SamlIdentity(
            username=usernames[0],
            email=first(p.email_attribute),
            display_name=first(p.display_name_attribute),
            groups=tuple(_attribute(attributes, friendly, p.groups_attribute)),
            assertion_id=str(assertion_id),
            not_on_or_after=auth.get_last_assertion_not_on_or_after(),
        )


class SamlProviders:
    """The configured IdPs by id; one HTTP client for their metadata."""

    def __init__(self, settings: Settings) -> None:
        self._client = httpx.AsyncClient(follow_redirects=False)
        self.by_id = {
            p.id: ServiceProvider(p, settings.public_url, self._client)
            for p in settings.saml_providers
        }

    def get(self, provider_id: str) -> ServiceProvider | None:
        return self.by_id.get(provider_id)

    async def aclose(self) -> None:
        await self._client.aclose()
