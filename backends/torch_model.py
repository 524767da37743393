"""What gft asks of a loaded transformers model, apart from running it: whether its forward
takes `logits_to_keep`, where its LM head is, its learned-position limit, and switching
its own dropout off for the update (with the config rates kept for saving)."""
from __future__ import annotations

import contextlib

import torch

from backends.torch_head import HEAD_AFTER_BODY


def accepts_logits_to_keep(model) -> bool:
    import inspect
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters


def separate_head(model):
    """(decoder, lm_head) when logits are exactly lm_head(decoder(...).last_hidden_state)
    with a plain bias-free Linear (not a LoRA-wrapped one), else None: the chunked head
    (backends/torch_head.py) then takes the hidden states and lm_head's weight."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(inner, "lm_head", None)
    if getattr(inner.config, "model_type", None) not in HEAD_AFTER_BODY \
            or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return inner.get_decoder(), head


def switch_off_dropout(model: torch.nn.Module) -> dict[str, float]:
    """Zero the model's own dropout for the update: every nn.Dropout, the float rates that
    transformers' modules keep (`attention_dropout`, OPT's `dropout`, `activation_dropout`,
    `layerdrop`, ...), and those its config holds, which some modules read in forward
    (Falcon's hidden_dropout). Rollouts and evaluation run in eval mode and mlx-lm's models
    have no dropout, so with it on the update would score tokens under a different
    (random) network than the one that sampled them, and the two backends would train
    different objectives. Applied before LoRA goes on: lora_dropout stays as set.
    Returns the config's own nonzero rates, which save_model writes back (the user's
    model keeps its config)."""
    def is_rate(name: str, value: object) -> bool:
        return ("dropout" in name or "layerdrop" in name) and type(value) is float \
            and value > 0
    config = getattr(model, "config", None)
    kept = {k: v for k, v in vars(config).items() if is_rate(k, v)} if config else {}
    for name in kept:
        setattr(config, name, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if is_rate(name, value):
                setattr(module, name, 0.0)
    return kept


@contextlib.contextmanager
def config_values(config, values: dict[str, float]):
    """The config with `values` set while saving (the rates switch_off_dropout zeroed in
    memory), as it was afterwards."""
    now = {k: getattr(config, k) for k in values}
    for k, v in values.items():
        setattr(config, k, v)
    try:
        yield
    finally:
        for k, v in now.items():
            setattr(config, k, v)


def learned_position_limit(model) -> int | None:
    """How many positions a model with learned absolute position embeddings has rows for
    (GPT-2's wpe, OPT's embed_positions: an Embedding besides the tokens' sized by
    max_position_embeddings, OPT's with 2 rows of offset); None for RoPE and ALiBi models,
    whose positions are computed and run on past the config's figure."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    limit = getattr(inner.config, "max_position_embeddings", None)  # n_positions: aliased
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    tokens = inner.get_input_embeddings()
    learned = any(isinstance(m, torch.nn.Embedding) and m is not tokens
                  and limit <= m.num_embeddings <= limit + 2 for m in inner.modules())
    return limit if learned else None
