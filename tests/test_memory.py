"""Memory features: experts on demand (Wan 2.2 A14B holds one expert at a time), fp8 weights
that stay fp8 on every path (MoE, offload, nodes), and the header-only model description.

The on-demand model must compute exactly what the loaded model computes; "released" is checked
with weak references to the loaded modules (the idle expert's tensors are freed, not parked).
"""
import gc
import weakref

import pytest
import torch

from tests.reference import max_abs_err
from tests.tiny_models import FILES, dit_state_dict
from wan_core import apply_loras, load_dit
from wan_core.conditioning import VideoConditioning
from wan_core.loading import on_demand
from wan_core.loading.on_demand import OnDemandDiT
from wan_core.ops import Linear, is_fp8
from wan_core.pipeline import MoEModel, generate
from wan_core.sampling import OffloadIdleExpert

COND = VideoConditioning(32, 32, 5)


def _prompts(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(6, config.text_dim, generator=g)],
            [torch.randn(4, config.text_dim, generator=g)])


def _linear_dtypes(module):
    """Storage dtypes of the transformer blocks' Linear weights."""
    return {m.weight.dtype for m in module.blocks.modules() if isinstance(m, Linear)}


@pytest.fixture()
def experts(models):
    return models / FILES["dit_t2v_high"], models / FILES["dit_t2v_low"]


class LoadLog:
    """Records a weak reference to every model an OnDemandDiT reads from its file."""

    def __init__(self, monkeypatch):
        self.loaded = []
        real = on_demand.load_dit

        def load(*args, **kwargs):
            model = real(*args, **kwargs)
            self.loaded.append(weakref.ref(model))
            return model

        monkeypatch.setattr(on_demand, "load_dit", load)

    def alive(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self.loaded)


def test_on_demand_model_is_described_from_the_header_alone(experts, monkeypatch):
    import wan_core.loading.checkpoint as checkpoint

    loaded = load_dit(experts[0])
    monkeypatch.setattr(checkpoint, "_load_safetensors",
                        lambda *a: pytest.fail("weights read to describe the model"))
    handle = OnDemandDiT(experts[0])
    assert handle.config == loaded.config and not handle.loaded
    assert handle.compute_dtype == loaded.compute_dtype == torch.bfloat16
    assert is_fp8(handle.stored_dtype)
    meta = handle.meta_model()
    assert [(n, p.shape) for n, p in meta.named_parameters()] == \
        [(n, p.shape) for n, p in loaded.named_parameters()]


def test_on_demand_model_computes_what_the_loaded_model_computes(experts):
    handle = OnDemandDiT(experts[0], dtype="fp32")
    model = load_dit(experts[0], dtype="fp32")
    x = torch.randn(1, 16, 2, 4, 4)
    ctx, _ = _prompts(model.config)
    t = torch.tensor([700.0])
    with torch.no_grad():
        assert torch.equal(handle(x, t, ctx), model(x, t, ctx))
    assert handle.loaded and _linear_dtypes(handle.module) == {torch.float8_e4m3fn}
    handle.release()
    assert not handle.loaded


def test_moe_on_demand_holds_one_expert_at_a_time_and_matches_resident_experts(experts,
                                                                              monkeypatch):
    log = LoadLog(monkeypatch)
    high, low = (OnDemandDiT(p, dtype="fp32") for p in experts)
    pair = MoEModel(high, low, 0.875, (3.0, 2.0), offload=OffloadIdleExpert("cpu"))
    resident = MoEModel(load_dit(experts[0], dtype="fp32"), load_dit(experts[1], dtype="fp32"),
                        0.875, (3.0, 2.0), offload=OffloadIdleExpert("cpu"))
    ctx, neg = _prompts(high.config)
    in_memory = []

    def count(step, total, x, x0):
        in_memory.append(log.alive())

    with torch.no_grad():
        got = generate(pair, ctx, neg, COND, steps=6, shift=5.0, seed=3, callback=count)
        want = generate(resident, ctx, neg, COND, steps=6, shift=5.0, seed=3)
    assert torch.equal(got, want)
    assert len(log.loaded) == 2                      # each expert read once
    assert in_memory and max(in_memory) == 1         # never both
    assert log.loaded[0]() is None                   # the high-noise expert's tensors are gone
    assert not high.loaded and low.loaded
    for expert in resident.experts:                  # offloading kept the fp8 storage
        assert _linear_dtypes(expert) == {torch.float8_e4m3fn}


def test_on_demand_experts_with_loras_equal_loras_on_loaded_experts(experts, models,
                                                                   monkeypatch):
    lora_high = models / FILES["lora_t2v_high"]
    lora_low = models / FILES["lora_t2v_low"]
    handles = MoEModel(*(OnDemandDiT(p, dtype="fp32") for p in experts), 0.875,
                       offload=OffloadIdleExpert("cpu"))
    loaded = MoEModel(*(load_dit(p, dtype="fp32") for p in experts), 0.875,
                      offload=OffloadIdleExpert("cpu"))
    monkeypatch.setattr(on_demand, "load_dit", lambda *a, **k: pytest.fail("loaded too early"))
    patched = apply_loras(apply_loras(handles, [(lora_high, 0.7)], expert="high_noise"),
                          [(lora_low, 1.3)], expert="low_noise")
    monkeypatch.undo()
    assert not patched.high_noise.loaded and patched.high_noise.loras == ((lora_high, 0.7),)
    reference = apply_loras(apply_loras(loaded, [(lora_high, 0.7)], expert="high_noise"),
                            [(lora_low, 1.3)], expert="low_noise")
    ctx, neg = _prompts(loaded.config, 1)
    with torch.no_grad():
        got = generate(patched, ctx, neg, COND, steps=5, guide_scale=2.0, seed=1)
        want = generate(reference, ctx, neg, COND, steps=5, guide_scale=2.0, seed=1)
        plain = generate(loaded, ctx, neg, COND, steps=5, guide_scale=2.0, seed=1)
    assert torch.equal(got, want) and max_abs_err(got, plain) > 1e-4
    assert not handles.high_noise.loaded          # LoRA handles never loaded the plain ones
    assert patched.high_noise.module is None and patched.low_noise.loaded


def test_a_lora_for_another_model_is_refused_before_any_weight_is_read(experts, models,
                                                                      monkeypatch):
    from wan_core.loading.lora import LoRAError

    handle = OnDemandDiT(experts[0])
    monkeypatch.setattr(on_demand, "load_dit", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(LoRAError, match="not a LoRA"):
        apply_loras(handle, [(models / FILES["vae21"], 1.0)])


def test_prefetch_reads_in_the_background_and_hands_errors_to_the_caller(experts, tmp_path):
    handle = OnDemandDiT(experts[0])
    handle.prefetch()
    model = handle.load()
    assert handle.module is model and not handle.loras
    broken = tmp_path / "expert.safetensors"
    broken.write_bytes(experts[1].read_bytes())
    late = OnDemandDiT(broken)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])   # cut after the check
    late.prefetch()
    with pytest.raises(Exception, match="truncated"):
        late.load()


def test_fp8_weight_dtype_stores_linear_weights_in_fp8_and_computes_wider(tmp_path):
    from safetensors.torch import save_file

    sd = dit_state_dict("t2v", 11)
    path = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(path))
    model = load_dit(path, weight_dtype="fp8_e4m3fn")
    assert _linear_dtypes(model) == {torch.float8_e4m3fn}
    assert model.compute_dtype == torch.bfloat16
    # Reference: the bf16 model with every Linear weight rounded to fp8 by hand.
    reference = load_dit(path)
    for layer in reference.modules():
        if isinstance(layer, Linear):
            layer.weight = torch.nn.Parameter(layer.weight.to(torch.float8_e4m3fn),
                                              requires_grad=False)
    x = torch.randn(1, 16, 1, 4, 4)
    ctx, _ = _prompts(model.config)
    t = torch.tensor([500.0])
    with torch.no_grad():
        got, want, wide = model(x, t, ctx), reference(x, t, ctx), load_dit(path)(x, t, ctx)
    assert torch.equal(got, want) and not torch.equal(got, wide)
    with pytest.raises(ValueError, match="weight_dtype"):
        load_dit(path, weight_dtype="bf16")


def test_nodes_load_on_demand_keep_fp8_and_release_both_experts_after_sampling(models,
                                                                               monkeypatch):
    from tests.conftest import load_pack

    monkeypatch.setenv("WANCORE_MODELS_DIR", str(models))
    log = LoadLog(monkeypatch)
    nodes = load_pack().NODE_CLASS_MAPPINGS
    loader = nodes["WanCoreModelLoader"]()
    out = loader.load(FILES["dit_t2v_high"].split("/")[-1], "default")
    high = out["result"][0]
    assert not high.loaded and out["ui"]["wancore_variant"][0]["dtype"] == "fp8_e4m3fn"
    low = loader.load(FILES["dit_t2v_low"].split("/")[-1], "default")["result"][0]
    (pair,) = nodes["WanCoreMoE"]().combine(high, low, 0.875, 2.0, 2.0)
    ctx, neg = _prompts(high.config)
    embeds = {"positive": ctx, "negative": neg}
    seen = []
    real_generate = __import__("wan_core.pipeline", fromlist=["generate"]).generate

    def spy(model, *args, callback=None, **kwargs):
        def count(*a):
            seen.append((log.alive(), _linear_dtypes(model.high_noise.module or model.low_noise.module)))
            return callback(*a)
        return real_generate(model, *args, callback=count, **kwargs)

    monkeypatch.setattr("wan_core.pipeline.generate", spy)
    (latent,) = nodes["WanCoreSampler"]().sample(pair, embeds, COND, 0, 4, 2.0, 5.0, "unipc",
                                                  1.0)
    assert torch.isfinite(latent["samples"]).all()
    assert seen and max(n for n, _ in seen) == 1
    assert all(dtypes == {torch.float8_e4m3fn} for _, dtypes in seen)
    assert not high.loaded and not low.loaded and log.alive() == 0
    # fp8_e4m3fn as weight dtype stores a wider file in fp8 (it used to be refused).
    i2v = loader.load(FILES["dit_i2v_high"].split("/")[-1], "fp8_e4m3fn")["result"][0]
    assert _linear_dtypes(i2v.load()) == {torch.float8_e4m3fn}


# -- block streaming -----------------------------------------------------------------------------

def _deep_model(seed=21, layers=5):
    """A tiny T2V DiT with ``layers`` blocks, fp32."""
    sd = dit_state_dict("t2v", seed)
    block0 = {k[len("blocks.0."):]: v for k, v in sd.items() if k.startswith("blocks.0.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    for i in range(layers):
        g = torch.Generator().manual_seed(seed * 100 + i)
        sd.update({f"blocks.{i}.{k}": v + 0.02 * torch.randn(v.shape, generator=g)
                   for k, v in block0.items()})
    return load_dit(sd, dtype="fp32")


class BlockCensus:
    """Counts, at every block call, how many streamed blocks compute with tensors other than
    their CPU storage (device copies), independently of the streamer's own bookkeeping."""

    def __init__(self, model, streamer):
        self.peak = 0
        self.calls = 0
        self.streamer = streamer
        for block in model.blocks:
            block.register_forward_pre_hook(self.count)   # runs after the streamer's own hook

    def count(self, module, args):
        copies = 0
        for i, storage in self.streamer._storage.items():
            if any(_current(slot).data_ptr() != stored.data_ptr() for slot, stored in storage):
                copies += 1
        self.peak = max(self.peak, copies)
        self.calls += 1


def _current(slot):
    owner, kind, name = slot
    return (owner._parameters if kind == "param" else owner._buffers)[name]


@pytest.mark.parametrize("resident", [0, 2, 5])
def test_block_streaming_gives_the_resident_output_with_at_most_two_blocks_in_flight(resident):
    from wan_core.ops.streaming import BlockStreaming, place, unstream

    model = _deep_model()
    x = torch.randn(2, 16, 2, 4, 4)
    ctx = [torch.randn(7, model.config.text_dim), torch.randn(3, model.config.text_dim)]
    t = torch.tensor([800.0, 300.0])
    with torch.no_grad():
        want = model(x, t, ctx)
        model.block_streaming = BlockStreaming(resident=resident)
        place(model, "cpu")
        streamer = model._block_streamer
        census = BlockCensus(model, streamer)
        first, second = model(x, t, ctx), model(x, t, ctx)
    assert torch.equal(first, want) and torch.equal(second, want)
    streamed = 5 - resident
    assert len(streamer.streamed) == streamed and census.calls == 10
    # One streamed block computes at a time; one more is being copied in (prefetch).
    assert census.peak == min(streamed, 1) and streamer.peak_streamed == min(streamed, 2)
    unstream(model)
    for i, storage in streamer._storage.items():        # every block back on its storage
        assert all(_current(slot) is not None and _current(slot).data_ptr() == stored.data_ptr()
                   for slot, stored in storage)


def test_block_streaming_works_with_fp8_gguf_and_lora_layers(models, experts):
    from wan_core.ops.streaming import BlockStreaming, place

    fp8_with_lora = apply_loras(load_dit(experts[0], dtype="fp32"),
                                [(models / FILES["lora_t2v_high"], 0.8)])
    gguf = load_dit(models / "diffusion_models/wan2.1-t2v-1.3b-Q8_0.gguf", dtype="fp32")
    assert fp8_with_lora.blocks[0].self_attn.q.patches and gguf.blocks[0].ffn[0].qtype
    for model in (fp8_with_lora, gguf):
        x = torch.randn(1, 16, 2, 4, 4)
        ctx, _ = _prompts(model.config)
        t = torch.tensor([640.0])
        with torch.no_grad():
            want = model(x, t, ctx)
            model.block_streaming = BlockStreaming(resident=0)
            place(model, "cpu")
            assert torch.equal(model(x, t, ctx), want)
        assert model._block_streamer.peak_streamed == min(len(model.blocks), 2)


def test_a_vram_budget_picks_the_blocks_that_fit():
    from wan_core.ops.streaming import GIB, BlockStreaming, module_bytes

    model = _deep_model()
    block = module_bytes(model.blocks[0])
    outside = module_bytes(model) - 5 * block
    for resident in range(3):
        budget = (outside + (resident + 2) * block + block // 2) / GIB
        assert BlockStreaming(budget_gb=budget).resident_blocks(model) == resident
    # Room for 3 resident + 2 in flight = all 5 blocks: nothing is streamed.
    assert BlockStreaming(budget_gb=module_bytes(model) / GIB).resident_blocks(model) == 5
    assert BlockStreaming(budget_gb=outside / GIB).resident_blocks(model) == 0
    for bad in (dict(resident=-1), dict(budget_gb=0.0), dict(budget_gb=float("nan")),
                dict(), dict(resident=1, budget_gb=1.0), dict(resident=1.5)):
        with pytest.raises(ValueError):
            BlockStreaming(**bad)


def test_streamed_on_demand_experts_match_resident_ones(experts, monkeypatch):
    from wan_core.ops.streaming import BlockStreaming

    log = LoadLog(monkeypatch)
    high, low = (OnDemandDiT(p, dtype="fp32") for p in experts)
    for handle in (high, low):
        handle.block_streaming = BlockStreaming(resident=1)
    pair = MoEModel(high, low, 0.875, (3.0, 2.0), offload=OffloadIdleExpert("cpu"))
    resident = MoEModel(load_dit(experts[0], dtype="fp32"), load_dit(experts[1], dtype="fp32"),
                        0.875, (3.0, 2.0), offload=OffloadIdleExpert("cpu"))
    ctx, neg = _prompts(high.config)
    with torch.no_grad():
        got = generate(pair, ctx, neg, COND, steps=4, seed=5)
        want = generate(resident, ctx, neg, COND, steps=4, seed=5)
    assert torch.equal(got, want)
    assert low.module._block_streamer.peak_streamed >= 1
    low.release()
    assert log.alive() == 0               # streaming hooks do not keep a released expert alive


def test_cli_streaming_and_experts_on_demand_give_the_same_latents(models, tmp_path):
    from safetensors.torch import load_file

    from tests.test_pipeline import _cli

    def latents(name, *extra):
        result = _cli(models, tmp_path / f"{name}.mp4", "--save-latents",
                      str(tmp_path / f"{name}.st"), *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        return load_file(str(tmp_path / f"{name}.st"))["latent"]

    assert torch.equal(latents("plain"), latents("streamed", "--blocks-on-device", "0"))
    low = str(models / FILES["dit_t2v_low"])
    pair = ("--dit", str(models / FILES["dit_t2v_high"]), "--dit-low-noise", low)
    assert torch.equal(latents("moe", *pair),
                       latents("moe_streamed", *pair, "--vram-budget", "0.001",
                               "--prefetch-expert"))
    both = _cli(models, tmp_path / "x.mp4", "--blocks-on-device", "1", "--vram-budget", "2")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_loader_node_streaming_widgets_keep_the_output(models, monkeypatch):
    from tests.conftest import load_pack

    monkeypatch.setenv("WANCORE_MODELS_DIR", str(models))
    nodes = load_pack().NODE_CLASS_MAPPINGS
    name = FILES["dit_t2v_high"].split("/")[-1]
    optional = nodes["WanCoreModelLoader"].INPUT_TYPES()["optional"]
    assert optional["blocks_on_gpu"][1]["default"] == -1 and "tooltip" in optional["vram_budget_gb"][1]
    latents = []
    for widgets in ((), (0,), (-1, 0.0005)):
        model = nodes["WanCoreModelLoader"]().load(name, "default", "sdpa", *widgets)["result"][0]
        ctx, neg = _prompts(model.config)
        (latent,) = nodes["WanCoreSampler"]().sample(model, {"positive": ctx, "negative": neg},
                                                      COND, 0, 3, 2.0, 5.0, "unipc", 1.0)
        streamer = getattr(model.module, "_block_streamer", None)
        assert (streamer is not None) == bool(widgets)
        latents.append(latent["samples"])
    assert torch.equal(latents[0], latents[1]) and torch.equal(latents[0], latents[2])


@pytest.mark.parametrize("method", ["teacache", "magcache", "easycache"])
def test_step_cache_works_on_on_demand_experts(experts, method):
    from wan_core.pipeline import calibrate_cache
    from wan_core.sampling import CacheSettings

    def pair():
        return MoEModel(*(OnDemandDiT(p, dtype="fp32") for p in experts), 0.875, (3.0, 2.0),
                        offload=OffloadIdleExpert("cpu"))

    loaded = MoEModel(*(load_dit(p, dtype="fp32") for p in experts), 0.875, (3.0, 2.0),
                      offload=OffloadIdleExpert("cpu"))
    ctx, neg = _prompts(loaded.config)
    with torch.no_grad():
        data = calibrate_cache(loaded, ctx, neg, COND, steps=30)
        on_demand_data = calibrate_cache(pair(), ctx, neg, COND, steps=30)
        assert on_demand_data == data          # same key, same numbers
        settings = CacheSettings(method, threshold=5.0, start=0.0, calibration=data)
        stats, want_stats = {}, {}
        got = generate(pair(), ctx, neg, COND, steps=12, cache=settings, stats=stats)
        want = generate(loaded, ctx, neg, COND, steps=12, cache=settings, stats=want_stats)
    assert stats["skipped"] >= 1 and stats == want_stats and torch.equal(got, want)
