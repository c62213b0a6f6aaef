//! Reading and rewriting a client's request body.
//!
//! tollgate reads only what routing, budgets and metering need (`model`, `stream`,
//! `stream_options`, `max_tokens`, `n`, and what counting and capability checks look at),
//! checks the types of the other common OpenAI fields as it passes them, and forwards every
//! other byte untouched: the rewrite splices new text into the exact byte ranges of `model`
//! and `stream_options`, it never re-serialises the body.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::error::ApiError;
use crate::metering::skim::Skim;
use crate::metering::tokens::PlainChat;
use crate::policy::pricing::Capabilities;

/// Which OpenAI endpoint a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub const ALL: [Endpoint; 3] = [Endpoint::Chat, Endpoint::Completions, Endpoint::Embeddings];

    /// The path below the provider's base URL.
    pub fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }

    /// The name stored in the ledger.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }

    pub fn from_name(name: &str) -> &'static str {
        match name {
            "completions" => Endpoint::Completions.name(),
            "embeddings" => Endpoint::Embeddings.name(),
            _ => Endpoint::Chat.name(),
        }
    }

    pub fn prompt_kind(self) -> crate::metering::tokens::PromptKind {
        use crate::metering::tokens::PromptKind;
        match self {
            Endpoint::Chat => PromptKind::Chat,
            Endpoint::Completions => PromptKind::Completion,
            Endpoint::Embeddings => PromptKind::Embedding,
        }
    }
}

/// Largest `n` accepted (OpenAI's own limit).
const MAX_N: u64 = 128;

/// A request's body as the client sent it, parsed into a `Value` the first time its tokens
/// are counted exactly (a budget near its limit, a `tpm` limit, a dry run, an answer without
/// usage): most requests are never counted, so most bodies are never built into a tree.
#[derive(Debug)]
pub struct Prompt {
    body: Bytes,
    value: OnceLock<Value>,
}

impl Prompt {
    /// A body to parse when needed. A body usually arrives as a slice of its connection's
    /// read buffer: a stream's, kept for as long as the stream lasts, is copied when small,
    /// so that it does not keep the whole buffer alive (at 5,000 open streams, ~6 MB).
    fn unparsed(body: &Bytes, stream: bool) -> Prompt {
        const COPY_AT_MOST: usize = 64 * 1024;
        let body = if stream && body.len() <= COPY_AT_MOST { Bytes::copy_from_slice(body) } else { body.clone() };
        Prompt { body, value: OnceLock::new() }
    }

    /// A body parsed already.
    fn parsed(value: Value) -> Prompt {
        Prompt { body: Bytes::new(), value: OnceLock::from(value) }
    }

    /// The whole body, parsed.
    pub fn value(&self) -> &Value {
        // The body was checked as JSON before this `Prompt` was made, so this parse succeeds.
        self.value.get_or_init(|| serde_json::from_slice(&self.body).unwrap_or(Value::Null))
    }
}

/// What tollgate needs to know about a request.
#[derive(Debug)]
pub struct ParsedRequest {
    pub endpoint: Endpoint,
    /// The body, for token counting; shared with deferred counting.
    pub prompt: Arc<Prompt>,
    /// A chat body of string-only messages, tallied for the token bound as it was parsed.
    pub plain_chat: Option<PlainChat>,
    pub model: String,
    pub stream: bool,
    /// The client asked for the usage chunk itself (`stream_options.include_usage`).
    pub client_wants_usage: bool,
    /// `max_completion_tokens`, if the request sets it.
    pub max_completion_tokens: Option<u64>,
    /// `max_tokens`, if the request sets it.
    pub max_tokens: Option<u64>,
    /// Choices per request (`n`); output is reserved for each.
    pub n: u64,
    /// Features a serving model must support.
    pub needs: Capabilities,
    model_span: (usize, usize),
    stream_options_span: Option<(usize, usize)>,
    /// Offset of the closing `}` of the top-level object.
    close: usize,
}

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
    mistyped: Option<ApiError>,
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
fn check_type(endpoint: Endpoint, key: &str, value: &Value) -> Result<(), ApiError> {
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
fn wrong_type(param: String, expected: &str, value: &Value) -> ApiError {
    let message = format!("Invalid type for '{param}': expected {expected}, got {}.", type_name(value));
    ApiError::param(param, message)
}

/// A 400 for a required `param` that is missing.
fn missing(param: String) -> ApiError {
    let message = format!("'{param}' is a required property.");
    ApiError::param(param, message)
}

/// Reads chat `messages` in one pass: whether a content part is an image (`vision`), and
/// whether each message is an object with a string `role` and a `content` that is a string,
/// an array of parts or `null` (an assistant's or a tool's message may leave `content` out);
/// the first that is not is the error.
fn read_messages(messages: &[Value], vision: &mut bool) -> Result<(), ApiError> {
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

fn json_error(e: &serde_json::Error) -> ApiError {
    ApiError::InvalidJson(format!(
        "We could not parse the JSON body of your request ({}). The body must be a JSON object.",
        e.to_string().split(" at line").next().unwrap_or("invalid JSON")
    ))
}

fn optional_u64(value: Option<&Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::param(field, format!("Invalid type for '{field}': expected a non-negative integer, got {v}."))
        }),
    }
}

/// Parses and checks a request body for `endpoint`.
pub fn parse(endpoint: Endpoint, body: &Bytes) -> Result<ParsedRequest, ApiError> {
    match skim_plain_chat(endpoint, body) {
        Some(parsed) => Ok(parsed),
        None => parse_full(endpoint, body),
    }
}

/// The common request, read without building anything: a valid chat body whose messages
/// hold only strings, with no tools, functions or content parts. Whatever else a body holds,
/// and every body with something to refuse, is `None`, for [`parse_full`] to read (and to
/// word its refusal). Parsing a body into a `Value` was a tenth of a request's instructions.
fn skim_plain_chat(endpoint: Endpoint, body: &Bytes) -> Option<ParsedRequest> {
    /// Top-level keys compared for duplicates; a body with more goes the full way.
    const MAX_KEYS: usize = 24;
    if endpoint != Endpoint::Chat {
        return None;
    }
    let text = simdutf8::basic::from_utf8(body).ok()?;
    let mut s = Skim::new(text);
    let mut keys = Keys::<MAX_KEYS>::new();
    let mut model = None;
    let mut stream = None;
    let mut stream_options = None;
    let (mut max_completion_tokens, mut max_tokens, mut n) = (None, None, None);
    let mut chat = None;
    let mut json_schema = false;
    s.object(|s, key| {
        // An escaped key could spell one of the fields below.
        let key = keys.first_time(key?)?;
        match key {
            b"model" => model = Some(s.spanned(|s| s.plain_str())?),
            b"stream" => stream = s.boolean()?,
            b"stream_options" => stream_options = Some(s.spanned(stream_options_usage)?),
            b"max_completion_tokens" => max_completion_tokens = whole(s)?,
            b"max_tokens" => max_tokens = whole(s)?,
            b"n" => n = whole(s)?,
            b"messages" => chat = Some(plain_messages(s)?),
            b"response_format" => json_schema = response_format_is_schema(s)?,
            // The other common fields, checked for their types as the full reader checks them.
            b"temperature" | b"top_p" | b"presence_penalty" | b"frequency_penalty" => s.number_or_null()?,
            b"seed" | b"top_logprobs" => {
                whole(s)?;
            }
            b"logprobs" | b"parallel_tool_calls" => {
                s.boolean()?;
            }
            b"user" => string_or_null(s)?,
            b"stop" => stop(s)?,
            b"logit_bias" => object_or_null(s)?,
            // Counted or checked only by the full reader.
            b"tools" | b"functions" => return None,
            _ => s.value()?,
        }
        Some(())
    })?;
    if !s.at_end() {
        return None;
    }
    let (Some(model), Some(chat)) = (model, chat) else { return None };
    let (model, model_span) = (model.0.filter(|m| !m.is_empty())?, model.1);
    let n = n.unwrap_or(1);
    if n == 0 || n > MAX_N || chat.messages == 0 {
        return None;
    }
    let close = body.iter().rposition(|&b| b == b'}')?;
    let stream = stream.unwrap_or(false);
    Some(ParsedRequest {
        endpoint,
        prompt: Arc::new(Prompt::unparsed(body, stream)),
        plain_chat: Some(chat),
        model: model.to_owned(),
        stream,
        client_wants_usage: stream_options.is_some_and(|(usage, _)| usage),
        max_completion_tokens,
        max_tokens,
        n,
        needs: Capabilities { tools: false, vision: false, json_schema },
        model_span,
        stream_options_span: stream_options.map(|(_, span)| span),
        close,
    })
}

/// The keys of one object so far, up to `N`, for the skim to leave an object that repeats a
/// key (or has more than `N`) to the full reader.
struct Keys<'a, const N: usize> {
    seen: [&'a [u8]; N],
    len: usize,
}

impl<'a, const N: usize> Keys<'a, N> {
    fn new() -> Self {
        Keys { seen: [&[]; N], len: 0 }
    }

    /// `key`, if it is new and there is room to remember it.
    fn first_time(&mut self, key: &'a [u8]) -> Option<&'a [u8]> {
        if self.len == N || self.seen[..self.len].contains(&key) {
            return None;
        }
        self.seen[self.len] = key;
        self.len += 1;
        Some(key)
    }
}

/// A count or `null`; anything else (a fraction, a sign, a string) is left to the full reader,
/// and so is a count that may be past `u64` (the skim saturates it; serde reads a float).
fn whole(s: &mut Skim) -> Option<Option<u64>> {
    match s.scalar()? {
        crate::metering::skim::Scalar::Null => Some(None),
        crate::metering::skim::Scalar::Uint(u64::MAX) => None,
        crate::metering::skim::Scalar::Uint(v) => Some(Some(v)),
        crate::metering::skim::Scalar::Other => None,
    }
}

/// A string or `null`.
fn string_or_null(s: &mut Skim) -> Option<()> {
    match s.peek()? {
        b'"' => s.written_str().map(drop),
        b'n' => s.value(),
        _ => None,
    }
}

/// An object or `null`.
fn object_or_null(s: &mut Skim) -> Option<()> {
    match s.peek()? {
        b'{' | b'n' => s.value(),
        _ => None,
    }
}

/// `stop`: a string, an array of strings, or `null`.
fn stop(s: &mut Skim) -> Option<()> {
    match s.peek()? {
        b'[' => s.elements(|s| s.written_str().map(drop)).map(drop),
        _ => string_or_null(s),
    }
}

/// `stream_options`: an object or `null`; whether it sets `include_usage` to `true`.
fn stream_options_usage(s: &mut Skim) -> Option<bool> {
    if s.peek()? != b'{' {
        return s.boolean().and_then(|b| b.is_none().then_some(false));
    }
    let mut usage = None;
    s.object(|s, key| match key? {
        b"include_usage" if usage.is_none() => {
            usage = Some(s.boolean()?.unwrap_or(false));
            Some(())
        }
        b"include_usage" => None,
        _ => s.value(),
    })?;
    Some(usage.unwrap_or(false))
}

/// `response_format` (an object or `null`): whether its `type` is `json_schema`.
fn response_format_is_schema(s: &mut Skim) -> Option<bool> {
    match s.peek()? {
        b'{' => {}
        b'n' => return s.value().map(|()| false),
        _ => return None,
    }
    let mut kind = None;
    s.object(|s, key| match key? {
        b"type" if kind.is_none() => {
            kind = Some(s.plain_str()?);
            Some(())
        }
        b"type" => None,
        _ => s.value(),
    })?;
    Some(kind.flatten() == Some("json_schema"))
}

/// `messages`: an array of objects whose every field is a string (role, content, name, ...),
/// with a `role` and a `content`, tallied for the token bound; anything else is left to the
/// full reader.
fn plain_messages(s: &mut Skim) -> Option<PlainChat> {
    /// Fields of one message compared for duplicates.
    const MAX_FIELDS: usize = 8;
    let mut chat = PlainChat::default();
    let messages = s.elements(|s| {
        let mut fields = Keys::<MAX_FIELDS>::new();
        let (mut role, mut content) = (false, false);
        s.object(|s, key| {
            // An escaped key could spell `name`; a repeated one is read once by the full reader.
            let key = fields.first_time(key?)?;
            chat.text_bytes += s.written_str()?.len() as u64;
            chat.names += u64::from(key == b"name");
            role |= key == b"role";
            content |= key == b"content";
            Some(())
        })?;
        // A message without either is refused, or (an assistant's) left to the full reader.
        (role && content).then_some(())
    })?;
    chat.messages = messages as u64;
    Some(chat)
}

/// Parses and checks any request body for `endpoint` into a `Value`, wording what it refuses:
/// what [`parse`] does for the bodies its skim leaves alone (public for the tests that hold
/// the two to one answer).
pub fn parse_full(endpoint: Endpoint, body: &Bytes) -> Result<ParsedRequest, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let top = TopLevelFor(endpoint)
        .deserialize(&mut de)
        .and_then(|top| de.end().map(|()| top))
        .map_err(|e| json_error(&e))?;
    if let Some(key) = top.duplicate {
        return Err(ApiError::param(&key, format!("Duplicate key '{key}' in the request body.")));
    }
    let model_span = top.model.map(|raw| span_of(body, raw));
    let stream_options_span = top.stream_options.map(|raw| span_of(body, raw));
    let noted = top.noted;
    let value = Value::Object(top.map);
    let close = body
        .iter()
        .rposition(|&b| b == b'}')
        .ok_or_else(|| ApiError::InvalidJson("The body must be a JSON object.".into()))?;

    let model = match noted.model {
        Some(Value::String(m)) if !m.is_empty() => m,
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(ApiError::param("model", "You must provide a model parameter."))
        }
        Some(other) => {
            return Err(ApiError::param("model", format!("Invalid type for 'model': expected a string, got {other}.")))
        }
    };
    let model_span = model_span.ok_or_else(|| ApiError::param("model", "You must provide a model parameter."))?;

    let stream = match &noted.stream {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(ApiError::param(
                "stream",
                format!("Invalid type for 'stream': expected a boolean, got {other}."),
            ))
        }
    };
    if stream && endpoint == Endpoint::Embeddings {
        return Err(ApiError::param("stream", "Embeddings cannot be streamed."));
    }
    let client_wants_usage = match &noted.stream_options {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::param("stream_options.include_usage", "Invalid type: expected a boolean."))
            }
        },
        Some(_) => {
            return Err(ApiError::param("stream_options", "Invalid type for 'stream_options': expected an object."))
        }
    };
    let max_completion_tokens = optional_u64(noted.max_completion_tokens.as_ref(), "max_completion_tokens")?;
    let max_tokens = optional_u64(noted.max_tokens.as_ref(), "max_tokens")?;
    let n = optional_u64(noted.n.as_ref(), "n")?.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ApiError::param("n", format!("'n' must be between 1 and {MAX_N}.")));
    }
    match endpoint {
        Endpoint::Chat => match noted.messages {
            Some(Shape::Array) => {}
            Some(Shape::EmptyArray) => {
                return Err(ApiError::param("messages", "'messages' must contain at least one message."))
            }
            None => return Err(ApiError::param("messages", "'messages' is a required property.")),
            Some(_) => return Err(ApiError::param("messages", "Invalid type for 'messages': expected an array.")),
        },
        Endpoint::Completions => match noted.prompt {
            Some(Shape::String | Shape::Array | Shape::EmptyArray) => {}
            None => return Err(ApiError::param("prompt", "'prompt' is a required property.")),
            Some(Shape::Other) => {
                return Err(ApiError::param("prompt", "Invalid type for 'prompt': expected a string or an array."))
            }
        },
        Endpoint::Embeddings => match noted.input {
            Some(Shape::String | Shape::Array | Shape::EmptyArray) => {}
            None => return Err(ApiError::param("input", "'input' is a required property.")),
            Some(Shape::Other) => {
                return Err(ApiError::param("input", "Invalid type for 'input': expected a string or an array."))
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

impl ParsedRequest {
    /// The output limit to reserve for: `max_completion_tokens`, else `max_tokens`.
    pub fn max_output(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// The first output limit the request sets above `limit` (each is checked, as the
    /// upstream checks each): its field and value.
    pub fn output_limit_over(&self, limit: u64) -> Option<(&'static str, u64)> {
        [("max_tokens", self.max_tokens), ("max_completion_tokens", self.max_completion_tokens)]
            .into_iter()
            .find_map(|(field, max)| max.filter(|&max| max > limit).map(|max| (field, max)))
    }

    /// The body to send upstream: `model` replaced by `upstream_model`, and for streams
    /// `stream_options.include_usage` set so the upstream reports usage. Everything else
    /// is the client's bytes.
    pub fn rewrite(&self, body: &Bytes, upstream_model: &str) -> Bytes {
        let mut edits: Vec<(usize, usize, String)> = Vec::with_capacity(2);
        if upstream_model != self.model {
            let quoted = serde_json::to_string(upstream_model).unwrap_or_else(|_| format!("\"{upstream_model}\""));
            edits.push((self.model_span.0, self.model_span.1, quoted));
        }
        if self.stream && !self.client_wants_usage {
            let options = |(start, end): (usize, usize)| {
                serde_json::from_slice::<serde_json::Map<String, Value>>(&body[start..end]).ok()
            };
            match self.stream_options_span.map(|span| (span, options(span))) {
                Some(((start, end), Some(mut options))) => {
                    options.insert("include_usage".into(), Value::Bool(true));
                    edits.push((start, end, Value::Object(options).to_string()));
                }
                Some(((start, end), None)) => edits.push((start, end, r#"{"include_usage":true}"#.into())),
                None => {
                    let opened = body[..self.close].iter().rposition(|b| !matches!(b, b' ' | b'\n' | b'\r' | b'\t'));
                    let empty = opened.is_some_and(|i| body[i] == b'{');
                    let sep = if empty { "" } else { "," };
                    edits.push((self.close, self.close, format!(r#"{sep}"stream_options":{{"include_usage":true}}"#)));
                }
            }
        }
        if edits.is_empty() {
            return body.clone();
        }
        edits.sort_by_key(|e| e.0);
        let mut out = Vec::with_capacity(body.len() + 64);
        let mut at = 0;
        for (start, end, text) in edits {
            out.extend_from_slice(&body[at..start]);
            out.extend_from_slice(text.as_bytes());
            at = end;
        }
        out.extend_from_slice(&body[at..]);
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_chat(body: &str) -> Result<ParsedRequest, ApiError> {
        parse(Endpoint::Chat, &Bytes::copy_from_slice(body.as_bytes()))
    }

    #[test]
    fn rewrite_touches_only_model_and_usage_option() {
        let body = Bytes::from_static(br#"{ "model" : "gpt-4o",  "messages":[{"role":"user","content":"hi"}], "temperature": 1.50, "stream": true }"#);
        let p = parse_chat(std::str::from_utf8(&body).unwrap()).unwrap();
        let out = p.rewrite(&body, "gpt-4o-2024-08-06");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "model" : "gpt-4o-2024-08-06",  "messages":[{"role":"user","content":"hi"}], "temperature": 1.50, "stream": true ,"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn unchanged_body_is_forwarded_as_is() {
        let body = Bytes::from_static(br#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}]}"#);
        let p = parse_chat(std::str::from_utf8(&body).unwrap()).unwrap();
        assert_eq!(p.rewrite(&body, "gpt-4o"), body);
    }

    #[test]
    fn existing_stream_options_keep_their_fields() {
        let body = Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":false}}"#);
        let p = parse_chat(std::str::from_utf8(&body).unwrap()).unwrap();
        assert!(!p.client_wants_usage);
        let out: Value = serde_json::from_slice(&p.rewrite(&body, "m")).unwrap();
        assert_eq!(out["stream_options"]["include_usage"], true);
    }

    #[test]
    fn bad_inputs_name_their_field() {
        let param = |body: &str| match parse_chat(body) {
            Err(ApiError::InvalidParam { param, .. }) => param,
            other => panic!("expected a param error, got {other:?}"),
        };
        assert_eq!(param(r#"{"messages":[{"role":"user","content":"x"}]}"#), "model");
        assert_eq!(param(r#"{"model":5,"messages":[]}"#), "model");
        assert_eq!(param(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#), "max_tokens");
        assert_eq!(param(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":1.5}"#), "max_tokens");
        assert_eq!(param(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":100000}"#), "n");
        assert_eq!(param(r#"{"model":"m","messages":"hi"}"#), "messages");
        assert_eq!(param(r#"{"model":"m","model":"n","messages":[{"role":"user","content":"x"}]}"#), "model");
        assert_eq!(param(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#), "stream");
        // Both output limits are read, each checked for its type.
        assert_eq!(
            param(
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":5,"max_tokens":"9"}"#
            ),
            "max_tokens"
        );
        // The common fields' types.
        let chat =
            |extra: &str| param(&format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],{extra}}}"#));
        assert_eq!(chat(r#""temperature":"hot""#), "temperature");
        assert_eq!(chat(r#""top_p":true"#), "top_p");
        assert_eq!(chat(r#""seed":1.5"#), "seed");
        assert_eq!(chat(r#""logprobs":1"#), "logprobs");
        assert_eq!(chat(r#""user":5"#), "user");
        assert_eq!(chat(r#""stop":[1]"#), "stop");
        assert_eq!(chat(r#""tools":{}"#), "tools");
        assert_eq!(chat(r#""response_format":"json""#), "response_format");
        // The first mistyped member in the body's order is named.
        assert_eq!(chat(r#""user":5,"temperature":"hot""#), "user");
        assert_eq!(param(r#"{"model":"m","messages":["hi"]}"#), "messages[0]");
        assert_eq!(
            param(r#"{"model":"m","messages":[{"role":"user","content":"x"},{"content":"y"}]}"#),
            "messages[1].role"
        );
        assert_eq!(param(r#"{"model":"m","messages":[{"role":["user"],"content":"y"}]}"#), "messages[0].role");
        assert_eq!(param(r#"{"model":"m","messages":[{"role":"user","content":5}]}"#), "messages[0].content");
        assert_eq!(param(r#"{"model":"m","messages":[{"role":"user"}]}"#), "messages[0].content");
    }

    #[test]
    fn common_fields_of_their_types_or_null_pass_and_unknown_fields_are_not_checked() {
        let ok = [
            r#"{"model":"m","messages":[{"role":"assistant","tool_calls":[]},{"role":"tool","tool_call_id":"t"},{"role":"user","content":null}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":null,"top_p":1,"seed":-3,"logprobs":true,"top_logprobs":2,"user":"u","stop":["a"],"tools":null,"response_format":null,"parallel_tool_calls":false,"logit_bias":{"1":5},"custom":{"any":"thing"},"echo":"x"}"#,
        ];
        for body in ok {
            parse_chat(body).unwrap_or_else(|e| panic!("{body}: {e:?}"));
        }
        let completion = |body: &str| parse(Endpoint::Completions, &Bytes::copy_from_slice(body.as_bytes()));
        for prompt in [r#""x""#, r#"["a","b"]"#, "[1,2]", "[[1],[2,3]]", "[]"] {
            completion(&format!(r#"{{"model":"m","prompt":{prompt},"logprobs":2,"echo":true}}"#)).unwrap();
        }
        for prompt in [r#"["a",1]"#, "[[1],2]", "[1.5]", r#"[["a"]]"#] {
            assert!(
                matches!(completion(&format!(r#"{{"model":"m","prompt":{prompt}}}"#)), Err(ApiError::InvalidParam { param, .. }) if param == "prompt"),
                "{prompt}"
            );
        }
        let embedding = |body: &str| parse(Endpoint::Embeddings, &Bytes::copy_from_slice(body.as_bytes()));
        assert!(
            matches!(embedding(r#"{"model":"m","input":[[1],["x"]]}"#), Err(ApiError::InvalidParam { param, .. }) if param == "input")
        );
        assert!(
            matches!(embedding(r#"{"model":"m","input":"x","dimensions":"8"}"#), Err(ApiError::InvalidParam { param, .. }) if param == "dimensions")
        );
    }

    #[test]
    fn both_output_limits_are_kept_and_the_reservation_reads_max_completion_tokens_first() {
        for body in [
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":900,"max_completion_tokens":10}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":10,"max_tokens":900,"tools":[]}"#,
        ] {
            let p = parse_chat(body).unwrap();
            assert_eq!(
                (p.max_tokens, p.max_completion_tokens, p.max_output()),
                (Some(900), Some(10), Some(10)),
                "{body}"
            );
            assert_eq!(p.output_limit_over(100), Some(("max_tokens", 900)), "{body}");
            assert_eq!(p.output_limit_over(1000), None, "{body}");
        }
        let p = parse_chat(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":9,"max_completion_tokens":500}"#,
        )
        .unwrap();
        assert_eq!(p.output_limit_over(100), Some(("max_completion_tokens", 500)));
        let p = parse_chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":9}"#).unwrap();
        assert_eq!((p.max_output(), p.output_limit_over(8)), (Some(9), Some(("max_tokens", 9))));
    }

    #[test]
    fn not_json_is_invalid_json() {
        for body in ["", "nope", "[1,2]", "{\"model\":", "\"str\"", "{\"a\":\"\\ud800\"}x"] {
            assert!(
                matches!(
                    parse(Endpoint::Chat, &Bytes::copy_from_slice(body.as_bytes())),
                    Err(ApiError::InvalidJson(_))
                ),
                "{body}"
            );
        }
        assert!(matches!(
            parse(Endpoint::Chat, &Bytes::from_static(b"{\"model\":\"\xff\"}")),
            Err(ApiError::InvalidJson(_))
        ));
        let deep = "[".repeat(10_000);
        assert!(matches!(
            parse(Endpoint::Chat, &Bytes::from(format!("{{\"model\":{deep}"))),
            Err(ApiError::InvalidJson(_))
        ));
    }

    #[test]
    fn common_chat_bodies_are_skimmed_and_the_rest_read_in_full() {
        let skimmed = [
            r#"{"model":"gpt-4o","messages":[{"role":"system","content":"Be \"brief\".\n"},{"role":"user","name":"ann","content":"hi"}]}"#,
            r#" { "messages" : [ {"role":"user","content":"x"} ] , "model" : "m", "stream":true, "stream_options":{"include_usage":true}, "max_tokens":null, "n":2, "temperature":0.75, "response_format":{"type":"json_schema","json_schema":{"name":"x"}}, "metadata":{"a":[1,{"b":null}]} } "#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_p":-0.5,"presence_penalty":null,"frequency_penalty":1,"seed":7,"top_logprobs":null,"logprobs":false,"parallel_tool_calls":true,"user":"\u00e9","stop":["\n",""],"logit_bias":{"1":-100}}"#,
        ];
        for body in skimmed {
            let p = parse_chat(body).unwrap();
            assert!(p.plain_chat.is_some(), "{body}");
            let full = parse_full(Endpoint::Chat, &Bytes::copy_from_slice(body.as_bytes())).unwrap();
            assert_eq!(
                (p.stream, p.client_wants_usage, p.n, p.needs),
                (full.stream, full.client_wants_usage, full.n, full.needs)
            );
        }
        let chat = parse_chat(skimmed[0]).unwrap().plain_chat.unwrap();
        assert_eq!(chat, PlainChat { messages: 2, names: 1, text_bytes: 6 + 15 + 4 + 3 + 2 });
        let full = [
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}"#,
            r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[]}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[]}"#,
            r#"{"model":"m\u0041","messages":[{"role":"user","content":"x"}]}"#,
            r#"{"model":"m","messages":[{"role":"user","c\u006fntent":"x"}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x","content":"y"}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":1e0}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"seed":-1}"#,
            r#"{"model":"m","messages":[{"role":"assistant","content":"x"},{"role":"tool","tool_call_id":"t"}]}"#,
        ];
        for body in full {
            assert!(parse_chat(body).unwrap().plain_chat.is_none(), "{body}");
        }
    }

    #[test]
    fn a_streams_body_is_kept_apart_from_the_buffer_it_arrived_in() {
        let chat = br#"{"model":"m","stream":STREAM,"messages":[{"role":"user","content":"x"}]}"#;
        for stream in [true, false] {
            let text = String::from_utf8_lossy(chat).replace("STREAM", &stream.to_string());
            // As hyper hands a body over: a slice of the connection's larger read buffer.
            let buffer = Bytes::from(format!("{text}{}", " ".repeat(8192)));
            let body = buffer.slice(..text.len());
            let p = parse(Endpoint::Chat, &body).unwrap();
            let within = buffer.as_ptr_range().contains(&p.prompt.body.as_ptr());
            assert_eq!(within, !stream, "stream: {stream}");
            assert_eq!(p.prompt.value()["model"], "m");
        }
    }

    #[test]
    fn capabilities_are_detected() {
        let p = parse_chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"http://x"}}]}],"tools":[{"type":"function","function":{"name":"f"}}],"response_format":{"type":"json_schema"}}"#).unwrap();
        assert_eq!(p.needs, Capabilities::ALL);
    }
}
