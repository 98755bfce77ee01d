"""Step counts of the demo training stages (chosen from step times measured on 2 shared CPU cores).

``STEPS``: the shipped weights (TRAINING.md): the third run's stages, with ``i2v`` from the
fourth session (3000 steps, resumed to 6000, 9000, then 12000: ``--resume --steps N``) and
``dit_mixed`` from the fifth (6000 steps, resumed to 8500, then 10500), ``dit_focus`` and
``i2v_focus`` from the sixth (one run each), ``vace`` (issue 25, one run). ``SECOND_RUN``
and ``FIRST_RUN``: the earlier recipes' counts (end-to-end VAE stages ``vae`` ... ``vae_long``,
kept for reference; their DiTs were trained on that VAE's latents). ``T2V_STAGES`` /
``I2V_STAGES``: the DiT stages whose last finished one is shipped (``final_stage``)."""
from __future__ import annotations

from pathlib import Path

from .training import finished

STEPS = {"text": 400, "encoder_fit": 2000, "decoder_fit": 2400, "vae_fit": 300, "dit": 6400,
         "i2v": 12000, "dit_mixed": 10500, "dit_focus": 4000, "i2v_focus": 3000, "experts": 100,
         "fast_lora": 5500, "vace": 3000, "decoder_shape": 400, "vae_shape": 1100,
         "dit_shape": 3000, "i2v_shape": 2500, "dit_fine": 2000, "dit_pairs": 1500}
# The twelfth session shipped vae_shape, dit_shape, i2v_shape (counts above) with the experts, and
# fast_lora 1500 / vace 1000 steps warm-started from the previous files (--warm-start --steps N).
SECOND_RUN = {"vae": 1500, "text": 400, "decoder": 1200, "decoder_long": 400, "vae_long": 650,
              "dit": 3200, "i2v": 300, "experts": 100}
FIRST_RUN = {"vae": 1500, "text": 400, "decoder": 1200, "decoder_long": 400, "dit": 1100,
             "i2v": 300, "experts": 200}

T2V_STAGES = ("dit_shape", "dit_focus", "dit_mixed", "dit")    # refinements first
I2V_STAGES = ("i2v_shape", "i2v_focus", "i2v")
VAE_STAGES = ("vae_shape", "vae_fit")


def final_stage(out: Path, chain: tuple) -> str:
    """The first finished stage of ``chain`` (``T2V_STAGES`` or ``I2V_STAGES``): the one that
    is shipped, and for T2V the one the experts start from."""
    return next((s for s in chain if finished(Path(out) / s) is not None), chain[-1])
