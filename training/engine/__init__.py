"""BLOOM assembled for training: the model laid out for DeepSpeed's pipeline, the optimizer, and
DeepSpeed's engine around them (the only code that touches DeepSpeed's engine internals)."""
