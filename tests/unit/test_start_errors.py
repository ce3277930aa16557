"""A worker start error as a value and back (how a Ray host hands it to the gateway), and init_failed bodies."""

from __future__ import annotations

import pytest

from workers.supervisor import SavedStateError, UnknownAgentError, WorkerStartError


@pytest.mark.parametrize("error", [WorkerStartError("boom"), UnknownAgentError("no such agent 'x'"),
                                   SavedStateError("the session's saved state is not JSON: ...")])
def test_a_start_error_keeps_its_type_code_and_message_as_a_body(error: WorkerStartError) -> None:
    back = WorkerStartError.from_body(error.as_body())
    assert type(back) is type(error) and back.code == error.code and back.message == error.message


def test_an_init_failed_body_names_its_error() -> None:
    assert type(WorkerStartError.from_body({"code": 4004, "message": "m"})) is UnknownAgentError
    assert type(WorkerStartError.from_body({"code": 5001, "message": "m", "bad_state": True})) is SavedStateError
    assert type(WorkerStartError.from_body({"code": 5001, "message": "m", "bad_state": "yes"})) is WorkerStartError
    assert WorkerStartError.from_body({}).message == "the agent failed to start"
