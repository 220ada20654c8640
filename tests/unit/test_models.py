"""Model sources: parsing, preparing the embedded model, and failing offline with a fix."""

import json
import os

import pytest

from raystack.models import embedded, sources


@pytest.mark.parametrize(
    "text, kind, ref",
    [
        ("smollm2-135m-instruct", "embedded", "smollm2-135m-instruct"),
        ("modelscope://Qwen/Qwen3-32B", "modelscope", "Qwen/Qwen3-32B"),
        ("hf://HuggingFaceTB/SmolLM2-135M-Instruct", "hf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("/models/qwen", "local", "/models/qwen"),
    ],
)
def test_parse_source(text, kind, ref):
    src = sources.parse_source(text)
    assert (src.kind, src.ref) == (kind, ref)


@pytest.mark.parametrize("text", ["s3://bucket/model", "modelscope://Qwen", "hf://a/b/c", "Qwen3-32B"])
def test_unusable_sources_explain_the_accepted_forms(text):
    with pytest.raises(sources.ModelSourceError, match="Org/Name"):
        sources.parse_source(text)


def test_embedded_model_is_prepared_once_and_checked(tmp_path):
    messages = []
    path = sources.resolve("smollm2-135m-instruct", tmp_path, progress=messages.append)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file()
    assert any("converting" in m for m in messages)
    # Its chat template shows the model a request's tools and renders a turn that only called them.
    from transformers import AutoTokenizer

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    turns = [{"role": "user", "content": "Weather?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "-3 C"}]
    prompt = AutoTokenizer.from_pretrained(path).apply_chat_template(turns, tools=tools, tokenize=False)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in prompt
    assert "<tool_response>\n-3 C\n</tool_response>" in prompt

    messages.clear()
    assert sources.resolve("smollm2-135m-instruct", tmp_path, progress=messages.append) == path
    assert messages == [f"smollm2-135m-instruct: ready at {path} (checksums verified)"]

    # A checkpoint prepared to an older recipe (a cache from before the tools template) is not ready: it is
    # prepared again, as above.
    model = embedded.EMBEDDED_MODELS["smollm2-135m-instruct"]
    marker = path / embedded.MARKER
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "recipe": embedded.RECIPE - 1}))
    assert not embedded.is_prepared(model, tmp_path)
    marker.write_text(json.dumps(record))
    # Nor is a damaged one, caught by its checksum.
    (path / "tokenizer.json").write_text("{}")
    assert not embedded.is_prepared(model, tmp_path)


@pytest.mark.parametrize(
    "source, env",
    [
        # The hub endpoints point at a closed local port: the real download code fails at the network.
        ("hf://Qwen/Qwen3-0.6B", {"HF_ENDPOINT": "http://127.0.0.1:9"}),
        ("modelscope://Qwen/Qwen3-0.6B", {"MODELSCOPE_ENDPOINT": "http://127.0.0.1:9"}),
    ],
)
def test_offline_download_names_the_model_and_the_fix(tmp_path, monkeypatch, source, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(sources.ModelSourceError) as err:
        sources.resolve(source, tmp_path)
    message = str(err.value)
    assert f"could not download {source}" in message
    assert "set `source:` to its local path" in message
    assert not os.path.exists(tmp_path / source.split("://")[0] / source.split("://")[1] / ".raystack-complete")
