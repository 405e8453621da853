// AudioPlayer: turns the daemon's chunks into gapless sound. Each chunk is decoded on its
// own and scheduled at an exact time on the AudioContext clock, right where the previous
// one ends, so there is neither gap nor overlap (unlike chaining on `onended`).

import { VOICE_DATA, parseFrame } from "./frames.js";
import { OPUS_RATE, OpusUtterance } from "./opus.js";

// Audio scheduled ahead of the clock when playback (re)starts: room for the next chunk
// to arrive and decode before the first one has played out.
const START_LEAD_S = 0.1;
// Opus goes through WebCodecs: every chunk is a decode and a flush handed to the browser's
// media thread and back, which a busy machine can hold up for a couple of hundred ms (seen
// in the full test run on 2 cores), while an utterance's first chunk is only ~34 ms of
// sound once pre_skip is dropped. More lead there keeps the second chunk in time.
const START_LEAD_OPUS_S = 0.3;
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
      entry.start = this.schedule(buffer, entry.utteranceId);
      this.last = { entry, source: this.lastSource };
    });
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

  /** Start `buffer` exactly where the previous one ends (or a little ahead after a pause). */
  schedule(buffer, utteranceId) {
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
    this.lastSource = source;
    if (!this.sources.has(utteranceId)) this.sources.set(utteranceId, new Set());
    const set = this.sources.get(utteranceId);
    set.add(source);
    source.onended = () => {
      set.delete(source);
      if (set.size === 0) this.sources.delete(utteranceId);
    };
    return start;
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
