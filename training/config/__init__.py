"""The config: typed schema, Hydra loading, and the checks that run before anything starts."""
