"""Multi-process generation (issue 26) on the CPU with gloo: Ulysses sequence parallelism, CFG
parallelism, FSDP, and their combination must equal the single-process result (max abs <=
1e-4 on fp32), for odd token counts, per-token timesteps, image tokens, VACE, LoRA and the step
cache; plus the launch errors and a rank that dies. Workers: tests/parallel_workers.py."""
from __future__ import annotations

import socket

import pytest
import torch

from tests import parallel_workers as workers
from tests.reference import max_abs_err, report

BOUND = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(scenario: str, world: int, tmp_path) -> list:
    workers.spawn(scenario, world, tmp_path, _free_port())
    return [torch.load(tmp_path / f"{scenario}_rank{r}.pt", weights_only=False)
            for r in range(world)]


@pytest.fixture(scope="module")
def single():
    """The single-process results every scenario is compared with."""
    made = workers.models()
    return {"forward": workers.forward_all(made),
            "generation": workers.tiny_generation(workers.models(("t2v",))["t2v"][0]),
            "moe": workers.tiny_generation(workers.moe_pair())}


def test_ulysses_and_fsdp_on_2_processes_equal_one(single, tmp_path):
    ranks = _run("ulysses_2", 2, tmp_path)
    for name, expected in single["forward"].items():
        for r, result in enumerate(ranks):
            err = max_abs_err(result["forward"][name], expected)
            report(f"ulysses 2, {name} forward (rank {r}) vs one process", err, BOUND)
            assert err < BOUND, (name, r)
    expected_fp8 = workers.forward_all(workers.models(("fp8_lora",)))["fp8_lora"]
    err = max_abs_err(ranks[0]["fsdp_forward"]["fp8_lora"], expected_fp8)
    report("FSDP + ulysses 2, fp8_scaled model with a LoRA vs one process", err, BOUND)
    assert err < BOUND and ranks[0]["fsdp_fp8_dtype"] == "torch.float8_e4m3fn"
    for name in ("t2v", "vace"):
        err = max_abs_err(ranks[0]["fsdp_forward"][name], single["forward"][name])
        report(f"FSDP + ulysses 2, {name} forward vs one process", err, BOUND)
        assert err < BOUND
        whole, local, two_blocks = ranks[0]["fsdp_bytes"][name]
        # each rank keeps half of every weight: 1/N of the model plus at most one block
        assert local <= whole / 2 + two_blocks / 2, (name, whole, local)
    latent, stats = ranks[0]["generation"]
    expected, expected_stats = single["generation"]
    err = max_abs_err(latent, expected)
    report("ulysses 2, cached CFG generation vs one process", err, BOUND)
    assert err < BOUND and stats == expected_stats and stats["skipped"] > 0
    assert torch.equal(ranks[1]["generation"][0], latent)       # every rank has the result


def test_cfg_parallel_moe_on_2_processes_equals_one(single, tmp_path):
    ranks = _run("cfg_2", 2, tmp_path)
    expected, expected_stats = single["moe"]
    for r, result in enumerate(ranks):
        latent, stats = result["generation"]
        err = max_abs_err(latent, expected)
        report(f"cfg parallel 2, MoE generation (rank {r}) vs one process", err, BOUND)
        assert err < BOUND and stats == expected_stats


def test_ulysses_2_x_cfg_2_with_fsdp_on_4_processes_equals_one(single, tmp_path):
    ranks = _run("ulysses_2_cfg_2_fsdp", 4, tmp_path)
    expected, _ = single["moe"]
    for r, result in enumerate(ranks):
        err = max_abs_err(result["generation"][0], expected)
        report(f"ulysses 2 x cfg 2 + FSDP, MoE generation (rank {r}) vs one process", err,
               BOUND)
        assert err < BOUND


def test_a_rank_that_dies_stops_the_others(tmp_path):
    codes = workers.spawn_unjoined("dead_rank", 2, tmp_path, _free_port(), timeout=90)
    assert codes == [0, 3], codes            # rank 1 crashed; rank 0 stopped by itself
    survivor = torch.load(tmp_path / "dead_rank_rank0.pt", weights_only=False)
    assert survivor["outcome"] != "finished" and survivor["seconds"] < 30, survivor


# ------------------------------------------------------------------------------ the CLI

def _two_head_dit(models, tmp_path):
    """The tiny T2V file with metadata naming 2 attention heads (Ulysses needs >= 2)."""
    from safetensors.torch import load_file, save_file

    from tests.tiny_models import FILES

    path = tmp_path / "dit_two_heads.safetensors"
    save_file(load_file(str(models / FILES["dit_t2v"])), str(path), metadata={"num_heads": "2"})
    return path


def _generate_args(models, dit, out, *extra):
    from tests.tiny_models import FILES

    return ["generate", "--dit", str(dit), "--vae", str(models / FILES["vae21"]),
            "--text-encoder", str(models / FILES["umt5"]), "--prompt", "a red circle",
            "--size", "64x48", "--frames", "9", "--steps", "3", "--cache", "easycache",
            "--cache-threshold", "2", "--out", str(out), "--save-latents",
            str(out.with_suffix(".latent")), *extra]


def test_torchrun_cli_matches_one_process_and_only_rank_0_writes(models, tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from wan_core.__main__ import main

    dit = _two_head_dit(models, tmp_path)
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    assert main(_generate_args(models, dit, single / "v.mp4")) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(_free_port()), "-m", "wan_core",
         *_generate_args(models, dit, multi / "v.mp4", "--ulysses-size", "2", "--dit-fsdp",
                         "--t5-fsdp", "--device", "cpu")],
        capture_output=True, text=True, timeout=240, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in multi.iterdir()) == ["v.latent", "v.mp4"]
    assert done.stdout.count("wrote ") == 1 and done.stdout.count("model: ") == 1, done.stdout
    assert "2 processes: ulysses 2 x cfg 1, DiT FSDP, T5 FSDP" in done.stdout
    err = max_abs_err(load_file(str(multi / "v.latent"))["latent"],
                      load_file(str(single / "v.latent"))["latent"])
    report("torchrun 2 processes (ulysses 2, DiT + T5 FSDP, step cache) vs one, CLI latents",
           err, BOUND)
    assert err < BOUND


@pytest.mark.parametrize("env, extra, needle", [
    ({}, ("--ulysses-size", "2"), "need one process per GPU started by torchrun: torchrun "
                                  "--nproc-per-node N -m wan_core generate"),
    ({"WORLD_SIZE": "3"}, ("--ulysses-size", "2"),
     "3 processes were started but --ulysses-size 2 uses 2"),
    ({"WORLD_SIZE": "2"}, ("--ulysses-size", "2", "--cfg-parallel"),
     "2 processes were started but --ulysses-size 2 x 2 (--cfg-parallel) uses 4"),
    ({"WORLD_SIZE": "2"}, ("--ulysses-size", "2"),
     "--ulysses-size 2 does not divide the model's 1 attention heads; use one of 1"),
    ({"WORLD_SIZE": "2"}, ("--dit-fsdp", "--cfg-parallel", "--blocks-on-device", "1"),
     "use one of the two"),
])
def test_parallel_options_are_checked_before_anything_loads(models, tmp_path, capsys,
                                                            monkeypatch, env, extra, needle):
    import wan_core
    from tests.tiny_models import FILES
    from wan_core.__main__ import main

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    if env:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "29999")
        for key, value in env.items():
            monkeypatch.setenv(key, value)

    def refuse(*args, **kwargs):
        raise AssertionError("loaded before the options were checked")

    for name in ("load_dit", "load_vae", "load_text_encoder"):
        monkeypatch.setattr(wan_core, name, refuse)
    assert main(_generate_args(models, models / FILES["dit_t2v"], tmp_path / "v.mp4",
                               *extra)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0], err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- worker pool (ComfyUI)

def test_multi_gpu_node_pool_matches_one_process_reuses_and_cancels(models, tmp_path,
                                                                    monkeypatch):
    """The WanCore Multi-GPU node: the sampler hands the run to 2 worker processes (gloo on the
    CPU here), which equal one process; the workers stay alive and keep the model between runs,
    reload it for a new LoRA strength, and stop together when the run is cancelled."""
    from tests.conftest import load_pack
    from tests.tiny_models import FILES
    from wan_core.sampling import SamplingCancelled

    pack = load_pack()
    nodes = pack.NODE_CLASS_MAPPINGS
    generation = __import__(type(nodes["WanCoreSampler"]()).__module__, fromlist=["_POOLS"])
    folder = tmp_path / "models"
    (folder / "diffusion_models").mkdir(parents=True)
    (folder / "loras").mkdir()
    dit = _two_head_dit(models, folder / "diffusion_models")
    lora = folder / "loras" / "lora.safetensors"
    lora.write_bytes((models / FILES["lora_t2v_high"]).read_bytes())   # same shapes as dit_t2v
    for kind in ("vae", "text_encoders"):
        (folder / kind).symlink_to(models / kind)
    monkeypatch.setenv("WANCORE_MODELS_DIR", str(folder))
    model = nodes["WanCoreModelLoader"]().load(dit.name)["result"][0]
    (model,) = nodes["WanCoreLoRA"]().apply(model, "lora.safetensors", 0.5)
    te = nodes["WanCoreTextEncoderLoader"]().load(FILES["umt5"].split("/", 1)[1])[0]
    (embeds,) = nodes["WanCoreTextEncode"]().encode(te, "a red circle", "")
    (cond,) = nodes["WanCoreEmptyVideo"]().build(64, 48, 9)
    sampler = nodes["WanCoreSampler"]()
    args = (embeds, cond, 7, 3, 4.0, 3.0, "unipc", 1.0)
    try:
        (expected,) = sampler.sample(model, *args)
        (on_workers,) = nodes["WanCoreMultiGPU"]().apply(model, 2, False, True)
        (latent,) = sampler.sample(on_workers, *args)
        err = max_abs_err(latent["samples"], expected["samples"])
        report("Multi-GPU node: 2 worker processes (ulysses 2, FSDP) vs one process", err,
               BOUND)
        assert err < BOUND
        pool = next(iter(generation._POOLS.values()))
        assert pool.loads == 1
        sampler.sample(on_workers, *args)                        # same model: no reload
        assert pool.loads == 1 and pool.alive
        (stronger,) = nodes["WanCoreLoRA"]().apply(
            nodes["WanCoreModelLoader"]().load(dit.name)["result"][0], "lora.safetensors", 0.9)
        (moved,) = nodes["WanCoreMultiGPU"]().apply(stronger, 2, False, True)
        (other,) = sampler.sample(moved, *args)
        assert pool.loads == 2 and not torch.equal(other["samples"], latent["samples"])

        calls = []

        def interrupt():
            calls.append(1)
            if len(calls) >= 2:
                raise SamplingCancelled("interrupted from the UI")

        monkeypatch.setattr(generation.host, "throw_if_interrupted", interrupt)
        with pytest.raises(SamplingCancelled):
            sampler.sample(moved, *args)
        assert pool.alive
        monkeypatch.setattr(generation.host, "throw_if_interrupted", lambda: None)
        (again,) = sampler.sample(moved, *args)                  # still usable after a cancel
        assert torch.equal(again["samples"], other["samples"])

        class RaisingBar:               # ComfyUI's progress hook raises its interruption
            def __init__(self, total):
                self.calls = 0

            def update(self, step, preview=None):
                self.calls += 1
                if self.calls == 2:
                    raise SamplingCancelled("interrupted from the progress hook")

        monkeypatch.setattr(generation.host, "ProgressBar", RaisingBar)
        with pytest.raises(SamplingCancelled):
            sampler.sample(moved, *args)
        monkeypatch.setattr(generation.host, "ProgressBar", lambda total: RaisingBar(-1))
        monkeypatch.setattr(RaisingBar, "update", lambda self, step, preview=None: None)
        (after,) = sampler.sample(moved, *args)      # the stopped job's result never leaks
        assert pool.alive and torch.equal(after["samples"], other["samples"])
        with pytest.raises(ValueError, match="gpus 2 does not divide the model.s 1 attention"):
            nodes["WanCoreMultiGPU"]().apply(_one_head(models), 2, False, False)
        with pytest.raises(ValueError, match="use an even number of gpus"):
            nodes["WanCoreMultiGPU"]().apply(model, 3, True, False)
    finally:
        for pool in generation._POOLS.values():
            pool.close()
        generation._POOLS.clear()


def _one_head(models):
    from tests.tiny_models import FILES
    from wan_core.loading.on_demand import OnDemandDiT

    return OnDemandDiT(models / FILES["dit_t2v"])


def test_workers_exit_when_their_host_is_killed(tmp_path):
    """A worker whose host (ComfyUI) died without closing the pool stops by itself."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time\n"
            f"sys.path.insert(0, {str(workers.ROOT)!r})\n"
            "from wan_core.parallel import PoolSettings, WorkerPool\n"
            "pool = WorkerPool(PoolSettings(1, device='cpu'))\n"
            "print(' '.join(str(p.pid) for p in pool._procs), flush=True)\n"
            "time.sleep(120)\n")
    host = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in host.stdout.readline().split()]
        assert pids
        os.kill(host.pid, signal.SIGKILL)
        host.wait(timeout=10)

        def alive(pid):
            try:
                os.kill(pid, 0)
            except OSError:
                return False
            with open(f"/proc/{pid}/stat") as f:           # a zombie has exited
                return f.read().split()[2] != "Z"

        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(alive(pid) for pid in pids)
    finally:
        if host.poll() is None:
            host.kill()
