"""A real SAML 2.0 identity provider for the SAML login tests: pysaml2's own IdP (`saml2.server`).

The product's service provider is python3-saml (OneLogin) over xmlsec; this IdP is pysaml2 over
the `xmlsec1` command, so the two sides share no SAML code. The IdP runs in a thread on a free
loopback port, with a key pair made for the run, and serves:

- `GET /metadata`: its metadata (entity id, the Redirect-binding SSO endpoint, its certificate);
- `GET /sso/redirect?SAMLRequest=…&RelayState=…`: the login form, as a real IdP shows one;
- `POST /sso/login`: checks the user's password and answers the browser with the auto-posting
  form that carries the signed Response to the SP's assertion consumer service.

It learns the SP from the SP's own metadata URL (`trust_sp`), so the product's metadata endpoint
is what the tests feed it. `response_for` makes a Response directly, with the knobs the refusal
tests need: unsigned, signed with a key the SP does not trust, another audience, expired.
"""

from __future__ import annotations

import base64
import contextlib
import html
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

XMLSEC1 = shutil.which("xmlsec1")
SAML_IDP_MISSING = (
    None if XMLSEC1 else "SAML tests need xmlsec1 for pysaml2's IdP (apt-get install -y xmlsec1)"
)


@dataclass(frozen=True)
class IdpUser:
    password: str
    email: str
    display_name: str
    groups: tuple[str, ...] = ()


USERS: dict[str, IdpUser] = {
    "erin": IdpUser("erin-idp-password", "erin@example.org", "Erin Example", ("engineers",)),
    "frank": IdpUser("frank-idp-password", "frank@example.org", "Frank Example", ("ops", "admins")),
}

ATTRIBUTES = {"uid": "uid", "email": "mail", "display_name": "displayName", "groups": "memberOf"}
"""The attribute names this IdP releases (basic name format), as the product's settings map them."""


def _key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = directory / f"{name}.key", directory / f"{name}.crt"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SamlIdp:
    workdir: Path
    users: dict[str, IdpUser] = field(default_factory=lambda: dict(USERS))
    port: int = field(default_factory=_free_port)
    sp_metadata: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.key_file, self.cert_file = _key_pair(self.workdir, "idp")
        self.rogue_key_file, self.rogue_cert_file = _key_pair(self.workdir, "rogue")
        self.server = self._server(self.key_file, self.cert_file)
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def entity_id(self) -> str:
        return f"{self.base_url}/metadata"

    @property
    def metadata_url(self) -> str:
        return f"{self.base_url}/metadata"

    @property
    def certificate_pem(self) -> str:
        return self.cert_file.read_text()

    def _config(self, key_file: Path, cert_file: Path) -> Any:
        from saml2 import BINDING_HTTP_REDIRECT
        from saml2.config import IdPConfig
        from saml2.saml import NAME_FORMAT_BASIC, NAMEID_FORMAT_PERSISTENT

        config = IdPConfig()
        config.load(
            {
                "entityid": self.entity_id,
                "xmlsec_binary": XMLSEC1,
                "key_file": str(key_file),
                "cert_file": str(cert_file),
                "metadata": {"inline": list(self.sp_metadata)},
                "service": {
                    "idp": {
                        "name": "StreamSpace test IdP",
                        "endpoints": {
                            "single_sign_on_service": [
                                (f"{self.base_url}/sso/redirect", BINDING_HTTP_REDIRECT)
                            ]
                        },
                        "name_id_format": [NAMEID_FORMAT_PERSISTENT],
                        "policy": {
                            "default": {
                                "lifetime": {"minutes": 5},
                                "attribute_restrictions": None,
                                "name_form": NAME_FORMAT_BASIC,
                            }
                        },
                        "want_authn_requests_signed": False,
                    }
                },
            }
        )
        return config

    def _server(self, key_file: Path, cert_file: Path) -> Any:
        from saml2.server import Server

        return Server(config=self._config(key_file, cert_file))

    def metadata_xml(self) -> str:
        from saml2.metadata import create_metadata_string

        return create_metadata_string(None, config=self.server.config, valid=48).decode()

    def trust_sp(self, sp_metadata_url: str) -> None:
        """Read the SP's metadata from the product, as an IdP admin registering an app does."""
        r = httpx.get(sp_metadata_url, timeout=10)
        r.raise_for_status()
        self.sp_metadata.append(r.text)
        self.server = self._server(self.key_file, self.cert_file)

    # ---- responses ------------------------------------------------------------------------

    def parse_request(self, saml_request: str) -> Any:
        from saml2 import BINDING_HTTP_REDIRECT

        return self.server.parse_authn_request(saml_request, BINDING_HTTP_REDIRECT).message

    def response_for(
        self,
        saml_request: str,
        username: str,
        *,
        sign: bool = True,
        rogue_key: bool = False,
        audience: str | None = None,
        lifetime_minutes: int = 5,
        groups: tuple[str, ...] | None = None,
    ) -> tuple[str, str]:
        """(ACS URL, base64 SAMLResponse) answering an AuthnRequest for `username`."""
        from saml2.saml import AUTHN_PASSWORD_PROTECTED
        from saml2.samlp import NameIDPolicy
        from saml2.xmldsig import DIGEST_SHA256, SIG_RSA_SHA256

        request = self.parse_request(saml_request)
        if audience is not None and not any(
            f'entityID="{audience}"' in m for m in self.sp_metadata
        ):
            # pysaml2 answers only SPs it knows: another SP, as an admin would register it.
            self.sp_metadata.append(
                self.sp_metadata[0].replace(
                    f'entityID="{request.issuer.text}"', f'entityID="{audience}"'
                )
            )
            self.server = self._server(self.key_file, self.cert_file)
        user = self.users[username]
        server = (
            self._server(self.rogue_key_file, self.rogue_cert_file) if rogue_key else self.server
        )
        policy = server.config.getattr("policy", "idp")
        policy._restrictions["default"]["lifetime"] = {"minutes": lifetime_minutes}
        identity = {
            ATTRIBUTES["uid"]: [username],
            ATTRIBUTES["email"]: [user.email],
            ATTRIBUTES["display_name"]: [user.display_name],
            ATTRIBUTES["groups"]: list(user.groups if groups is None else groups),
        }
        response = server.create_authn_response(
            identity,
            in_response_to=request.id,
            destination=request.assertion_consumer_service_url,
            sp_entity_id=audience or request.issuer.text,
            name_id_policy=NameIDPolicy(format=request.name_id_policy.format)
            if request.name_id_policy is not None and request.name_id_policy.format
            else None,
            userid=username,
            authn={"class_ref": AUTHN_PASSWORD_PROTECTED, "authn_auth": self.entity_id},
            sign_assertion=sign,
            sign_response=False,
            sign_alg=SIG_RSA_SHA256,
            digest_alg=DIGEST_SHA256,
        )
        encoded = base64.b64encode(str(response).encode()).decode()
        return request.assertion_consumer_service_url, encoded

    # ---- the HTTP side --------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def _send(self, status: int, body: str, content_type: str = "text/html") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", f"{content_type}; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/metadata":
                    self._send(200, idp.metadata_xml(), "application/samlmetadata+xml")
                elif url.path == "/sso/redirect" and "SAMLRequest" in query:
                    self._send(
                        200, idp.login_form(query["SAMLRequest"], query.get("RelayState", ""))
                    )
                else:
                    self._send(404, "not found", "text/plain")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                if urlparse(self.path).path != "/sso/login":
                    self._send(404, "not found", "text/plain")
                    return
                username = form.get("username", "")
                user = idp.users.get(username)
                if user is None or form.get("password") != user.password:
                    self._send(
                        401,
                        idp.login_form(
                            form.get("SAMLRequest", ""),
                            form.get("RelayState", ""),
                            "Wrong password",
                        ),
                    )
                    return
                acs, response = idp.response_for(form["SAMLRequest"], username)
                self._send(200, auto_post_form(acs, response, form.get("RelayState", "")))

        return Handler

    def login_form(self, saml_request: str, relay_state: str, error: str = "") -> str:
        e = html.escape
        return (
            "<!doctype html><title>Test IdP login</title><h1>Test IdP</h1>"
            + (f'<p id="error">{e(error)}</p>' if error else "")
            + '<form method="post" action="/sso/login">'
            f'<input type="hidden" name="SAMLRequest" value="{e(saml_request)}">'
            f'<input type="hidden" name="RelayState" value="{e(relay_state)}">'
            '<label>Username <input name="username" id="idp-username"></label>'
            '<label>Password <input name="password" type="password" id="idp-password"></label>'
            '<button type="submit" id="idp-submit">Sign in</button></form>'
        )

    def start(self) -> SamlIdp:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


def auto_post_form(acs: str, saml_response: str, relay_state: str) -> str:
    e = html.escape
    return (
        "<!doctype html><title>Signing in…</title>"
        f'<form method="post" action="{e(acs)}" id="saml-post">'
        f'<input type="hidden" name="SAMLResponse" value="{e(saml_response)}">'
        f'<input type="hidden" name="RelayState" value="{e(relay_state)}">'
        "<noscript><button type=submit>Continue</button></noscript></form>"
        "<script>document.getElementById('saml-post').submit()</script>"
    )


@contextlib.contextmanager
def running_saml_idp(workdir: Path) -> Iterator[SamlIdp]:
    idp = SamlIdp(workdir).start()
    try:
        yield idp
    finally:
        idp.stop()
