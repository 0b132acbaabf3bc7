"""Passive and active health: when a worker is taken out of routing and when it comes back.

Real calls and active checks feed the same consecutive-failure count; N in a
row eject the worker. Only a passing active check re-admits it, because an
ejected worker gets no traffic and so could never prove itself through calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class HealthRecord:
    consecutive_failures: int = 0
    ejected: bool = False
    ejections: int = 0
    checks_passed: int = 0
    checks_failed: int = 0
    last_check_ok: bool | None = None
    last_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "healthy": not self.ejected,
            "consecutive_failures": self.consecutive_failures,
            "ejections": self.ejections,
            "checks_passed": self.checks_passed,
            "checks_failed": self.checks_failed,
            "last_check_ok": self.last_check_ok,
            "last_error": self.last_error,
        }


class HealthTracker:
    def __init__(self, eject_after: int = 3) -> None:
        if eject_after < 1:
            raise ValueError(f"eject_after must be at least 1, got {eject_after}")
        self.eject_after = eject_after
        self._records: dict[str, HealthRecord] = {}
        self.ejected: set[str] = set()  # hot path: an empty set means nobody to filter out

    def record(self, public_key: str) -> HealthRecord:
        rec = self._records.get(public_key)
        if rec is None:
            rec = self._records[public_key] = HealthRecord()
        return rec

    def is_ejected(self, public_key: str) -> bool:
        return public_key in self.ejected

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """{worker key: its record, with "ejected"} for every worker this tracker has seen."""
        return {pk: {**rec.to_dict(), "ejected": rec.ejected} for pk, rec in self._records.items()}

    def call_succeeded(self, public_key: str) -> None:
        """A real call answered: the failure streak ends (it does not re-admit; see module doc)."""
        self.record(public_key).consecutive_failures = 0

    def call_failed(self, public_key: str, error: str) -> bool:
        """A real call failed for a worker-side reason. True when this failure ejected the worker."""
        return self._fail(public_key, error)

    def check_passed(self, public_key: str) -> bool:
        """An active check answered and the worker accepts work. True when this re-admitted it."""
        rec = self.record(public_key)
        rec.checks_passed += 1
        rec.last_check_ok = True
        rec.consecutive_failures = 0
        if rec.ejected:
            rec.ejected = False
            self.ejected.discard(public_key)
            return True
        return False

    def check_failed(self, public_key: str, error: str) -> bool:
        rec = self.record(public_key)
        rec.checks_failed += 1
        rec.last_check_ok = False
        return self._fail(public_key, error)

    def forget(self, public_key: str) -> None:
        self._records.pop(public_key, None)
        self.ejected.discard(public_key)

    def _fail(self, public_key: str, error: str) -> bool:
        rec = self.record(public_key)
        rec.consecutive_failures += 1
        rec.last_error = error
        if not rec.ejected and rec.consecutive_failures >= self.eject_after:
            rec.ejected = True
            self.ejected.add(public_key)
            rec.ejections += 1
            return True
        return False
