// The speechcast page: finds the daemon's WebSocket through GET /v1/info, stays connected
// (reconnecting with backoff), plays the stream with AudioPlayer, and logs every event.
// Page options: ?format=opus|pcm|wav, ?compress=1, ?token=... (passed on to the WebSocket).
// Without ?format the page asks for Opus when the browser decodes it with WebCodecs (a
// twelfth of PCM's bytes), else for pcm; ?format=opus falls back to pcm the same way.
// ?ws=URL,URL...: the WebSockets of daemons serving one audience (docs/scale-out.md), tried
// in turn at each (re)connection ("/" is this page's own host, e.g. behind one proxy port).
// "Type as you go" (typing.js) speaks the text box as a streamed utterance while it is typed.

import { opusSupported } from "./opus.js";
import { AudioPlayer } from "./player.js";
import { Captions } from "./captions.js";
import { TypeAsYouGo } from "./typing.js";

const RECONNECT_FIRST_S = 0.5;
const RECONNECT_MAX_S = 10;
const LOG_LIMIT = 200;

const params = new URLSearchParams(location.search);
const asked = params.get("format");
const format = asked === "wav" || asked === "pcm" ? asked : (await opusSupported()) ? "opus" : "pcm";
const compress = params.get("compress") === "1";
const token = params.get("token");
const wsList = (params.get("ws") || "").split(",").map((u) => u.trim()).filter(Boolean);
let wsTurn = 0;

const $ = (id) => document.getElementById(id);
const player = new AudioPlayer({ format });
const captions = new Captions(player, { captions: $("captions"), mouth: $("mouth-gap") });
const state = { ws: null, backoff: RECONNECT_FIRST_S, provider: null };

// What tests (and curious people) can read from the console.
window.speechcast = {
  player,
  format, // what this page asked the daemon for
  bytesReceived: 0, // every byte of every message received (text and audio)
  audioBytesReceived: 0, // the audio frames' bytes alone
  captions,
  events: [], // every event received, in order, as {at, event}
  log: [], // every line of the event log, oldest first, as {kind, text, utteranceId}
  get timeline() {
    return player.timeline;
  },
  get decodeErrors() {
    return player.decodeErrors;
  },
};

function setConnection(kind, text) {
  const indicator = $("connection");
  indicator.dataset.state = kind;
  indicator.textContent = text;
  $("speak").disabled = $("cancel").disabled = kind !== "connected";
}

function log(kind, text, utteranceId = null) {
  window.speechcast.log.push({ kind, text, utteranceId });
  const item = document.createElement("li");
  item.className = kind;
  if (utteranceId) item.dataset.utterance = utteranceId;
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString();
  item.append(time, ` ${text}`);
  const list = $("log");
  list.prepend(item);
  while (list.children.length > LOG_LIMIT) list.lastChild.remove();
}

function showProviders(names, current) {
  state.provider = current;
  const select = $("provider");
  if (select.options.length !== names.length) {
    select.replaceChildren(...names.map((name) => new Option(name, name)));
  }
  select.value = current;
}

function onEvent(event) {
  window.speechcast.events.push({ at: performance.now(), event });
  switch (event.type) {
    case "hello":
      showProviders(event.providers, event.provider);
      log("info", `connected to speechcast ${event.version}: session ${event.session}, provider ${event.provider}`);
      break;
    case "ready":
      showProviders(event.providers, event.provider);
      log("info", `ready: provider ${event.provider}`);
      break;
    case "provider_changed":
      state.provider = event.provider;
      $("provider").value = event.provider;
      log("info", `provider changed to ${event.provider}`);
      break;
    case "accepted":
      if (event.streaming) typing.accepted(event.utterance_id, $("text").value);
      log("info", `${event.utterance_id} accepted, ${event.position} ahead of it`, event.utterance_id);
      break;
    case "utterance_started":
      player.started(event);
      log("speaking", `${event.utterance_id} speaking with ${event.provider} (${event.voice}, ${event.sample_rate} Hz)`, event.utterance_id);
      break;
    case "utterance_finished":
      // Logged once the player has taken every chunk before it (decoded and scheduled).
      typing.ended(event.utterance_id);
      captions.finished(event);
      player.finished(event).then(() => logFinished(event));
      break;
    case "cancelled":
      player.stop(event.utterance_ids);
      log("info", `cancelled ${event.utterance_ids.join(", ") || "nothing (all quiet)"}`);
      break;
    case "error":
      if (event.code === "unknown_utterance") typing.lost();
      else if (!event.utterance_id) typing.refused();
      log("error", `error ${event.code}: ${event.message}`, event.utterance_id);
      break;
    case "closed":
      log("info", "session closed");
      break;
    case "words":
      captions.words(event);
      break;
    case "visemes":
      captions.visemes(event);
      break;
    default:
      break; // newer event types: ignored, as the protocol asks
  }
}

function logFinished(event) {
  const ttfa = event.ttfa_ms == null ? "no audio" : `TTFA ${Math.round(event.ttfa_ms)} ms`;
  const seconds = (event.audio_ms / 1000).toFixed(2);
  const text = `${event.utterance_id} finished ${event.status}: ${event.chunks} chunks, ${seconds} s, ${ttfa}`;
  log(event.status === "ok" ? "done" : "error", text, event.utterance_id);
}

function countBytes(data) {
  const size = typeof data === "string" ? new Blob([data]).size : data.byteLength;
  window.speechcast.bytesReceived += size;
  if (typeof data !== "string") window.speechcast.audioBytesReceived += size;
  const sizes = [window.speechcast.bytesReceived, window.speechcast.audioBytesReceived].map(kilo);
  $("bytes").textContent = `${format}: ${sizes[0]} received (audio ${sizes[1]})`;
}

function kilo(bytes) {
  const kb = bytes / 1000;
  return kb < 1000 ? kb.toFixed(1) + " kB" : (kb / 1000).toFixed(2) + " MB";
}

function onMessage(message) {
  countBytes(message.data);
  if (typeof message.data !== "string") {
    player.frame(message.data);
    return;
  }
  let event;
  try {
    event = JSON.parse(message.data);
  } catch {
    return;
  }
  onEvent(event);
}

async function webSocketUrl() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = new URLSearchParams({ format, compress: compress ? "1" : "0", timing: "all" });
  if (token) query.set("token", token);
  if (wsList.length) {
    const url = new URL(wsList[wsTurn++ % wsList.length], `${scheme}://${location.host}/`);
    for (const [name, value] of query) url.searchParams.set(name, value);
    return url.toString();
  }
  const info = await (await fetch("/v1/info", { cache: "no-store" })).json();
  return `${scheme}://${location.hostname}:${info.ws_port}/?${query}`;
}

async function connect() {
  setConnection("connecting", "connecting…");
  let url;
  try {
    url = await webSocketUrl();
  } catch {
    reconnectLater();
    return;
  }
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => {
    state.backoff = RECONNECT_FIRST_S;
    setConnection("connected", "connected");
  };
  ws.onmessage = onMessage;
  ws.onclose = (close) => {
    if (state.ws !== ws) return;
    state.ws = null;
    typing.reset();
    log("error", `connection closed (${close.code}${close.reason ? " " + close.reason : ""})`);
    reconnectLater();
  };
}

function reconnectLater() {
  const delay = state.backoff;
  state.backoff = Math.min(RECONNECT_MAX_S, state.backoff * 2);
  setConnection("disconnected", `disconnected, retrying in ${delay.toFixed(1)} s`);
  setTimeout(connect, delay * 1000);
}

function send(message) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
  state.ws.send(JSON.stringify(message));
  return true;
}

// A provider picked in the list but not the daemon's current one is a one-off choice.
function chosenProvider() {
  const provider = $("provider").value;
  return provider && provider !== state.provider ? { provider } : {};
}

const typing = new TypeAsYouGo(send, chosenProvider);
const asYouType = () => $("as-you-type").checked;

// In "type as you go" mode Speak becomes Done: the rest of the box ends the stream.
function finishTyping() {
  if (!state.ws) return; // keep the box until the connection is back
  typing.done($("text").value);
  $("text").value = "";
}

$("speak-form").addEventListener("submit", (submit) => {
  submit.preventDefault();
  player.resume();
  if (asYouType()) {
    finishTyping();
    return;
  }
  const text = $("text").value;
  if (!text.trim()) return;
  send({ type: "send_message", text, ...chosenProvider() });
});

$("text").addEventListener("input", () => {
  if (asYouType()) typing.typed($("text").value);
});

$("text").addEventListener("keydown", (key) => {
  if (!asYouType() || key.key !== "Enter" || key.shiftKey || key.isComposing) return;
  key.preventDefault(); // Enter ends the text instead of starting a new line
  player.resume();
  finishTyping();
});

$("as-you-type").addEventListener("change", () => {
  const on = asYouType();
  if (!on && typing.active()) finishTyping(); // switching off ends the stream with the box's rest
  $("speak").textContent = on ? "Done" : "Speak";
  $("as-you-type-help").hidden = !on;
  $("text").placeholder = on
    ? "Type: your words are spoken as you go. Enter ends the text."
    : "Type something to say, then press Speak.";
});

$("cancel").addEventListener("click", () => {
  player.stopAll();
  send({ type: "cancel", all: true });
});

// Browsers keep audio suspended until the person interacts with the page.
for (const kind of ["pointerdown", "keydown"]) {
  document.addEventListener(kind, () => player.resume(), { once: true });
}

function drawLevel() {
  $("level").style.width = `${Math.round(player.level() * 100)}%`;
  requestAnimationFrame(drawLevel);
}

requestAnimationFrame(drawLevel);
connect();
