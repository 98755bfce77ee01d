// ComfyUI frontend extension for ComfyUI-WanCore:
//  (a) inline preview of the video a WanCore save node wrote,
//  (b) frames snapped to 4n+1 and width/height to valid multiples while the user edits them,
//  (c) the detected model variant shown on loader nodes after a run.
// The logic lives in wancore_logic.js (tested with `node --test web/tests/`).
import { app } from "../../scripts/app.js";
import { SNAPPED_WIDGETS, describeVariant, viewUrl, videoMime } from "./wancore_logic.js";

// The variant most recently reported by a WanCore model loader; decides the size multiple.
let lastVariant = undefined;

function installSnapping(node) {
  for (const widget of node.widgets || []) {
    const snap = SNAPPED_WIDGETS[widget.name];
    if (!snap) continue;
    const original = widget.callback;
    widget.callback = function (value, ...rest) {
      const snapped = snap(value, lastVariant);
      if (snapped !== widget.value) widget.value = snapped;
      return original?.call(this, widget.value, ...rest);
    };
  }
}

function showVariant(node, info) {
  const text = describeVariant(info);
  if (!text) return;
  lastVariant = info.variant;
  let widget = node.widgets?.find((w) => w.name === "wancore_detected");
  if (!widget) {
    widget = node.addWidget("text", "wancore_detected", text, () => {}, { serialize: false });
    widget.disabled = true;
  }
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

function showVideo(node, file) {
  const url = viewUrl(file);
  const isImage = videoMime(file.filename).startsWith("image/");
  let holder = node.wancorePreview;
  if (!holder) {
    holder = document.createElement("div");
    holder.style.width = "100%";
    node.addDOMWidget("wancore_preview", "preview", holder, { serialize: false });
    node.wancorePreview = holder;
  }
  holder.replaceChildren();
  const el = document.createElement(isImage ? "img" : "video");
  el.src = url;
  el.style.width = "100%";
  if (!isImage) {
    Object.assign(el, { controls: true, loop: true, muted: true, autoplay: true });
  }
  holder.appendChild(el);
  node.setSize?.([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
}

app.registerExtension({
  name: "WanCore.VideoTools",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("WanCore")) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      installSnapping(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const variant = message?.wancore_variant?.[0];
      if (variant) showVariant(this, variant);
      const video = message?.wancore_video?.[0];
      if (video) showVideo(this, video);
    };
  },
});
