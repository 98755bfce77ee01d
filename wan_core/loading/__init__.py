"""Files -> models: checkpoint readers (``checkpoint``), key layouts, assignment into meta-built
models (``assign``) and one ``load_*`` per model (``dit``, ``vae``, ``text_encoder``,
``clip_vision``)."""
