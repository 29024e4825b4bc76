"""JSON Schema -> the TypeScript-like text harmony puts in the developer message's `# Tools` section.

This follows openai-harmony's `json_schema_to_typescript` / `template_tools_section` (src/encoding.rs) quirk
for quirk, because the model was trained on that exact text: descriptions become `// ` comments above a
property, optional properties get `?`, string enums become unions of quoted strings, nested objects indent
their properties by four spaces (and close at that indent), `oneOf` renders one ` | ` line per variant, defaults
become trailing `// default: ...` comments, and anything it does not understand becomes `any`. Keys keep the
order the client sent them in (serde_json's preserve_order).
"""

from __future__ import annotations

import json
from typing import Any

from gptoss.engine.harmony.messages import ResponseFormat, ToolSpec


def rust_lines(text: str) -> list[str]:
    """Rust's `str::lines()`: split on `\\n`, drop one trailing `\\r` per line, no empty last line."""
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _format_float(value: float) -> str:
    """serde_json's (ryu's) float text: shortest digits, `1e-7` / `1e16` exponent style, `1.0` for integers."""
    if value == 0.0:
        return "-0.0" if str(value).startswith("-") else "0.0"
    sign = "-" if value < 0 else ""
    mantissa, _, exp = repr(abs(value)).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    digits = (int_part + frac_part).lstrip("0") or "0"
    # value = int(int_part.frac_part) * 10^exp = int(int_part + frac_part) * 10^(exp - len(frac_part))
    k = (int(exp) if exp else 0) - len(frac_part)
    stripped = digits.rstrip("0")
    k += len(digits) - len(stripped)
    digits = stripped
    length = len(digits)
    kk = length + k  # 10^(kk-1) <= value < 10^kk
    if k >= 0 and kk <= 16:
        text = digits + "0" * k + ".0"
    elif 0 < kk <= 16:
        text = digits[:kk] + "." + digits[kk:]
    elif -5 < kk <= 0:
        text = "0." + "0" * (-kk) + digits
    elif length == 1:
        text = f"{digits}e{kk - 1}"
    else:
        text = f"{digits[0]}.{digits[1:]}e{kk - 1}"
    return sign + text


def json_text(value: Any) -> str:
    """serde_json's compact `Display` of a JSON value."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _format_float(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json_text(str(k))}:{json_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(json_text(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _get(schema: Any, key: str) -> Any:
    """`serde_json::Value::get`: None unless `schema` is an object holding `key`."""
    return schema.get(key) if isinstance(schema, dict) else None


def _is_enum(schema: Any) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and len(values) > 0


def _default_comment(schema: Any, default: Any, *, raw_enum_string: bool) -> str:
    """`default: ...` text: strings quoted unless the schema is an enum (then bare where `raw_enum_string`)."""
    if isinstance(default, str) and not _is_enum(schema):
        return f'default: "{default}"'
    if isinstance(default, str) and raw_enum_string:
        return f"default: {default}"
    return f"default: {json_text(default)}"


def _variant_type(variant: Any, indent: str) -> str:
    text = json_schema_to_typescript(variant, indent + "   ")
    if _get(variant, "nullable") is True and "null" not in text:
        text += " | null"
    return text


def json_schema_to_typescript(schema: Any, indent: str = "") -> str:
    """The TypeScript-like type of a JSON Schema, as openai-harmony renders tool parameters."""
    one_of = _get(schema, "oneOf")
    if isinstance(one_of, list):
        out = []
        for variant in one_of:
            out.append(f"\n{indent} | ")
            out.append(_variant_type(variant, indent))
            comments = []
            if isinstance(_get(variant, "description"), str):
                comments.append(variant["description"])
            if isinstance(variant, dict) and "default" in variant:
                # Top-level oneOf variants never render bare enum strings (the property-level branch does).
                comments.append(_default_comment(variant, variant["default"], raw_enum_string=False))
            if comments:
                out.append(" // " + " ".join(comments))
        return "".join(out)

    kind = _get(schema, "type")
    if isinstance(kind, list):
        names = ["number" if t == "integer" else t for t in kind if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if isinstance(kind, str):
        if kind == "object":
            return _object_type(schema, indent)
        if kind == "string":
            values = _get(schema, "enum")
            if isinstance(values, list):
                quoted = [f'"{v}"' for v in values if isinstance(v, str)]
                if quoted:
                    return " | ".join(quoted)
            return "string"
        if kind in ("number", "integer"):
            return "number"
        if kind == "boolean":
            return "boolean"
        if kind == "array":
            if isinstance(schema, dict) and "items" in schema:
                return json_schema_to_typescript(schema["items"], indent) + "[]"
            return "Array<any>"
        return "any"
    return "any"


def _object_type(schema: dict, indent: str) -> str:
    out = []
    if isinstance(schema.get("description"), str):
        out.append(f"{indent}// {schema['description']}\n")
    out.append("{\n")
    props = schema.get("properties")
    if isinstance(props, dict):
        required_list = schema.get("required")
        required = {r for r in required_list if isinstance(r, str)} if isinstance(required_list, list) else set()
        for key, val in props.items():
            mark = "" if key in required else "?"
            if isinstance(_get(val, "title"), str):
                out.append(f"{indent}// {val['title']}\n{indent}//\n")
            one_of = _get(val, "oneOf")
            if one_of is None and isinstance(_get(val, "description"), str):
                out.append(f"{indent}// {val['description']}\n")
            examples = _get(val, "examples")
            if isinstance(examples, list) and examples:
                out.append(f"{indent}// Examples:\n")
                for example in examples:
                    if isinstance(example, str):
                        out.append(f'{indent}// - "{example}"\n')
            if isinstance(one_of, list):
                out.append(_one_of_property(key, mark, val, one_of, indent))
                continue
            out.append(f"{indent}{key}{mark}: ")
            text = json_schema_to_typescript(val, indent + "    ")
            if _get(val, "nullable") is True and "null" not in text:
                text += " | null"
            out.append(text + ",")
            if one_of is None and isinstance(val, dict) and "default" in val:
                out.append(" // " + _default_comment(val, val["default"], raw_enum_string=True))
            out.append("\n")
    out.append(f"{indent}}}")
    return "".join(out)


def _one_of_property(key: str, mark: str, val: dict, variants: list, indent: str) -> str:
    out = []
    property_desc = val.get("description") if isinstance(val.get("description"), str) else None
    first_desc = _get(variants[0], "description") if variants else None
    skip_property_desc = property_desc is not None and isinstance(first_desc, str) and first_desc == property_desc
    desc_above = False
    if not skip_property_desc and property_desc is not None:
        out.append(f"{indent}// {property_desc}\n")
        desc_above = True
    if "default" in val:
        out.append(f"{indent}// " + _default_comment(val, val["default"], raw_enum_string=True) + "\n")
    out.append(f"{indent}{key}{mark}:\n")
    for i, variant in enumerate(variants):
        out.append(f"{indent} | ")
        out.append(_variant_type(variant, indent))
        comments = []
        variant_desc = _get(variant, "description")
        if not (i == 0 and desc_above) and isinstance(variant_desc, str) and variant_desc != property_desc:
            comments.append(variant_desc)
        if isinstance(variant, dict) and "default" in variant:
            comments.append(_default_comment(variant, variant["default"], raw_enum_string=True))
        if comments:
            out.append(" // " + " ".join(comments))
        out.append("\n")
    out.append(f"{indent},\n")
    return "".join(out)


def render_tools_section(tools: list[ToolSpec], namespace: str = "functions") -> str:
    """`# Tools` + `## functions` + `namespace functions { ... } // namespace functions`."""
    parts = [f"## {namespace}\n"]
    if tools:
        parts.append(f"namespace {namespace} {{\n")
        for tool in tools:
            parts.extend(f"// {line}" for line in rust_lines(tool.description))
            if tool.parameters is not None:
                parts.append(f"type {tool.name} = (_: {json_schema_to_typescript(tool.parameters, '')}) => any;\n")
            else:
                parts.append(f"type {tool.name} = () => any;\n")
        parts.append(f"}} // namespace {namespace}")
    return "# Tools\n\n" + "\n".join(parts)


def render_response_format_section(response_format: ResponseFormat) -> str:
    """`# Response Formats` as harmony's format guide shows it: name, optional description, compact schema."""
    lines = ["# Response Formats", "", f"## {response_format.name}", ""]
    if response_format.description:
        lines.extend(f"// {line}" for line in rust_lines(response_format.description))
    lines.append(json.dumps(response_format.schema, ensure_ascii=False, separators=(",", ":")))
    return "\n".join(lines)
