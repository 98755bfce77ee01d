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


def validate_widget(node_class, name: str, value) -> None:
    """Raise ValueError when ``value`` is not acceptable for widget ``name``."""
    spec = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        if name in spec.get(section, {}):
            input_type, *options = spec[section][name]
            opts = options[0] if options else {}
            break
    else:
        raise ValueError(f"{node_class.__name__} has no input {name!r}")
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
