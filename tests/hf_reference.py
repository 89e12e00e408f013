"""The independent reference: Hugging Face's BloomForCausalLM, built from our ModelConfig's shape."""
import torch
from transformers import BloomConfig, BloomForCausalLM

from training.config.schema import ModelConfig


def hf_config(cfg: ModelConfig, vocab: int) -> BloomConfig:
    return BloomConfig(vocab_size=vocab, hidden_size=cfg.hidden_size, n_layer=cfg.num_layers,
                       n_head=cfg.num_heads, layer_norm_epsilon=cfg.layer_norm_epsilon,
                       initializer_range=cfg.init_std, hidden_dropout=0.0, attention_dropout=0.0)


def random_hf_model(cfg: ModelConfig, vocab: int, seed: int = 0) -> BloomForCausalLM:
    """HF BLOOM with random weights, biases and LayerNorms too (HF initialises those to 0/1, which
    would hide a bias or LayerNorm mapped to the wrong place)."""
    torch.manual_seed(seed)
    model = BloomForCausalLM(hf_config(cfg, vocab)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                base = 1.0 if name.endswith("layernorm.weight") or name.endswith("ln_f.weight") else 0.0
                param.copy_(base + 0.1 * torch.randn_like(param))
    return model
