"""Bundled model configs for offline planning (config.json files of popular models)."""
