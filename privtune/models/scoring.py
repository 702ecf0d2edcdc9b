"""Classification with a language model: label-word scoring on decoders, a head on encoders.

A decoder classifies by the logits its LM head gives to one *label word* per class (the verbalizer, e.g.
" negative" / " neutral" / " positive") at the last real token of ``"Tweet: {text}\\nSentiment:"``. Two
details matter for correctness and speed:

* Batches are right-padded, so the last real token sits at ``attention_mask.sum(-1) - 1``, not at ``-1``
  (reading position -1 of a padded row is off by several logits).
* Only the ``C`` label rows of the head are multiplied, at one position: exact, and much cheaper than
  the full ``[B, T, V]`` projection (V = 49,152 for SmolLM2).

Encoders (BERT family) use their sequence-classification head instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from privtune.models.blocks import get_lm_head, is_decoder


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last attended position of each row, for right or left padding.

    Args:
        attention_mask: ``[B, T]`` of 0/1.

    Returns:
        ``[B]`` long tensor.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=-1)


def label_word_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    label_token_ids: Tensor,
    **forward_kwargs: object,
) -> Tensor:
    """Scores ``[B, C]`` of the label words at each row's last real token, for a causal decoder.

    Works on plain and peft-wrapped models, including prompt tuning that prepends virtual tokens: the
    hidden states are then longer than ``input_ids`` and the index is shifted by the difference.

    Args:
        model: a ``*ForCausalLM`` (possibly inside a peft wrapper).
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]``.
        label_token_ids: ``[C]`` token id of each class's label word.
        **forward_kwargs: passed to the model's forward (e.g. ``past_key_values`` for deep prompts).
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
        **forward_kwargs,
    )
    hidden = out.hidden_states[-1]  # [B, T + P, d], after the final norm
    shift = hidden.shape[1] - input_ids.shape[1]  # P virtual tokens prepended by prompt tuning, else 0
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_token_index(attention_mask) + shift]  # [B, d]
    head = get_lm_head(model)
    weight = head.weight[label_token_ids]  # [C, d]
    scores = last @ weight.T  # [B, C]
    if getattr(head, "bias", None) is not None:
        scores = scores + head.bias[label_token_ids]
    return scores


def classification_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    label_token_ids: Tensor | None = None,
    **forward_kwargs: object,
) -> Tensor:
    """Class scores ``[B, C]``: label-word scoring for decoders, the classification head for encoders."""
    if is_decoder(model):
        if label_token_ids is None:
            raise ValueError("`label_token_ids` is required to classify with a decoder (label-word scoring).")
        return label_word_logits(model, input_ids, attention_mask, label_token_ids, **forward_kwargs)
    return model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).logits
