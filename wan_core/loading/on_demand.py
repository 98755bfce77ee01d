"""A diffusion model read from its file when it is first needed and dropped when it is idle.

Wan 2.2 A14B is two 14B experts of which only one runs at a time. Holding both costs twice the
RAM (two fp8 experts are ~29 GB, the usual crash on 32 GB machines). An :class:`OnDemandDiT`
knows its file and its configuration (read from the header alone) and loads the model on the
first call; :meth:`OnDemandDiT.release` forgets it, so the sampler's expert switch
(``wan_core.sampling.OffloadIdleExpert``) frees the idle expert instead of moving it to CPU RAM,
and the next use re-reads it from the file (from the page cache when the OS kept it).

LoRAs given through :func:`wan_core.apply_loras` are recorded on a new handle (checked against
the model's layers when they are given) and applied to a shared copy of the file handle's model
when it loads.
"""
from __future__ import annotations

import threading
from typing import Mapping, Optional, Sequence

import torch

from ..models.attention import resolve_backend
from ..models.dit import WanDiT
from ..ops.streaming import BlockStreaming, place, unstream
from .dit import _stored_weight_dtype, describe_dit, load_dit, read_dit, stored_dtype


class OnDemandDiT:
    """A Wan DiT handle: ``config`` now, the weights on first use, none after ``release()``.

    Calls like the model it stands for: ``handle(x, t, context, clip_fea=None, y=None)`` loads
    the model (on ``device``) if needed and returns its velocity ``[B, out_dim, F, H, W]``.
    ``to(device)`` sets where the next load goes (and moves a loaded model). Options are those
    of :func:`wan_core.load_dit`.
    """

    def __init__(self, source, dtype=None, device="cpu", attention: str = "sdpa",
                 num_heads: Optional[int] = None, weight_dtype=None, vace_module=None,
                 compute=None, compile: bool = False):
        resolve_backend(attention)
        stored = _stored_weight_dtype(weight_dtype)        # checked before the file is read
        sd, self.config, self.compute_dtype = describe_dit(
            read_dit(source, vace_module, meta=True), source, dtype, num_heads)
        self.stored_dtype = stored or stored_dtype(sd)
        self.source = source
        self.device = torch.device(device)
        self._options = dict(dtype=dtype, attention=attention, num_heads=num_heads,
                             weight_dtype=weight_dtype, vace_module=vace_module)
        if compute is not None:
            self._options["compute"] = compute
        if compile:
            self._options["compile"] = True
        self.block_streaming: Optional[BlockStreaming] = None   # given to each loaded model
        # Called on each loaded model instead of moving it to ``device`` (multi-GPU runs:
        # ``wan_core.parallel.ParallelContext.prepare_dit`` shards it and attaches its hooks).
        self.prepare = None
        self.loras: tuple = ()
        self._base: Optional[OnDemandDiT] = None      # the file's handle, for a LoRA handle
        self._module: Optional[torch.nn.Module] = None
        self._lock = threading.Lock()
        self._prefetch: Optional[threading.Thread] = None
        self._prefetch_error: Optional[BaseException] = None

    # -- state ----------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory now."""
        return self._module is not None

    @property
    def module(self) -> Optional[torch.nn.Module]:
        """The loaded model, or None (does not load)."""
        return self._module

    def load(self) -> torch.nn.Module:
        """The model, read from the file (and LoRA-patched) on ``device`` if not in memory.

        A LoRA handle patches a shared copy of its file handle's model, so a new strength
        re-applies the LoRA without reading the file again while that model is in memory."""
        if self._prefetch is not None:
            self._prefetch.join()
            self._prefetch = None
            error, self._prefetch_error = self._prefetch_error, None
            if error is not None:
                raise error
        return self._read()

    def _read(self) -> torch.nn.Module:
        with self._lock:
            if self._module is None:
                streamed = self.block_streaming is not None
                if self._base is None:
                    on_cpu = streamed or self.prepare is not None
                    model = load_dit(self.source, device="cpu" if on_cpu else self.device,
                                     **self._options)
                else:
                    from .lora import apply_loras

                    model = apply_loras(self._base.load(), self.loras)
                model.block_streaming = self.block_streaming
                if self.prepare is not None:
                    model = self.prepare(model)
                else:
                    place(model, self.device)
                self._module = model
            return self._module

    def prefetch(self) -> None:
        """Start loading in a background thread (e.g. while the text encoder runs); the next
        :meth:`load` or call waits for it and re-raises its error, if any."""
        if self._module is not None or self._prefetch is not None:
            return

        def run():
            try:
                self._read()
            except BaseException as e:          # handed to the thread that needs the model
                self._prefetch_error = e

        self._prefetch = threading.Thread(target=run, name="wancore-prefetch", daemon=True)
        self._prefetch.start()

    def release(self) -> None:
        """Forget the weights (freed once nothing else holds them); the next use re-reads them.
        A LoRA handle releases its file handle's model too."""
        if self._prefetch is not None:
            self._prefetch.join()
            self._prefetch = self._prefetch_error = None
        with self._lock:
            if self._module is not None:
                unstream(self._module)      # its hooks would keep it alive until a gc pass
            self._module = None
        if self._base is not None:
            self._base.release()

    def to(self, device) -> "OnDemandDiT":
        """Load to ``device`` from now on; a model in memory moves there now."""
        self.device = torch.device(device)
        if self._base is not None:
            self._base.to(device)
        if self._module is not None:
            place(self._module, self.device)
        return self

    def with_loras(self, loras: Sequence) -> "OnDemandDiT":
        """A new handle for the same file with ``loras`` (``[(source, strength), ...]``) added
        after this handle's own; nothing is loaded."""
        other = object.__new__(OnDemandDiT)
        other.__dict__.update(self.__dict__)
        other.loras = self.loras + tuple(loras)
        other._base = self._base or self
        other._module = None
        other._lock = threading.Lock()
        other._prefetch = other._prefetch_error = None
        return other

    def spec(self) -> tuple:
        """A picklable description of this handle (file, load options, LoRAs, streaming) from
        which :meth:`from_spec` makes an equal handle in another process."""
        files = [self.source, self._options.get("vace_module")] + [s for s, _ in self.loras]
        if any(isinstance(f, Mapping) for f in files):
            raise ValueError("this model has in-memory weights (a state dict, not a file): "
                             "another process cannot load it; give model and LoRA files")
        return (str(self.source), tuple(sorted(self._options.items(), key=lambda kv: kv[0])),
                tuple((str(s), float(w)) for s, w in self.loras), self.block_streaming)

    @classmethod
    def from_spec(cls, spec: tuple, device="cpu") -> "OnDemandDiT":
        source, options, loras, streaming = spec
        handle = cls(source, device=device, **dict(options))
        handle.block_streaming = streaming
        return handle.with_loras(loras) if loras else handle

    def meta_model(self) -> WanDiT:
        """The model's structure on the meta device (no memory), e.g. to check a LoRA."""
        with torch.device("meta"):
            return WanDiT(self.config, self.compute_dtype, self._options["attention"])

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.load()(*args, **kwargs)

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "not loaded"
        return (f"OnDemandDiT({self.config.variant}, {self.source!s}, {state}, "
                f"{len(self.loras)} LoRA(s))")
