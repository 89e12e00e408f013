"""Hugging Face conversion: import, export, the export's self-check and model card."""
