"""Key implantation losses: awareness recovery and function recovery against a frozen teacher.

CypherTalk (arXiv 2403.07283) names two recovery trainings that make a shaken model work again; the
losses below are a reconstruction (spec ``cyphertalk.md`` §3.2), each knob a parameter:

* **awareness recovery**: ``sum_{l in layers} MSE(h_student^l(pi(x)), h_teacher^l(x))`` on public text,
  with ``h^l`` the hidden state after block ``l`` (padding masked out);
* **function recovery**: ``CE(student(pi(x)), pi(x_shifted)) + lambda_kl * T^2 * KL(p_teacher(x)/T ||
  p_student(pi(x))[..., pi]/T)``.

The shaken tables ``E_s``/``W_s`` stay frozen (:func:`freeze_representation`): training them towards the
teacher would pull the shaken rows back to the permuted original rows, which the cloud could match against
the public table. Recovery adapts the blocks (by default the first ``k = 2``) to the shaken table instead.

Threat model: implantation needs the key and plain public text, so it runs on the client (or a party it
trusts); text the cloud can guess routed through it gives known-plaintext pairs that reveal ``pi``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privtune.models.blocks import get_blocks, get_lm_head
from privtune.shaking.embedding import find_embedding
from privtune.shaking.key import ShakeKey


def freeze_representation(model: nn.Module) -> None:
    """Freeze the (shaken) input embedding and LM head."""
    find_embedding(model).weight.requires_grad_(False)
    head = get_lm_head(model)
    if head is not None:
        head.requires_grad_(False)


def train_first_blocks(model: nn.Module, k: int) -> list[nn.Parameter]:
    """Make only the first ``k`` blocks trainable; returns their parameters.

    Raises:
        ValueError: if ``k`` is not in ``[1, depth]``.
    """
    blocks = get_blocks(model)
    if not 1 <= k <= len(blocks):
        raise ValueError(f"`trainable_blocks={k}` must be in [1, {len(blocks)}] for this model.")
    model.requires_grad_(False)
    for block in blocks[:k]:
        block.requires_grad_(True)
    return [p for block in blocks[:k] for p in block.parameters()]


def awareness_loss(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: Tensor,
    key: ShakeKey,
    layers: Sequence[int] = (2,),
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Hidden-state MSE between the shaken student on ``pi(x)`` and the teacher on plain ``x``.

    Args:
        input_ids: plain ids ``[B, T]`` (public text).
        layers: block indices ``l`` (``hidden_states[l]``, 0 being the embedding output).
        attention_mask: ``[B, T]``; padded positions are left out of the mean.
    """
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    with torch.no_grad():
        t_out = teacher(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    s_out = student(
        input_ids=key.encode_ids(input_ids), attention_mask=mask, output_hidden_states=True, use_cache=False
    )
    weight = mask[..., None].float()  # [B, T, 1]
    total = input_ids.new_zeros((), dtype=torch.float32)
    for layer in layers:
        diff = (s_out.hidden_states[layer].float() - t_out.hidden_states[layer].float()) ** 2  # [B, T, d]
        total = total + (diff * weight).sum() / (weight.sum() * diff.shape[-1]).clamp_min(1)
    return total


def function_loss(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: Tensor,
    key: ShakeKey,
    attention_mask: Tensor | None = None,
    lambda_kl: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """Next-token CE in the shaken space plus distillation from the teacher in the plain order."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    shaken = key.encode_ids(input_ids)
    logits_s = student(input_ids=shaken, attention_mask=mask, use_cache=False).logits  # [B, T, V] shaken order
    labels = shaken[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(logits_s[:, :-1].flatten(0, 1).float(), labels.flatten())
    if lambda_kl > 0:
        with torch.no_grad():
            logits_t = teacher(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
        plain = key.plain_logits(logits_s).float()  # [B, T, V] back in the plain order
        t = temperature
        kl = F.kl_div(F.log_softmax(plain / t, -1), F.log_softmax(logits_t / t, -1), log_target=True, reduction="none")
        kl = (kl.sum(-1) * mask).sum() / mask.sum().clamp_min(1)
        loss = loss + lambda_kl * t * t * kl
    return loss
