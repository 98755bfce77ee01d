"""Step counts of the shipped run (chosen from step times measured on 2 shared CPU cores)."""
STEPS = {"vae": 1500, "text": 400, "decoder": 1200, "decoder_long": 400, "vae_long": 650,
         "dit": 3200, "i2v": 300, "experts": 100}
