//! The typed view of a body or chunk.
//!
//! Only the fields metering needs. Every field type used here accepts any JSON value (see
//! `lenient`), so a body that is valid JSON always deserializes.

use serde::de::IgnoredAny;

use super::lenient::{Count, Field, List, Text};
use super::Usage;

/// A response body or stream chunk, of any of the shapes this module knows.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct Body<'a> {
    #[serde(borrow)]
    pub(super) choices: List<Choice<'a>>,
    pub(super) usage: Field<RawUsage>,
    /// The Response object in Responses API stream events such as `response.completed`.
    pub(super) response: Field<ResponseObject>,
    pub(super) error: Field<IgnoredAny>,
    /// The Responses API event type.
    #[serde(rename = "type", borrow)]
    pub(super) kind: Text<'a>,
}

impl Body<'_> {
    pub(super) fn reported_usage(&self) -> Option<Usage> {
        match (&self.usage, &self.response) {
            (Field::Value(usage), _) => usage.to_usage(),
            (Field::Null, Field::Value(response)) => match &response.usage {
                Field::Value(usage) => usage.to_usage(),
                _ => None,
            },
            _ => None,
        }
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct ResponseObject {
    pub(super) usage: Field<RawUsage>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct Choice<'a> {
    /// Streamed chat/completions.
    #[serde(borrow)]
    pub(super) delta: Field<Message<'a>>,
    /// Non-streamed chat/completions.
    #[serde(borrow)]
    pub(super) message: Field<Message<'a>>,
    /// Legacy completions, streamed or not.
    #[serde(borrow)]
    pub(super) text: Text<'a>,
}

/// A chat message or a streamed delta of one.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct Message<'a> {
    #[serde(borrow)]
    pub(super) content: Text<'a>,
    #[serde(borrow)]
    pub(super) refusal: Text<'a>,
    /// DeepSeek-style reasoning text (OpenAI itself does not stream its reasoning).
    #[serde(borrow)]
    pub(super) reasoning_content: Text<'a>,
    /// The newer spelling of the same (vLLM, OpenRouter); some providers send both.
    #[serde(borrow)]
    pub(super) reasoning: Text<'a>,
    #[serde(borrow)]
    pub(super) tool_calls: List<ToolCall<'a>>,
    /// The deprecated single function call.
    #[serde(borrow)]
    pub(super) function_call: Field<FunctionCall<'a>>,
}

impl Message<'_> {
    pub(super) fn for_each_text(&self, mut f: impl FnMut(&str)) {
        // Providers that send both spellings of reasoning send the same text twice.
        let reasoning = self.reasoning_content.0.as_ref().or(self.reasoning.0.as_ref());
        let texts = [reasoning, self.content.0.as_ref(), self.refusal.0.as_ref()];
        for s in texts.into_iter().flatten() {
            f(s);
        }
        if let Field::Value(call) = &self.function_call {
            call.for_each_text(&mut f);
        }
        for call in &self.tool_calls.items {
            if let Field::Value(function) = &call.function {
                function.for_each_text(&mut f);
            }
        }
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct ToolCall<'a> {
    #[serde(borrow)]
    pub(super) function: Field<FunctionCall<'a>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct FunctionCall<'a> {
    #[serde(borrow)]
    pub(super) name: Text<'a>,
    #[serde(borrow)]
    pub(super) arguments: Text<'a>,
}

impl FunctionCall<'_> {
    pub(super) fn for_each_text(&self, mut f: impl FnMut(&str)) {
        for s in [&self.name.0, &self.arguments.0].into_iter().flatten() {
            f(s);
        }
    }
}

/// `usage` in any of the known shapes.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct RawUsage {
    pub(super) prompt_tokens: Count,
    pub(super) completion_tokens: Count,
    pub(super) prompt_tokens_details: Field<Details>,
    pub(super) input_tokens: Count,
    pub(super) output_tokens: Count,
    pub(super) input_tokens_details: Field<Details>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct Details {
    pub(super) cached_tokens: Count,
}

impl RawUsage {
    pub(super) fn to_usage(&self) -> Option<Usage> {
        // The chat spelling wins when an upstream sends both.
        let input = match either(self.prompt_tokens, self.input_tokens) {
            Count::Valid(n) => n,
            // Without an input count this is not a usage report worth billing from.
            Count::Absent | Count::Invalid => return None,
        };
        let output = either(self.completion_tokens, self.output_tokens).or_zero()?;
        let cached = either(Details::cached(&self.prompt_tokens_details), Details::cached(&self.input_tokens_details))
            .or_zero()?;
        Some(Usage { input_tokens: input, cached_input_tokens: cached.min(input), output_tokens: output })
    }
}

impl Details {
    pub(super) fn cached(details: &Field<Details>) -> Count {
        match details {
            Field::Null => Count::Absent,
            Field::Other => Count::Invalid,
            Field::Value(d) => d.cached_tokens,
        }
    }
}

/// The first of two alternative spellings of a count that is present.
pub(super) fn either(a: Count, b: Count) -> Count {
    match a {
        Count::Absent => b,
        _ => a,
    }
}
