"""privtune's federated round loop as a Flower 1.42 app (Message API): a ``ServerApp`` and a ``ClientApp``.

Needs the optional extra ``flower`` (``pip install 'privtune[flower]'``). The apps are in
:mod:`privtune.flower.server_app` and :mod:`privtune.flower.client_app` (``app`` objects for ``flwr run`` /
SuperLink and SuperNodes; ``make_server_app`` / ``make_client_app`` for ``flwr.simulation.run_simulation``).
See docs/flower.md.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "privtune.flower needs the optional dependency `flwr` (1.42): pip install 'privtune[flower]'."
    ) from err
