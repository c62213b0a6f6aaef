//! The skim for the common request: a chat body of string-only messages, read without
//! building anything.

use std::sync::Arc;

use bytes::Bytes;

use super::{Endpoint, ParsedRequest, Prompt, MAX_N};
use crate::policy::pricing::Capabilities;
use crate::policy::tokens::PlainChat;
use crate::skim::{Scalar, Skim};

/// The common request, read without building anything: a valid chat body whose messages
/// hold only strings, with no tools, functions or content parts. Whatever else a body holds,
/// and every body with something to refuse, is `None`, for [`parse_full`](super::parse_full)
/// to read (and to word its refusal). Most requests are such bodies, and building a `Value`
/// for them would cost more than the rest of their parsing.
pub(super) fn skim_plain_chat(endpoint: Endpoint, body: &Bytes) -> Option<ParsedRequest> {
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
pub(super) struct Keys<'a, const N: usize> {
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
pub(super) fn whole(s: &mut Skim) -> Option<Option<u64>> {
    match s.scalar()? {
        Scalar::Null => Some(None),
        Scalar::Uint(u64::MAX) => None,
        Scalar::Uint(v) => Some(Some(v)),
        Scalar::Other => None,
    }
}

/// A string or `null`.
pub(super) fn string_or_null(s: &mut Skim) -> Option<()> {
    match s.peek()? {
        b'"' => s.written_str().map(drop),
        b'n' => s.value(),
        _ => None,
    }
}

/// An object or `null`.
pub(super) fn object_or_null(s: &mut Skim) -> Option<()> {
    match s.peek()? {
        b'{' | b'n' => s.value(),
        _ => None,
    }
}

/// `stop`: a string, an array of strings, or `null`.
pub(super) fn stop(s: &mut Skim) -> Option<()> {
    match s.peek()? {
        b'[' => s.elements(|s| s.written_str().map(drop)).map(drop),
        _ => string_or_null(s),
    }
}

/// `stream_options`: an object or `null`; whether it sets `include_usage` to `true`.
pub(super) fn stream_options_usage(s: &mut Skim) -> Option<bool> {
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
pub(super) fn response_format_is_schema(s: &mut Skim) -> Option<bool> {
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
pub(super) fn plain_messages(s: &mut Skim) -> Option<PlainChat> {
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
