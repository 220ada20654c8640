"""LoRA adapters on the real vLLM engine, through the router with the openai client (conftest.py: the second
stack, whose model lists an adapter of SmolLM2 with random weights and one made for another model)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e_options.conftest import ADAPTER, FOREIGN_ADAPTER, MODEL

pytestmark = pytest.mark.e2e

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(options_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{options_stack}/v1", api_key="unused", max_retries=0, timeout=300)


def greedy(client: openai.OpenAI, model: str) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text


def test_models_lists_each_adapter_with_its_base(client):
    listed = {m.id: m.model_extra for m in client.models.list().data}
    assert listed[MODEL]["parent"] is None
    assert listed[ADAPTER]["parent"] == MODEL and listed[ADAPTER]["root"].endswith(ADAPTER)
    assert listed[FOREIGN_ADAPTER]["parent"] == MODEL


def test_an_adapter_answers_unlike_its_model_and_the_same_each_time(client, options_stack):
    base = greedy(client, MODEL)
    adapted = greedy(client, ADAPTER)
    assert adapted != base
    assert greedy(client, ADAPTER) == adapted
    streamed = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == adapted
    chat = httpx.post(f"{options_stack}/v1/chat/completions", timeout=300, json={
        "model": f"{ADAPTER}@vllm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["model"] == ADAPTER
    assert greedy(client, MODEL) == base  # the model itself is unchanged by its adapter's requests


def test_an_unknown_adapter_is_a_404_naming_the_known_ones(client):
    with pytest.raises(openai.NotFoundError) as caught:
        greedy(client, "smollm2-pirate")
    message = caught.value.body["message"]
    assert ADAPTER in message and FOREIGN_ADAPTER in message and caught.value.body["param"] == "model"


def test_an_adapter_made_for_another_model_is_a_400_and_the_replica_keeps_serving(client):
    with pytest.raises(openai.BadRequestError) as caught:
        greedy(client, FOREIGN_ADAPTER)
    error = caught.value.body
    assert error["param"] == "model" and "was not made for model `smollm2`" in error["message"]
    assert "takes inputs 64 wide" in error["message"] or "gives outputs" in error["message"]
    assert greedy(client, ADAPTER)  # the replica that refused it serves on
