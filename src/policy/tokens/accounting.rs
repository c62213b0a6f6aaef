//! OpenAI's prompt accounting over a request body: chat messages, content parts, tool
//! definitions (the cookbook's rule), and completion / embedding inputs.

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::measure::{to_u64, Measure, Tally};
use super::py_json::{py_isspace, py_str};
use super::rules::{ImageRule, ModelRules, ToolConstants};
use super::PromptKind;

pub(super) fn count_body<M: Measure>(m: &M, rules: &ModelRules, kind: PromptKind, body: &Value) -> u64 {
    let Some(body) = body.as_object() else {
        return 0;
    };
    match kind {
        PromptKind::Chat => chat_tokens(m, rules, body),
        PromptKind::Completion => input_tokens(m, body.get("prompt")),
        PromptKind::Embedding => input_tokens(m, body.get("input")),
    }
}

/// `prompt` / `input`: a string, strings, a token array, or token arrays.
pub(super) fn input_tokens<M: Measure>(m: &M, input: Option<&Value>) -> u64 {
    match input {
        Some(Value::String(s)) => m.text(s),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => m.text(s),
                Value::Number(_) => 1,
                Value::Array(ids) => to_u64(ids.iter().filter(|id| id.is_number()).count()),
                _ => 0,
            })
            .fold(0u64, u64::saturating_add),
        _ => 0,
    }
}

pub(super) fn chat_tokens<M: Measure>(m: &M, rules: &ModelRules, body: &Map<String, Value>) -> u64 {
    let mut n = Tally::default();
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for message in messages.iter().filter_map(Value::as_object) {
            message_tokens(m, rules, message, &mut n);
        }
    }
    n.add(3); // every reply is primed with <|start|>assistant<|message|>
    tools_tokens(m, rules, body, &mut n);
    n.total()
}

pub(super) fn message_tokens<M: Measure>(m: &M, rules: &ModelRules, msg: &Map<String, Value>, n: &mut Tally) {
    n.add_signed(rules.per_message);
    for (key, value) in msg {
        match value {
            // Every string field is encoded, whatever its key (role, content, name, tool_call_id,
            // refusal, …); the keys themselves are part of the per-message constant.
            Value::String(s) => {
                n.add(m.text(s));
                if key == "name" {
                    n.add_signed(rules.per_name);
                }
            }
            Value::Array(parts) if key == "content" => {
                for part in parts.iter().filter_map(Value::as_object) {
                    content_part_tokens(m, rules, part, n);
                }
            }
            // Not in the cookbook: the oracle counts a call's function name and arguments.
            Value::Array(calls) if key == "tool_calls" => {
                for call in calls.iter().filter_map(Value::as_object) {
                    if let Some(Value::Object(function)) = call.get("function") {
                        function_call_tokens(m, function, n);
                    }
                }
            }
            Value::Object(function) if key == "function_call" => function_call_tokens(m, function, n),
            _ => {}
        }
    }
}

pub(super) fn function_call_tokens<M: Measure>(m: &M, function: &Map<String, Value>, n: &mut Tally) {
    for field in ["name", "arguments"] {
        if let Some(Value::String(s)) = function.get(field) {
            n.add(m.text(s));
        }
    }
}

pub(super) fn content_part_tokens<M: Measure>(m: &M, rules: &ModelRules, part: &Map<String, Value>, n: &mut Tally) {
    match part.get("type").and_then(Value::as_str) {
        Some("text") => {
            if let Some(Value::String(s)) = part.get("text") {
                n.add(m.text(s));
            }
        }
        Some("image_url") => {
            let (url, detail) = match part.get("image_url") {
                Some(Value::Object(image)) => match image.get("url") {
                    None => ("", image.get("detail")),
                    Some(Value::String(url)) => (url.as_str(), image.get("detail")),
                    Some(_) => return,
                },
                Some(Value::String(url)) => (url.as_str(), None),
                _ => return,
            };
            let low_detail = detail.and_then(Value::as_str) == Some("low");
            // Only the tile rule's high/auto detail depends on the size; skip decoding otherwise.
            let needs_size = !(low_detail && matches!(rules.image, ImageRule::Tiles { .. }));
            let size = if needs_size { m.image_size(url) } else { None };
            n.add(rules.image.tokens(size, low_detail));
        }
        // Other part types (input_audio, file, …) have no published rule; the oracle skips them.
        _ => {}
    }
}

/// The tool definitions' tokens: the cookbook's rule for `tools` (or legacy `functions`).
pub(super) fn tools_tokens<M: Measure>(m: &M, rules: &ModelRules, body: &Map<String, Value>, n: &mut Tally) {
    // As the oracle's `body.get("tools") or [{"function": f} for f in body.get("functions", [])]`.
    let functions: Vec<&Map<String, Value>> = match body.get("tools") {
        Some(Value::Array(tools)) if !tools.is_empty() => tools
            .iter()
            .filter_map(Value::as_object)
            .filter_map(|tool| match tool.get("function") {
                None => Some(tool), // a legacy entry given directly
                Some(Value::Object(function)) => Some(function),
                Some(_) => None,
            })
            .collect(),
        _ => match body.get("functions") {
            Some(Value::Array(functions)) if !functions.is_empty() => {
                functions.iter().filter_map(Value::as_object).collect()
            }
            _ => return,
        },
    };
    let c = rules.tools;
    for f in functions {
        n.add_signed(c.func_init);
        let name = f.get("name").map_or(Cow::Borrowed(""), py_str);
        let description = match f.get("description") {
            Some(Value::String(d)) => d.trim_end_matches(py_isspace),
            _ => "",
        };
        let description = description.strip_suffix('.').unwrap_or(description);
        n.add(m.joined(&[&name, ":", description]));
        let properties = match f.get("parameters") {
            Some(Value::Object(parameters)) => match parameters.get("properties") {
                Some(Value::Object(properties)) if !properties.is_empty() => properties,
                _ => continue,
            },
            _ => continue,
        };
        n.add_signed(c.prop_init);
        for (key, p) in properties {
            let Some(p) = p.as_object() else { continue };
            n.add_signed(c.prop_key);
            if let Some(values) = p.get("enum") {
                enum_tokens(m, c, values, n);
            }
            let description = match p.get("description") {
                Some(Value::String(d)) => d.strip_suffix('.').unwrap_or(d),
                _ => "",
            };
            let ty = match p.get("type") {
                None => Cow::Borrowed(""),
                Some(Value::Array(types)) => Cow::Owned(types.iter().map(py_str).collect::<Vec<_>>().join("|")),
                Some(ty) => py_str(ty),
            };
            n.add(m.joined(&[key, ":", &ty, ":", description]));
            // The oracle's approximation beyond the cookbook: nested schemas count as their JSON.
            for nested in ["properties", "items"] {
                if let Some(v) = p.get(nested) {
                    n.add(m.json(v));
                }
            }
        }
    }
    n.add_signed(c.func_end);
}

pub(super) fn enum_tokens<M: Measure>(m: &M, c: &ToolConstants, values: &Value, n: &mut Tally) {
    // Python iterates whatever it is given: a list's items, a string's characters, a dict's keys.
    match values {
        Value::Array(items) => {
            n.add_signed(c.enum_init);
            for item in items {
                n.add_signed(c.enum_item);
                n.add(m.text(&py_str(item)));
            }
        }
        Value::String(s) => {
            n.add_signed(c.enum_init);
            let mut buf = [0u8; 4];
            for ch in s.chars() {
                n.add_signed(c.enum_item);
                n.add(m.text(ch.encode_utf8(&mut buf)));
            }
        }
        Value::Object(keys) => {
            n.add_signed(c.enum_init);
            for key in keys.keys() {
                n.add_signed(c.enum_item);
                n.add(m.text(key));
            }
        }
        _ => {}
    }
}
