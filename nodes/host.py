"""The one module that talks to the ComfyUI host.

Everything else in ``nodes/`` and all of ``wan_core`` stays host-free. Each function falls back
to a sensible stand-alone behaviour when ComfyUI is not importable (tests, scripts), so the
nodes can be exercised without a running ComfyUI.

Environment for the stand-alone fallback: ``WANCORE_MODELS_DIR`` (default ``./models``) holds
``diffusion_models/``, ``vae/``, ``text_encoders/``, ``clip_vision/``, ``loras/``;
``WANCORE_OUTPUT_DIR`` (default ``./output``) receives saved videos.
"""
from __future__ import annotations

import os
import weakref
from pathlib import Path

try:  # pragma: no cover - exercised only inside ComfyUI
    import folder_paths as _folder_paths
except ImportError:
    _folder_paths = None

try:  # pragma: no cover
    import comfy.utils as _comfy_utils
    import comfy.model_management as _model_management
except ImportError:
    _comfy_utils = None
    _model_management = None

# ComfyUI folder names for each kind of model (text_encoders was "clip" in old ComfyUI).
MODEL_FOLDERS = {
    "diffusion_models": ("diffusion_models", "unet"),
    "vae": ("vae",),
    "text_encoders": ("text_encoders", "clip"),
    "clip_vision": ("clip_vision",),
    "loras": ("loras",),
}
MODEL_SUFFIXES = (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin", ".gguf")
# The embedded demo model (wan_core/demo/weights) is offered in the loaders' lists under this
# folder name, so the demo workflow runs without any download.
EMBEDDED_FOLDER = "wancore-demo"
EMBEDDED = {"diffusion_models": ("t2v", "i2v", "high_noise", "low_noise", "vace_module"),
            "vae": ("vae",),
            "text_encoders": ("text_encoder",), "loras": ("fast_lora",)}


def embedded_models(kind: str) -> dict[str, Path]:
    """Dropdown name -> path of the embedded demo files of one kind (those present)."""
    from wan_core.demo import FILES, WEIGHTS_DIR

    paths = {f"{EMBEDDED_FOLDER}/{FILES[n]}": WEIGHTS_DIR / FILES[n] for n in EMBEDDED.get(kind, ())}
    return {name: path for name, path in paths.items() if path.is_file()}


def in_comfyui() -> bool:
    return _folder_paths is not None


def _standalone_models_dir() -> Path:
    return Path(os.environ.get("WANCORE_MODELS_DIR", "models"))


def list_models(kind: str) -> list[str]:
    """File names (relative to the model folder) that a loader dropdown offers."""
    names: list[str] = []
    if _folder_paths is not None:
        for folder in MODEL_FOLDERS[kind]:
            try:
                names.extend(_folder_paths.get_filename_list(folder))
                roots = _folder_paths.get_folder_paths(folder)
            except KeyError:
                continue
            # ComfyUI's lists leave out .gguf (not a registered model extension): add them
            names.extend(p.relative_to(root).as_posix() for root in map(Path, roots)
                         if root.is_dir() for p in root.rglob("*.gguf") if p.is_file())
    else:
        root = _standalone_models_dir() / MODEL_FOLDERS[kind][0]
        if root.is_dir():
            names = [p.relative_to(root).as_posix() for p in root.rglob("*")
                     if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES]
    return sorted(dict.fromkeys(names)) + sorted(set(embedded_models(kind)) - set(names))


def model_path(kind: str, name: str) -> str:
    """Full path of a model file chosen in a dropdown; a clear error when it is gone."""
    if _folder_paths is not None:
        for folder in MODEL_FOLDERS[kind]:
            try:
                path = _folder_paths.get_full_path(folder, name)
            except KeyError:
                continue
            if path:
                return path
    else:
        path = _standalone_models_dir() / MODEL_FOLDERS[kind][0] / name
        if path.is_file():
            return str(path)
    embedded = embedded_models(kind).get(name)
    if embedded is not None:
        return str(embedded)
    raise FileNotFoundError(
        f"model file '{name}' was not found in models/{MODEL_FOLDERS[kind][0]}; "
        "put it there and press 'r' to refresh the node's list")


def output_directory() -> str:
    if _folder_paths is not None:
        return _folder_paths.get_output_directory()
    path = Path(os.environ.get("WANCORE_OUTPUT_DIR", "output"))
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def torch_device():
    """The device ComfyUI runs models on (CPU when stand-alone and no GPU)."""
    import torch

    if _model_management is not None:
        return _model_management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device():
    import torch

    if _model_management is not None:
        return _model_management.unet_offload_device()
    return torch.device("cpu")


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interruption exception when the user pressed Cancel."""
    if _model_management is not None:
        _model_management.throw_exception_if_processing_interrupted()


class ProgressBar:
    """ComfyUI's progress bar (with an optional preview image), or a no-op stand-alone."""

    def __init__(self, total: int):
        self.total = total
        self._bar = _comfy_utils.ProgressBar(total) if _comfy_utils is not None else None

    def update(self, step: int, preview=None) -> None:
        if self._bar is not None:
            self._bar.update_absolute(step, self.total, preview)


# module -> its ComfyUI ModelPatcher. Kept here, not on the module, so that copies of a model
# (a LoRA-patched one shares the base's tensors) never carry the base's patcher along.
_PATCHERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _patcher(module):
    """The ComfyUI ModelPatcher managing ``module`` (created once per module).

    The patcher writes bookkeeping attributes (``device``, loaded-memory counters) onto the
    model it manages, so it manages a plain container holding our module rather than the
    module itself."""
    import torch
    import comfy.model_patcher  # pragma: no cover - only inside ComfyUI

    patcher = _PATCHERS.get(module)
    if patcher is None:
        holder = torch.nn.Module()
        holder.add_module("wancore", module)
        patcher = comfy.model_patcher.ModelPatcher(
            holder, load_device=torch_device(), offload_device=offload_device())
        _PATCHERS[module] = patcher
    return patcher


def load_for_compute(module):
    """Make ``module`` resident on the compute device before a heavy call.

    An on-demand model (``wan_core.loading.on_demand.OnDemandDiT``) is read from its file
    first. Inside ComfyUI the module is registered with its model management, which frees other
    models when memory is needed and may offload ours later when another model needs the room.
    Stand-alone it is simply moved to the compute device. Returns the device.
    """
    if _is_on_demand(module):
        handle = module
        if _model_management is None:            # read straight onto the compute device
            handle.to(torch_device()).load()
            return torch_device()
        module = handle.load()
        streaming = getattr(handle, "block_streaming", None)
        if streaming is not None:
            # Streamed blocks bypass ComfyUI's loader (it would load every block): make room
            # for what stays on the GPU ourselves.
            from wan_core.ops.streaming import device_bytes

            _model_management.free_memory(device_bytes(module, streaming), torch_device())
            handle.to(torch_device())
            return torch_device()
    if _model_management is not None:
        _model_management.load_models_gpu([_patcher(module)], force_full_load=True)
        return torch_device()
    device = torch_device()
    module.to(device)
    return device


def _is_on_demand(model) -> bool:
    return hasattr(model, "release") and hasattr(model, "load")


def release(module) -> None:
    """Move ``module`` off the compute device (the text encoder), or, for an on-demand model
    (the idle Wan 2.2 expert), drop its weights from memory altogether: it is re-read from its
    file when needed, never parked in CPU RAM."""
    if _is_on_demand(module):
        handle = module
        loaded = handle.module
        if loaded is not None and loaded in _PATCHERS:
            patcher = _PATCHERS.pop(loaded)
            if _model_management is not None:
                # Forget it in ComfyUI's list of loaded models without copying it back to RAM.
                _model_management.current_loaded_models[:] = [
                    m for m in _model_management.current_loaded_models if m.model is not patcher]
            del patcher
        handle.release()
        if _model_management is not None:
            _model_management.soft_empty_cache()
        return
    if _model_management is not None and module in _PATCHERS:
        _PATCHERS[module].detach()
        return
    module.to(offload_device())


def next_output_path(prefix: str, extension: str) -> tuple[str, str, str]:
    """A fresh ``(full_path, filename, subfolder)`` in the output folder for ``prefix``
    (which may contain a subfolder, e.g. ``"videos/WanCore"``), numbered like ComfyUI's."""
    out_dir = output_directory()
    if _folder_paths is not None:
        folder, name, counter, subfolder, _ = _folder_paths.get_save_image_path(prefix, out_dir)
        _require_inside(folder, out_dir, prefix)
    else:
        sub, _, name = prefix.replace("\\", "/").rpartition("/")
        if not name or name in (".", ".."):
            raise ValueError(f"filename_prefix {prefix!r} must end with a file name, e.g. "
                             "'WanCore/video'")
        folder = os.path.join(out_dir, sub)
        subfolder = sub
        _require_inside(folder, out_dir, prefix)
        os.makedirs(folder, exist_ok=True)
        counter = 1
        for existing in os.listdir(folder):
            stem = existing.rsplit(".", 1)[0]
            if stem.startswith(name + "_") and stem[len(name) + 1:].rstrip("_").isdigit():
                counter = max(counter, int(stem[len(name) + 1:].rstrip("_")) + 1)
    filename = f"{name}_{counter:05}_.{extension}"
    return os.path.join(folder, filename), filename, subfolder


def _require_inside(folder: str, out_dir: str, prefix: str) -> None:
    """Every saved file stays under the output folder: no absolute prefixes, no '..' out."""
    root = os.path.realpath(out_dir)
    target = os.path.realpath(folder)
    if os.path.isabs(prefix.replace("\\", "/")) or os.path.commonpath([root, target]) != root:
        raise ValueError(f"filename_prefix {prefix!r} points outside the output folder "
                         f"({out_dir}); use a relative name such as 'WanCore/video'")
