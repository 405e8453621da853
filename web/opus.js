// Opus in the page (DESIGN.md section 12): a VOICE_DATA payload holds 20 ms Opus packets,
// each as u16 LE length + bytes. One WebCodecs AudioDecoder per utterance decodes them in
// order (the codec state carries from chunk to chunk); the first `pre_skip` samples of the
// utterance (48 kHz, as in RFC 7845) are the encoder's look-ahead and are dropped.
// WebCodecs exists only in secure contexts: https, or http on 127.0.0.1/localhost.

export const OPUS_RATE = 48000; // what Opus decoders produce
const PACKET_US = 20000; // each packet is 20 ms; timestamps only need to increase
const CONFIG = { codec: "opus", sampleRate: OPUS_RATE, numberOfChannels: 1 };

/** True when this browser can decode Opus with WebCodecs (else the page asks for pcm). */
export async function opusSupported() {
  if (typeof AudioDecoder === "undefined" || typeof EncodedAudioChunk === "undefined") return false;
  try {
    return (await AudioDecoder.isConfigSupported(CONFIG)).supported === true;
  } catch {
    return false;
  }
}

/** The packets of one payload (views into it). Throws if a length runs past the end. */
export function splitPackets(payload) {
  const bytes = new Uint8Array(payload);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const packets = [];
  let at = 0;
  while (at < bytes.length) {
    if (at + 2 > bytes.length) throw new Error(`opus payload ends inside a packet length at byte ${at}`);
    const size = view.getUint16(at, true);
    at += 2;
    if (at + size > bytes.length) throw new Error(`opus packet of ${size} bytes runs past the payload's end`);
    packets.push(bytes.subarray(at, at + size));
    at += size;
  }
  return packets;
}

/** One utterance's decoder: chunk payloads in, Float32 samples at 48 kHz out. */
export class OpusUtterance {
  constructor(preSkip = 0) {
    this.toSkip = preSkip;
    this.timestamp = 0;
    this.outputs = [];
    this.failure = null;
    this.decoder = new AudioDecoder({
      output: (data) => this.outputs.push(data),
      error: (error) => {
        this.failure = error;
      },
    });
    this.decoder.configure(CONFIG);
  }

  /** Decode one chunk: its packets, then a flush so every sample of them comes out. */
  async decode(payload) {
    for (const packet of splitPackets(payload)) {
      this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: this.timestamp, data: packet }));
      this.timestamp += PACKET_US;
    }
    try {
      await this.decoder.flush();
    } catch (error) {
      throw this.failure ?? error;
    }
    if (this.failure) throw this.failure;
    const parts = this.outputs.splice(0);
    const total = parts.reduce((sum, data) => sum + data.numberOfFrames, 0);
    const samples = new Float32Array(total);
    let at = 0;
    for (const data of parts) {
      data.copyTo(samples.subarray(at, at + data.numberOfFrames), { planeIndex: 0, format: "f32-planar" });
      at += data.numberOfFrames;
      data.close();
    }
    const skip = Math.min(this.toSkip, samples.length);
    this.toSkip -= skip;
    return samples.subarray(skip);
  }

  close() {
    for (const data of this.outputs.splice(0)) data.close();
    if (this.decoder.state !== "closed") this.decoder.close();
  }
}
