"""Checkpoints: the layout-independent file format, saving/loading a running engine, reading a saved model."""
