"""Shared pytest setup: deterministic CPU runs with a bounded thread count."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def load_pack():
    """Import this repository as ComfyUI would import a custom node folder."""
    name = "comfyui_wancore_pack"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """A ComfyUI ``models`` folder of tiny random checkpoints (tests/tiny_models.py)."""
    from tests.tiny_models import write_models

    return write_models(tmp_path_factory.mktemp("models"))
