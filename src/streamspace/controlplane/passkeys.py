"""WebAuthn passkeys (py_webauthn): the options a browser needs and the checks of what it
answers. The relying party is the host users open: `STREAMSPACE_PUBLIC_URL`'s, else the
request's own (`Host`), so a credential made on one name is refused on another."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url
from webauthn.helpers.exceptions import InvalidAuthenticationResponse, InvalidRegistrationResponse
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

CHALLENGE_SECONDS = 300


class PasskeyRefused(Exception):
    """The browser's answer does not prove what it must; the message says why."""


@dataclass(frozen=True)
class RelyingParty:
    id: str
    origin: str
    name: str


def relying_party(public_url: str, scheme: str, host_header: str, name: str) -> RelyingParty:
    if public_url:
        parts = urlsplit(public_url)
        return RelyingParty(parts.hostname or "", f"{parts.scheme}://{parts.netloc}", name)
    host = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    return RelyingParty(host.strip("[]"), f"{scheme}://{host_header}", name)


def registration_options(
    rp: RelyingParty, user_id: str, username: str, display_name: str, existing: list[str]
) -> tuple[dict[str, Any], str]:
    """(publicKey options as JSON, the challenge, base64url). Discoverable credentials are
    asked for, so the same passkey also signs in without a username."""
    options = generate_registration_options(
        rp_id=rp.id,
        rp_name=rp.name,
        user_id=user_id.encode(),
        user_name=username,
        user_display_name=display_name or username,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.PREFERRED,
            user_verification=UserVerificationRequirement.PREFERRED,
        ),
        exclude_credentials=[
            PublicKeyCredentialDescriptor(id=base64url_to_bytes(c)) for c in existing
        ],
    )
    return json.loads(options_to_json(options)), bytes_to_base64url(options.challenge)


@dataclass(frozen=True)
class NewCredential:
    credential_id: str
    public_key: str
    sign_count: int


def check_registration(
    rp: RelyingParty, credential: dict[str, Any], challenge: str
) -> NewCredential:
    try:
        verified = verify_registration_response(
            credential=credential,
            expected_challenge=base64url_to_bytes(challenge),
            expected_rp_id=rp.id,
            expected_origin=rp.origin,
        )
    except (InvalidRegistrationResponse, ValueError, KeyError, TypeError) as exc:
        raise PasskeyRefused(f"the passkey could not be registered: {exc}") from None
    return NewCredential(
        bytes_to_base64url(verified.credential_id),
        bytes_to_base64url(verified.credential_public_key),
        verified.sign_count,
    )


def authentication_options(
    rp: RelyingParty, allowed: list[str] | None, *, require_verification: bool
) -> tuple[dict[str, Any], str]:
    """`allowed` None: any discoverable credential of this site (passwordless sign-in)."""
    options = generate_authentication_options(
        rp_id=rp.id,
        allow_credentials=(
            None
            if allowed is None
            else [PublicKeyCredentialDescriptor(id=base64url_to_bytes(c)) for c in allowed]
        ),
        user_verification=(
            UserVerificationRequirement.REQUIRED
            if require_verification
            else UserVerificationRequirement.PREFERRED
        ),
    )
    return json.loads(options_to_json(options)), bytes_to_base64url(options.challenge)


def credential_id_of(credential: dict[str, Any]) -> str:
    raw = credential.get("rawId") or credential.get("id")
    if not isinstance(raw, str) or not raw or len(raw) > 1024:
        raise PasskeyRefused("the answer names no credential")
    return raw


def check_assertion(
    rp: RelyingParty,
    credential: dict[str, Any],
    challenge: str,
    public_key: str,
    sign_count: int,
    *,
    require_verification: bool,
) -> int:
    """The authenticator's new signature counter, if the assertion is valid. A counter that
    does not grow (when the authenticator keeps one) means a cloned key: refused."""
    try:
        verified = verify_authentication_response(
            credential=credential,
            expected_challenge=base64url_to_bytes(challenge),
            expected_rp_id=rp.id,
            expected_origin=rp.origin,
            credential_public_key=base64url_to_bytes(public_key),
            credential_current_sign_count=sign_count,
            require_user_verification=require_verification,
        )
    except (InvalidAuthenticationResponse, ValueError, KeyError, TypeError) as exc:
        raise PasskeyRefused(f"the passkey was refused: {exc}") from None
    return int(verified.new_sign_count)
