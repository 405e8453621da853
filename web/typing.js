// "Type as you go": the text box as a streamed utterance (DESIGN.md section 10). The first
// keystrokes open it with text_start, each batch of typed text goes out as text_append with
// exactly the characters added at the end since the last batch, and done() sends text_end.
// Used by app.js, which owns the WebSocket and hands us its `send`.
//
// Text already sent cannot be unsaid, so an edit anywhere before the end of what was sent
// is ignored: the box's new content becomes the base, and only text typed after it is sent.

const DEBOUNCE_MS = 200;
// Typing one of these sends the batch at once: a word or clause is complete.
const BOUNDARY = /[\s.,;:!?]$/;

export class TypeAsYouGo {
  /**
   * @param {(message: object) => boolean} send  app.js's send (false when not connected)
   * @param {() => object} options  extra text_start fields (provider), read when a stream opens
   */
  constructor(send, options = () => ({})) {
    this.send = send;
    this.options = options;
    this.sent = ""; // the start of the box that has been sent (or ignored as an edit)
    this.stream = null; // the open stream: {id (null until accepted), ending, tail}
    this.waiting = []; // streams whose text_start has no answer yet, oldest first
    this.timer = null;
  }

  /** The box changed (an input event): send now at a word boundary, else after a pause. */
  typed(value) {
    clearTimeout(this.timer);
    if (BOUNDARY.test(value)) this.flush(value);
    else this.timer = setTimeout(() => this.flush(value), DEBOUNCE_MS);
  }

  /** Send whatever was added at the end of the box since the last batch. */
  flush(value) {
    clearTimeout(this.timer);
    if (!value.startsWith(this.sent)) {
      this.sent = value; // an edit of sent text: ignored (see the top)
      return;
    }
    const added = value.slice(this.sent.length);
    if (!added) return;
    const stream = this.stream;
    if (!stream) {
      if (!added.trim()) return; // nothing to say yet; a stream opens on the first word
      if (!this.send({ type: "text_start", text: added, ...this.options() })) return;
      this.stream = { id: null, ending: false, tail: "" };
      this.waiting.push(this.stream);
      this.sent = value;
      return;
    }
    if (stream.id === null) return; // sent once `accepted` gives the id
    if (this.send({ type: "text_append", utterance_id: stream.id, text: added })) this.sent = value;
  }

  /** Whether text of the box went out (or a stream is open): switching off then ends it. */
  active() {
    return this.stream !== null || this.sent !== "";
  }

  /** Enter or Done: send the rest with text_end. The caller then clears the box. */
  done(value) {
    clearTimeout(this.timer);
    if (!this.stream) this.flush(value); // ended before any batch went out: open it now
    const stream = this.stream;
    stream && (stream.tail = value.startsWith(this.sent) ? value.slice(this.sent.length) : "");
    this.stream = null;
    this.sent = "";
    if (!stream) return;
    stream.ending = true;
    if (stream.id !== null) this.end(stream);
  }

  end(stream) {
    const message = { type: "text_end", utterance_id: stream.id };
    if (stream.tail) message.text = stream.tail;
    this.send(message);
  }

  /** An `accepted` with `streaming: true`: the answer to our oldest text_start. */
  accepted(utteranceId, value) {
    const stream = this.waiting.shift();
    if (!stream) return;
    stream.id = utteranceId;
    if (stream.ending) this.end(stream);
    else if (stream === this.stream) this.flush(value); // what was typed while waiting
  }

  /**
   * An `error` with no utterance id while a text_start waits: its refusal (rate limit, closed
   * session), since in this mode the page sends nothing else that needs an answer. The text
   * stays counted as sent: the log shows the error, and the next words try a new stream.
   */
  refused() {
    const stream = this.waiting.shift();
    if (stream && stream === this.stream) this.stream = null;
  }

  /** The daemon ended our open stream (idle end, cancel): the next words open a new one. */
  ended(utteranceId) {
    if (this.stream && this.stream.id === utteranceId) this.stream = null;
  }

  /** `unknown_utterance` (it carries no id): the daemon no longer knows our open stream. */
  lost() {
    if (this.stream && this.stream.id !== null) this.stream = null;
  }

  /** The connection closed: streams die with it (the daemon ends them itself). */
  reset() {
    clearTimeout(this.timer);
    this.stream = null;
    this.waiting = [];
  }
}
