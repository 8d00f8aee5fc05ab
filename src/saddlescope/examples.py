"""Small models and data to try ``saddlescope analyze --model`` on, with nothing to download.

    saddlescope analyze --model saddlescope.examples:digits_cnn --data saddlescope.examples:digits_batches
    saddlescope analyze --model saddlescope.examples:tiny_gpt2 --data saddlescope.examples:token_batches \\
        --loss lm --method lanczos

They double as templates: a factory returns an ``nn.Module``, a data function returns batches
``(inputs, targets)`` (inputs a tensor, or a dict of tensors for Hugging Face models).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from saddlescope.errors import InvalidInputError


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits with BatchNorm and Dropout (both behave as in evaluation)."""

    def __init__(self, channels: int = 4, hidden: int = 16, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * 16, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, 1, 8, 8)))


def digits_cnn(channels: int = 4, hidden: int = 16, dropout: float = 0.25, seed: int = 0) -> DigitsCNN:
    """A :class:`DigitsCNN` initialised from ``seed``."""
    torch.manual_seed(seed)
    return DigitsCNN(channels, hidden, dropout)


def digits_batches(n_samples: int = 256, batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n_samples`` sklearn digits, scaled to [0, 1], as (images (B, 1, 8, 8), labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if not 1 <= n_samples <= len(digits.target):
        raise InvalidInputError(f"n_samples must be in 1..{len(digits.target)}, got {n_samples}")
    x = torch.tensor(digits.images[:n_samples] / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target[:n_samples], dtype=torch.long)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n_samples, batch_size)]


def tiny_gpt2(n_layer: int = 2, n_embd: int = 16, n_head: int = 2, vocab_size: int = 64, n_positions: int = 32,
              seed: int = 0) -> nn.Module:
    """A Hugging Face GPT-2 built from a small config (random weights; needs ``transformers``)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InvalidInputError("tiny_gpt2 needs Hugging Face transformers: pip install transformers") from exc
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                        n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def token_batches(n_sequences: int = 16, length: int = 12, vocab_size: int = 64, batch_size: int = 8,
                  seed: int = 0) -> list[tuple[dict[str, Any], torch.Tensor]]:
    """Synthetic token sequences with structure to learn (each token is the previous plus one, mod
    the vocabulary, from a random start): ``({"input_ids": ids}, ids)`` batches for ``--loss lm``."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab_size, (n_sequences, 1), generator=generator)
    ids = (start + torch.arange(length)) % vocab_size
    return [({"input_ids": ids[i:i + batch_size]}, ids[i:i + batch_size]) for i in range(0, n_sequences, batch_size)]
