"""Deep prefix prompt tuning of a frozen model for text classification (the FedPepTAO client model).

FedPepTAO (Che et al., EMNLP 2023, arXiv 2310.15080) tunes P-tuning v2 deep prefixes (arXiv 2110.07602) with the
backbone frozen:

* decoders (Llama, GPT-2, OPT families: SmolLM2) use candidate scoring of single-token label words at the last
  real token: the loss is the full-vocabulary cross-entropy of the label word (MetaICL "direct", spec §3); the
  prediction is the argmax over the label words only;
* encoders (BERT family: MiniLM, which has no MLM head) have two heads (``encoder_head``):

  - ``label_names`` (default): the encoder analogue of the code's frozen MLM verbalizer. Each class is the
    normalised mean-pooled embedding of its label name (``"business"``, ``"sports"``, ...) computed once by the
    frozen model without a prefix; a text's score is ``scale * cos(mean_pool(h), e_c)``. Nothing but the prefix
    trains, so the communicated bytes are ``4 P |sel| 2 H_kv`` per client and direction, as in spec §11. Mean
    pooling plus cosine is how sentence encoders such as all-MiniLM-L6-v2 were trained, so it is also a zero-shot
    classifier before any tuning. ``scale = 20`` is the sentence-transformers contrastive scale (temperature 0.05).
  - ``linear``: the sequence-classification head, fresh, trained with the prefix and federated with it
    (``C * (d + 1)`` values more per client and direction).

The module trains like any LightningModule (centralised prompt tuning) and implements the federated round loop's
client Protocols (:class:`privtune.federated.FederatedClient`, :class:`privtune.federated.PartialPromptClient`):
:meth:`client_parameters`, :meth:`client_loss`, :meth:`evaluate_batch`, :attr:`prompt_name`,
:attr:`num_prompt_layers`, :meth:`hidden_states`.

Threat model: as a module, none; under the federated Strategy only the prompt (slices), and the ``linear`` head if
one is trained, leave a client.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from privtune.models import get_lm_head, is_decoder, load_model, load_tokenizer, resolve_model
from privtune.models.scoring import last_token_index
from privtune.prompts import DeepPrefixPrompt, freeze_backbone

ENCODER_HEADS = ("label_names", "linear")
PROMPT_NAME = "prefix"


class PromptTuning(pl.LightningModule):
    """A frozen model with a deep prefix prompt, for classification.

    Args:
        model: model name or folder (see :func:`privtune.models.resolve_model`).
        num_virtual_tokens: prefix length ``P``.
        prefix_dropout: dropout on the prefix at forward time (0.1 in P-tuning v2).
        init_std: standard deviation of the prefix initialisation.
        num_labels: classes of an encoder's head (decoders score label words and ignore it).
        encoder_head: ``label_names`` (frozen label-name embeddings, cosine scores) or ``linear`` (a trained
            classification head); encoders only.
        label_scale: the cosine scale of the ``label_names`` head.
        lr: learning rate for centralised training (the federated Strategy uses its client settings).
        weight_decay: AdamW weight decay for centralised training.
        seed: seeds the prefix and head initialisation (every client starts from the same prompt).

    Raises:
        ValueError: for an unknown model, ``num_virtual_tokens < 1``, ``lr <= 0``, an unknown ``encoder_head``,
            ``label_scale <= 0`` or an encoder without ``num_labels``, before any weight is loaded.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        num_virtual_tokens: int = 5,
        prefix_dropout: float = 0.1,
        init_std: float = 0.02,
        num_labels: int | None = None,
        encoder_head: str = "label_names",
        label_scale: float = 20.0,
        lr: float = 0.04,
        weight_decay: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        errors = []
        if num_virtual_tokens < 1:
            errors.append(f"`num_virtual_tokens={num_virtual_tokens}` must be >= 1.")
        if not lr > 0:
            errors.append(f"`lr={lr}` must be > 0.")
        if encoder_head not in ENCODER_HEADS:
            errors.append(f"`encoder_head={encoder_head!r}` must be one of {ENCODER_HEADS}.")
        if not label_scale > 0:
            errors.append(f"`label_scale={label_scale}` must be > 0.")
        if errors:
            raise ValueError(" ".join(errors))
        resolve_model(model)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(model)
        from privtune.models import load_config

        decoder = load_config(model).model_type not in ("bert", "roberta")
        if not decoder and num_labels is None:
            raise ValueError(f"`num_labels` is required for the encoder `model={model!r}` (its classification head).")
        task = "causal_lm" if decoder else "sequence_classification"
        self.model = load_model(model, task=task, num_labels=num_labels, seed=seed)
        self.decoder = is_decoder(self.model)
        freeze_backbone(self.model)
        self.prompt = DeepPrefixPrompt.for_model(
            self.model, num_virtual_tokens=num_virtual_tokens, dropout=prefix_dropout, init_std=init_std, seed=seed
        )
        self.head: nn.Module | None = None
        if not self.decoder and encoder_head == "linear":
            self.head = self.model.classifier
            self.head.requires_grad_(True)
        # [C, d] normalised label-name embeddings of the `label_names` head (set by `configure_labels`)
        self.register_buffer("label_embeddings", None, persistent=False)
        self.lr, self.weight_decay = lr, weight_decay
        self.label_token_ids: Tensor | None = None
        self.num_classes: int | None = num_labels

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.configure_labels(
                getattr(datamodule, "label_token_ids", None),
                getattr(datamodule, "num_classes", 0),
                getattr(datamodule, "label_names", None),
            )

    def configure_labels(
        self, label_token_ids: Tensor | None, num_classes: int, label_names: list[str] | None = None
    ) -> None:
        """Take the verbalizer (decoders), the class count and the label names (``label_names`` head) from the data.

        Raises:
            ValueError: if a decoder gets no label words, an encoder's head size disagrees with the data, or the
                ``label_names`` head gets no names.
        """
        if self.decoder:
            if label_token_ids is None:
                raise ValueError(
                    f"The decoder `model={self.hparams.model!r}` classifies by label words: give the datamodule "
                    "`label_words` (one single-token word per class)."
                )
            self.label_token_ids = torch.as_tensor(label_token_ids, dtype=torch.long)
        elif self.num_classes is not None and num_classes and num_classes != self.num_classes:
            raise ValueError(f"`num_labels={self.num_classes}` but the datamodule has {num_classes} classes.")
        self.num_classes = num_classes or self.num_classes
        if not self.decoder and self.head is None:
            if not label_names:
                raise ValueError(
                    "`encoder_head='label_names'` scores texts against the class names: the datamodule has no "
                    "`label_names`; use `encoder_head='linear'`."
                )
            self.label_embeddings = self._embed_label_names(label_names)

    @torch.no_grad()
    def _embed_label_names(self, names: list[str]) -> Tensor:
        """``[C, d]``: each name's mean-pooled, normalised last hidden state, frozen model, no prefix."""
        enc = self.tokenizer([n.replace("_", " ") for n in names], padding=True, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        was_training = self.model.training
        self.model.eval()  # no dropout: the class embeddings are fixed vectors, the same on every client and rank
        try:
            hidden = self.model.base_model(**enc).last_hidden_state
        finally:
            self.model.train(was_training)
        return F.normalize(_mean_pool(hidden, enc["attention_mask"]), dim=-1)

    # ------------------------------------------------------------------ what a client trains and sends
    #: the entry of :meth:`client_parameters` holding the deep prefix (layers on axis 1)
    prompt_name = PROMPT_NAME

    @property
    def num_prompt_layers(self) -> int:
        """``L``: the layers of the deep prefix."""
        return int(self.prompt.num_layers)

    def client_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors by name: ``prefix`` ``[P, L, 2, H_kv]`` and, for encoders, ``head.*``."""
        params = {PROMPT_NAME: self.prompt.weight}
        if self.head is not None:
            params.update({f"head.{k}": p for k, p in self.head.named_parameters()})
        return params

    # ------------------------------------------------------------------ forward
    def _run(self, batch: dict[str, Tensor], output_hidden_states: bool = False) -> Any:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        kwargs = self.prompt.forward_kwargs(mask)
        if self.decoder:
            return self.model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1, **kwargs)
        return self.model(input_ids=ids, use_cache=False, output_hidden_states=output_hidden_states, **kwargs)

    def _decoder_last_hidden(self, out: Any, mask: Tensor) -> Tensor:
        hidden = out.hidden_states[-1]  # [B, T, d] (the prefix is in the cache, not in the sequence)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_token_index(mask)]  # [B, d]

    def _label_ids(self, device: torch.device) -> Tensor:
        if self.label_token_ids is None:
            raise RuntimeError("call `configure_labels` (or fit with a datamodule) before running a decoder.")
        return self.label_token_ids.to(device)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Class scores ``[B, C]``."""
        out = self._run(batch, output_hidden_states=self.head is None)
        if not self.decoder:
            return self._encoder_scores(out, batch["attention_mask"])
        last = self._decoder_last_hidden(out, batch["attention_mask"])
        head = get_lm_head(self.model)
        ids = self._label_ids(last.device)
        scores = last @ head.weight[ids].T
        if getattr(head, "bias", None) is not None:
            scores = scores + head.bias[ids]
        return scores

    def client_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Training loss: full-vocabulary CE of the label word (decoders), CE of the head (encoders)."""
        out = self._run(batch, output_hidden_states=self.head is None)
        if not self.decoder:
            return F.cross_entropy(self._encoder_scores(out, batch["attention_mask"]).float(), batch["labels"])
        last = self._decoder_last_hidden(out, batch["attention_mask"])
        logits = get_lm_head(self.model)(last).float()  # [B, V] at one position
        return F.cross_entropy(logits, self._label_ids(last.device)[batch["labels"]])

    def _encoder_scores(self, out: Any, mask: Tensor) -> Tensor:
        """``[B, C]``: the linear head's logits, or scaled cosines to the label-name embeddings."""
        if self.head is not None:
            return out.logits
        if self.label_embeddings is None:
            raise RuntimeError("call `configure_labels` (or fit with a datamodule) before running the encoder.")
        pooled = F.normalize(_mean_pool(out.hidden_states[-1], mask), dim=-1)  # [B, d]; real tokens only
        return self.hparams.label_scale * pooled @ self.label_embeddings.to(pooled.dtype).T

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor]) -> Tensor:
        """Predicted class per row ``[B]`` (argmax over the label words / head outputs)."""
        return self(batch).argmax(-1)

    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, Tensor]) -> tuple[int, int]:
        """``(correct, total)`` predictions on one labelled batch (the federated loop's personalised evaluation)."""
        preds = self.predict(batch)
        return int((preds == batch["labels"]).sum()), int(batch["labels"].numel())

    @torch.no_grad()
    def hidden_states(self, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """All layer outputs (index 0 = embeddings), for FedPepTAO's layer scoring."""
        return self._run(batch, output_hidden_states=True).hidden_states

    # ------------------------------------------------------------------ centralised training
    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.client_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def _eval(self, batch: dict[str, Tensor], split: str) -> None:
        if not hasattr(self, f"_{split}_acc"):
            setattr(self, f"_{split}_acc", MulticlassAccuracy(num_classes=self.num_classes, average="micro"))
        metric = getattr(self, f"_{split}_acc").to(self.device)
        metric.update(self.predict(batch), batch["labels"])
        self.log(f"{split}/acc", metric, prog_bar=True, batch_size=batch["labels"].shape[0])

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval(batch, "val")

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval(batch, "test")

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(self.client_parameters().values()), lr=self.lr, weight_decay=self.weight_decay)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the frozen backbone is rebuilt from `model`; only the trainable tensors are written
        head = [f"model.classifier.{k}" for k, _ in self.head.named_parameters()] if self.head is not None else []
        keep = {"prompt.weight", *head}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        self.strict_loading = False

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.strict_loading = False


def _mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """``[B, T, d]`` states, ``[B, T]`` mask -> ``[B, d]`` mean over the real tokens (sentence-transformers pooling)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
