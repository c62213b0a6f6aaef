//! The full reader: any request body parsed into a `Value`, every field's type checked as it
//! passes, and what is refused worded as OpenAI words it.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use super::{Endpoint, ParsedRequest, Prompt, RequestError, MAX_N};

use crate::policy::pricing::Capabilities;

/// The body's top-level object, read in one pass: every value parsed into the tree token
/// counting and the checks read, and the raw text of the two values a rewrite replaces
/// (`model`, `stream_options`), whose byte ranges it splices.
struct TopLevel<'a> {
    map: serde_json::Map<String, Value>,
    model: Option<&'a RawValue>,
    stream_options: Option<&'a RawValue>,
    /// The first key that appears twice (the rest of the body is still checked first).
    duplicate: Option<String>,
    noted: Noted,
}

/// The top-level fields `parse` checks, noted as the parser passes them: looking each up in
/// the parsed map afterwards hashed its name (serde_json's map uses SipHash) a dozen times a
/// request. Small values are kept as they are; of the large ones only what is checked. The
/// types of the endpoint's other common fields are checked as they pass too.
struct Noted {
    endpoint: Endpoint,
    /// The first member, in the body's order, whose value has the wrong type for its field.
    mistyped: Option<RequestError>,
    model: Option<Value>,
    stream: Option<Value>,
    stream_options: Option<Value>,
    max_completion_tokens: Option<Value>,
    max_tokens: Option<Value>,
    n: Option<Value>,
    /// `messages`, `prompt` and `input`: what each is, when present and not `null`.
    messages: Option<Shape>,
    prompt: Option<Shape>,
    input: Option<Shape>,
    needs: Capabilities,
}

/// What a required field holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    String,
    EmptyArray,
    Array,
    Other,
}

impl Shape {
    fn of(value: &Value) -> Option<Shape> {
        match value {
            Value::Null => None,
            Value::String(_) => Some(Shape::String),
            Value::Array(a) if a.is_empty() => Some(Shape::EmptyArray),
            Value::Array(_) => Some(Shape::Array),
            _ => Some(Shape::Other),
        }
    }
}

impl Noted {
    fn new(endpoint: Endpoint) -> Noted {
        Noted {
            endpoint,
            mistyped: None,
            model: None,
            stream: None,
            stream_options: None,
            max_completion_tokens: None,
            max_tokens: None,
            n: None,
            messages: None,
            prompt: None,
            input: None,
            needs: Capabilities::default(),
        }
    }

    fn note(&mut self, key: &str, value: &Value) {
        if self.mistyped.is_none() {
            self.mistyped = check_type(self.endpoint, key, value).err();
        }
        let non_empty = |v: &Value| v.as_array().is_some_and(|a| !a.is_empty());
        match key {
            "model" => self.model = Some(value.clone()),
            "stream" => self.stream = Some(value.clone()),
            "stream_options" => self.stream_options = Some(value.clone()),
            "max_completion_tokens" => self.max_completion_tokens = Some(value.clone()),
            "max_tokens" => self.max_tokens = Some(value.clone()),
            "n" => self.n = Some(value.clone()),
            "prompt" => self.prompt = Shape::of(value),
            "input" => self.input = Shape::of(value),
            // The features a request uses: tools (or legacy functions), image inputs, a JSON schema.
            "tools" | "functions" => self.needs.tools |= non_empty(value),
            "response_format" => {
                self.needs.json_schema = value.get("type").and_then(Value::as_str) == Some("json_schema");
            }
            "messages" => {
                self.messages = Shape::of(value);
                if let Value::Array(messages) = value {
                    let checked = read_messages(messages, &mut self.needs.vision);
                    if self.endpoint == Endpoint::Chat && self.mistyped.is_none() {
                        self.mistyped = checked.err();
                    }
                }
            }
            _ => {}
        }
    }
}

/// Reads a body's [`TopLevel`] for one endpoint (whose fields' types it checks).
struct TopLevelFor(Endpoint);

impl<'de> DeserializeSeed<'de> for TopLevelFor {
    type Value = TopLevel<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<TopLevel<'de>, D::Error> {
        struct V(Endpoint);
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut top = TopLevel {
                    // Room for a typical request's fields, so the map is not regrown for them.
                    map: serde_json::Map::with_capacity(map.size_hint().unwrap_or(8)),
                    model: None,
                    stream_options: None,
                    duplicate: None,
                    noted: Noted::new(self.0),
                };
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let value = match key.as_ref() {
                        "model" | "stream_options" => {
                            let raw: &'de RawValue = map.next_value()?;
                            let value = serde_json::from_str(raw.get()).map_err(serde::de::Error::custom)?;
                            if key == "model" {
                                top.model = Some(raw);
                            } else {
                                top.stream_options = Some(raw);
                            }
                            value
                        }
                        _ => map.next_value::<Value>()?,
                    };
                    top.noted.note(&key, &value);
                    if top.map.insert(key.clone().into_owned(), value).is_some() && top.duplicate.is_none() {
                        top.duplicate = Some(key.into_owned());
                    }
                }
                Ok(top)
            }
        }
        deserializer.deserialize_map(V(self.0))
    }
}

/// What a common OpenAI request field holds (every one may also be `null`).
#[derive(Clone, Copy)]
enum FieldType {
    Number,
    Integer,
    Boolean,
    String,
    Object,
    Array,
    /// `stop`: a string or an array of strings.
    Stop,
    /// `prompt` / `input`: a string, or an array of strings, of integers (tokens) or of
    /// integer arrays.
    Text,
}

impl FieldType {
    /// The type of `endpoint`'s common field `key`; `None` for a field passed through
    /// unchecked, or one checked on its own (`model`, `stream`, `stream_options`, `n`,
    /// `max_tokens`, `max_completion_tokens`).
    fn of(endpoint: Endpoint, key: &str) -> Option<FieldType> {
        use Endpoint::*;
        use FieldType::*;
        Some(match (endpoint, key) {
            (Chat | Completions, "temperature" | "top_p" | "presence_penalty" | "frequency_penalty") => Number,
            (Chat | Completions, "seed") | (Chat, "top_logprobs") | (Completions, "logprobs" | "best_of") => Integer,
            (Embeddings, "dimensions") => Integer,
            (Chat, "logprobs" | "parallel_tool_calls") | (Completions, "echo") => Boolean,
            (_, "user") | (Completions, "suffix") | (Embeddings, "encoding_format") => String,
            (Chat, "response_format") | (Chat | Completions, "logit_bias") => Object,
            (Chat, "tools" | "functions") => Array,
            (Chat | Completions, "stop") => Stop,
            (Completions, "prompt") | (Embeddings, "input") => Text,
            // `messages` is checked as it is read for its images (`read_messages`).
            _ => return None,
        })
    }

    fn expected(self) -> &'static str {
        match self {
            FieldType::Number => "a number",
            FieldType::Integer => "an integer",
            FieldType::Boolean => "a boolean",
            FieldType::String => "a string",
            FieldType::Object => "an object",
            FieldType::Array => "an array",
            FieldType::Stop => "a string or an array of strings",
            FieldType::Text => "a string, an array of strings, an array of integers or an array of integer arrays",
        }
    }
}

fn is_integer(v: &Value) -> bool {
    v.as_i64().is_some() || v.as_u64().is_some()
}

/// Checks the type of a top-level member: `null`, or what its field holds.
fn check_type(endpoint: Endpoint, key: &str, value: &Value) -> Result<(), RequestError> {
    let Some(kind) = FieldType::of(endpoint, key) else { return Ok(()) };
    let fits = match (kind, value) {
        (_, Value::Null) => true,
        (FieldType::Number, Value::Number(_)) => true,
        (FieldType::Integer, v) => is_integer(v),
        (FieldType::Boolean, Value::Bool(_)) | (FieldType::String, Value::String(_)) => true,
        (FieldType::Object, Value::Object(_)) | (FieldType::Array, Value::Array(_)) => true,
        (FieldType::Stop, Value::String(_)) => true,
        (FieldType::Stop, Value::Array(items)) => items.iter().all(Value::is_string),
        (FieldType::Text, Value::String(_)) => true,
        (FieldType::Text, Value::Array(items)) => {
            items.iter().all(Value::is_string)
                || items.iter().all(is_integer)
                || items.iter().all(|i| i.as_array().is_some_and(|tokens| tokens.iter().all(is_integer)))
        }
        _ => false,
    };
    if fits {
        return Ok(());
    }
    Err(wrong_type(key.to_owned(), kind.expected(), value))
}

/// A 400 for `param` holding `value` where `expected` belongs.
fn wrong_type(param: String, expected: &str, value: &Value) -> RequestError {
    let message = format!("Invalid type for '{param}': expected {expected}, got {}.", type_name(value));
    RequestError::param(param, message)
}

/// A 400 for a required `param` that is missing.
fn missing(param: String) -> RequestError {
    let message = format!("'{param}' is a required property.");
    RequestError::param(param, message)
}

/// Reads chat `messages` in one pass: whether a content part is an image (`vision`), and
/// whether each message is an object with a string `role` and a `content` that is a string,
/// an array of parts or `null` (an assistant's or a tool's message may leave `content` out);
/// the first that is not is the error.
fn read_messages(messages: &[Value], vision: &mut bool) -> Result<(), RequestError> {
    for (i, message) in messages.iter().enumerate() {
        let Value::Object(fields) = message else {
            return Err(wrong_type(format!("messages[{i}]"), "an object", message));
        };
        // A message has a few fields: passing them is cheaper than hashing two names.
        let (mut role, mut content) = (None, None);
        for (key, value) in fields {
            match key.as_str() {
                "role" => role = Some(value),
                "content" => content = Some(value),
                _ => {}
            }
        }
        let role = match role {
            Some(Value::String(role)) => role.as_str(),
            None => return Err(missing(format!("messages[{i}].role"))),
            Some(other) => return Err(wrong_type(format!("messages[{i}].role"), "a string", other)),
        };
        match content {
            Some(Value::Array(parts)) => {
                *vision |= parts.iter().any(|p| p.get("type").and_then(Value::as_str) == Some("image_url"));
            }
            Some(Value::String(_) | Value::Null) => {}
            None if matches!(role, "assistant" | "tool") => {}
            None => return Err(missing(format!("messages[{i}].content"))),
            Some(other) => {
                return Err(wrong_type(
                    format!("messages[{i}].content"),
                    "a string, an array of content parts or null",
                    other,
                ))
            }
        }
    }
    Ok(())
}

/// A JSON value's type, for error messages (never the value: it may be large, or private).
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn span_of(body: &[u8], raw: &RawValue) -> (usize, usize) {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    (start, start + raw.get().len())
}

fn json_error(e: &serde_json::Error) -> RequestError {
    RequestError::InvalidJson(format!(
        "We could not parse the JSON body of your request ({}). The body must be a JSON object.",
        e.to_string().split(" at line").next().unwrap_or("invalid JSON")
    ))
}

fn optional_u64(value: Option<&Value>, field: &str) -> Result<Option<u64>, RequestError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            RequestError::param(field, format!("Invalid type for '{field}': expected a non-negative integer, got {v}."))
        }),
    }
}
/// Parses and checks any request body for `endpoint` into a `Value`, wording what it refuses:
/// what [`parse`](super::parse) does for the bodies its skim leaves alone (public for the
/// tests that hold the two to one answer).
pub fn parse_full(endpoint: Endpoint, body: &Bytes) -> Result<ParsedRequest, RequestError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let top = TopLevelFor(endpoint)
        .deserialize(&mut de)
        .and_then(|top| de.end().map(|()| top))
        .map_err(|e| json_error(&e))?;
    if let Some(key) = top.duplicate {
        return Err(RequestError::param(&key, format!("Duplicate key '{key}' in the request body.")));
    }
    let model_span = top.model.map(|raw| span_of(body, raw));
    let stream_options_span = top.stream_options.map(|raw| span_of(body, raw));
    let noted = top.noted;
    let value = Value::Object(top.map);
    let close = body
        .iter()
        .rposition(|&b| b == b'}')
        .ok_or_else(|| RequestError::InvalidJson("The body must be a JSON object.".into()))?;

    let model = match noted.model {
        Some(Value::String(m)) if !m.is_empty() => m,
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(RequestError::param("model", "You must provide a model parameter."))
        }
        Some(other) => {
            return Err(RequestError::param(
                "model",
                format!("Invalid type for 'model': expected a string, got {other}."),
            ))
        }
    };
    let model_span = model_span.ok_or_else(|| RequestError::param("model", "You must provide a model parameter."))?;

    let stream = match &noted.stream {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(RequestError::param(
                "stream",
                format!("Invalid type for 'stream': expected a boolean, got {other}."),
            ))
        }
    };
    if stream && endpoint == Endpoint::Embeddings {
        return Err(RequestError::param("stream", "Embeddings cannot be streamed."));
    }
    let client_wants_usage = match &noted.stream_options {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(RequestError::param("stream_options.include_usage", "Invalid type: expected a boolean."))
            }
        },
        Some(_) => {
            return Err(RequestError::param("stream_options", "Invalid type for 'stream_options': expected an object."))
        }
    };
    let max_completion_tokens = optional_u64(noted.max_completion_tokens.as_ref(), "max_completion_tokens")?;
    let max_tokens = optional_u64(noted.max_tokens.as_ref(), "max_tokens")?;
    let n = optional_u64(noted.n.as_ref(), "n")?.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(RequestError::param("n", format!("'n' must be between 1 and {MAX_N}.")));
    }
    match endpoint {
        Endpoint::Chat => match noted.messages {
            Some(Shape::Array) => {}
            Some(Shape::EmptyArray) => {
                return Err(RequestError::param("messages", "'messages' must contain at least one message."))
            }
            None => return Err(RequestError::param("messages", "'messages' is a required property.")),
            Some(_) => return Err(RequestError::param("messages", "Invalid type for 'messages': expected an array.")),
        },
        Endpoint::Completions => match noted.prompt {
            Some(Shape::String | Shape::Array | Shape::EmptyArray) => {}
            None => return Err(RequestError::param("prompt", "'prompt' is a required property.")),
            Some(Shape::Other) => {
                return Err(RequestError::param("prompt", "Invalid type for 'prompt': expected a string or an array."))
            }
        },
        Endpoint::Embeddings => match noted.input {
            Some(Shape::String | Shape::Array | Shape::EmptyArray) => {}
            None => return Err(RequestError::param("input", "'input' is a required property.")),
            Some(Shape::Other) => {
                return Err(RequestError::param("input", "Invalid type for 'input': expected a string or an array."))
            }
        },
    }
    if let Some(e) = noted.mistyped {
        return Err(e);
    }
    let needs = noted.needs;
    Ok(ParsedRequest {
        endpoint,
        prompt: Arc::new(Prompt::parsed(value)),
        plain_chat: None,
        model,
        stream,
        client_wants_usage,
        max_completion_tokens,
        max_tokens,
        n,
        needs,
        model_span,
        stream_options_span,
        close,
    })
}
