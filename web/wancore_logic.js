// Pure helpers for the WanCore frontend extension: no DOM, no ComfyUI imports, so they can be
// tested with node's built-in test runner (web/tests/*.test.mjs).

/** Wan frame counts are 4n+1. Returns the nearest valid count (ties round up), at least 1. */
export function snapFrames(value) {
  const n = Math.round(Number(value));
  if (!Number.isFinite(n) || n <= 1) return 1;
  const below = n - ((n - 1) % 4);
  const above = below + 4;
  return n - below < above - n ? below : above;
}

/** Nearest multiple of `multiple` (ties round up), at least one multiple. */
export function snapToMultiple(value, multiple) {
  const v = Number(value);
  if (!Number.isFinite(v) || v <= multiple) return multiple;
  return Math.round(v / multiple) * multiple;
}

/**
 * The pixel multiple a width/height must have: VAE stride times the DiT patch size.
 * Wan 2.1 VAE: 8 x patch 2 = 16. Wan 2.2 VAE (TI2V-5B): 16 x patch 2 = 32.
 */
export function sizeMultiple(variant) {
  return typeof variant === "string" && variant.includes("ti2v") ? 32 : 16;
}

/** Human text for a detected model, e.g. "wan2.1-t2v-1.3B · 1.42B params · bf16". */
export function describeVariant(info) {
  if (!info) return "";
  const parts = [info.variant || "unknown model"];
  if (info.params >= 1e9) parts.push(`${(info.params / 1e9).toFixed(2)}B params`);
  else if (info.params) parts.push(`${(info.params / 1e6).toFixed(1)}M params`);
  if (info.dtype) parts.push(info.dtype);
  return parts.join(" · ");
}

/** URL of a saved output file as ComfyUI's /view endpoint serves it. */
export function viewUrl(file) {
  const q = new URLSearchParams({
    filename: file.filename,
    subfolder: file.subfolder || "",
    type: file.type || "output",
  });
  return `/view?${q.toString()}`;
}

/** MIME type for a saved video's file name, for a <video> or <img> element. */
export function videoMime(filename) {
  const ext = String(filename).split(".").pop().toLowerCase();
  return { mp4: "video/mp4", webm: "video/webm", webp: "image/webp" }[ext] || "";
}

/** Which widgets of a node are snapped, and how. Keys are widget names. */
export const SNAPPED_WIDGETS = {
  frames: (v) => snapFrames(v),
  width: (v, variant) => snapToMultiple(v, sizeMultiple(variant)),
  height: (v, variant) => snapToMultiple(v, sizeMultiple(variant)),
};
