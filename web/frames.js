// VOICE_DATA frames (DESIGN.md section 4): u32 type, u32 chunkId, u8 isFinal, then audio.
// A compressed frame is the whole frame in zlib format (RFC 1950), told by its header.

export const VOICE_DATA = 0x00000002;
export const POSITION_UPDATE = 0x00000001; // reserved by the seed; clients ignore it
const HEADER_BYTES = 9;
const ZLIB_SECOND_BYTES = new Set([0x01, 0x5e, 0x9c, 0xda]);

/** True when the frame starts with a zlib header (a raw frame starts with 0x02). */
export function isCompressed(bytes) {
  return bytes.length >= 2 && bytes[0] === 0x78 && ZLIB_SECOND_BYTES.has(bytes[1]);
}

/** Inflate a zlib stream with the browser's own DecompressionStream ('deflate' = RFC 1950). */
export async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/**
 * Parse one binary message into {type, chunkId, isFinal, audio} (audio: an ArrayBuffer
 * of its own). Throws on a frame shorter than its header or a broken zlib stream.
 */
export async function parseFrame(data) {
  let bytes = new Uint8Array(data);
  if (isCompressed(bytes)) bytes = await inflate(bytes);
  if (bytes.length < HEADER_BYTES) throw new Error(`frame of ${bytes.length} bytes is shorter than its header`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return {
    type: view.getUint32(0, true),
    chunkId: view.getUint32(4, true),
    isFinal: view.getUint8(8) === 1,
    audio: bytes.slice(HEADER_BYTES).buffer,
  };
}
