"""kv_aware on real engines: each repeated long prompt prefix goes to the replica whose KV cache holds it, as
the engines' own count of cached prompt tokens shows (usage.prompt_tokens_details.cached_tokens), and the
router's expectation of that count (x-raystack-cached-tokens-expected) is the engine's."""

from __future__ import annotations

import random

import openai
import pytest

from tests.e2e_kv.conftest import MODEL

pytestmark = pytest.mark.e2e

TENANTS = 6
ROUNDS = 3
BLOCK = 128  # the CPU engine's block size


def system_prompt(tenant: int) -> str:
    """About 600 tokens of one tenant's instructions: four whole blocks and more."""
    return f"Tenant {tenant}'s assistant. " + " ".join(f"Rule {tenant}.{i}: answer tenant {tenant} in full sentences."
                                                        for i in range(60))


def test_a_repeated_prefix_is_answered_from_the_cache_of_the_replica_that_holds_it(kv_stack):
    client = openai.OpenAI(base_url=kv_stack, api_key="unused", max_retries=0, timeout=300)
    order = random.Random(0)
    cached: dict[int, list[int]] = {tenant: [] for tenant in range(TENANTS)}
    expected: dict[int, list[int]] = {tenant: [] for tenant in range(TENANTS)}
    for round_ in range(ROUNDS):
        tenants = list(range(TENANTS))
        order.shuffle(tenants)
        for tenant in tenants:
            raw = client.chat.completions.with_raw_response.create(model=MODEL, max_tokens=2, messages=[
                {"role": "system", "content": system_prompt(tenant)},
                {"role": "user", "content": f"Question {round_} of tenant {tenant}?"}])
            details = raw.parse().usage.prompt_tokens_details
            cached[tenant].append(details.cached_tokens if details else 0)
            expected[tenant].append(int(raw.headers.get("x-raystack-cached-tokens-expected", -1)))
    # Two replicas routed by load alone would miss about half of the second round (1 in 64 that none does).
    for tenant, counts in cached.items():
        assert counts[0] < BLOCK, f"tenant {tenant}'s first request found its prefix cached: {counts}"
        assert all(count >= 4 * BLOCK for count in counts[1:]), f"tenant {tenant} missed its cache: {counts}"
    assert expected == cached  # one request at a time: the router knows exactly what each cache holds
