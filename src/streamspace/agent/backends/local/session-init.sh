#!/bin/sh
# The first process of a local session (under tini): the display server, then the app; the
# session ends when the app does, and its exit reason is the last "streamspace-init: reason="
# line on stderr, which the agent reads from the session log.
#
# Environment (set by the agent): SS_XVNC (the Xvnc binary), SS_DISPLAY, SS_GEOMETRY, SS_DEPTH,
# SS_DESKTOP, SS_RFB_SOCKET (Unix socket for RFB, no TCP port), SS_APP_LOG (the app's stderr),
# SS_CLIPBOARD_IN / SS_CLIPBOARD_OUT (1 or 0: text may cross into / out of the session; the
# session's own X clients cannot override them), XAUTHORITY, PULSE_SERVER (where the session's
# sound server listens). Arguments: the app.
# The sound server (PulseAudio with one null sink, when installed) runs as the session user
# here like everything else; the agent encodes what plays into it for the viewer
# (docs/streaming.md#sound). A second null sink's monitor, remapped as the source
# `microphone` (the default source), is where the agent plays the browser's microphone when
# the user's groups allow it (docs/streaming.md#microphone). A session without it simply has
# no sound.
# A stop (SIGTERM/SIGINT/SIGHUP) goes to the app first; the display server is stopped after
# it, so apps can still save their state with their display up.
set -u

note() {
    printf 'streamspace-init: %s\n' "$*" >&2
}

app_pid=""
stopping=""

on_stop() {
    stopping=1
    if [ -n "$app_pid" ]; then
        kill -TERM "$app_pid" 2>/dev/null
    fi
}
trap on_stop TERM INT HUP

# `kill -0` also succeeds on a display server that is dying or dead but not yet reaped.
display_gone() {
    kill -0 "$xvnc_pid" 2>/dev/null || return 0
    stat=""
    read -r stat <"/proc/$xvnc_pid/stat" 2>/dev/null || return 0
    stat=${stat##*) }
    case "$stat" in
    Z* | X*) return 0 ;;
    esac
    return 1
}

rm -f "$SS_RFB_SOCKET" "/tmp/.X$SS_DISPLAY-lock" "/tmp/.X11-unix/X$SS_DISPLAY"

# The session's own sound server (a null sink the agent's encoder reads), started now so it
# comes up while the display server does.
pulse_pid=""
pulse_dir=${PULSE_SERVER#unix:}
pulse_dir=${pulse_dir%/*}
if command -v pulseaudio >/dev/null 2>&1 && mkdir -p -m 0700 "$pulse_dir" 2>/dev/null; then
    pulseaudio -n --daemonize=no --use-pid-file=no --exit-idle-time=-1 --disallow-exit \
        --disallow-module-loading --realtime=no --high-priority=no --log-target=stderr \
        --log-level=error \
        -L "module-null-sink sink_name=streamspace rate=48000 channels=2" \
        -L "module-null-sink sink_name=streamspace_mic rate=48000 channels=1" \
        -L "module-remap-source master=streamspace_mic.monitor source_name=microphone" \
        -L "module-native-protocol-unix socket=${PULSE_SERVER#unix:} auth-anonymous=1" \
        -L "module-always-sink" 2>>"$SS_APP_LOG" &
    pulse_pid=$!
fi
stop_pulse() {
    [ -z "$pulse_pid" ] || kill -TERM "$pulse_pid" 2>/dev/null
}

# No TCP listener (-rfbport -1, -nolisten tcp) and no abstract X socket (-nolisten local):
# sessions sharing the host's network namespace would otherwise see each other's.
"$SS_XVNC" ":$SS_DISPLAY" \
    -geometry "$SS_GEOMETRY" \
    -depth "$SS_DEPTH" \
    -rfbunixpath "$SS_RFB_SOCKET" \
    -rfbunixmode 0600 \
    -rfbport -1 \
    -SecurityTypes None \
    -UseBlacklist 0 \
    -AlwaysShared \
    -AcceptCutText "${SS_CLIPBOARD_IN:-1}" \
    -SendCutText "${SS_CLIPBOARD_OUT:-1}" \
    -AllowOverride desktop \
    -nolisten tcp \
    -nolisten local \
    -auth "$XAUTHORITY" \
    -desktop "$SS_DESKTOP" &
xvnc_pid=$!

tries=0
while [ ! -S "/tmp/.X11-unix/X$SS_DISPLAY" ]; do
    if display_gone; then
        note "reason=display server exited during startup"
        stop_pulse
        exit 125
    fi
    if [ -n "$stopping" ]; then
        kill -TERM "$xvnc_pid" 2>/dev/null
        stop_pulse
        exit 143
    fi
    tries=$((tries + 1))
    if [ "$tries" -gt 1000 ]; then
        note "reason=display server did not open display :$SS_DISPLAY within 20 s"
        kill -KILL "$xvnc_pid" 2>/dev/null
        stop_pulse
        exit 125
    fi
    sleep 0.02
done

if [ -n "$stopping" ]; then
    kill -TERM "$xvnc_pid" 2>/dev/null
    stop_pulse
    exit 143
fi

# The sound server started beside the display server; the app connects to it at once.
if [ -n "$pulse_pid" ]; then
    tries=0
    while [ ! -S "${PULSE_SERVER#unix:}" ] && [ "$tries" -lt 150 ]; do
        kill -0 "$pulse_pid" 2>/dev/null || break
        tries=$((tries + 1))
        sleep 0.02
    done
fi

"$@" 2>>"$SS_APP_LOG" &
app_pid=$!

# `wait` returns early when a trapped signal arrives; keep waiting until the app is gone.
while :; do
    wait "$app_pid"
    status=$?
    kill -0 "$app_pid" 2>/dev/null || break
done

# An app usually dies of its display server's death a moment before that death is visible
# here (the kernel closes the server's sockets before it becomes a zombie); give it that moment.
if [ -z "$stopping" ]; then
    tries=0
    while ! display_gone && [ "$tries" -lt 25 ]; do
        tries=$((tries + 1))
        sleep 0.02
    done
fi

if display_gone; then
    note "reason=display server exited"
elif [ -n "$stopping" ]; then
    note "reason=stopped"
elif [ "$status" -eq 127 ]; then
    note "reason=app $1 could not be run (exit code 127)"
else
    note "reason=app exited with code $status"
fi

if [ -n "$pulse_pid" ]; then
    kill -TERM "$pulse_pid" 2>/dev/null
fi
kill -TERM "$xvnc_pid" 2>/dev/null
tries=0
while ! display_gone && [ "$tries" -lt 100 ]; do
    tries=$((tries + 1))
    sleep 0.02
done
kill -KILL "$xvnc_pid" 2>/dev/null
exit "$status"
