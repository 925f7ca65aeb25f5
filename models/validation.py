"""Config files validated by pydantic models, with the project's one-line errors.

Every config file (gate and partition policies, Vast settings, budget, Thunder cluster...) is a
pydantic v2 model with ``extra="forbid"``; ``validate`` turns pydantic's ValidationError into
the caller's error class with one line that names the file and the field:

    configs/vast.toml: field 'idle.window_s': must be a number, got 'x'

Only the layers above ``models`` use this module (pydantic is not installed on the bare GPU
boxes the trainer runs on, so nothing of the training path imports it).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)

# pydantic error type -> what the field must be (followed by ", got <input>")
_MUST = {
    "float_type": "must be a number", "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "int_type": "must be an integer", "int_parsing": "must be an integer", "int_from_float": "must be an integer",
    "string_type": "must be a string", "path_type": "must be a string (a path)",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "list_type": "must be a list", "tuple_type": "must be a list",
    "dict_type": "must be a table", "model_type": "must be a table", "model_attributes_type": "must be a table",
}


_FIRST = {"extra_forbidden": 0, "missing": 1}


class ConfigModel(BaseModel):
    """Base of the config file models: unknown keys are errors, types are not coerced
    (a string is no number, true is no number; an integer is accepted for a float)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _known(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the (sub)model that holds ``loc``'s last part, for 'unknown field'."""
    for part in loc[:-1]:
        info = model.model_fields.get(str(part))
        sub = getattr(info, "annotation", None) if info else None
        sub = next((a for a in getattr(sub, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), sub)
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return sorted(model.model_fields)


def _shown(value: Any) -> str:
    """The input as the message quotes it (a long table or list is cut: the line stays one line)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(err: dict, model: type[BaseModel] | None = None) -> str:
    """One pydantic error as ``field 'a.b': message``."""
    loc, kind = tuple(err["loc"]), err["type"]
    where = f"field '{field_path(loc)}'" if loc else "(top level)"
    if kind == "missing":
        return f"{where}: required"
    if kind == "extra_forbidden":
        known = _known(model, loc) if model is not None else []
        return f"{where}: unknown field" + (f" (known: {', '.join(known)})" if known else "")
    if kind in _MUST:
        return f"{where}: {_MUST[kind]}, got {_shown(err['input'])}"
    msg = err["msg"]
    if kind == "value_error":  # our own validators say what the field must be; the input follows
        msg = msg.removeprefix("Value error, ")
        return f"{where}: {msg}, got {_shown(err['input'])}"
    if msg.startswith("Input should be "):
        msg = "must be " + msg.removeprefix("Input should be ")
    return f"{where}: {msg}, got {_shown(err['input'])}"


def message(e: ValidationError, where: str, model: type[BaseModel] | None = None) -> str:
    """``FILE: field 'path': message`` for the first error (the count of the others after it):
    unknown fields first, then missing ones, then the rest in the order of the fields."""
    errors = sorted(e.errors(include_url=False), key=lambda err: _FIRST.get(err["type"], 2))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {describe(errors[0], model)}{more}" if where else f"{describe(errors[0], model)}{more}"


def validate(model: type[M], data: Any, where: str, error: type[Exception]) -> M:
    """``model`` from ``data`` (a parsed TOML/JSON document); any problem raises ``error``
    with one line naming ``where`` (the file) and the field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise error(message(e, where, model)) from None
