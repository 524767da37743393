"""A reward model as a reward: what TRL's GRPOTrainer does with `reward_funcs="org/rm"`.

`rewards: [path/to/reward-model]` (or a Hub id, `org/name`) names a transformers
sequence-classification model, e.g. one trained with TRL's RewardTrainer. Each response
is scored as TRL scores it:
- text: for a chat prompt, the reward model's own chat template over the prompt's
  messages + the response as an assistant turn; otherwise prompt + response;
- tokens: that text without special tokens added (the template already holds them),
  right-padded in batches of `batch_size`;
- reward: the first logit of the model's score head.
It runs through PyTorch on either backend (an MLX run needs `gft[torch]` for it), on the
GPU when there is one, else the CPU, in inference mode.

A folder whose weights have no score head (a causal LM, a base model) is refused: its
head would be freshly random, and every reward noise (transformers only warns).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gft.errors import RewardError, first_line
from gft.runpaths import looks_local

# a sequence-classification head, in the architectures transformers writes, or a
# custom reward-model class (trust_remote_code models name theirs e.g. *RewardModel)
_SCORING = ("ForSequenceClassification", "RewardModel")


def names_a_reward_model(name: str) -> bool:
    """Whether a reward name (one without ':function') names a model: a local folder
    with a config.json, or a Hub id 'org/name' (not a local path)."""
    if ":" in name:
        return False
    path = Path(name).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file()
    return not looks_local(name) and name.count("/") == 1 and not name.endswith(".py")


class RewardModelScorer:
    """A loaded reward model, called the way reward functions are (by keyword)."""

    def __init__(self, name: str, model: Any, tokenizer: Any, batch_size: int,
                 max_length: int | None):
        self.__name__ = name  # reward metrics are named after functions
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    def __call__(self, prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        texts = [self._text(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            scores += self._score(texts[start:start + self.batch_size])
        return scores

    def _text(self, prompt: Any, completion: Any) -> str:
        if isinstance(prompt, list):  # chat: the response is its assistant turn
            reply = completion if isinstance(completion, list) else \
                [{"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(prompt + reply, tokenize=False)
        return prompt + completion

    def _score(self, texts: list[str]) -> list[float]:
        import torch
        batch = self.tokenizer(texts, return_tensors="pt", padding=True,
                               padding_side="right", add_special_tokens=False,
                               truncation=self.max_length is not None,
                               max_length=self.max_length)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        with torch.inference_mode():
            logits = self.model(**batch).logits
        return logits[:, 0].float().cpu().tolist()


def load_reward_model(name: str, batch_size: int = 8, max_length: int | None = None,
                      device: str | None = None, dtype: str = "auto") -> RewardModelScorer:
    """The reward model `name` (a folder or Hub id) ready to score; every failure is one
    RewardError line naming it. device: default the GPU this process uses (torchrun's
    LOCAL_RANK), else Apple's MPS, else the CPU."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise RewardError(f"reward '{name}': batch_size must be a positive integer, "
                          f"got {batch_size!r}")
    try:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:
        raise RewardError(f"reward '{name}': a reward model runs through PyTorch: "
                          "pip install 'gft[torch]'") from None
    from gft.hubmodel import local_model
    try:
        folder = local_model(name)
    except Exception as exc:
        raise RewardError(f"reward '{name}': {first_line(exc)}") from None
    _check_scoring_head(name, Path(folder))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype=dtype)
    except Exception as exc:
        raise RewardError(f"reward '{name}': cannot load it as a reward model: "
                          f"{type(exc).__name__}: {first_line(exc)}") from None
    if tokenizer.pad_token_id is None:  # batches are padded: as TRL does, pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last real token
    model.to(device or _default_device(torch)).eval()
    return RewardModelScorer(name, model, tokenizer, batch_size, max_length)


def _check_scoring_head(name: str, folder: Path) -> None:
    """Refuse a folder that is not a reward model before loading it."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise RewardError(f"reward '{name}': {folder} has no config.json; a reward model "
                          "is a transformers sequence-classification model folder")
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise RewardError(f"reward '{name}': {config_file}: {first_line(exc)}") from None
    if not any(part in arch for arch in architectures for part in _SCORING):
        raise RewardError(
            f"reward '{name}': {folder} holds {', '.join(architectures) or 'no architecture'}"
            ", not a reward model (a ...ForSequenceClassification with a trained score "
            "head); its score head would be random")


def _default_device(torch: Any) -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
