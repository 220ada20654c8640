"""Priority classes: the router's config of them, the class each request gets (its key's at most), and
what each engine is told (raystack.config.priority, raystack.router.priority)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from raystack.config import RouterConfig
from raystack.config.priority import PriorityClasses
from raystack.protocol import OpenAIError
from raystack.router.auth import APIKeyError, APIKeys
from raystack.router.priority import Priorities, tell_engine

PRIORITIES = Priorities(PriorityClasses())  # interactive, standard (the default), batch (sheddable)


def test_the_default_classes_and_a_router_config_that_names_its_own():
    default = RouterConfig().priority
    assert default.names == ["interactive", "standard", "batch"] and default.default == "standard"
    assert [c.sheddable for c in default.classes] == [False, False, True]
    own = RouterConfig.model_validate({"priority": {"default": "chat", "classes": [
        {"name": "chat"}, {"name": "bulk", "sheddable": True, "max_share": 0.5, "queue_timeout_s": 30}]}})
    assert Priorities(own.priority).by_name["bulk"].rank == 1


@pytest.mark.parametrize("priority, problem", [
    ({"default": "gold"}, "default class 'gold' is not among the classes"),
    ({"classes": [{"name": "a"}, {"name": "a"}], "default": "a"}, "priority class names must be unique"),
    ({"classes": [{"name": "a", "sheddable": True}], "default": "a"}, "every class is sheddable"),
    ({"classes": [{"name": "a", "max_share": 0}], "default": "a"}, "greater than 0"),
    ({"classes": [], "default": "a"}, "at least 1 item"),
])
def test_a_priority_config_that_cannot_work_is_refused_with_why(priority, problem):
    with pytest.raises(ValidationError, match=problem):
        RouterConfig.model_validate({"priority": priority})


def test_a_request_has_its_keys_class_and_may_ask_for_a_lower_one_never_a_higher_one():
    assert PRIORITIES.of(None, None, {}).name == "standard"  # no key, nothing asked: the default
    assert PRIORITIES.of("interactive", None, {}).name == "interactive"
    assert PRIORITIES.of("interactive", "batch", {}).name == "batch"  # lower: granted
    assert PRIORITIES.of("batch", "interactive", {}).name == "batch"  # higher: the key's class stays
    assert PRIORITIES.of(None, "interactive", {}).name == "standard"  # without a key, the default is the highest
    # vLLM's integer in the body: the class at that position, lower first; beyond the last, the last
    assert PRIORITIES.of("interactive", None, {"priority": 1}).name == "standard"
    assert PRIORITIES.of("interactive", None, {"priority": 99}).name == "batch"
    assert PRIORITIES.of("standard", None, {"priority": -5}).name == "standard"
    assert PRIORITIES.of("interactive", "standard", {"priority": 2}).name == "standard"  # the header wins


def test_an_unknown_class_in_the_header_is_a_400_naming_the_classes():
    with pytest.raises(OpenAIError) as refused:
        PRIORITIES.of(None, "urgent", {})
    assert refused.value.status == 400 and refused.value.param == "x-raystack-priority"
    assert "interactive, standard, batch" in refused.value.message


def test_an_engine_that_schedules_by_priority_gets_the_class_rank_and_another_gets_no_field():
    body = {"priority": 0}
    tell_engine(body, PRIORITIES.by_name["batch"], schedules_by_priority=True)
    assert body["priority"] == 2
    tell_engine(body, PRIORITIES.by_name["batch"], schedules_by_priority=False)
    assert "priority" not in body


def test_a_key_names_its_class_and_an_unknown_one_is_refused_by_line():
    text = "keys:\n  - name: chat\n    key: sk-chat\n    priority: interactive\n  - name: jobs\n    key: sk-jobs\n"
    keys = APIKeys.parse(text, "keys", classes=PriorityClasses().names)
    assert sorted((g.name, g.priority) for g in keys.grants.values()) == [("chat", "interactive"), ("jobs", None)]
    with pytest.raises(APIKeyError, match=r"line 2: priority: no class 'gold' \(the router's classes: interactive, "):
        APIKeys.parse("keys:\n  - name: chat\n    key: sk-chat\n    priority: gold\n", "keys",
                      classes=PriorityClasses().names)
