"""A real OpenLDAP `slapd` for the directory login tests, with a seeded directory and TLS.

Each `running_slapd()` builds its own cn=config with `slapadd` in a temporary directory (mdb
backend, suffix dc=example,dc=org), seeds people and groups, and runs `slapd` as the current
user on two free loopback ports: plain LDAP (which offers StartTLS) and LDAPS. The server
certificate is signed by a CA made for the run, so the tests verify TLS for real; `other_ca`
is a second CA that signed nothing, to prove a wrong CA is refused.

Only the service account (and the root DN) may read the directory: an anonymous search finds
nothing, so a login that works shows that the product's service bind was used.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"
MODULE_PATH = Path("/usr/lib/ldap")
SCHEMA_DIR = Path("/etc/ldap/schema")
SLAPD_MISSING = (
    None
    if Path(SLAPD).exists() and Path(SLAPADD).exists() and (MODULE_PATH / "back_mdb.so").exists()
    else "LDAP tests need OpenLDAP's slapd (apt-get install -y slapd ldap-utils)"
)

BASE_DN = "dc=example,dc=org"
ROOT_DN = f"cn=admin,{BASE_DN}"
ROOT_PASSWORD = "root-secret-pw"
SERVICE_DN = f"cn=streamspace,ou=services,{BASE_DN}"
SERVICE_PASSWORD = "service-bind-secret-7Q"
PEOPLE_DN = f"ou=people,{BASE_DN}"
GROUPS_DN = f"ou=groups,{BASE_DN}"
PASSWORDS = {
    "alice": "alice-directory-pw",
    "bob": "bob-directory-pw",
    "carol": "carol-directory-pw",
    "dave": "dave-directory-pw",
}
"""dave is marked `employeeType: disabled`: a filter that excludes such entries refuses him."""
GROUPS = {
    "engineers": ["alice", "bob", "carol"],
    "admins": ["alice"],
    "designers": ["bob", "carol"],
}
READY_TIMEOUT = 20.0


def user_dn(uid: str) -> str:
    return f"uid={uid},{PEOPLE_DN}"


def group_dn(name: str) -> str:
    return f"cn={name},{GROUPS_DN}"


def _ssha(password: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ca(directory: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def _server_cert(
    directory: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path = directory / "server.pem"
    key_path = directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem_key(key))
    key_path.chmod(0o600)
    return cert_path, key_path


def _config_ldif(root: Path, cert: Path, key: Path, ca: Path) -> str:
    schemas = "".join(
        f"include: file://{SCHEMA_DIR / name}.ldif\n"
        for name in ("core", "cosine", "nis", "inetorgperson")
    )
    return f"""dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {root}/slapd.pid
olcArgsFile: {root}/slapd.args
olcTLSCACertificateFile: {ca}
olcTLSCertificateFile: {cert}
olcTLSCertificateKeyFile: {key}

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: {MODULE_PATH}
olcModuleLoad: back_mdb

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{schemas}
dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcSuffix: {BASE_DN}
olcRootDN: {ROOT_DN}
olcRootPW: {ROOT_PASSWORD}
olcDbDirectory: {root}/data
olcDbMaxSize: 67108864
olcAccess: {{0}}to attrs=userPassword by self =xw by anonymous auth by * none
olcAccess: {{1}}to * by dn.exact="{SERVICE_DN}" read by self read by * none
"""


def _data_ldif() -> str:
    entries = [
        f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\n"
        "o: Example\n",
        f"dn: {PEOPLE_DN}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: {GROUPS_DN}\nobjectClass: organizationalUnit\nou: groups\n",
        f"dn: ou=services,{BASE_DN}\nobjectClass: organizationalUnit\nou: services\n",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: streamspace\nuserPassword: {_ssha(SERVICE_PASSWORD)}\n",
    ]
    for uid, password in PASSWORDS.items():
        entry = (
            f"dn: {user_dn(uid)}\nobjectClass: inetOrgPerson\nuid: {uid}\n"
            f"cn: {uid.title()} Example\nsn: Example\nmail: {uid}@example.org\n"
            f"userPassword: {_ssha(password)}\n"
        )
        if uid == "dave":
            entry += "employeeType: disabled\n"
        entries.append(entry)
    for name, members in GROUPS.items():
        lines = "".join(f"member: {user_dn(m)}\n" for m in members)
        entries.append(f"dn: {group_dn(name)}\nobjectClass: groupOfNames\ncn: {name}\n{lines}")
    return "\n".join(entries)


@dataclass
class Slapd:
    """A running slapd and what a test needs to point StreamSpace at it."""

    root: Path
    port: int
    ldaps_port: int
    ca_path: Path
    other_ca_path: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"ldap://localhost:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://localhost:{self.ldaps_port}"

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """`Settings` keyword arguments that point StreamSpace at this directory (StartTLS)."""
        values: dict[str, Any] = {
            "ldap_url": self.url,
            "ldap_start_tls": True,
            "ldap_ca_file": self.ca_path,
            "ldap_bind_dn": SERVICE_DN,
            "ldap_bind_password": SERVICE_PASSWORD,
            "ldap_user_base_dn": PEOPLE_DN,
            "ldap_group_base_dn": GROUPS_DN,
            "ldap_admin_group": "admins",
            "ldap_operator_group": "operators",
            "ldap_timeout_seconds": 3.0,
        }
        values.update(overrides)
        return values

    def start(self) -> Slapd:
        """Start (or start again, with the same data) and wait until it answers."""
        self._log = (self.root / "slapd.log").open("ab")
        self._proc = subprocess.Popen(
            [
                SLAPD,
                "-F",
                str(self.root / "slapd.d"),
                "-h",
                f"ldap://127.0.0.1:{self.port}/ ldaps://127.0.0.1:{self.ldaps_port}/",
                "-d",
                "0",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"slapd exited ({self._proc.returncode}): {self.log()}")
            if self._answers():
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"slapd did not answer within {READY_TIMEOUT} s: {self.log()}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        import ldap3

        try:
            with ldap3.Connection(
                ldap3.Server(f"ldap://127.0.0.1:{self.port}", connect_timeout=1),
                ROOT_DN,
                ROOT_PASSWORD,
                auto_bind=True,
                receive_timeout=2,
            ):
                return True
        except ldap3.core.exceptions.LDAPException:
            return False

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        path = self.root / "slapd.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    @contextlib.contextmanager
    def admin(self) -> Iterator[Any]:
        """An ldap3 connection as the root DN, to change the directory during a test."""
        import ldap3

        conn = ldap3.Connection(
            ldap3.Server(f"ldap://127.0.0.1:{self.port}", connect_timeout=2),
            ROOT_DN,
            ROOT_PASSWORD,
            auto_bind=True,
            receive_timeout=5,
            raise_exceptions=True,
        )
        try:
            yield conn
        finally:
            conn.unbind()

    def remove_member(self, group: str, uid: str) -> None:
        import ldap3

        with self.admin() as conn:
            conn.modify(group_dn(group), {"member": [(ldap3.MODIFY_DELETE, [user_dn(uid)])]})

    def add_member(self, group: str, uid: str) -> None:
        import ldap3

        with self.admin() as conn:
            conn.modify(group_dn(group), {"member": [(ldap3.MODIFY_ADD, [user_dn(uid)])]})

    def add_group(self, name: str, *members: str) -> None:
        with self.admin() as conn:
            conn.add(
                group_dn(name),
                ["groupOfNames"],
                {"cn": name, "member": [user_dn(m) for m in members]},
            )

    def delete_user(self, uid: str) -> None:
        """Remove the person and their memberships, as a directory admin would."""
        import ldap3

        with self.admin() as conn:
            for name, members in GROUPS.items():
                if uid in members:
                    conn.modify(group_dn(name), {"member": [(ldap3.MODIFY_DELETE, [user_dn(uid)])]})
            conn.delete(user_dn(uid))

    def set_attribute(self, uid: str, attribute: str, value: str) -> None:
        import ldap3

        with self.admin() as conn:
            conn.modify(user_dn(uid), {attribute: [(ldap3.MODIFY_REPLACE, [value])]})


def _slapadd(root: Path, args: list[str], ldif: str) -> None:
    path = root / f"{args[-1].replace('=', '_').replace(',', '_')}.ldif"
    path.write_text(ldif)
    done = subprocess.run(
        [SLAPADD, "-F", str(root / "slapd.d"), *args, "-l", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"slapadd {args} failed: {done.stderr[-2000:]}")


@contextlib.contextmanager
def running_slapd() -> Iterator[Slapd]:
    """A seeded slapd for one test; its directory is removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="ss-slapd-"))
    try:
        (root / "slapd.d").mkdir()
        (root / "data").mkdir()
        ca_key, ca_cert, ca_path = _ca(root, "test-ca")
        _, _, other_ca = _ca(root, "other-ca")
        cert, key = _server_cert(root, ca_key, ca_cert)
        _slapadd(root, ["-n", "0"], _config_ldif(root, cert, key, ca_path))
        _slapadd(root, ["-b", BASE_DN], _data_ldif())
        server = Slapd(
            root=root,
            port=_free_port(),
            ldaps_port=_free_port(),
            ca_path=ca_path,
            other_ca_path=other_ca,
        )
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
