"""What validating the event models costs: the choice behind decoding with validation.

The codec builds every event with pydantic validation (``Header(name=..., value=...)``),
although it has already checked what it decoded. This measures, per model, validation, pydantic's
``model_construct`` (no validation), and the cheapest construction possible without
validation (filling the instance's ``__dict__`` directly), so that the cost of keeping
validation is a figure, not a guess. Run: ``python bench/models_bench.py``.
"""

from __future__ import annotations

import platform
import timeit
from collections.abc import Callable
from typing import Any

from milterapp.events import Body, EndOfHeaders, EnvRcpt, EsmtpArgs, Header

_new = object.__new__
_set = object.__setattr__


def unvalidated(cls: type[Any], values: dict[str, Any]) -> Any:
    """An instance without validation or defaults: the floor for any construction."""
    instance = _new(cls)
    _set(instance, "__dict__", values)
    _set(instance, "__pydantic_fields_set__", set(values))
    _set(instance, "__pydantic_extra__", None)
    _set(instance, "__pydantic_private__", None)
    return instance


HEADER = {"name": "X-Header-1", "value": "value number 1 value", "leading_space": False}
RCPT = {"address": "bob@example.net", "raw": "<bob@example.net>"}
CASES: list[tuple[str, Callable[[], object]]] = [
    ("Header, validated", lambda: Header(**HEADER)),
    ("Header, model_construct", lambda: Header.model_construct(**HEADER)),
    ("Header, unvalidated floor", lambda: unvalidated(Header, dict(HEADER))),
    ("EnvRcpt, validated", lambda: EnvRcpt(**RCPT, args=EsmtpArgs.parse(["NOTIFY=NEVER"]))),
    (
        "EnvRcpt, model_construct",
        lambda: EnvRcpt.model_construct(**RCPT, args=EsmtpArgs.parse(["NOTIFY=NEVER"])),
    ),
    ("Body (4 KiB), validated", lambda: Body(chunk=b"x" * 4096)),
    ("EndOfHeaders, validated", EndOfHeaders),
]


def main() -> None:
    number = 100_000
    print(f"python {platform.python_version()} on {platform.machine()}, best of 5 x {number}")
    for label, build in CASES:
        best = min(timeit.repeat(build, number=number, repeat=5)) / number * 1e6
        print(f"{label:<30} {best:6.2f} us")


if __name__ == "__main__":
    main()
