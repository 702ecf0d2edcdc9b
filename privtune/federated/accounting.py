"""Communication and time accounting of a federated run (FedPepTAO, arXiv 2310.15080, spec §11).

* Bytes per round and direction: ``bytes_per_elem * (elements sent per client) * (clients)``; for FedPepTAO that is
  ``4 * P * |sel| * 2 * H_kv * M`` in float32. Server-side state (momentum, control variates) adds nothing;
  SCAFFOLD doubles the traffic (it also sends ``c`` down and ``dc_i`` up).
* Round time is the slowest sampled client's local wall-clock time (parallel devices); the serial cost (sum over
  clients) is kept as well.

Threat model: none; this only counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def prefix_transfer_elements(num_virtual_tokens: int, num_layers: int, kv_width: int) -> int:
    """Elements of ``|sel|`` layers' prefix slices: ``P * |sel| * 2 * H_kv``."""
    return num_virtual_tokens * num_layers * 2 * kv_width


@dataclass
class RoundRecord:
    """One round's traffic and time.

    Attributes:
        round: 1-based round index.
        clients: the sampled clients.
        reported: the clients whose update arrived (sampled minus dropped).
        up_bytes: bytes uploaded by the reporting clients.
        down_bytes: bytes broadcast to the sampled clients.
        round_seconds: the slowest reporting client's local time.
        serial_seconds: the sum over reporting clients.
        num_transfer_params: elements sent per client per direction.
    """

    round: int
    clients: list[int]
    reported: list[int]
    up_bytes: int
    down_bytes: int
    round_seconds: float
    serial_seconds: float
    num_transfer_params: int


@dataclass
class CommLedger:
    """Per-round and cumulative traffic and time; serialisable into checkpoints and reports."""

    rounds: list[RoundRecord] = field(default_factory=list)

    def record(
        self,
        round_idx: int,
        clients: list[int],
        reported: list[int],
        elements_per_client: int,
        client_seconds: dict[int, float],
        bytes_per_elem: int = 4,
        factor: int = 1,
    ) -> RoundRecord:
        """Add one round: every sampled client downloads, every reporting client uploads.

        Raises:
            ValueError: if ``bytes_per_elem`` or ``factor`` is not positive.
        """
        if bytes_per_elem < 1 or factor < 1:
            raise ValueError(f"`bytes_per_elem` and `factor` must be >= 1; got {bytes_per_elem}, {factor}.")
        per_client = bytes_per_elem * elements_per_client * factor
        times = [client_seconds.get(c, 0.0) for c in reported]
        rec = RoundRecord(
            round=round_idx,
            clients=list(clients),
            reported=list(reported),
            up_bytes=per_client * len(reported),
            down_bytes=per_client * len(clients),
            round_seconds=max(times, default=0.0),
            serial_seconds=float(sum(times)),
            num_transfer_params=elements_per_client * factor,
        )
        self.rounds.append(rec)
        return rec

    @property
    def total_up_bytes(self) -> int:
        """Cumulative upload."""
        return sum(r.up_bytes for r in self.rounds)

    @property
    def total_down_bytes(self) -> int:
        """Cumulative download."""
        return sum(r.down_bytes for r in self.rounds)

    @property
    def total_seconds(self) -> float:
        """Sum of per-round times (the slowest client of each round)."""
        return sum(r.round_seconds for r in self.rounds)

    def summary(self) -> dict[str, Any]:
        """Totals for reports."""
        return {
            "rounds": len(self.rounds),
            "up_bytes": self.total_up_bytes,
            "down_bytes": self.total_down_bytes,
            "total_bytes": self.total_up_bytes + self.total_down_bytes,
            "round_seconds_total": self.total_seconds,
            "serial_seconds_total": sum(r.serial_seconds for r in self.rounds),
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain-data form."""
        return {"rounds": [asdict(r) for r in self.rounds]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.rounds = [RoundRecord(**r) for r in state["rounds"]]
