"""The record of one input row, as every stage's shard parquet holds it, and a rejection as data.

A record is a dict with the RECORD_COLUMNS (missing values are nulls), then the input's
extra columns, then whatever scores the stages and filters added. The shard parquet of the
write stage holds one record per input row, kept or rejected, so `rows in = written +
rejected` can be checked on the files themselves.

A rejection is a `Rejection`: the short, countable `reason` users count in stats.json
("clip_similarity<0.28", "failed_to_download: HTTP 404", "unsafe: caption_blocklist"),
and beside it who decided and on what measure (`filter`, `metric`, `value`, `threshold`),
stored as the REJECTION_COLUMNS of the record. The report reads those columns; nothing
parses a reason string to get a number back.

A record's `status` speaks img2dataset's vocabulary, so tools written for its output read
curate's: SUCCESS (written), FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE, and curate's own FILTERED for
a row a filter dropped. Every stage, the report and the tests use these constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pyarrow as pa

# Why a rejection's image is never shown or kept (see `Rejection.is_safety`).
SAFETY_PREFIX = "unsafe"
# The score stage's score field (the filters declare theirs: Filter.score_fields).
CLIP_SIMILARITY = "clip_similarity"

# A row's status: img2dataset's values (its parquet's `status`, its _stats.json counts), and one
# of curate's own for the rows its filters drop.
SUCCESS = "success"                        # written: in the shard's tar
FAILED_TO_DOWNLOAD = "failed_to_download"  # the fetch failed or was refused (HTTP error, timeout, bad URL, opt-out)
FAILED_TO_RESIZE = "failed_to_resize"      # fetched, but the image did not decode or normalize (or was a bomb)
FILTERED = "filtered"                      # a filter dropped it: `reason` and the reject_* columns say which, why
REJECTED_STATUSES = (FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE, FILTERED)
STATUSES = (SUCCESS, *REJECTED_STATUSES)


@dataclass(frozen=True)
class Rejection:
    """Why a row was not written.

    reason:    the short label counted in stats ("clip_similarity<0.28")
    filter:    the filter that decided, or the stage for its own rejections ("download",
               "score"), or None where nothing finer is known
    metric:    the measured quantity the decision compared ("clip_similarity", "side")
    value:     this row's value of `metric`
    threshold: the limit it was compared with
    detail:    free text for the row's error_message (an HTTP status line, a decoder's error)
    status:    the row's status, by who rejected it: FILTERED for a filter's decision (the default);
               the stages set FAILED_TO_DOWNLOAD for their fetch's failures and FAILED_TO_RESIZE
               for an image that does not decode or normalize (pipeline/fetch.py, stages/download.py)
    """

    reason: str
    filter: Optional[str] = None
    metric: Optional[str] = None
    value: Optional[float] = None
    threshold: Optional[float] = None
    detail: Optional[str] = None
    status: str = FILTERED

    def __post_init__(self):
        if self.status not in REJECTED_STATUSES:
            raise ValueError(f"a rejection's status is one of {REJECTED_STATUSES}, not {self.status!r}")

    @property
    def is_safety(self) -> bool:
        return is_safety_reason(self.reason)

    def columns(self) -> dict:
        """The record's columns for this rejection."""
        return {
            "status": self.status, "reason": self.reason, "error_message": self.detail,
            "reject_filter": self.filter, "reject_metric": self.metric,
            "reject_value": None if self.value is None else float(self.value),
            "reject_threshold": None if self.threshold is None else float(self.threshold),
        }


def is_safety_reason(reason: Optional[str]) -> bool:
    """True for rejections made for safety: their images are never shown, thumbnailed or kept."""
    return bool(reason) and reason.startswith(SAFETY_PREFIX)


# The rejection as columns of the record (nulls for written rows).
REJECTION_COLUMNS = ["reject_filter", "reject_metric", "reject_value", "reject_threshold"]

# Columns every stage's parquet carries, before the input's extra columns.
RECORD_COLUMNS = [
    "key", "url", "caption", "status", "reason", "error_message", "http_status", *REJECTION_COLUMNS,
    "width", "height", "original_width", "original_height", "sha256", "bytes",
]

# Record fields that say why a row was dropped, not what the sample is: not part of the json
# stored beside an image (which carries `status` and `error_message`, as img2dataset's json does).
_OUTCOME = {"reason", "http_status", *REJECTION_COLUMNS}

_TYPES = {
    "http_status": pa.int64(),  # the status of a failed fetch's HTTP answer (404, 503, ...); null without one
    "reject_filter": pa.string(), "reject_metric": pa.string(),
    "reject_value": pa.float64(), "reject_threshold": pa.float64(),
}


def sample_meta(record: dict) -> dict:
    """The json stored beside each image: everything known about the sample, with its status
    (SUCCESS) and error_message (null), but none of a rejection's columns."""
    return {k: v for k, v in record.items() if k not in _OUTCOME}


def records_table(records: list[dict], extra_cols: list[str]) -> pa.Table:
    """Records as a table with a stable column order (missing values are nulls)."""
    columns = RECORD_COLUMNS + [c for c in extra_cols if c not in RECORD_COLUMNS]
    columns += sorted({k for r in records for k in r} - set(columns))
    return pa.Table.from_pydict({
        c: pa.array([r.get(c) for r in records], _TYPES.get(c)) for c in columns
    })
