"""The BLOOM model and what knows its shape: modules, ALiBi, kernel backends, the parameter table."""
