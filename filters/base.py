"""The filter contract: keep, or drop with a reason.

A filter is a small pydantic model: its fields are its parameters (so a misspelled
parameter in the YAML is an error naming it), and `keep(sample)` answers True or
(False, reason). Calling the filter counts kept and dropped-per-reason by itself,
so every filter's effect shows up in the shard's stats without any code of its own.

A sample is a dict: `key`, `jpg` (bytes of the normalized image), `caption`, and
`meta` (the json written beside the image; filters may add scores to it).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar, Optional, Union

from pydantic import BaseModel, ConfigDict, PrivateAttr

Decision = Union[bool, tuple[bool, str]]


class Filter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The name used in the YAML `filters:` list.
    name: ClassVar[str]

    _counts: Counter = PrivateAttr(default_factory=Counter)

    def keep(self, sample: dict[str, Any]) -> Decision:
        raise NotImplementedError

    def __call__(self, sample: dict[str, Any]) -> Optional[str]:
        """Apply the filter; returns None to keep, or the drop reason."""
        decision = self.keep(sample)
        if decision is True or decision == (True, ""):
            self._counts["kept"] += 1
            return None
        reason = decision[1] if isinstance(decision, tuple) else self.name
        self._counts[f"dropped: {reason}"] += 1
        return reason

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)


def apply_chain(chain: list[Filter], sample: dict[str, Any]) -> Optional[str]:
    """Run filters in order; the first drop wins (later filters do not see the sample)."""
    for f in chain:
        reason = f(sample)
        if reason is not None:
            return reason
    return None
