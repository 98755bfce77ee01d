"""Block compile (issue 29 item 3; ``compile=True``): one ``torch.compile`` of the transformer
block serves every block and every step (no recompilation), its output equals the eager
model's within float rounding, it works with LoRA, block streaming, the step cache and fp8
weights / fp8 compute, and a compile failure gives one warning and the eager model.

Runs Inductor on the CPU (needs the C compiler the CPU backend uses); each new block structure
or input shape costs one compilation of a few seconds, so the cases share one tiny config."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from tests.dit_helpers import random_inputs, random_state_dict, tiny_config
from wan_core import apply_loras, load_dit
from wan_core.models import block_compile
from wan_core.models.block_compile import compiler, is_compiled

LAYERS = 3
STEPS = (torch.tensor([900.0, 250.0]), torch.tensor([500.0, 10.0]))   # two "sampling steps"


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test starts without compiled forwards, Dynamo caches or a recorded failure."""
    torch._dynamo.reset()
    block_compile.reset()
    yield
    block_compile.reset()
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def case():
    cfg = tiny_config("t2v", num_layers=LAYERS)
    return cfg, random_state_dict(cfg, seed=3), random_inputs(cfg)


def graphs() -> int:
    """Graphs Dynamo has compiled in this process (a recompilation is one more)."""
    return counters["stats"]["unique_graphs"]


def run_steps(model, inputs) -> list:
    with torch.no_grad():
        return [model(**{**inputs, "t": t}) for t in STEPS]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_one_compile_serves_every_block_and_step_and_matches_eager(case):
    cfg, sd, inputs = case
    eager = load_dit(sd, num_heads=cfg.num_heads)
    model = load_dit(sd, num_heads=cfg.num_heads, compile=True)
    assert is_compiled(model) and not is_compiled(eager)
    before = graphs()
    got, want = run_steps(model, inputs), run_steps(eager, inputs)
    # 3 blocks x 2 steps, one graph: no compilation per block or per step
    assert graphs() - before == 1 and compiler().error is None
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-5 and (g - w).abs().max() < 1e-4
    block_compile.compile_blocks(model, enabled=False)
    assert not is_compiled(model) and torch.equal(run_steps(model, inputs)[0], want[0])


def test_lora_streaming_and_the_step_cache_on_a_compiled_model(case):
    from wan_core.conditioning import VideoConditioning
    from wan_core.ops.streaming import BlockStreaming, place
    from wan_core.pipeline import generate
    from wan_core.sampling import CacheSettings

    cfg, sd, _ = case
    gen = torch.Generator().manual_seed(7)
    lora = {}
    for i in range(LAYERS):                    # the same layers in every block: one structure
        for name in ("self_attn.q", "ffn.0"):
            out_f, in_f = sd[f"blocks.{i}.{name}.weight"].shape
            key = f"diffusion_model.blocks.{i}.{name}"
            lora[f"{key}.lora_down.weight"] = torch.randn(4, in_f, generator=gen) * 0.05
            lora[f"{key}.lora_up.weight"] = torch.randn(out_f, 4, generator=gen) * 0.05
    patched = apply_loras(load_dit(sd, num_heads=cfg.num_heads, compile=True), [(lora, 0.8)])
    assert is_compiled(patched) and patched.blocks[1].self_attn.q.patches
    patched.block_streaming = BlockStreaming(resident=1)       # blocks 1, 2 streamed
    place(patched, "cpu")
    eager = apply_loras(load_dit(sd, num_heads=cfg.num_heads), [(lora, 0.8)])
    ctx = [torch.randn(7, cfg.text_dim, generator=gen)]
    neg = [torch.randn(3, cfg.text_dim, generator=gen)]
    cond = VideoConditioning(32, 32, 5)
    outs = []
    before = graphs()
    for model in (patched, eager):
        stats = {}
        cache = CacheSettings("easycache", threshold=100.0, start=0.0, max_skips=1)
        outs.append(generate(model, ctx, neg, cond, steps=4, shift=3.0, seed=1, cache=cache,
                             stats=stats))
        assert stats["skipped"] >= 1 and stats["evaluated"] + stats["skipped"] == 4
    # the CFG batch (cond + uncond, one timestep) with the LoRA'd block: one graph
    assert graphs() - before == 1 and compiler().error is None
    assert patched._block_streamer.peak_streamed == 2
    assert rel(outs[0], outs[1]) < 1e-4


def test_fp8_weights_and_fp8_compute_compile(case):
    from wan_core.ops import Linear

    cfg, sd, inputs = case
    bf16 = run_steps(load_dit(sd, num_heads=cfg.num_heads, dtype="bf16"), inputs)
    for compute in (None, "fp8"):
        options = dict(num_heads=cfg.num_heads, dtype="bf16", weight_dtype="fp8_e4m3fn",
                       compute=compute)
        eager = load_dit(sd, **options)
        model = load_dit(sd, **options, compile=True)
        assert any(m.fp8_compute for m in model.modules() if isinstance(m, Linear)) == \
            (compute == "fp8")
        before = graphs()
        got, want = run_steps(model, inputs), run_steps(eager, inputs)
        assert graphs() - before == 1 and compiler().error is None
        for g, w, b in zip(got, want, bf16):
            if compute is None:          # fp8 storage, bf16 multiplies: rounding only
                assert rel(g, w) < 5e-3
            else:
                # Activations quantised to e4m3 (3 mantissa bits): inputs that differ in the
                # last bf16 bit round to neighbouring e4m3 values now and then, so compiled and
                # eager fp8 differ by about the fp8 noise itself (3 % here, 3 layers of random
                # weights), and the compiled one is as close to bf16 as the eager one.
                assert rel(g, w) < 0.06 and rel(g, b) < 1.2 * rel(w, b) + 1e-3


def test_vace_blocks_compile_too():
    from tests.test_vace_model import vace_config, vace_inputs

    cfg = vace_config(4, 2)
    sd, inputs = random_state_dict(cfg, seed=2), vace_inputs(cfg)
    eager = load_dit(sd, num_heads=cfg.num_heads)
    model = load_dit(sd, num_heads=cfg.num_heads, compile=True)
    assert all(b.compiled is not None for b in model.block_sequence())
    before = graphs()
    with torch.no_grad():
        for t in STEPS:
            got = model(**{**inputs, "t": t}, vace_scale=0.7)
            want = eager(**{**inputs, "t": t}, vace_scale=0.7)
            assert rel(got, want) < 1e-5
    # main block, VACE block 0 (adds the control to x0), the other VACE blocks
    assert graphs() - before == 3 and compiler().error is None


def test_compile_with_an_attention_backend_that_breaks_the_graph(case):
    """A backend the compiler does not trace (``torch.compiler.disable``: the fp8 attention
    kernel) splits the block's graph; still compiled once for all blocks and steps."""
    from wan_core.models.attention import BACKENDS

    if "fp8" not in BACKENDS:
        pytest.skip("no fp8 attention backend in this checkout")
    cfg, sd, inputs = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # fp8 attention: CUDA only -> sdpa
        eager = run_steps(load_dit(sd, num_heads=cfg.num_heads, attention="fp8"), inputs)
        model = load_dit(sd, num_heads=cfg.num_heads, attention="fp8", compile=True)
        got = run_steps(model, inputs)
        after_first = graphs()
        got += run_steps(model, inputs)
    assert graphs() == after_first and compiler().error is None
    for g, w in zip(got, eager + eager):
        assert rel(g, w) < 1e-5


def test_a_compile_failure_warns_once_and_runs_the_eager_model(case, monkeypatch):
    cfg, sd, inputs = case
    eager = run_steps(load_dit(sd, num_heads=cfg.num_heads), inputs)

    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("InductorError: no C compiler found\ndetails")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = load_dit(sd, num_heads=cfg.num_heads, compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run_steps(model, inputs)                        # 3 blocks x 2 steps
        other = load_dit(sd, num_heads=cfg.num_heads, compile=True)
        again = run_steps(other, inputs)
    messages = [str(w.message) for w in caught if "compile=True" in str(w.message)]
    assert len(messages) == 1, messages
    assert "no C compiler found" in messages[0] and "details" not in messages[0]
    assert all(torch.equal(g, w) for g, w in zip(got + again, eager + eager))
    assert isinstance(compiler().error, RuntimeError)


def test_compile_option_reaches_on_demand_models_the_node_and_the_cli(case, tmp_path,
                                                                       monkeypatch, models):
    from safetensors.torch import save_file

    from tests.conftest import load_pack
    from tests.tiny_models import FILES
    from wan_core.__main__ import build_parser
    from wan_core.loading.on_demand import OnDemandDiT

    cfg, sd, _ = case
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path),
              metadata={"num_heads": str(cfg.num_heads)})
    handle = OnDemandDiT(path, num_heads=cfg.num_heads, compile=True)
    assert is_compiled(handle.load())
    assert not is_compiled(OnDemandDiT(path, num_heads=cfg.num_heads).load())
    assert dict(handle.spec()[1])["compile"] is True
    assert is_compiled(OnDemandDiT.from_spec(handle.spec()).load())

    monkeypatch.setenv("WANCORE_MODELS_DIR", str(models))
    loader = load_pack().NODE_CLASS_MAPPINGS["WanCoreModelLoader"]
    widget = loader.INPUT_TYPES()["optional"]["compile"]
    assert widget[0] == "BOOLEAN" and widget[1]["default"] is False and widget[1]["tooltip"]
    name = FILES["dit_t2v"].split("/", 1)[1]
    on = loader().load(name, "default", "sdpa", -1, 0.0, "none", True)["result"][0]
    off = loader().load(name, "default", "sdpa", -1, 0.0, "none")["result"][0]
    assert on is not off and on._options["compile"] is True and "compile" not in off._options

    parser = build_parser()
    args = parser.parse_args(["generate", "--dit", "d.safetensors", "--vae", "v.safetensors",
                              "--text-encoder", "t.safetensors", "--prompt", "p", "--compile"])
    assert args.compile is True
