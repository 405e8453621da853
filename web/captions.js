// Captions and a mouth that move with the voice: the daemon's `words` and `visemes` events
// (the page connects with timing=all; DESIGN.md section 11) placed on the AudioContext
// clock through the player's own schedule of each chunk, so the highlighted word is the
// one whose audio is playing, whatever the network or decoding did to arrival times.

// Mouth opening per viseme (Oculus/OVR set): half-width and half-height of the lips' gap,
// in SVG units of a 100 x 60 box. Closed for silence and the lip sounds (p, b, m).
const MOUTH = {
  sil: [22, 1], PP: [20, 0.5], FF: [21, 3], TH: [22, 5], DD: [22, 6], kk: [21, 8], CH: [15, 8],
  SS: [24, 4], nn: [22, 5], RR: [16, 7], aa: [24, 16], E: [26, 10], I: [27, 7], O: [15, 13], U: [11, 9],
};

export class Captions {
  /** `player`: the AudioPlayer (its `timeline` says where each chunk plays). */
  constructor(player, { captions, mouth }) {
    this.player = player;
    this.captionsEl = captions;
    this.mouthEl = mouth;
    this.utterances = new Map(); // id -> {words: [], visemes: [], spans: []}
    this.shown = null; // the utterance whose words are on screen
    this.current = { utteranceId: null, index: -1, word: null, viseme: "sil", utteranceMs: null, contextTime: null };
    this.frame = this.frame.bind(this);
    requestAnimationFrame(this.frame);
  }

  entry(id) {
    if (!this.utterances.has(id)) this.utterances.set(id, { words: [], visemes: [], spans: [] });
    return this.utterances.get(id);
  }

  words(event) {
    this.entry(event.utterance_id).words.push(...event.words);
  }

  visemes(event) {
    this.entry(event.utterance_id).visemes.push(...event.visemes);
  }

  /** Forget an utterance once it is over (cancelled ones at once). */
  finished(event) {
    if (event.status === "cancelled") this.utterances.delete(event.utterance_id);
  }

  /** Where `contextTime` falls in an utterance's audio: its chunks as the player scheduled them. */
  locate(contextTime) {
    let best = null;
    let offset = 0;
    let lastId = null;
    for (const chunk of this.player.timeline) {
      if (chunk.utteranceId !== lastId) {
        offset = 0;
        lastId = chunk.utteranceId;
      }
      if (chunk.ok && chunk.start !== null && chunk.start <= contextTime) {
        best = { utteranceId: chunk.utteranceId, ms: (offset + Math.min(contextTime - chunk.start, chunk.duration)) * 1000 };
      }
      offset += chunk.duration;
    }
    return best;
  }

  frame() {
    requestAnimationFrame(this.frame);
    this.update();
  }

  /** Highlight the word and shape the mouth for the audio playing now; returns `current`. */
  update() {
    const context = this.player.context;
    if (!context) return this.current;
    const now = context.currentTime;
    const at = this.locate(now);
    const utterance = at && this.utterances.get(at.utteranceId);
    if (!utterance) {
      this.setMouth("sil");
      return this.current;
    }
    const fresh = this.shown !== at.utteranceId || utterance.spans.length !== utterance.words.length;
    if (fresh) this.render(at.utteranceId);
    // The word being said: the last one begun (a pause keeps the previous highlighted).
    let index = -1;
    for (let k = 0; k < utterance.words.length && utterance.words[k].start_ms <= at.ms; k++) index = k;
    const viseme = utterance.visemes.find((v) => v.start_ms <= at.ms && at.ms < v.end_ms)?.viseme ?? "sil";
    if (fresh || index !== this.current.index || at.utteranceId !== this.current.utteranceId) {
      utterance.spans.forEach((span, k) => span.classList.toggle("current", k === index));
    }
    this.current = {
      utteranceId: at.utteranceId, index, word: index >= 0 ? utterance.words[index].word : null,
      viseme, utteranceMs: at.ms, contextTime: now,
    };
    this.setMouth(viseme);
    return this.current;
  }

  render(id) {
    const utterance = this.utterances.get(id);
    this.shown = id;
    utterance.spans = utterance.words.map((w) => {
      const span = document.createElement("span");
      span.className = "word";
      span.textContent = w.word;
      return span;
    });
    const parts = [];
    utterance.spans.forEach((span, k) => parts.push(...(k ? [" ", span] : [span])));
    this.captionsEl.replaceChildren(...parts);
  }

  setMouth(viseme) {
    const [rx, ry] = MOUTH[viseme] ?? MOUTH.sil;
    this.mouthEl.setAttribute("rx", String(rx));
    this.mouthEl.setAttribute("ry", String(ry));
    this.mouthEl.dataset.viseme = viseme;
  }
}
