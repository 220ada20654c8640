"""Schemathesis hooks for test_fuzz_serve (loaded through SCHEMATHESIS_HOOKS): a generated `model`
string is almost never a configured model, so every string becomes the fuzzed model's name. The
rest of each body stays as generated: valid, invalid and odd alike reach the engine."""

import schemathesis

FUZZED_MODEL = "fuzz"


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = FUZZED_MODEL
    return body
