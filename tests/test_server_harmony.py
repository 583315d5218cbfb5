"""A gpt-oss (harmony) model behind the server: the tiny fixture, random weights.

What it writes is noise, so the checks are about routing: the stream's ``content`` and
``reasoning_content`` deltas add up to the non-streamed message's fields at temperature 0,
with system/developer messages, ``reasoning_effort`` and usage on the way.
"""

from __future__ import annotations

import json

import pytest

from ggufllm import LLMService

from . import http_calls as http
from .server_fixture import running_server

pytestmark = pytest.mark.slow


def test_harmony_channels_split_the_same_way_streamed_or_not(tiny_gguf) -> None:
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "developer", "content": "Answer from the context."},
                         {"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24, "temperature": 0, "reasoning_effort": "high"}
    with running_server(LLMService(tiny_gguf("q8_0"), max_length=256)) as server:
        models = http.get(f"{server.url}/v1/models", timeout=10).json()["data"]
        assert models[0]["meta"]["prompt_format"] == "harmony"
        whole = http.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
        assert whole.status_code == 200, whole.text
        message = whole.json()["choices"][0]["message"]
        streamed = http.post(f"{server.url}/v1/chat/completions",
                              json={**body, "stream": True}, timeout=300)
        assert streamed.status_code == 200
        content, reasoning = [], []
        for line in streamed.text.splitlines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    content.append(choice["delta"].get("content") or "")
                    reasoning.append(choice["delta"].get("reasoning_content") or "")
    assert "".join(content) == message["content"]
    assert "".join(reasoning) == message.get("reasoning_content", "")
    usage = whole.json()["usage"]
    assert usage["completion_tokens"] >= usage["completion_tokens_details"]["reasoning_tokens"]
