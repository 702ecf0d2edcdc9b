"""Which callbacks a federated Strategy accepts: those that act where they are attached, or none silently.

The federated Strategies train every client inside the round loop of :mod:`privtune.federated.loop`; Lightning's
batch and gradient hooks then see one tick per round, never a client's batches or gradients. A privacy callback
that works in those hooks (DP-SGD's clipping and noise, shaking a batch's ids) would protect nothing while its
report claims it did, so it is refused at set-up (issue 13: "refuse rather than degrade").

The rule, in order:

1. a callback declaring :class:`privtune.contracts.FederatedAware` is accepted (``federated_support = "run"``) or
   refused with its own ``federated_alternative`` (``"refuse"``);
2. Lightning's own callbacks (checkpointing, progress bars, summaries, timers) are accepted: they count steps,
   save and display, and a round is a step;
3. any other callback that overrides a batch or gradient hook is refused, naming the hook;
4. privtune's own callbacks (``privtune.callbacks``) that do not declare themselves are refused: each privacy
   mechanism states whether it protects a federated run, none is assumed to;
5. the rest (a project's own callbacks with set-up, fit-end or exception hooks only) are accepted.

Threat model: the simulated clients' local training happens inside the loop; only what runs there protects them.
"""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch.callbacks import Callback

from privtune.contracts import FederatedAware, conforms

#: hooks that see a training / validation batch or the gradients of one
BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_validation_batch_start",
    "on_validation_batch_end",
)

CLIENT_DP_HINT = (
    "for a privacy guarantee in a federated run use client-level DP "
    "(`strategy.init_args.federated.client_dp`, docs/federated.md)"
)


def overridden_batch_hooks(callback: Callback) -> list[str]:
    """The batch / gradient hooks that ``callback``'s class (or a base below ``Callback``) defines."""
    hooks = []
    for hook in BATCH_HOOKS:
        for klass in type(callback).__mro__:
            if klass is Callback:
                break
            if hook in vars(klass):
                hooks.append(hook)
                break
    return hooks


def refusal(callback: Callback, strategy: str) -> str | None:
    """The one-sentence reason ``callback`` cannot run under the federated ``strategy``, or ``None`` if it can."""
    name = type(callback).__name__
    if conforms(callback, FederatedAware):
        if callback.federated_support == "run":
            return None
        return (
            f"`{name}` cannot run under the federated Strategy `{strategy}`: it declares that it does not act "
            f"inside the clients' local training; instead {callback.federated_alternative}."
        )
    module = type(callback).__module__
    if module.startswith(("lightning.", "pytorch_lightning.")):
        return None
    hooks = overridden_batch_hooks(callback)
    if hooks:
        return (
            f"`{name}` works on training batches or gradients ({', '.join(hooks)}), but the federated Strategy "
            f"`{strategy}` trains every client inside its own round loop where those hooks never see a client's "
            f"batches or gradients, so it would silently do nothing; remove it ({CLIENT_DP_HINT}), or, if it only "
            "needs one tick per round, declare `federated_support = 'run'` on its class (privtune.contracts."
            "FederatedAware)."
        )
    if module.startswith("privtune.callbacks"):
        return (
            f"privtune's `{name}` does not declare how it acts in a federated run (privtune.contracts.FederatedAware), "
            f"so the federated Strategy `{strategy}` refuses it rather than let a mechanism silently protect less "
            f"than asked; remove it ({CLIENT_DP_HINT})."
        )
    return None


def check_callbacks(callbacks: Iterable[Callback], strategy: str) -> None:
    """Raise ``ValueError`` for the first callback the federated ``strategy`` cannot honour (see module doc)."""
    for callback in callbacks:
        reason = refusal(callback, strategy)
        if reason is not None:
            raise ValueError(reason)
