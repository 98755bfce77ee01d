"""The reference harness itself: the official modules load on CPU and run tiny models."""
import torch

from tests.reference import max_abs_err, official, sdpa_flash_attention


def test_sdpa_stand_in_masks_keys_beyond_k_lens():
    q, k, v = (torch.randn(2, 5, 3, 8) for _ in range(3))
    lens = torch.tensor([4, 2])
    out = sdpa_flash_attention(q, k, v, k_lens=lens)
    for b in range(2):
        n = int(lens[b])
        ref = sdpa_flash_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n])
        assert max_abs_err(out[b:b + 1], ref) < 1e-6


def test_official_wan_model_runs_tiny_t2v():
    mod = official("modules.model")
    assert mod.flash_attention is sdpa_flash_attention
    model = mod.WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=4, dim=64,
                         ffn_dim=96, freq_dim=32, text_dim=24, out_dim=4, num_heads=2,
                         num_layers=2).eval()
    x = [torch.randn(4, 3, 8, 8)]
    ctx = [torch.randn(7, 24)]
    with torch.no_grad():
        out = model(x, t=torch.tensor([500.0]), context=ctx, seq_len=3 * 4 * 4)
    assert out[0].shape == (4, 3, 8, 8) and torch.isfinite(out[0]).all()


def test_official_vaes_run_tiny():
    for name, z, scale_dim in (("modules.vae2_1", 4, 4), ("modules.vae2_2", 8, 8)):
        mod = official(name)
        cfg = dict(dim=8, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                   temperal_downsample=[False, True, True])
        if name.endswith("2_2"):
            cfg["dec_dim"] = 8
        vae = mod.WanVAE_(**cfg).eval()
        size = 32 if name.endswith("2_2") else 16
        video = torch.randn(1, 3, 5, size, size)
        scale = [torch.zeros(scale_dim), torch.ones(scale_dim)]
        with torch.no_grad():
            mu = vae.encode(video, scale)
            rec = vae.decode(mu, scale)
        assert mu.shape[2] == 2 and rec.shape == video.shape, (name, mu.shape, rec.shape)
