#!/bin/sh
# Start Xvnc on display :1 (RFB on port 5901), then openbox (if installed) and, once the window
# manager is up, the app given as arguments. The container lives as long as the app does and
# exits with the app's status. tini (PID 1, -g) forwards stop signals to all of them.
#
# The VNC server requires VNC Authentication: STREAMSPACE_VNC_PASSWD holds the obfuscated
# password bytes (vncpasswd file format) as octal printf escapes, set by the StreamSpace agent,
# which alone knows the password. Without it the container refuses to start rather than serve
# an open VNC port. VNC_CLIPBOARD_IN / VNC_CLIPBOARD_OUT (1 or 0) say whether text may cross
# into / out of the session; -AllowOverride keeps X clients (vncconfig) from changing that.
# With STREAMSPACE_VNC_SOCKET (the agent sets it) Xvnc listens on that Unix socket only, in a
# directory the agent bind-mounts, and on no TCP port at all. With STREAMSPACE_PULSE_SOCKET (the
# agent sets it too) the session's own PulseAudio plays into one null sink and serves its native
# protocol on that socket, which the agent's encoder reads (docs/streaming.md#sound), and its
# default source `microphone` plays what the agent decodes from the browser's microphone
# (docs/streaming.md#microphone); the app finds it through PULSE_SERVER. With STREAMSPACE_FILES_PORT, STREAMSPACE_FILES_HOST_KEY and
# STREAMSPACE_FILES_CLIENT_KEY (a pod: the agent sets them from the session's Secret) OpenSSH
# serves SFTP of this user's files on that port, to that one client key only, no shell.
set -eu

geometry="${VNC_GEOMETRY:-1280x800}"
depth="${VNC_DEPTH:-24}"
runtime="${XDG_RUNTIME_DIR:-/tmp/streamspace-$(id -u)}"
wm_ready="$runtime/wm-ready"

if [ "$#" -eq 0 ]; then
    set -- sleep infinity
fi

# A container stopped hard (SIGKILL, OOM) keeps Xvnc's lock and socket in its writable layer;
# they would stop Xvnc from starting again on wake.
rm -f /tmp/.X1-lock /tmp/.X11-unix/X1
mkdir -p "$runtime"
chmod 0700 "$runtime"
rm -f "$wm_ready"

if [ -z "${STREAMSPACE_VNC_PASSWD:-}" ]; then
    echo "streamspace-entrypoint: STREAMSPACE_VNC_PASSWD is not set; refusing to serve VNC" \
        "without authentication" >&2
    exit 2
fi
passwd_file="$runtime/vncpasswd"
(umask 077 && printf "$STREAMSPACE_VNC_PASSWD" > "$passwd_file")
unset STREAMSPACE_VNC_PASSWD

# The socket path comes from the agent (a fixed path without spaces), so it may be split.
socket="${STREAMSPACE_VNC_SOCKET:-}"
unset STREAMSPACE_VNC_SOCKET
if [ -n "$socket" ]; then
    rm -f "$socket"
    listen="-rfbunixpath $socket -rfbunixmode 0600 -rfbport -1"
else
    listen="-rfbport 5901"
fi

# The sound server starts first so it comes up while the display server does. For a pod
# (STREAMSPACE_PULSE_PORT with its cookie) it also serves the agent on that TCP port, cookie
# authentication only; the app always uses the Unix socket.
pulse_socket="${STREAMSPACE_PULSE_SOCKET:-}"
pulse_port="${STREAMSPACE_PULSE_PORT:-}"
pulse_cookie="${STREAMSPACE_PULSE_COOKIE:-}"
unset STREAMSPACE_PULSE_SOCKET STREAMSPACE_PULSE_PORT STREAMSPACE_PULSE_COOKIE
if [ -z "$pulse_cookie" ]; then
    pulse_port=""
fi
if [ -z "$pulse_socket" ] && [ -n "$pulse_port" ]; then
    pulse_socket="$runtime/pulse.sock"
fi
pulse_pid=""
start_pulse() {
    pulseaudio -n --daemonize=no --use-pid-file=no --exit-idle-time=-1 --disallow-exit \
        --disallow-module-loading --realtime=no --high-priority=no --log-target=stderr \
        --log-level=error \
        -L "module-null-sink sink_name=streamspace rate=48000 channels=2" \
        -L "module-null-sink sink_name=streamspace_mic rate=48000 channels=1" \
        -L "module-remap-source master=streamspace_mic.monitor source_name=microphone" \
        -L "module-native-protocol-unix socket=$pulse_socket auth-anonymous=1" \
        -L "module-always-sink" "$@" &
    pulse_pid=$!
}
if [ -n "$pulse_socket" ] && command -v pulseaudio >/dev/null 2>&1; then
    rm -f "$pulse_socket"
    if [ -n "$pulse_port" ]; then
        cookie_file="$runtime/pulse-cookie"
        (umask 077 && printf "$pulse_cookie" > "$cookie_file")
        start_pulse -L "module-native-protocol-tcp port=$pulse_port auth-anonymous=0 auth-cookie-enabled=1 auth-cookie=$cookie_file"
    else
        start_pulse
    fi
    export PULSE_SERVER="unix:$pulse_socket"
fi
unset pulse_cookie

files_port="${STREAMSPACE_FILES_PORT:-}"
files_host_key="${STREAMSPACE_FILES_HOST_KEY:-}"
files_client_key="${STREAMSPACE_FILES_CLIENT_KEY:-}"
unset STREAMSPACE_FILES_PORT STREAMSPACE_FILES_HOST_KEY STREAMSPACE_FILES_CLIENT_KEY
sshd_pid=""
if [ -n "$files_port" ] && [ -n "$files_host_key" ] && [ -n "$files_client_key" ] \
    && [ -x /usr/sbin/sshd ]; then
    sshd_dir="$runtime/sshd"
    mkdir -p "$sshd_dir"
    chmod 0700 "$sshd_dir"
    (umask 077 \
        && printf '%s\n' "$files_host_key" > "$sshd_dir/host_key" \
        && printf '%s\n' "$files_client_key" > "$sshd_dir/authorized_keys" \
        && cat > "$sshd_dir/sshd_config" <<EOF
Port $files_port
HostKey $sshd_dir/host_key
PidFile none
AuthorizedKeysFile $sshd_dir/authorized_keys
AuthenticationMethods publickey
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AllowUsers $(id -un)
PermitRootLogin no
AllowTcpForwarding no
AllowStreamLocalForwarding no
AllowAgentForwarding no
X11Forwarding no
PermitTTY no
PermitTunnel no
PermitUserRC no
PermitUserEnvironment no
GatewayPorts no
StrictModes no
MaxAuthTries 2
LoginGraceTime 20
Subsystem sftp internal-sftp
ForceCommand internal-sftp -d $HOME
LogLevel ERROR
EOF
    )
    /usr/sbin/sshd -f "$sshd_dir/sshd_config" -D -e &
    sshd_pid=$!
fi
unset files_host_key

Xvnc :1 \
    -geometry "$geometry" \
    -depth "$depth" \
    $listen \
    -SecurityTypes VncAuth \
    -PasswordFile "$passwd_file" \
    -UseBlacklist 0 \
    -AlwaysShared \
    -AcceptCutText "${VNC_CLIPBOARD_IN:-1}" \
    -SendCutText "${VNC_CLIPBOARD_OUT:-1}" \
    -AllowOverride desktop \
    -desktop "${VNC_DESKTOP_NAME:-StreamSpace}" \
    -nolisten tcp &
xvnc_pid=$!

# Wait (up to 10 s) for the X socket so nothing races the server.
tries=0
while [ ! -S /tmp/.X11-unix/X1 ]; do
    if ! kill -0 "$xvnc_pid" 2>/dev/null; then
        echo "streamspace-entrypoint: Xvnc exited during startup" >&2
        exit 1
    fi
    tries=$((tries + 1))
    if [ "$tries" -gt 500 ]; then
        echo "streamspace-entrypoint: Xvnc did not create /tmp/.X11-unix/X1 in 10 s" >&2
        exit 1
    fi
    sleep 0.02
done

export DISPLAY=:1

# Apps started before the window manager manages the screen can stall for seconds (xterm waits
# for frame extents), so wait (up to 5 s) for openbox's --startup hook.
if command -v openbox >/dev/null 2>&1; then
    openbox --startup "touch $wm_ready" >/dev/null 2>&1 &
    wm_pid=$!
    tries=0
    while [ ! -e "$wm_ready" ] && [ "$tries" -lt 250 ] && kill -0 "$wm_pid" 2>/dev/null; do
        tries=$((tries + 1))
        sleep 0.02
    done
fi

# The app's first sound must not race the server's socket (up to 3 s).
if [ -n "$pulse_pid" ]; then
    tries=0
    while [ ! -S "$pulse_socket" ] && [ "$tries" -lt 150 ] && kill -0 "$pulse_pid" 2>/dev/null; do
        tries=$((tries + 1))
        sleep 0.02
    done
fi

"$@" &
app_pid=$!
set +e
wait "$app_pid"
status=$?
kill "$xvnc_pid" $pulse_pid $sshd_pid 2>/dev/null
exit "$status"
