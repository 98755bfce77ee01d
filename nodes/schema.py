"""How ComfyUI lays out a node's inputs: sockets (linked inputs) and widgets, in order.

Saved workflows store widget values by position (``widgets_values``) and links by socket index,
so this order is the public contract of every node (tests/test_workflows.py freezes it).
"""
from __future__ import annotations

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
CONTROL_AFTER_GENERATE = "control_after_generate"


def is_widget(input_type) -> bool:
    return isinstance(input_type, (list, tuple)) or input_type in WIDGET_TYPES


def sockets_and_widgets(node_class) -> tuple[list, list]:
    """``([(socket name, type)], [widget name])`` of a node class, required inputs then optional.

    A widget with ``control_after_generate`` is followed by a ``control_after_generate`` entry
    (the frontend saves its "fixed"/"randomize" setting right after the value)."""
    spec = node_class.INPUT_TYPES()
    sockets, widgets = [], []
    for section in ("required", "optional"):
        for name, (input_type, *options) in spec.get(section, {}).items():
            if is_widget(input_type):
                widgets.append(name)
                if options and options[0].get(CONTROL_AFTER_GENERATE):
                    widgets.append(CONTROL_AFTER_GENERATE)
            else:
                sockets.append((name, input_type))
    return sockets, widgets


def widget_kwargs(node_class, values: list) -> dict:
    """Map saved ``widgets_values`` to input names (the control_after_generate entry dropped).
    Fewer values than widgets (a workflow saved before a widget was appended) leave the rest to
    their defaults."""
    _, widgets = sockets_and_widgets(node_class)
    if len(values) > len(widgets):
        raise ValueError(f"{node_class.__name__} has {len(widgets)} widgets {widgets} but the "
                         f"workflow stores {len(values)} values {values}")
    return {name: value for name, value in zip(widgets, values) if name != CONTROL_AFTER_GENERATE}


def input_spec(node_class, name: str):
    """``(type, options)`` of the required or optional input ``name``, or None."""
    spec = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        if name in spec.get(section, {}):
            input_type, *options = spec[section][name]
            return input_type, (options[0] if options else {})
    return None


def validate_widget(node_class, name: str, value) -> None:
    """Raise ValueError when ``value`` is not acceptable for widget ``name``."""
    found = input_spec(node_class, name)
    if found is None:
        raise ValueError(f"{node_class.__name__} has no input {name!r}")
    input_type, opts = found
    if isinstance(input_type, (list, tuple)):
        if value not in input_type:
            raise ValueError(f"{node_class.__name__}.{name}: {value!r} is not one of {input_type}")
    elif input_type in ("INT", "FLOAT"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{node_class.__name__}.{name}: {value!r} is not a number")
        if not opts.get("min", value) <= value <= opts.get("max", value):
            raise ValueError(f"{node_class.__name__}.{name}: {value} outside "
                             f"[{opts.get('min')}, {opts.get('max')}]")
    elif input_type == "STRING" and not isinstance(value, str):
        raise ValueError(f"{node_class.__name__}.{name}: {value!r} is not text")


# ------------------------------------------------------------------------------ input checks
# What each socket type must carry, and where it comes from (for the error message).

def _config_has(value, attr: str) -> bool:
    return hasattr(getattr(value, "config", None), attr)


def _is_model(value) -> bool:
    return _config_has(value, "model_type") and _config_has(value, "out_dim")


def _is_vae(value) -> bool:
    return _config_has(value, "z_dim") and callable(getattr(value, "decode", None))


def _is_clip_vision(value) -> bool:
    from wan_core.models.clip_vision import CLIPVisionEncoder

    return isinstance(value, CLIPVisionEncoder)


def _is_text_encoder(value) -> bool:
    return (not isinstance(value, (str, bytes)) and callable(getattr(value, "encode", None))
            and not _is_model(value)
            and not _is_vae(value) and not _is_clip_vision(value))


def _is_tensor(value, dims: int) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.dim() == dims


SOCKETS = {
    "WANCORE_MODEL": (_is_model, "a diffusion model (from WanCore Load Diffusion Model, "
                                 "WanCore LoRA or WanCore MoE)"),
    "WANCORE_VAE": (_is_vae, "a VAE (from WanCore Load VAE)"),
    "WANCORE_TEXT_ENCODER": (_is_text_encoder, "a text encoder (from WanCore Load Text Encoder)"),
    "WANCORE_CLIP_VISION": (_is_clip_vision, "a CLIP vision model (from WanCore Load CLIP "
                                             "Vision)"),
    "WANCORE_TEXT_EMBEDS": (lambda v: isinstance(v, dict) and {"positive", "negative"} <= set(v),
                            "text embeddings (from WanCore Text Encode)"),
    "WANCORE_VIDEO_COND": (lambda v: all(hasattr(v, a) for a in ("width", "height", "frames",
                                                                 "is_image_conditioned")),
                           "a video conditioning (from WanCore Empty Video or WanCore Image "
                           "To Video)"),
    "IMAGE": (lambda v: _is_tensor(v, 4) and v.shape[-1] in (3, 4),
              "an IMAGE batch [N, H, W, 3] (from Load Image, VAE Decode, ...)"),
    "LATENT": (lambda v: isinstance(v, dict) and "samples" in v and _is_tensor(v["samples"], 5)
               or isinstance(v, dict) and "samples" in v and _is_tensor(v["samples"], 4),
               "a LATENT {'samples': [B, C, T, h, w]} (from WanCore Sampler or VAE Encode)"),
}


def _describe(value) -> str:
    """What a value is, in the words of the socket types when it is one of them."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return f"{type(value).__name__} {value!r}"[:120]
    for name, (check, _) in SOCKETS.items():
        try:
            if check(value):
                return f"{type(value).__name__} (a {name})"
        except Exception:       # a foreign object's attribute raising: just not this type
            continue
    if isinstance(value, dict) and "samples" not in value and value:
        return f"a dict with keys {sorted(map(str, value))[:6]} (no 'samples')"
    return type(value).__name__


def check_input(node_class, display: str, name: str, value) -> None:
    """Raise ValueError naming the node and the input when ``value`` does not fit the input
    ``name`` of ``node_class`` (socket type, widget type / range, empty image batch)."""
    import math

    found = input_spec(node_class, name)
    if found is None:
        return                                       # hidden or extra inputs: not ours
    input_type, opts = found
    where = f"{display}: input '{name}'"
    if isinstance(input_type, (list, tuple)):
        if not isinstance(value, str):
            raise ValueError(f"{where} must be one of its choices (text), got {_describe(value)}")
        # file lists (*_name): the loader says itself where a missing file should go
        if value not in input_type and not name.endswith("_name"):
            shown = ", ".join(map(repr, list(input_type)[:8]))
            raise ValueError(f"{where} is {value!r}; choose one of {shown}")
    elif input_type in ("INT", "FLOAT"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value}")
        if input_type == "INT" and not float(value).is_integer():
            raise ValueError(f"{where} must be a whole number, got {value}")
        low, high = opts.get("min", value), opts.get("max", value)
        if not low <= value <= high:
            raise ValueError(f"{where} is {value}, outside its range [{low}, {high}]")
    elif input_type == "STRING":
        if not isinstance(value, str):
            raise ValueError(f"{where} must be text, got {_describe(value)}")
    elif input_type == "BOOLEAN":
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {_describe(value)}")
    elif input_type in SOCKETS:
        check, wanted = SOCKETS[input_type]
        try:
            ok = check(value)
        except Exception:
            ok = False
        if not ok:
            if input_type == "LATENT" and isinstance(value, dict) and "samples" not in value:
                raise ValueError(f"{where} has no 'samples' tensor (keys: "
                                 f"{sorted(map(str, value))}); connect {wanted}")
            raise ValueError(f"{where} needs {wanted}; got {_describe(value)}")
        if input_type == "IMAGE" and value.shape[0] == 0:
            raise ValueError(f"{where} is an empty image batch (0 images); connect at least "
                             "one image")


def with_input_checks(node_class, display: str):
    """Wrap ``node_class``'s FUNCTION so that every input is checked (``check_input``) before
    the node runs; idempotent."""
    import functools
    import inspect

    func = getattr(node_class, node_class.FUNCTION)
    if getattr(func, "_wancore_checked", False):
        return node_class
    signature = inspect.signature(func)

    @functools.wraps(func)
    def checked(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        for name, value in list(bound.arguments.items())[1:]:
            if value is None and signature.parameters[name].default is None:
                continue                              # an optional socket left empty
            check_input(node_class, display, name, value)
        return func(self, *args, **kwargs)

    checked._wancore_checked = True
    setattr(node_class, node_class.FUNCTION, checked)
    return node_class
