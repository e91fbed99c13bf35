"""What a classifier's logits mean: one label per image (softmax) or independent labels (sigmoid).

A multi-label model (a Hugging Face `problem_type = "multi_label_classification"`) or a binary model with a single
logit scores each class on its own: its probabilities are sigmoid(logit) and need not sum to 1. Every place that
turns logits into probabilities (predictions, Score-CAM's confidences, faithfulness scores) asks the model's head.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

Head = Literal["softmax", "sigmoid"]
HEADS: tuple[str, ...] = get_args(Head)


def probabilities(logits: Tensor, head: Head = "softmax") -> Tensor:
    """float32 probabilities [N, classes] of logits [N, classes] under `head`."""
    logits = logits.float()
    return torch.sigmoid(logits) if head == "sigmoid" else torch.softmax(logits, dim=1)
