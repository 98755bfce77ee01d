import { test } from "node:test";
import assert from "node:assert/strict";
import {
  snapFrames, snapToMultiple, sizeMultiple, describeVariant, viewUrl, videoMime, SNAPPED_WIDGETS,
} from "../wancore_logic.js";

test("frames snap to the nearest 4n+1", () => {
  assert.equal(snapFrames(81), 81);
  assert.equal(snapFrames(80), 81);
  assert.equal(snapFrames(78), 77);
  assert.equal(snapFrames(79), 81); // tie rounds up
  assert.equal(snapFrames(0), 1);
  assert.equal(snapFrames(2), 1);
  assert.equal(snapFrames(3), 5);
  assert.equal(snapFrames("17"), 17);
});

test("sizes snap to the variant's multiple", () => {
  assert.equal(snapToMultiple(832, 16), 832);
  assert.equal(snapToMultiple(830, 16), 832);
  assert.equal(snapToMultiple(3, 16), 16);
  assert.equal(sizeMultiple("wan2.2-ti2v-5B"), 32);
  assert.equal(sizeMultiple("wan2.1-t2v-1.3B"), 16);
  assert.equal(sizeMultiple(undefined), 16);
  assert.equal(SNAPPED_WIDGETS.width(700, "wan2.2-ti2v-5B"), 704);
  assert.equal(SNAPPED_WIDGETS.frames(120), 121);
});

test("variant text and file urls", () => {
  assert.equal(describeVariant({ variant: "wan2.1-t2v-1.3B", params: 1.419e9, dtype: "bf16" }),
    "wan2.1-t2v-1.3B · 1.42B params · bf16");
  assert.equal(describeVariant({ variant: "custom", params: 2.5e6 }), "custom · 2.5M params");
  assert.equal(describeVariant(null), "");
  assert.equal(viewUrl({ filename: "a b.mp4", subfolder: "x", type: "output" }),
    "/view?filename=a+b.mp4&subfolder=x&type=output");
  assert.equal(videoMime("clip.MP4"), "video/mp4");
  assert.equal(videoMime("clip.webp"), "image/webp");
});
