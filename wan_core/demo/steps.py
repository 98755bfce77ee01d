"""Step counts of the demo training stages (chosen from step times measured on 2 shared CPU cores).

``STEPS``: the second run (this recipe, TRAINING.md). ``FIRST_RUN``: the run whose weights are
shipped (the same ``vae``/``text``/``decoder``/``decoder_long`` stages; its DiTs were trained
at lr 5e-4 on 4 placements per combination, without ``vae_long``)."""
STEPS = {"vae": 1500, "text": 400, "decoder": 1200, "decoder_long": 400, "vae_long": 650,
         "dit": 3200, "i2v": 300, "experts": 100}
FIRST_RUN = {"vae": 1500, "text": 400, "decoder": 1200, "decoder_long": 400, "dit": 1100,
             "i2v": 300, "experts": 200}
