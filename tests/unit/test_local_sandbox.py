"""The local backend's launch chain as data: what each sandbox stage is told to do."""

from __future__ import annotations

import pytest

from streamspace.agent.backends.local.identity import parse_uid_range
from streamspace.agent.backends.local.sandbox import (
    SANDBOX_HOME,
    SANDBOX_RUN,
    SESSION_ENV_MARKER,
    HostDir,
    SandboxFds,
    account_name,
    cgroup_join_argv,
    group_text,
    passwd_text,
    root_stage_env,
    session_env,
    setpriv_argv,
    tini_argv,
    uid_sandbox_argv,
    userns_sandbox_argv,
)

FDS = SandboxFds(home=11, run=12, init=13, passwd=14, group=15, info=16)
SYSTEM = [HostDir("/usr"), HostDir("/etc"), HostDir("/bin", symlink_to="usr/bin")]
ENV = {"HOME": SANDBOX_HOME, "DISPLAY": ":1", SESSION_ENV_MARKER: "s-1", "GCONV_PATH": "/tmp/x"}


def _after(argv: list[str], flag: str) -> list[str]:
    """Every value that follows `flag` in argv."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def _stages(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Split the uid sandbox chain into outer bwrap, setpriv and inner bwrap."""
    first = argv.index("--")
    setpriv_end = argv.index("--", first + 1)
    return argv[: first + 1], argv[first + 1 : setpriv_end + 1], argv[setpriv_end + 1 :]


def test_uid_sandbox_outer_stage_keeps_only_what_setpriv_needs() -> None:
    outer, setpriv, inner = _stages(
        uid_sandbox_argv(
            "/usr/bin/bwrap", "/usr/bin/setpriv", 200007, 200007, FDS, SYSTEM, ENV, network=False
        )
    )
    assert outer[0] == "/usr/bin/bwrap"
    assert _after(outer, "--cap-drop") == ["ALL"]
    assert sorted(_after(outer, "--cap-add")) == ["CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID"]
    assert "--unshare-user" not in outer  # a root-created user namespace would map to root
    assert "--setenv" not in outer  # the session's environment is given inside only
    assert setpriv == [
        "/usr/bin/setpriv",
        "--reuid=200007",
        "--regid=200007",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]
    assert inner[0] == "/usr/bin/bwrap"
    for flag in ("--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-ipc"):
        assert flag in inner
    assert "--unshare-net" in inner
    assert _after(inner, "--cap-drop") == ["ALL"]
    assert "--cap-add" not in inner
    assert "--as-pid-1" in inner
    assert _after(inner, "--info-fd") == [str(FDS.info)]


def test_the_filesystem_view_binds_only_the_sessions_own_dirs_writable() -> None:
    outer, _, _ = _stages(
        uid_sandbox_argv("bwrap", "setpriv", 200007, 200007, FDS, SYSTEM, ENV, network=True)
    )
    binds = [(outer[i + 1], outer[i + 2]) for i, a in enumerate(outer) if a == "--bind-fd"]
    assert binds == [(str(FDS.home), SANDBOX_HOME), (str(FDS.run), SANDBOX_RUN)]
    # Host directories appear read-only, never writable; /proc is the only plain --bind, and
    # the inner stage mounts its own over it.
    assert _after(outer, "--ro-bind") == ["/usr", "/etc"]
    assert _after(outer, "--bind") == ["/proc"]
    assert outer[outer.index("--symlink") : outer.index("--symlink") + 3] == [
        "--symlink",
        "usr/bin",
        "/bin",
    ]
    data = [(outer[i + 1], outer[i + 2]) for i, a in enumerate(outer) if a == "--ro-bind-data"]
    assert data == [
        (str(FDS.passwd), "/etc/passwd"),
        (str(FDS.group), "/etc/group"),
        (str(FDS.init), "/run/streamspace-init"),
    ]
    assert "--tmpfs" in outer and "/tmp" in _after(outer, "--tmpfs")


def test_network_is_only_for_templates_that_ask() -> None:
    with_net = userns_sandbox_argv("bwrap", FDS, SYSTEM, ENV, network=True)
    without = userns_sandbox_argv("bwrap", FDS, SYSTEM, ENV, network=False)
    assert "--unshare-net" not in with_net
    assert "--unshare-net" in without


def test_userns_sandbox_is_one_unprivileged_stage() -> None:
    argv = userns_sandbox_argv("bwrap", FDS, SYSTEM, ENV, network=False)
    assert argv.count("bwrap") == 1 and "setpriv" not in argv
    assert "--disable-userns" in argv and _after(argv, "--cap-drop") == ["ALL"]
    assert _after(argv, "--proc") == ["/proc"]  # its own PID namespace's /proc
    assert argv[-1] == "--"


def test_tini_is_pid_1_or_a_subreaper() -> None:
    assert tini_argv(
        "/usr/bin/tini", "/run/streamspace-init", ["xterm", "-fa", "Mono"], subreaper=False
    ) == [
        "/usr/bin/tini",
        "--",
        "/bin/sh",
        "/run/streamspace-init",
        "xterm",
        "-fa",
        "Mono",
    ]
    assert tini_argv("tini", "init.sh", ["xterm"], subreaper=True)[:2] == ["tini", "-s"]


def test_cgroups_are_joined_before_anything_else_runs() -> None:
    argv = cgroup_join_argv(
        ["/sys/fs/cgroup/memory/x/cgroup.procs", "/sys/fs/cgroup/cpu/x/cgroup.procs"]
    )
    assert argv[:2] == ["/bin/sh", "-c"]
    assert 'echo $$ > "$1" || exit 126' in argv[2]
    assert argv[-3:] == [
        "/sys/fs/cgroup/memory/x/cgroup.procs",
        "/sys/fs/cgroup/cpu/x/cgroup.procs",
        "--",
    ]


def _env(**template_env: str) -> dict[str, str]:
    return session_env(
        session_id="s-1",
        username="Alice",
        account="alice",
        template="xterm",
        home=SANDBOX_HOME,
        run_dir=SANDBOX_RUN,
        display=1,
        geometry="1280x800",
        depth=24,
        desktop="xterm (Alice)",
        rfb_socket=f"{SANDBOX_RUN}/vnc.sock",
        xvnc="/usr/bin/Xvnc",
        shell="/bin/bash",
        template_env=template_env,
        host_env={"LANG": "de_DE.UTF-8", "SECRET_TOKEN": "agent-only", "PATH": "/root/bin"},
    )


def test_the_session_environment_carries_nothing_of_the_agents() -> None:
    env = _env()
    assert env["HOME"] == SANDBOX_HOME and env["USER"] == "alice"
    assert env["XAUTHORITY"] == f"{SANDBOX_RUN}/Xauthority"
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"  # not the agent's PATH
    assert "SECRET_TOKEN" not in env  # the agent's own environment does not leak in
    assert env["LANG"] == "de_DE.UTF-8"
    assert env[SESSION_ENV_MARKER] == "s-1"


@pytest.mark.parametrize("key", ["HOME", "LD_PRELOAD", "XAUTHORITY", SESSION_ENV_MARKER, "USER"])
def test_template_env_cannot_override_identity_or_preload(key: str) -> None:
    env = _env(**{key: "/tmp/evil"})
    assert env.get(key) != "/tmp/evil"


def test_template_env_otherwise_applies() -> None:
    assert _env(MOZ_ENABLE_WAYLAND="0")["MOZ_ENABLE_WAYLAND"] == "0"


def test_passwd_and_group_name_the_session_user() -> None:
    passwd = passwd_text("alice", 200007, 200007, "/bin/bash")
    assert "alice:x:200007:200007:StreamSpace session:/home/streamspace:/bin/bash" in passwd
    assert passwd.count("\n") == 3  # root, nobody, the user: no host accounts leak in
    assert group_text("alice", 200007).splitlines()[-1] == "alice:x:200007:"


@pytest.mark.parametrize(
    ("username", "account"),
    [
        ("alice", "alice"),
        ("Bob", "bob"),
        ("carol@example.com", "streamspace"),
        ("-x", "streamspace"),
    ],
)
def test_account_names_are_safe(username: str, account: str) -> None:
    assert account_name(username) == account


def test_setpriv_drops_everything() -> None:
    assert "--clear-groups" in setpriv_argv("setpriv", 1, 1)


@pytest.mark.parametrize("text", ["0-10", "300000-200000", "abc", "200000", "1000-4294967295"])
def test_bad_uid_ranges_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="uid range"):
        parse_uid_range(text)


def test_uid_range_parses() -> None:
    assert parse_uid_range("200000-265535") == (200000, 265535)


def test_root_stages_get_no_session_environment_the_inner_stage_gets_exactly_it() -> None:
    env = root_stage_env(ENV)
    assert env == {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", SESSION_ENV_MARKER: "s-1"}
    _, _, inner = _stages(
        uid_sandbox_argv("bwrap", "setpriv", 200007, 200007, FDS, SYSTEM, ENV, network=False)
    )
    assert "--clearenv" in inner
    given = {inner[i + 1]: inner[i + 2] for i, a in enumerate(inner) if a == "--setenv"}
    assert given == ENV
