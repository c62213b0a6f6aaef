//! A non-streamed answer (or one chunk) read for its usage and generated text: through the
//! typed view, or by a skim when the body has a usable top-level usage report.

use serde::Deserialize;
use serde_json::error::Category;
use serde_json::Value;

use super::lenient::{Count, Field};
use super::view::{Body, Details, RawUsage};
use super::{ChunkKind, Usage, MAX_REPORTED_TOKENS};
use crate::skim::{Scalar, Skim};

/// Usage from a response body or stream chunk: chat/completions shape (`usage.prompt_tokens`,
/// `usage.completion_tokens`, `usage.prompt_tokens_details.cached_tokens`), embeddings
/// (`prompt_tokens`, no completion), and Responses API shape (`usage.input_tokens`,
/// `usage.output_tokens`, `usage.input_tokens_details.cached_tokens`, also nested under `response`
/// for `response.completed` events).
///
/// `None` when there is no usage (absent or `null`), when it has no input count, or when any count
/// in it is not a non-negative integer up to [`MAX_REPORTED_TOKENS`] (treated as not reported).
/// `cached_input_tokens` is clamped to `input_tokens`. Never panics.
pub fn usage_from_json(v: &Value) -> Option<Usage> {
    match Field::<Body>::deserialize(v) {
        Ok(Field::Value(body)) => body.reported_usage(),
        _ => None,
    }
}

/// Generated text in a non-streamed chat/completions response (`choices[].message.content`,
/// `refusal`, `reasoning_content`, `tool_calls[].function.name` / `.arguments`, `function_call`,
/// or legacy completions' `choices[].text`), for estimating output tokens when the response has
/// no usage. Empty for anything else. Never panics.
pub fn response_text(v: &Value) -> String {
    match Field::<Body>::deserialize(v) {
        Ok(Field::Value(body)) => body_text(&body),
        _ => String::new(),
    }
}

pub(super) fn body_text(body: &Body<'_>) -> String {
    let mut text = String::new();
    for choice in &body.choices.items {
        if let Field::Value(message) = &choice.message {
            message.for_each_text(|s| text.push_str(s));
        }
        if let Some(s) = &choice.text.0 {
            text.push_str(s);
        }
    }
    text
}

/// A non-streamed answer read straight from its bytes, without building a `Value` tree: its
/// reported usage and, only when it reports none, its generated text (for estimating). The
/// same as `usage_from_json` and `response_text` on the parsed body. `None` when the body is
/// not a JSON object.
pub fn read_answer(bytes: &[u8]) -> Option<(Option<Usage>, String)> {
    fn of(body: &Body<'_>) -> (Option<Usage>, String) {
        let usage = body.reported_usage();
        let text = if usage.is_some() { String::new() } else { body_text(body) };
        (usage, text)
    }
    // JSON is UTF-8 throughout; the typed reader skips the fields it ignores without checking
    // them, so check the whole body first (as parsing a `Value` does).
    let text = simdutf8::basic::from_utf8(bytes).ok()?;
    // A body with a usable top-level usage report needs nothing else: a skim that checks the
    // whole body and reads only that object answers for it, at a fraction of the typed
    // reader's cost (which matches every key against the typed view and decodes every string).
    if let Some((usage, _)) = skim_top(text) {
        return Some((Some(usage), String::new()));
    }
    match serde_json::from_str::<Field<Body>>(text) {
        Ok(Field::Value(body)) => Some(of(&body)),
        Ok(_) => None,
        // Well-formed JSON the typed reader refused (a duplicated key): read it as a `Value`
        // (last duplicate wins), which the typed reader always accepts.
        Err(e) if e.classify() == Category::Data => {
            let value: Value = serde_json::from_str(text).ok()?;
            match Field::<Body>::deserialize(&value) {
                Ok(Field::Value(body)) => Some(of(&body)),
                _ => None,
            }
        }
        Err(_) => None,
    }
}

/// What a well-formed body or chunk with a usable top-level `usage` report holds, as the
/// typed reader reads it: the report, and the chunk's kind for the forwarding loop. `None`
/// whenever the skim cannot tell, or the body has no such report (the typed reader decides).
pub(super) fn skim_top(text: &str) -> Option<(Usage, ChunkKind)> {
    let mut s = Skim::new(text);
    if s.peek()? != b'{' {
        return None;
    }
    let (mut usage, mut error, mut kind, mut choices) = (None, None, None, None);
    s.object(|s, key| {
        // A known field twice: the full reader takes the last.
        match key? {
            b"usage" if usage.is_none() => usage = Some(skim_usage(s)?),
            b"error" if error.is_none() => error = Some(s.scalar()? != Scalar::Null),
            b"type" if kind.is_none() => kind = Some(s.plain_str()? == Some("error")),
            b"choices" if choices.is_none() => choices = Some(s.non_empty_array()?),
            b"usage" | b"error" | b"type" | b"choices" => return None,
            _ => s.value()?,
        }
        Some(())
    })?;
    if !s.at_end() {
        return None;
    }
    let usage = usage?.to_usage()?;
    let kind = if error == Some(true) || kind == Some(true) {
        ChunkKind::Error
    } else if choices == Some(true) {
        ChunkKind::Content
    } else {
        ChunkKind::UsageOnly
    };
    Some((usage, kind))
}

/// A `usage` object as `RawUsage` reads it. `None` for anything else (the full reader
/// decides) and for a field given twice (the full reader takes the last).
pub(super) fn skim_usage(s: &mut Skim<'_>) -> Option<RawUsage> {
    if s.peek()? != b'{' {
        return None;
    }
    enum Slot<'r> {
        Count(&'r mut Count),
        Details(&'r mut Field<Details>),
    }
    let mut raw = RawUsage::default();
    let mut seen = 0u8;
    s.object(|s, key| {
        let (bit, slot) = match key? {
            b"prompt_tokens" => (1, Slot::Count(&mut raw.prompt_tokens)),
            b"completion_tokens" => (2, Slot::Count(&mut raw.completion_tokens)),
            b"input_tokens" => (4, Slot::Count(&mut raw.input_tokens)),
            b"output_tokens" => (8, Slot::Count(&mut raw.output_tokens)),
            b"prompt_tokens_details" => (16, Slot::Details(&mut raw.prompt_tokens_details)),
            b"input_tokens_details" => (32, Slot::Details(&mut raw.input_tokens_details)),
            _ => return s.value(),
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        match slot {
            Slot::Count(count) => *count = skim_count(s)?,
            Slot::Details(details) => *details = skim_details(s)?,
        }
        Some(())
    })?;
    Some(raw)
}

/// `prompt_tokens_details` / `input_tokens_details` as `Field<Details>` reads it (a
/// `cached_tokens` given twice is left to the full reader).
pub(super) fn skim_details(s: &mut Skim<'_>) -> Option<Field<Details>> {
    if s.peek()? != b'{' {
        return Some(match s.scalar()? {
            Scalar::Null => Field::Null,
            _ => Field::Other,
        });
    }
    let mut cached = None;
    s.object(|s, key| match key? {
        b"cached_tokens" if cached.is_none() => {
            cached = Some(skim_count(s)?);
            Some(())
        }
        b"cached_tokens" => None,
        _ => s.value(),
    })?;
    Some(Field::Value(Details { cached_tokens: cached.unwrap_or_default() }))
}

/// A count as `Count` reads it (a negative number is left to the full reader).
pub(super) fn skim_count(s: &mut Skim<'_>) -> Option<Count> {
    Some(match s.scalar()? {
        Scalar::Null => Count::Absent,
        Scalar::Uint(n) if n <= MAX_REPORTED_TOKENS => Count::Valid(n),
        Scalar::Uint(_) | Scalar::Other => Count::Invalid,
    })
}
