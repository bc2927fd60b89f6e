"""A rejection's status: img2dataset's vocabulary, decided by who rejected the row."""

from __future__ import annotations

import pytest

from curate.pipeline.records import (
    FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE, FILTERED, STATUSES, SUCCESS, Rejection, sample_meta,
)


def test_statuses_are_img2dataset_s_and_one_of_curate_s():
    assert STATUSES == ("success", "failed_to_download", "failed_to_resize", "filtered")


def test_a_filter_s_rejection_is_filtered_and_a_stage_says_otherwise():
    assert Rejection("caption_too_short: <2 words", filter="caption_length").columns()["status"] == FILTERED
    fetch = Rejection("failed_to_download: HTTP 404", filter="download", status=FAILED_TO_DOWNLOAD)
    decode = Rejection("decode_error", filter="download", status=FAILED_TO_RESIZE)
    assert (fetch.columns()["status"], decode.columns()["status"]) == (FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE)


@pytest.mark.parametrize("status", [SUCCESS, "rejected", "ok", None])
def test_a_rejection_cannot_carry_another_status(status):
    with pytest.raises(ValueError, match="status"):
        Rejection("x", status=status)


def test_the_json_beside_an_image_has_status_and_error_message_but_no_rejection():
    record = {"key": "000000001", "url": "http://x/a.jpg", "caption": "a", "status": SUCCESS, "error_message": None,
              "reason": None, "http_status": None, "reject_filter": None, "reject_metric": None,
              "reject_value": None, "reject_threshold": None, "width": 64, "height": 64}
    meta = sample_meta(record)
    assert meta["status"] == SUCCESS and "error_message" in meta
    assert not {"reason", "http_status", "reject_filter", "reject_metric", "reject_value", "reject_threshold"} & set(meta)
