// The session's sound in the viewer: its own ticketed WebSocket (/api/v1/streams/audio), one
// Opus packet per message (12-byte header, see docs/streaming.md#sound), decoded with WebCodecs'
// AudioDecoder and played through Web Audio with a short jitter buffer.
import { post } from "./api.js";
import { h } from "./ui.js";

const ENABLED_KEY = "streamspace.viewer.sound";
const VOLUME_KEY = "streamspace.viewer.volume";
const HEADER_BYTES = 12;
const JITTER_S = 0.03;
// Sound more than this far ahead of the clock is late (a stall): drop it rather than keep the lag.
const MAX_AHEAD_S = 0.15;

export function soundSupported() {
  return typeof AudioDecoder === "function" && typeof AudioContext === "function";
}

/**
 * The toolbar's sound toggle and volume slider. `sessionId`: whose sound; `running()`: whether
 * the session can be listened to now. Returns { elements, stop() }.
 */
export function soundControl({ sessionId, running }) {
  let enabled = localStorage.getItem(ENABLED_KEY) === "on";
  let volume = Number(localStorage.getItem(VOLUME_KEY) ?? "0.8");
  let ws = null;
  let decoder = null;
  let context = null;
  let gain = null;
  let analyser = null;
  let playhead = 0;
  let retry = null;
  let failures = 0;

  const button = h(
    "button",
    {
      type: "button",
      class: "btn btn-bar",
      "aria-pressed": String(enabled),
      title: "Play the session's sound (Ctrl+Alt+Shift+S)",
      dataset: { testid: "toggle-sound" },
      onclick: () => setEnabled(!enabled),
      hidden: !soundSupported(),
    },
    "Sound",
  );
  const slider = h("input", {
    type: "range",
    min: "0",
    max: "1",
    step: "0.05",
    value: String(volume),
    class: "volume",
    "aria-label": "Volume",
    dataset: { testid: "volume" },
    hidden: !soundSupported(),
    oninput: (e) => setVolume(Number(e.target.value)),
  });

  function setVolume(v) {
    volume = Math.min(1, Math.max(0, v));
    localStorage.setItem(VOLUME_KEY, String(volume));
    if (gain) gain.gain.value = volume;
  }

  function setEnabled(on) {
    enabled = on;
    localStorage.setItem(ENABLED_KEY, on ? "on" : "off");
    button.setAttribute("aria-pressed", String(on));
    if (on) start();
    else stop();
  }

  function graph() {
    if (!context) {
      context = new AudioContext({ latencyHint: "interactive", sampleRate: 48000 });
      gain = context.createGain();
      gain.gain.value = volume;
      analyser = context.createAnalyser();
      analyser.fftSize = 4096;
      gain.connect(analyser);
      analyser.connect(context.destination);
      // The graph, for diagnostics (and the browser tests): what the page is playing.
      button.audioGraph = { context, analyser };
    }
    if (context.state === "suspended") context.resume().catch(() => {});
    return context;
  }

  function play(data) {
    const ctx = context;
    const buffer = ctx.createBuffer(data.numberOfChannels, data.numberOfFrames, data.sampleRate);
    for (let ch = 0; ch < data.numberOfChannels; ch++) {
      data.copyTo(buffer.getChannelData(ch), { planeIndex: ch, format: "f32-planar" });
    }
    data.close();
    const now = ctx.currentTime;
    if (playhead < now || playhead > now + MAX_AHEAD_S) playhead = now + JITTER_S;
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(gain);
    source.start(playhead);
    playhead += buffer.duration;
  }

  function onPacket(event) {
    const bytes = new Uint8Array(event.data);
    if (bytes.length <= HEADER_BYTES || bytes[0] !== 1) return;
    const view = new DataView(event.data);
    const channels = bytes[1];
    if (!decoder || decoder.state === "closed") {
      decoder = new AudioDecoder({ output: play, error: () => decoder?.close() });
      decoder.configure({ codec: "opus", sampleRate: 48000, numberOfChannels: channels });
    }
    decoder.decode(
      new EncodedAudioChunk({
        type: "key",
        timestamp: Number(view.getBigUint64(4)),
        data: bytes.subarray(HEADER_BYTES),
      }),
    );
  }

  async function start() {
    clearTimeout(retry);
    retry = null;
    if (!enabled || ws || !running()) return;
    graph();
    let ticket;
    try {
      ticket = await post(`/api/v1/sessions/${sessionId}/connect`);
    } catch {
      schedule();
      return;
    }
    if (!enabled || ws) return;
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${proto}//${location.host}/api/v1/streams/audio?ticket=${encodeURIComponent(ticket.ticket)}`);
    socket.binaryType = "arraybuffer";
    socket.onmessage = (event) => {
      failures = 0;
      onPacket(event);
    };
    socket.onclose = (event) => {
      if (ws !== socket) return;
      ws = null;
      // 4401: signed out or not allowed, a new ticket will not help.
      if (enabled && event.code !== 4401) schedule();
    };
    ws = socket;
  }

  function schedule() {
    failures += 1;
    if (!enabled || failures > 5) return;
    retry = setTimeout(start, Math.min(10000, 1000 * 2 ** failures));
  }

  function stop() {
    clearTimeout(retry);
    retry = null;
    const socket = ws;
    ws = null;
    if (socket) socket.close();
    if (decoder && decoder.state !== "closed") decoder.close();
    decoder = null;
    playhead = 0;
  }

  return {
    elements: [button, slider],
    /** The session is (again) running: resume if the user had sound on. */
    resume: () => {
      failures = 0;
      if (enabled) start();
    },
    toggle: () => setEnabled(!enabled),
    stop: () => {
      stop();
      if (context) context.close().catch(() => {});
      context = null;
    },
  };
}
