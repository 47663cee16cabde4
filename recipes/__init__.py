"""Each head's build recipe (HEAD.toml over defaults.toml) and its data: evaluation and calibration sets.

A package only so that an installed exporter finds its recipes beside it (`exporter.pipeline.recipes` reads them).
"""
