"""privtune: tune language models when the data, the model, or both must stay private.

The core (``privtune.models``, ``privtune.data``, ``privtune.emulator``, ``privtune.prompts``,
``privtune.federated``, ``privtune.shaking``, ``privtune.attacks``) needs only torch and transformers.
Lightning parts live in ``privtune.modules``, ``privtune.strategies``, ``privtune.callbacks`` and
``privtune.datamodules``.
"""

__version__ = "0.1.0"
