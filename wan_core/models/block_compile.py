"""Block compile (``compile=True``): the transformer block compiled once and run by every block.

All blocks of a Wan DiT run the same code on weights of the same shapes, and Dynamo lifts
module parameters to graph inputs, so ONE ``torch.compile`` of a block class's ``run`` serves
every block of every model of that layout: the 30 or 40 blocks, both Wan 2.2 experts, LoRA
copies (``apply_loras``), streamed blocks (their weights are swapped in by hooks around the
block call, outside the compiled code), fp8-stored and ``compute='fp8'`` Linears. The step
cache decides before the model is called, so it is untouched. Inside the graph Inductor fuses
the element-wise chains between the matrix products and attention: LayerNorm + modulation,
RMSNorm + RoPE (spelled in real arithmetic there, ``dit._rms_norm_rope_real``), the gated
residual adds, GELU.

The graph is specialised to the shapes it sees (``dynamic=False``): a new resolution, batch
size or number of distinct timesteps compiles once more (the first step of a new size), up to
``CACHE_LIMIT`` variants per block class; past that Dynamo runs the block eagerly. A block
structure that differs (a LoRA on some blocks only, a GGUF layer type) is one more variant.

Failures: where compiling is impossible (no C compiler or Triton, an operation Dynamo or
Inductor cannot handle) the first call warns once and every block of every model runs eagerly
from then on. Nothing is lost mid-sampling: the compiled code never writes into the block's
input (it works on a copy, which Inductor folds into the first kernel that reads it), so the
call that failed is simply run again eagerly.

    from wan_core.models.block_compile import compile_blocks
    compile_blocks(model)            # what load_dit(..., compile=True) does
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn

CACHE_LIMIT = 64        # compiled variants kept per block class (the wrapper's dynamo limit)
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _torch_version() -> tuple:
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


@contextlib.contextmanager
def _compile_settings():
    """Around each compiled call: a recompile limit of at least ``CACHE_LIMIT``, parameters
    as graph inputs on PyTorch 2.4 (the default from 2.5; without it every block would compile
    its own graph), and Dynamo's notice about tracing through ``functools.lru_cache`` (the
    attention backend and fp8 checks are cached functions, whose results do not change)
    kept quiet."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    patches = {name: max(int(getattr(config, name)), CACHE_LIMIT)}
    if _torch_version() < (2, 5):
        patches["inline_inbuilt_nn_modules"] = True
    with config.patch(**patches), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
        yield


def _on_a_copy(run: Callable) -> Callable:
    """``run(block, x, *rest)`` on a copy of ``x`` (eager ``run`` updates ``x`` in place)."""
    def block_on_a_copy(block, x, *rest):
        return run(block, x.clone(), *rest)
    return block_on_a_copy


class CompiledRun:
    """One block class's ``run`` compiled (lazily, at the first call) and shared by all its
    blocks: ``compiled(block, x, *rest)`` equals ``block.run(x, *rest)``."""

    def __init__(self, compiler: "BlockCompiler", run: Callable):
        self.compiler = compiler
        self.run = run
        self._function: Optional[Callable] = None

    def __deepcopy__(self, memo):        # models are deep-copied (apply_loras): stay shared
        return self

    def __call__(self, block: nn.Module, x: torch.Tensor, *rest):
        if self.compiler.error is not None:
            return self.run(block, x, *rest)
        try:
            with _compile_settings():
                if self._function is None:
                    self._function = torch.compile(_on_a_copy(self.run), dynamic=False)
                return self._function(block, x, *rest)
        except _OUT_OF_MEMORY:
            raise
        except Exception as error:           # noqa: BLE001 - any compile failure
            # Eagerly on the untouched input: an error of the call itself (bad input) is
            # raised here as without compile, and compiling stays on.
            out = self.run(block, x, *rest)
            self.compiler.give_up(error)
            return out


class BlockCompiler:
    """The compiled block forwards of this process, one per block class; ``error`` is the
    failure that turned compiling off (None while it works)."""

    def __init__(self):
        self.kinds: dict = {}
        self.error: Optional[BaseException] = None

    def for_class(self, cls: type) -> CompiledRun:
        if cls not in self.kinds:
            self.kinds[cls] = CompiledRun(self, cls.run)
        return self.kinds[cls]

    def give_up(self, error: BaseException) -> None:
        if self.error is not None:
            return
        self.error = error
        first = (str(error).strip().splitlines() or [""])[0][:300]
        warnings.warn(f"compile=True: the transformer block could not be compiled "
                      f"({type(error).__name__}: {first}); the model runs without "
                      "compilation from now on (same results, eager speed)", stacklevel=4)


_COMPILER = BlockCompiler()


def compiler() -> BlockCompiler:
    """This process's :class:`BlockCompiler`."""
    return _COMPILER


def reset() -> None:
    """Forget the compiled forwards and any failure (tests); models compiled before keep the
    previous ones."""
    global _COMPILER
    _COMPILER = BlockCompiler()


def compile_blocks(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run every transformer block of ``model`` (a ``WanDiT``; VACE blocks included) through
    its class's shared compiled ``run`` (``enabled=False``: eagerly again). Returns ``model``.
    Nothing is compiled until the first forward."""
    sequence = getattr(model, "block_sequence", None)
    blocks = sequence() if callable(sequence) else list(getattr(model, "blocks", ()))
    if not blocks:
        raise ValueError("compile=True needs a Wan DiT (a model with transformer blocks)")
    for block in blocks:
        block.compiled = compiler().for_class(type(block)) if enabled else None
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model``'s blocks run compiled (``compile_blocks``)."""
    sequence = getattr(model, "block_sequence", None)
    blocks = sequence() if callable(sequence) else []
    return any(getattr(b, "compiled", None) is not None for b in blocks)
