"""The embedded demo model's training: dataset, stages, evaluation and export.

Not part of the installed ``wan_core`` library (nothing in ``wan_core`` imports it); run it from
a clone of the repository: ``python -m training.train --help``. See ``TRAINING.md``.
"""
