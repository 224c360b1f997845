// The browser's microphone into the session: getUserMedia -> MediaStreamTrackProcessor (or,
// where there is none, an AudioWorklet: static/mic-worklet.js) -> WebCodecs' AudioEncoder
// (Opus, 20 ms frames) -> its own ticketed WebSocket
// (/api/v1/streams/microphone), one packet per message with the sound stream's 12-byte header
// (docs/streaming.md#microphone). Off on every page load: the browser asks for permission, and
// the user's groups must allow it (the connect response says whether they do).
import { post } from "./api.js";
import { h } from "./ui.js";

const HEADER_BYTES = 12;
const FRAME_US = 20000;
// Sound waiting in the socket beyond this is dropped: a stalled network loses sound, not memory.
const MAX_BUFFERED = 64 * 1024;
const DENIED = "Your groups do not allow the microphone in sessions";

export function microphoneSupported() {
  return (
    typeof AudioEncoder === "function" &&
    (typeof MediaStreamTrackProcessor === "function" || typeof AudioWorkletNode === "function") &&
    typeof navigator.mediaDevices?.getUserMedia === "function"
  );
}

/**
 * The toolbar's Microphone toggle. `sessionId`: whose session hears it; `running()`: whether
 * it is running. `allow(bool)` is called with each connect response's `microphone`. Returns
 * { elements, allow(on), toggle(), stop() }.
 */
export function microphoneControl({ sessionId, running }) {
  let enabled = false;
  let allowed = false;
  let ws = null;
  let track = null;
  let encoder = null;
  let reader = null;
  let context = null;
  let firstTs = null;
  let channels = 1;

  const button = h(
    "button",
    {
      type: "button",
      class: "btn btn-bar",
      "aria-pressed": "false",
      title: DENIED,
      disabled: true,
      dataset: { testid: "toggle-microphone" },
      onclick: () => setEnabled(!enabled),
      hidden: !microphoneSupported(),
    },
    "Microphone",
  );

  function setAllowed(on) {
    allowed = Boolean(on);
    button.disabled = !allowed;
    button.title = allowed ? "Send this computer's microphone to the session (Ctrl+Alt+Shift+M)" : DENIED;
    if (!allowed && enabled) setEnabled(false);
  }

  function setEnabled(on) {
    if (on && (!allowed || !microphoneSupported())) return;
    enabled = on;
    button.setAttribute("aria-pressed", String(on));
    if (on) start();
    else stop();
  }

  function send(chunk) {
    const socket = ws;
    if (!socket || socket.readyState !== WebSocket.OPEN || socket.bufferedAmount > MAX_BUFFERED) return;
    if (firstTs === null) firstTs = chunk.timestamp;
    const message = new Uint8Array(HEADER_BYTES + chunk.byteLength);
    const view = new DataView(message.buffer);
    view.setUint8(0, 1);
    view.setUint8(1, channels);
    view.setBigUint64(4, BigInt(Math.max(0, Math.round(chunk.timestamp - firstTs))));
    chunk.copyTo(message.subarray(HEADER_BYTES));
    socket.send(message);
  }

  function encode(data) {
    if (!encoder) {
      channels = data.numberOfChannels;
      encoder = new AudioEncoder({ output: send, error: () => setEnabled(false) });
      encoder.configure({
        codec: "opus",
        sampleRate: data.sampleRate,
        numberOfChannels: channels,
        bitrate: 64000,
        opus: { frameDuration: FRAME_US },
      });
    }
    encoder.encode(data);
    data.close();
  }

  async function pump(processorReader) {
    for (;;) {
      const { value, done } = await processorReader.read();
      if (done || !enabled) {
        value?.close();
        return;
      }
      encode(value);
    }
  }

  /** Samples through an AudioWorklet, 20 ms per AudioData, timed by their count. */
  async function worklet(media) {
    const ctx = new AudioContext({ latencyHint: "interactive" });
    context = ctx;
    await ctx.resume();
    await ctx.audioWorklet.addModule("/static/mic-worklet.js");
    if (context !== ctx) return;
    const node = new AudioWorkletNode(ctx, "streamspace-mic-capture", { numberOfOutputs: 0 });
    let frames = 0;
    node.port.onmessage = ({ data }) => {
      if (!enabled || context !== ctx) return;
      const timestamp = Math.round((frames * 1e6) / ctx.sampleRate);
      frames += data.length;
      encode(
        new AudioData({
          format: "f32-planar",
          sampleRate: ctx.sampleRate,
          numberOfFrames: data.length,
          numberOfChannels: 1,
          timestamp,
          data,
        }),
      );
    };
    ctx.createMediaStreamSource(media).connect(node);
  }

  async function start() {
    if (!enabled || ws || !running()) return;
    let media;
    try {
      media = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
    } catch (err) {
      button.title = `The browser gave no microphone: ${err.message || err.name}`;
      setEnabled(false);
      return;
    }
    if (!enabled) {
      media.getTracks().forEach((t) => t.stop());
      return;
    }
    track = media.getAudioTracks()[0];
    let ticket;
    try {
      ticket = await post(`/api/v1/sessions/${sessionId}/connect`);
    } catch {
      setEnabled(false);
      return;
    }
    setAllowed(ticket.microphone);
    if (!enabled) return;
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${proto}//${location.host}/api/v1/streams/microphone?ticket=${encodeURIComponent(ticket.ticket)}`);
    socket.binaryType = "arraybuffer";
    socket.onclose = (event) => {
      if (ws !== socket) return;
      ws = null;
      if (event.code === 4403) setAllowed(false);
      else if (event.reason) button.title = `Microphone stopped: ${event.reason}`;
      setEnabled(false);
    };
    socket.onopen = () => {
      if (ws !== socket || !track) return;
      if (typeof MediaStreamTrackProcessor === "function") {
        reader = new MediaStreamTrackProcessor({ track }).readable.getReader();
        pump(reader).catch(() => setEnabled(false));
      } else {
        worklet(media).catch(() => setEnabled(false));
      }
    };
    ws = socket;
  }

  function stop() {
    const socket = ws;
    ws = null;
    if (socket) socket.close();
    reader?.cancel().catch(() => {});
    reader = null;
    track?.stop();
    track = null;
    context?.close().catch(() => {});
    context = null;
    if (encoder && encoder.state !== "closed") encoder.close();
    encoder = null;
    firstTs = null;
  }

  return {
    elements: [button],
    allow: setAllowed,
    toggle: () => setEnabled(!enabled),
    /** The session stopped or the viewer closed: release the microphone. */
    stop: () => setEnabled(false),
  };
}
