"""The run plan: parameter counts, memory estimate and FLOPs of a config and layout."""
