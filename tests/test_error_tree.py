"""The error tree's middle layer: refused before decoding vs failed while running, which
the server maps by class (so a new subclass gets the right kind of status unchanged)."""

from __future__ import annotations

import pytest

from ggufllm import errors
from ggufllm.server.errors import to_api_error


@pytest.mark.parametrize("exc, status", [
    (errors.InvalidParameterError("bad", "top_p"), 400),
    (errors.ContextLengthExceededError(900, 512, 100), 400),
    (errors.ServerBusyError(4), 429),
    (errors.DecodeFailedError(-3), 500),
    (errors.EngineFailedError("boom"), 503),
])
def test_each_class_has_its_status(exc, status):
    assert to_api_error(exc).status == status


def test_refusals_and_running_failures_are_told_apart_by_their_base():
    refused = [errors.InvalidParameterError, errors.UnsupportedSchemaError,
               errors.ContextLengthExceededError, errors.ServerBusyError]
    assert all(issubclass(c, errors.RequestRejectedError) for c in refused)
    assert not any(issubclass(c, errors.EngineError) for c in refused)
    assert issubclass(errors.DecodeFailedError, errors.EngineError)

    class NewRefusal(errors.RequestRejectedError):
        pass

    class NewRunFailure(errors.EngineError):
        pass

    assert to_api_error(NewRefusal("no")).status == 400
    err = to_api_error(NewRunFailure("died"))
    assert err.status == 500 and err.code == "engine_error"
