"""A tiny llama-style chat model built entirely on this machine (no hub): a byte-level BPE
tokenizer trained with ``tokenizers`` on the given texts, a llama config and random weights
saved as safetensors through MLX. ``mlx_lm.server``, ``mlx_lm.lora`` and ``mlx_lm.load`` read
the directory like any downloaded model, so the corrector lane can be exercised end to end
(serving, adapters, the OpenAI client) without network or a real LLM. Its output is noise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_llama(out_dir: Path, texts: Iterable[str], vocab_size: int = 512, hidden_size: int = 64,
                     layers: int = 2, seed: int = 0) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json under
    ``out_dir`` and return it. Deterministic for the same texts and seed."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    eos_id = tok.token_to_id("<|end|>")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "<|end|>", "unk_token": "<unk>", "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": 1024,
    }, indent=1))

    config = {
        "model_type": "llama", "hidden_size": hidden_size, "num_hidden_layers": layers,
        "intermediate_size": hidden_size * 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "vocab_size": tok.get_vocab_size(), "max_position_embeddings": 1024,
        "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": tok.token_to_id("<s>"), "eos_token_id": eos_id,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return out


def build_lora_adapter(model_dir: Path, out_dir: Path, rank: int = 4, num_layers: int = 2, seed: int = 1,
                       strength: float = 0.5) -> Path:
    """Write an untrained-but-nonzero LoRA adapter (adapter_config.json + adapters.safetensors)
    for ``model_dir`` in the layout ``mlx_lm.lora`` saves, so ``--adapter-path`` can load it."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = load(str(model_dir))
    lora = {"rank": rank, "dropout": 0.0, "scale": 10.0}
    mx.random.seed(seed)
    linear_to_lora_layers(model, num_layers, lora)
    weights = {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    # lora_b starts at zero, which would make the adapter a no-op; give it values large
    # enough that its output visibly differs from the base model's.
    weights = {k: (mx.random.normal(v.shape) * strength if k.endswith("lora_b") else v) for k, v in weights.items()}
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": lora,
    }, indent=1))
    return out
