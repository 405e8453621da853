// AudioPlayer: turns the daemon's chunks into gapless sound. Each chunk is decoded on its
// own and scheduled at an exact time on the AudioContext clock, right where the previous
// one ends, so there is neither gap nor overlap (unlike chaining on `onended`).

import { VOICE_DATA, parseFrame } from "./frames.js";
import { OPUS_RATE, OpusUtterance } from "./opus.js";

// When playback (re)starts, decoded chunks are held until this much sound is in hand (or
// START_WAIT_S has passed since the first of them, or the utterance ends), then scheduled
// START_LEAD_S ahead of the clock. An utterance's first chunk is short (40 ms) for a quick
// start; played alone, the next one had to arrive and decode within 140 ms, which a busy
// 2-core machine missed (seen in CI). Chunks of one piece arrive together, so holding
// costs milliseconds, and every later chunk then has the whole cushion to arrive in.
const START_BUFFER_S = 0.25;
const START_WAIT_S = 0.15;
const START_LEAD_S = 0.1;
// Opus goes through WebCodecs: every chunk is a decode and a flush handed to the browser's
// media thread and back, which a busy machine can hold up for a couple of hundred ms.
const START_LEAD_OPUS_S = 0.2;
// A start time closer to "now" than this could already be late once the node runs.
const LATE_MARGIN_S = 0.005;

export class AudioPlayer {
  /** `format`: "wav" (decodeAudioData), "pcm" (s16le at the announced rate) or "opus"
   *  (WebCodecs, one decoder per utterance: opus.js). */
  constructor({ format = "wav" } = {}) {
    this.format = format;
    this.context = null;
    this.output = null; // analyser in front of the speakers, for the level meter
    this.nextTime = 0; // where the next buffer starts on the context clock
    this.current = null; // {id, sampleRate} of the utterance whose chunks arrive now
    this.sources = new Map(); // utterance id -> Set of playing/scheduled source nodes
    this.cancelled = new Set();
    this.timeline = []; // per chunk: {chunkId, utteranceId, start, duration, ok}
    this.decodeErrors = []; // {chunkId, utteranceId, message}
    this.held = []; // {buffer, entry} decoded while (re)starting, not yet scheduled
    this.holdTimer = null;
    this.work = Promise.resolve();
  }

  /** Create the context at the stream's rate, so chunks are never resampled one by one. */
  ensureContext(sampleRate = 24000) {
    if (this.context && this.context.sampleRate === sampleRate) return this.context;
    if (this.context && this.playing() === 0) {
      this.context.close();
      this.context = null;
    }
    if (!this.context) {
      this.context = new AudioContext({ sampleRate, latencyHint: "interactive" });
      this.output = this.context.createAnalyser();
      this.output.fftSize = 1024;
      this.output.connect(this.context.destination);
      this.nextTime = 0;
    }
    return this.context;
  }

  /** Call from a user gesture: browsers start an AudioContext suspended until then. */
  async resume() {
    const context = this.ensureContext(this.current?.sampleRate);
    if (context.state === "suspended") await context.resume();
  }

  playing() {
    let n = 0;
    for (const set of this.sources.values()) n += set.size;
    return n;
  }

  /** Run `step` after everything queued before it: stream order survives async decoding. */
  enqueue(step) {
    this.work = this.work.then(step).catch((error) => console.error("player:", error));
    return this.work;
  }

  started(event) {
    return this.enqueue(() => {
      this.current?.opus?.close();
      const opus = this.format === "opus" ? new OpusUtterance(event.pre_skip ?? 0) : null;
      // Opus decodes at 48 kHz: the context runs at that rate, so nothing is resampled.
      const sampleRate = opus ? OPUS_RATE : event.sample_rate;
      this.current = { id: event.utterance_id, sampleRate, opus };
      this.ensureContext(sampleRate);
    });
  }

  finished(event) {
    if (event.status === "cancelled") this.stop([event.utterance_id]);
    return this.enqueue(() => {
      this.startHeld();
      if (this.format === "opus" && event.status !== "cancelled") this.trimLast(event.utterance_id, event.audio_ms / 1000);
      if (this.current?.id !== event.utterance_id) return;
      this.current.opus?.close();
      this.current = null;
    });
  }

  /** One binary message. A chunk that cannot be decoded is skipped and recorded. */
  frame(data) {
    return this.enqueue(async () => {
      let frame;
      try {
        frame = await parseFrame(data);
      } catch (error) {
        this.decodeErrors.push({ chunkId: null, utteranceId: this.current?.id ?? null, message: String(error) });
        return;
      }
      if (frame.type !== VOICE_DATA) return; // 0x01 position updates and anything newer
      const utterance = this.current;
      if (utterance && this.cancelled.has(utterance.id)) return;
      const entry = { chunkId: frame.chunkId, utteranceId: utterance?.id ?? null, start: null, duration: 0, ok: false };
      this.timeline.push(entry);
      let buffer;
      try {
        buffer = await this.decode(frame.audio, utterance?.sampleRate ?? 24000, utterance);
      } catch (error) {
        this.decodeErrors.push({ chunkId: frame.chunkId, utteranceId: entry.utteranceId, message: String(error) });
        return;
      }
      if (utterance && this.cancelled.has(utterance.id)) return; // cancelled while decoding
      entry.ok = true;
      if (buffer === null) return; // an opus chunk that completed no 20 ms packet
      entry.duration = buffer.duration;
      if (this.held.length === 0 && this.nextTime >= this.context.currentTime + LATE_MARGIN_S) {
        this.schedule(buffer, entry);
      } else {
        this.hold(buffer, entry);
      }
    });
  }

  /** Keep `buffer` until enough sound is in hand to start without running dry. */
  hold(buffer, entry) {
    this.held.push({ buffer, entry });
    const seconds = this.held.reduce((sum, h) => sum + h.entry.duration, 0);
    if (seconds >= START_BUFFER_S) this.startHeld();
    else if (this.holdTimer === null) {
      this.holdTimer = setTimeout(() => this.enqueue(() => this.startHeld()), START_WAIT_S * 1000);
    }
  }

  /** Schedule what is held, the first of it a lead ahead of the clock. */
  startHeld() {
    clearTimeout(this.holdTimer);
    this.holdTimer = null;
    const held = this.held;
    this.held = [];
    for (const { buffer, entry } of held) this.schedule(buffer, entry);
  }

  async decode(audio, sampleRate, utterance) {
    const context = this.ensureContext(sampleRate);
    if (this.format === "wav") return await context.decodeAudioData(audio);
    if (this.format === "opus") {
      if (!utterance?.opus) throw new Error("opus chunk before its utterance_started");
      const samples = await utterance.opus.decode(audio);
      if (samples.length === 0) return null;
      const buffer = context.createBuffer(1, samples.length, sampleRate);
      buffer.copyToChannel(samples, 0);
      return buffer;
    }
    if (audio.byteLength % 2 !== 0) throw new Error(`PCM chunk of ${audio.byteLength} bytes is not whole samples`);
    const view = new DataView(audio);
    const n = audio.byteLength / 2;
    const buffer = context.createBuffer(1, n, sampleRate);
    const samples = buffer.getChannelData(0);
    for (let i = 0; i < n; i++) samples[i] = view.getInt16(2 * i, true) / 32768;
    return buffer;
  }

  /** Start `buffer` exactly where the previous one ends (or a little ahead after a pause);
   *  `entry` (its timeline line) gets the start time. */
  schedule(buffer, entry) {
    const utteranceId = entry.utteranceId;
    const context = this.context;
    if (this.nextTime < context.currentTime + LATE_MARGIN_S) {
      this.nextTime = context.currentTime + (this.format === "opus" ? START_LEAD_OPUS_S : START_LEAD_S);
    }
    const source = context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.output);
    const start = this.nextTime;
    source.start(start);
    this.nextTime = start + buffer.duration;
    entry.start = start;
    this.last = { entry, source };
    if (!this.sources.has(utteranceId)) this.sources.set(utteranceId, new Set());
    const set = this.sources.get(utteranceId);
    set.add(source);
    source.onended = () => {
      set.delete(source);
      if (set.size === 0) this.sources.delete(utteranceId);
    };
  }

  /** Opus decodes whole 20 ms packets: the last one runs on (in silence) past the audio
   *  the daemon sent. Once `utterance_finished` says how long that was, end the last buffer
   *  there, so the next utterance follows without that gap. */
  trimLast(utteranceId, seconds) {
    const last = this.last;
    if (!last || last.entry.utteranceId !== utteranceId) return;
    const played = this.timeline.filter((c) => c.utteranceId === utteranceId).reduce((sum, c) => sum + c.duration, 0);
    const excess = played - seconds;
    if (excess <= 0 || excess >= last.entry.duration) return;
    const end = last.entry.start + last.entry.duration;
    last.entry.duration -= excess;
    try {
      last.source.stop(last.entry.start + last.entry.duration);
    } catch {
      return; // already stopped (cancel): nothing plays on
    }
    if (Math.abs(this.nextTime - end) < 1e-9) this.nextTime -= excess;
  }

  /** Silence the given utterances now and drop their chunks still on the way. */
  stop(utteranceIds) {
    this.held = this.held.filter((h) => !utteranceIds.includes(h.entry.utteranceId));
    for (const id of utteranceIds) {
      this.cancelled.add(id);
      for (const source of this.sources.get(id) ?? []) {
        source.onended = null;
        source.stop();
        source.disconnect();
      }
      this.sources.delete(id);
    }
    if (this.playing() === 0) this.nextTime = 0;
  }

  /** Silence everything (the Cancel button, before the daemon's answer arrives). */
  stopAll() {
    const ids = [...this.sources.keys()];
    if (this.current) ids.push(this.current.id);
    this.stop(ids);
  }

  /** The output level now, 0..1 (RMS of the last few milliseconds). */
  level() {
    if (!this.output) return 0;
    const samples = new Float32Array(this.output.fftSize);
    this.output.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    return Math.min(1, Math.sqrt(sum / samples.length) * 4);
  }
}
