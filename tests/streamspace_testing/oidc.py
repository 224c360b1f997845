"""A real OpenID Provider for the OIDC login tests: npm `oidc-provider` (OpenID-certified),
installed by scripts/oidc-provider.sh and run with Node on a loopback port with the small
configuration in `oidc_provider/server.mjs`: static accounts with a `groups` claim, the clients
the test registers, and signing keys the test chooses (so it can rotate them by restarting).

`sign_in` plays the browser at the provider for tests that do not need Chromium: it follows
the authorization request through the provider's login page and returns the redirect back to
the relying party (not followed), with the provider's cookies kept in the given client.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "oidc-provider.sh"
SERVER = Path(__file__).resolve().parent / "oidc_provider" / "server.mjs"
MISSING = (
    None
    if shutil.which("node") and shutil.which("npm")
    else "OIDC tests need Node.js and npm (apt-get install -y nodejs npm)"
)

ACCOUNTS = {
    "olivia": {
        "name": "Olivia Example",
        "email": "olivia@example.com",
        "groups": ["sso-admins", "engineering"],
    },
    "oscar": {"name": "Oscar Example", "email": "oscar@example.com", "groups": ["design"]},
    "mallory": {"name": "Mallory", "email": "mallory@elsewhere.test", "groups": []},
    "admin": {"name": "Not the admin", "email": "admin@example.com", "groups": []},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_key(kid: str) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
    jwk.pop("key_ops", None)  # PyJWT marks a private key sign-only; the provider verifies too
    jwk.update(kid=kid, use="sig", alg="RS256")
    return key, jwk


def module_path() -> str:
    out = subprocess.run(["bash", str(SCRIPT)], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


@dataclass
class Client:
    client_id: str
    client_secret: str
    redirect_uris: list[str]

    def registration(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "redirect_uris": self.redirect_uris,
            "post_logout_redirect_uris": [u.split("/api/")[0] + "/" for u in self.redirect_uris],
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "client_secret_basic",
        }


@dataclass
class OpenIdProviderServer:
    port: int = field(default_factory=free_port)
    clients: list[Client] = field(default_factory=list)
    id_token_ttl: int = 3600
    clock_behind: int = 0
    keys: list[dict[str, Any]] = field(default_factory=list)
    _proc: subprocess.Popen[bytes] | None = None
    _dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ss-oidc-")))

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def provider_settings(self, client: Client, **extra: Any) -> dict[str, Any]:
        return {
            "id": "testop",
            "name": "Test Provider",
            "issuer": self.issuer,
            "client_id": client.client_id,
            "client_secret": client.client_secret,
            "scopes": ["openid", "profile", "email", "groups"],
            **extra,
        }

    def start(self) -> OpenIdProviderServer:
        if not self.keys:
            self.keys = [new_key("key-1")[1]]
        jwks = self._dir / "jwks.json"
        jwks.write_text(json.dumps({"keys": self.keys}))
        env = {
            **os.environ,
            "OIDC_PROVIDER_MODULE": module_path(),
            "OIDC_PORT": str(self.port),
            "OIDC_JWKS": str(jwks),
            "OIDC_CLIENTS": json.dumps([c.registration() for c in self.clients]),
            "OIDC_ACCOUNTS": json.dumps(ACCOUNTS),
            "OIDC_ID_TOKEN_TTL": str(self.id_token_ttl),
            "OIDC_CLOCK_BEHIND": str(self.clock_behind),
        }
        log = (self._dir / "provider.log").open("ab")
        self._proc = subprocess.Popen(
            ["node", str(SERVER)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"oidc-provider exited: {self.log()}")
            try:
                r = httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=2)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"oidc-provider did not start: {self.log()}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None

    def restart(self, keys: list[dict[str, Any]]) -> None:
        self.stop()
        self.keys = keys
        self.start()

    def log(self) -> str:
        path = self._dir / "provider.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def sign_in(browser: httpx.Client, start: httpx.Response, username: str) -> str:
    """From the relying party's redirect to the provider (`start`), through the provider's
    login page as `username`, to the URL the provider sends the browser back to."""
    location = start.headers["location"]
    for _ in range(12):
        r = browser.get(location)
        if r.status_code in (302, 303):
            location = urljoin(location, r.headers["location"])
            if not location.startswith(str(browser.base_url).rstrip("/")):
                return location
            continue
        assert r.status_code == 200, re.sub(r"<style>.*?</style>", "", r.text, flags=re.S)[:1500]
        action = re.search(r'<form[^>]*action="([^"]+)"', r.text)
        assert action is not None, r.text[:500]
        prompt = re.search(r'name="prompt" value="([^"]+)"', r.text)
        form = {
            "prompt": prompt.group(1) if prompt else "login",
            "login": username,
            "password": "any",
        }
        r = browser.post(urljoin(location, action.group(1)), data=form)
        assert r.status_code in (302, 303), r.text[:500]
        location = urljoin(location, r.headers["location"])
        if not location.startswith(str(browser.base_url).rstrip("/")):
            return location
    raise AssertionError("the provider never sent the browser back")
