"""The demo training code (training/): its training-only paths equal the inference
paths of wan_core, and its exact reparametrisations are exact. Tiny and fast; no training run."""
import dataclasses

import pytest
import torch

from training import steps, train_dit, train_vae
from wan_core.models.vae.model import WanVAE

TINY_VAE = dataclasses.replace(train_vae.CONFIG, dim=4, decoder_dim=4)


def _vae(seed=0):
    torch.manual_seed(seed)
    vae = WanVAE(TINY_VAE)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vae


def test_vae_training_forward_equals_inference_and_has_gradients():
    vae = _vae()
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    mu, logvar = train_vae.encode_posterior(vae, video)          # grad mode, trainable weights
    recon = train_vae.decode_raw(vae, mu)
    (recon.square().mean() + logvar.mean()).backward()
    assert all(p.grad is not None for p in vae.parameters())
    with torch.no_grad():
        mu_ref = vae.encode_raw_stream(video)
        recon_ref = vae.decode_raw_stream(mu_ref)
    assert (mu - mu_ref).abs().max() < 1e-5
    assert (recon.clamp(-1, 1) - recon_ref).abs().max() < 1e-5


def test_vae_standardise_is_an_exact_reparametrisation():
    vae = _vae(1).eval()
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(video))
        mean, std = torch.randn(16) * 0.1, torch.rand(16) + 0.5
        train_vae.standardise(vae, mean, std)
        after = vae.decode(vae.encode(video))
    assert (before - after).abs().max() < 1e-4


def test_expert_noise_ranges_meet_at_the_boundary():
    lo, hi = train_dit.u_range("high")
    assert abs(float(train_dit.sample_sigma(torch.tensor(lo))) - train_dit.BOUNDARY) < 1e-6
    assert train_dit.u_range("low") == (0.0, lo) and hi == 1.0


def test_latent_targets_are_wan_shaped_unit_variance_and_invert_linearly():
    from training import dataset, latent_targets

    clips = torch.stack([dataset.sample_clip(i, frames=9, size=32)[0] for i in range(24)])
    basis = latent_targets.fit_basis(clips, z_dim=16)
    for part in basis.values():
        gram = part["basis"].T @ part["basis"]
        assert torch.allclose(gram, torch.eye(16, dtype=gram.dtype), atol=1e-8)   # orthonormal
    z = latent_targets.encode(clips, basis)
    assert z.shape == (24, 16, 3, 4, 4)                         # 1 + 4n frames -> 1 + n, /8
    std = z.transpose(0, 1).flatten(1).std(1)
    assert (std - 1).abs().max() < 0.05                          # unit variance per channel
    # the linear inverse is the orthogonal projection: a second round trip changes nothing
    once = latent_targets.decode(z, basis)
    twice = latent_targets.decode(latent_targets.encode(once, basis), basis)
    assert (once - twice).abs().max() < 1e-5
    psnr = 10 * torch.log10(4 / (once - clips).square().mean())
    print(f"\nPCA latent (16 of 192 / 768 dims) keeps {psnr:.1f} dB on its own 24 clips")
    assert psnr > 20


def test_spectral_weighting_is_an_exact_reparametrisation(monkeypatch):
    from training import latent_targets

    monkeypatch.setattr(train_vae, "CONFIG", TINY_VAE)
    vae = _vae(2).eval()
    basis = {"chunk": {"std": torch.linspace(5.0, 0.2, 16)}}
    weights = latent_targets.spectral_weights(basis)
    assert abs(float(weights.square().mean()) - 1) < 1e-6 and bool((weights[:-1] > weights[1:]).all())
    weighted = WanVAE(TINY_VAE).eval()
    weighted.load_state_dict(train_vae.spectrally_weighted(vae.state_dict(), basis))
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        z, zw = vae.encode(video), weighted.encode(video)
        assert (zw - z * weights.view(1, -1, 1, 1, 1)).abs().max() < 1e-4
        assert (weighted.decode(zw) - vae.decode(z)).abs().max() < 1e-4


def test_a_finished_stage_asked_for_more_steps_continues_from_its_checkpoint(tmp_path):
    """``--resume --steps N`` on a finished stage: ``finished`` reports it unfinished for a
    larger N and ``train_loop`` continues from ``ckpt.pt``; with a constant learning rate the
    result equals an uninterrupted run."""
    from training.training import finished, train_loop

    def run(stage_dir, steps):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def loss_fn(step):
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
            return (model(x) - x.sum(1, keepdim=True)).square().mean(), {}
        return train_loop(stage_dir, model, opt, loss_fn, steps, lambda s: 0.1, resume=True,
                          seed=0, log_every=1)

    run(tmp_path / "a", 3)
    assert finished(tmp_path / "a", 3)["step"] == 3 and finished(tmp_path / "a") is not None
    assert finished(tmp_path / "a", 5) is None
    continued = run(tmp_path / "a", 5)
    straight = run(tmp_path / "b", 5)
    assert continued["step"] == 5
    for key, value in straight["model"].items():
        assert torch.equal(continued["model"][key], value)


def test_mixed_noise_batches_are_consistent_per_frame_and_per_token():
    """``make_batch(mixed=True)`` (stage ``dit_mixed``): every latent frame is noised at its own
    level, the per-token timesteps repeat that level over the frame's patches, and about a third
    of the samples keep one level on every frame (the sampling case)."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(40, 16, 5, 8, 8, generator=g).half()
    cache = {"latents": latents, "captions": ["a"] * 40, "text": {"a": torch.ones(3, 8), "": torch.zeros(1, 8)}}
    xt, t, context, y, target = train_dit.make_batch(cache, 3, 0, False, mixed=True)
    assert xt.shape == (train_dit.BATCH, 16, 5, 8, 8) and t.shape == (train_dit.BATCH, 5 * 16)
    assert y is None and len(context) == train_dit.BATCH
    sigma = t.view(-1, 5, 16)[..., 0] / 1000                       # [B, F]
    assert torch.equal(t.view(-1, 5, 16), (sigma * 1000)[..., None].expand(-1, 5, 16))
    idx = torch.randint(40, (train_dit.BATCH,), generator=torch.Generator().manual_seed(3))
    x0 = latents[idx].float()                                    # the batch's clean latents
    x1 = target + x0
    s = sigma.view(-1, 1, 5, 1, 1)
    assert torch.allclose((1 - s) * x0 + s * x1, xt, atol=1e-5)
    assert bool(((sigma >= 0) & (sigma <= 1)).all())
    uniform = (sigma == sigma[:, :1]).all(1).float().mean()
    assert 0.1 < float(uniform) < 0.7
    # without mixing: one timestep per sample, as before
    _, t_plain, *_ = train_dit.make_batch(cache, 3, 0, False)
    assert t_plain.shape == (train_dit.BATCH,)


def test_focus_weights_draw_clips_by_background():
    """Stage ``dit_focus`` draws clips in proportion to a per-background weight; without
    weights the batches are the uniform ones of the other stages."""
    captions = (["a red circle moving up on a white background"] * 10
                + ["a red circle moving up on a black background"] * 30)
    weights = train_dit.clip_weights({"captions": captions}, {"white": 9.0})
    assert weights.tolist() == [9.0] * 10 + [1.0] * 30
    latents = torch.arange(40.0).view(40, 1, 1, 1, 1).expand(40, 16, 5, 8, 8).half()
    cache = {"latents": latents, "captions": captions,
             "text": {c: torch.ones(3, 8) for c in captions} | {"": torch.zeros(1, 8)}}
    drawn = []
    for step in range(20):
        xt, t, context, y, target = train_dit.make_batch(cache, step, 0, False, weights=weights)
        x0 = xt - (t / 1000).view(-1, 1, 1, 1, 1) * target         # x_t = x0 + sigma (x1 - x0)
        drawn.append(x0[:, 0, 0, 0, 0].round().long())             # clip i's latent is i
    share = float((torch.cat(drawn) < 10).float().mean())
    assert 0.65 < share < 0.85                                     # expected 90 / 120 = 0.75
    plain = train_dit.make_batch(cache, 3, 0, False)
    again = train_dit.make_batch(cache, 3, 0, False, weights=None)
    assert torch.equal(plain[0], again[0])


def test_the_shipped_dit_is_the_last_finished_refinement(tmp_path):
    """Export and the experts take ``dit_shape`` over ``dit_focus`` over ``dit_mixed`` over
    ``dit`` (``i2v_shape`` over ``i2v_focus`` over ``i2v``; the VAE of ``vae_shape`` over
    ``vae_fit``), whichever has finished."""
    chain = steps.T2V_STAGES
    assert steps.final_stage(tmp_path, chain) == "dit"
    for stage in ("dit", "dit_mixed"):
        (tmp_path / stage).mkdir()
        torch.save({"step": 1}, tmp_path / stage / "done.pt")
    (tmp_path / "dit_focus").mkdir()                       # started, not finished
    torch.save({"step": 1}, tmp_path / "dit_focus" / "ckpt.pt")
    assert steps.final_stage(tmp_path, chain) == "dit_mixed"
    torch.save({"step": 1}, tmp_path / "dit_focus" / "done.pt")
    assert steps.final_stage(tmp_path, chain) == "dit_focus"
    assert steps.final_stage(tmp_path, steps.I2V_STAGES) == "i2v"
    assert steps.final_stage(tmp_path, steps.VAE_STAGES) == "vae_fit"
    for stage in ("dit_shape", "i2v_shape", "vae_shape"):
        (tmp_path / stage).mkdir()
        torch.save({"step": 1}, tmp_path / stage / "done.pt")
    assert steps.final_stage(tmp_path, chain) == "dit_shape"
    assert steps.final_stage(tmp_path, steps.I2V_STAGES) == "i2v_shape"
    assert steps.final_stage(tmp_path, steps.VAE_STAGES) == "vae_shape"


def test_a_warm_started_lora_is_the_file_it_started_from(tmp_path):
    """``fast_lora --warm-start``: the trainable factors copied from a LoRA file give back that
    file when written the way ``save_fast_lora`` writes it; a LoRA of another rank is refused."""
    from safetensors.torch import save_file
    from training import train_fast
    from wan_core.models.configs import DiTConfig
    from wan_core.models.dit import WanDiT

    dit = WanDiT(DiTConfig(model_type="t2v", dim=32, ffn_dim=64, num_heads=2, num_layers=1,
                           text_dim=16, freq_dim=32))
    source = train_fast.LoRAFactors(dit, train_fast.RANK, seed=1)
    for p in source.factors.values():
        torch.nn.init.normal_(p)
    written = train_fast.comfy_lora(source.factors, torch.bfloat16, train_fast.SHIPPED_SCALE)
    save_file(written, str(tmp_path / "lora.safetensors"))
    warm = train_fast.LoRAFactors(dit, train_fast.RANK, seed=2)
    train_fast.warm_factors(warm, tmp_path / "lora.safetensors")
    again = train_fast.comfy_lora(warm.factors, torch.bfloat16, train_fast.SHIPPED_SCALE)
    assert set(again) == set(written)
    assert all(torch.equal(again[k], written[k]) for k in written)
    small = train_fast.LoRAFactors(dit, 4, seed=3)
    save_file(train_fast.comfy_lora(small.factors, torch.bfloat16),
              str(tmp_path / "r4.safetensors"))
    with pytest.raises(ValueError, match="rank"):
        train_fast.warm_factors(warm, tmp_path / "r4.safetensors")


def test_the_fast_lora_teacher_is_the_t2v_of_the_weights_folder(tmp_path):
    """``fast_lora --weights DIR`` distils the T2V exported to DIR, not the shipped one: the
    teacher's clean latents change with the folder's T2V (and repeat for the same folder)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from training import train_fast
    from wan_core.demo import FILES, WEIGHTS_DIR

    folder = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, folder)
    sd = load_file(str(folder / FILES["t2v"]))
    sd["head.head.weight"] = (sd["head.head.weight"].float() * 0.5).to(sd["head.head.weight"].dtype)
    save_file(sd, str(folder / FILES["t2v"]))
    shipped = train_fast.teacher_data(tmp_path / "a", 0, False, count=2)
    mine = train_fast.teacher_data(tmp_path / "b", 0, False, folder, count=2)
    again = train_fast.teacher_data(tmp_path / "c", 0, False, folder, count=2)
    assert shipped["x0"].shape == mine["x0"].shape == (2, *train_fast.LATENT)
    assert torch.equal(shipped["z"], mine["z"]) and torch.equal(mine["x0"], again["x0"])
    assert (shipped["x0"] - mine["x0"]).abs().max() > 0.1


def test_fine_patch_copy_embeds_flat_patches_as_before_and_averages_the_head():
    """``to_fine_patch`` (stage ``dit_fine``): a 1x1 token of a latent that is flat over each
    2x2 patch embeds as the 2x2 token did; the head's output per position is the mean of the
    2x2 sub-positions' outputs; mixed-noise batches then carry one timestep per latent pixel."""
    from wan_core.models.dit import WanDiT

    torch.manual_seed(0)
    coarse = WanDiT(train_dit.dit_config("t2v"))
    for p in coarse.parameters():
        p.data.normal_(0, 0.1)
    fine = WanDiT(train_dit.dit_config("t2v", train_dit.FINE_PATCH))
    fine.load_state_dict(train_dit.to_fine_patch(coarse.state_dict()))
    flat = torch.randn(1, 16, 1, 4, 4).repeat_interleave(2, 3).repeat_interleave(2, 4)  # [1,16,1,8,8]
    with torch.no_grad():
        a = coarse.patch_embedding(flat)                               # [1, D, 1, 4, 4]
        b = fine.patch_embedding(flat)                                 # [1, D, 1, 8, 8]
    assert torch.allclose(b[..., ::2, ::2], a, atol=1e-5)
    tokens = torch.randn(3, 128)
    with torch.no_grad():
        per_sub = coarse.head.head(tokens).view(3, 4, 16)              # (ph, pw, C) order
        assert torch.allclose(fine.head.head(tokens), per_sub.mean(1), atol=1e-5)
    latents = torch.randn(8, 16, 5, 8, 8).half()
    cache = {"latents": latents, "captions": ["a"] * 8, "text": {"a": torch.ones(3, 8), "": torch.zeros(1, 8)}}
    _, t, *_ = train_dit.make_batch(cache, 1, 0, False, mixed=True, patch=train_dit.FINE_PATCH)
    assert t.shape == (train_dit.BATCH, 5 * 64)


def test_shape_pairs_share_noise_levels_and_placement_and_differ_in_the_shape_word():
    """``pair_batch`` (stage ``dit_pairs``): rows 2p and 2p + 1 are one placement in two
    different shapes, noised with the same noise at the same per-frame levels."""
    from training import dataset

    g = torch.Generator().manual_seed(0)
    n = 6
    latents = torch.randn(n, 3, 16, 5, 8, 8, generator=g).half()
    valid = torch.ones(n, 3, dtype=torch.bool)
    valid[0, 1] = False                                        # a held-out shape is never drawn
    captions = [[f"a red {s} moving up on a black background" for s in dataset.SHAPES]
                for _ in range(n)]
    text = {c: torch.randn(9, 8, generator=g) for row in captions for c in row}
    text[""] = torch.zeros(1, 8)
    triples = {"latents": latents, "valid": valid, "captions": captions}
    xt, t, context, target, x0 = train_dit.pair_batch({"text": text}, triples, 5, 0)
    assert xt.shape == (train_dit.BATCH, 16, 5, 8, 8) and t.shape == (train_dit.BATCH, 80)
    assert torch.equal(t[0::2], t[1::2])
    x1 = target + x0
    assert torch.allclose(x1[0::2], x1[1::2], atol=1e-5)
    for a, b in zip(range(0, train_dit.BATCH, 2), range(1, train_dit.BATCH, 2)):
        assert not torch.equal(x0[a], x0[b])
        rows = [(i, k) for i in range(n) for k in range(3)
                if torch.equal(latents[i, k].float(), x0[a]) or torch.equal(latents[i, k].float(), x0[b])]
        assert len({i for i, _ in rows}) == 1 and (0, 1) not in rows


def test_object_size_option_draws_every_clip_with_that_size_and_refuses_bad_sizes():
    from training import dataset, evaluate, paths
    from wan_core.demo import clips

    shipped = clips.HALF_SIZE
    try:
        dataset.set_object_size("0.2,0.22")
        halves = [dataset.random_spec(seed).half for seed in range(20)]
        assert all(0.2 <= h <= 0.22 for h in halves)
        assert all(0.2 <= paths.random_half(seed) <= 0.22 for seed in range(5))
        # the whole path stays in frame
        for seed in range(20):
            spec = dataset.random_spec(seed)
            video = dataset.sample_clip(spec)[0]
            border = torch.cat([video[:, :, 0], video[:, :, -1], video[:, :, :, 0],
                                video[:, :, :, -1]], dim=-1)
            assert (border - border[:, :, :1]).abs().max() < 1e-5
    finally:
        dataset.set_object_size(",".join(str(v) for v in shipped))
    assert clips.HALF_SIZE == shipped
    for bad in ("0.3", "big,small", "0.2,0.1", "0.3,0.3", "0,0.1"):
        with pytest.raises(ValueError, match="object-size"):
            dataset.set_object_size(bad)
    # training combinations for --split train: never held out, reproducible
    specs = evaluate.train_specs(8)
    heldout = set(dataset.iter_combos("heldout"))
    assert len({s.combo for s in specs}) == 8 and not heldout & {s.combo for s in specs}
    assert specs == evaluate.train_specs(8)


def test_dit_shape_can_continue_from_a_given_t2v_with_its_own_object_weight(tmp_path, monkeypatch):
    """``train dit_shape --init FILE --shape-weight W``: the stage starts from FILE's weights
    (not the shipped T2V) and weighs the object's positions by W."""
    from safetensors.torch import save_file

    from training import train

    model = train_dit.init_weights(train_dit.WanDiT(train_dit.dit_config("t2v")), seed=3)
    with torch.no_grad():
        model.head.head.weight.normal_()            # init leaves it zero: make it tell
    path = tmp_path / "dit_t2v.safetensors"
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = train_dit.shipped_dit("t2v", path).state_dict()
    shipped = train_dit.shipped_dit("t2v").state_dict()
    key = "head.head.weight"
    assert torch.equal(loaded[key], model.state_dict()[key].half().float())
    assert not torch.equal(loaded[key], shipped[key])

    x0 = torch.randn(2, 16, 3, 8, 8)
    w4, w12 = train_dit.object_weight(x0, 4.0), train_dit.object_weight(x0, 12.0)
    assert torch.allclose(w12 - 1, 3 * (w4 - 1)) and float((w4 - 1).amax()) == pytest.approx(4.0)

    seen = {}
    monkeypatch.setattr(train_dit, "_finetune", lambda stage, out, make, n, seed, resume, lr, loss:
                        seen.update(lr=lr, start=make().state_dict()[key]))
    train_dit.run_dit_shape(tmp_path / "run", 1, 0, False, init=path, lr=6e-4)
    assert seen["lr"] == 6e-4 and torch.equal(seen["start"], loaded[key])
    train_dit.run_dit_shape(tmp_path / "run", 1, 0, False)
    assert seen["lr"] == train_dit.FOCUS_LR and torch.equal(seen["start"], shipped[key])
    seen = {}
    monkeypatch.setattr(train_dit, "run_dit_shape",
                        lambda out, n, seed, resume, init=None, **kw: seen.update(init=init, **kw))
    train.main(["dit_shape", "--out", str(tmp_path / "run"), "--init", str(path),
                "--shape-weight", "12", "--lr", "6e-4", "--steps", "1"])
    assert seen == {"init": path, "shape_weight": 12.0, "lr": 6e-4}
    for bad in (["dit_shape", "--init", str(tmp_path / "missing.safetensors")],
                ["dit", "--shape-weight", "2"], ["dit_shape", "--shape-weight", "-1"],
                ["dit", "--lr", "1e-4"], ["dit_shape", "--lr", "0"]):
        with pytest.raises(SystemExit):
            train.main(bad + ["--out", str(tmp_path / "run")])


def test_i2v_shape_can_start_from_a_given_t2v_with_the_shipped_image_input(tmp_path, monkeypatch):
    """``train i2v_shape --init T2V``: the I2V is that T2V (the same output when the image
    input ``y`` is zero) reading the image through the shipped I2V's ``y`` weights."""
    from safetensors.torch import save_file

    from training import train

    t2v = train_dit.init_weights(train_dit.WanDiT(train_dit.dit_config("t2v")), seed=5)
    with torch.no_grad():
        t2v.head.head.weight.normal_()              # init leaves it zero: make the output tell
    path = tmp_path / "dit_t2v.safetensors"
    save_file({k: v.contiguous() for k, v in t2v.state_dict().items()}, str(path))
    i2v = train_dit.i2v_from_t2v(path)
    shipped = train_dit.shipped_dit("i2v").state_dict()["patch_embedding.weight"]
    assert torch.equal(i2v.state_dict()["patch_embedding.weight"][:, 16:], shipped[:, 16:])

    torch.manual_seed(0)
    x, t = torch.randn(1, 16, 2, 8, 8), torch.tensor([700.0])
    context = [torch.randn(6, 128)]
    y = torch.randn(1, 20, 2, 8, 8)
    with torch.no_grad():
        plain = t2v(x, t, context)
        assert torch.allclose(i2v(x, t, context, y=torch.zeros_like(y)), plain, atol=1e-5)
        assert not torch.allclose(i2v(x, t, context, y=y), plain, atol=1e-3)

    seen = {}
    monkeypatch.setattr(train_dit, "run_i2v_shape",
                        lambda out, n, seed, resume, init=None: seen.update(init=init))
    train.main(["i2v_shape", "--out", str(tmp_path / "run"), "--init", str(path), "--steps", "1"])
    assert seen == {"init": path}
    for bad in (["experts", "--init", str(path)], ["i2v_shape", "--lr", "1e-4"]):
        with pytest.raises(SystemExit):
            train.main(bad + ["--out", str(tmp_path / "run")])


def test_export_of_a_dit_only_run_keeps_the_shipped_vae_and_text_encoder(tmp_path):
    """A run that retrained only the DiTs (on latents the shipped VAE encoded) exports the
    shipped VAE and text encoder with its own DiTs; an unfinished stage is named."""
    from safetensors.torch import load_file

    from training import export
    from training.training import atomic_save

    shipped = export.WEIGHTS
    run, out = tmp_path / "run", tmp_path / "weights"
    for stage, name in (("i2v_shape", "dit_i2v"), ("expert_high", "dit_high_noise"),
                        ("expert_low", "dit_low_noise")):
        ema = {k: v.float() for k, v in load_file(str(shipped / f"{name}.safetensors")).items()}
        atomic_save({"ema": ema, "step": 1}, run / stage / "done.pt")
    with pytest.raises(FileNotFoundError, match="run the 'dit' stage first"):
        export.export(run, out)
    t2v = {k: (v.float() * 1.5) for k, v in load_file(str(shipped / "dit_t2v.safetensors")).items()}
    atomic_save({"ema": t2v, "step": 1}, run / "dit_shape" / "done.pt")
    export.export(run, out)
    for name in ("vae", "text_encoder"):
        got, want = load_file(str(out / f"{name}.safetensors")), load_file(str(shipped / f"{name}.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    got = load_file(str(out / "dit_t2v.safetensors"))
    assert all(torch.equal(got[k], t2v[k].bfloat16()) for k in t2v)
