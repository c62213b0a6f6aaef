//! Incremental parser for `text/event-stream` bodies (the WHATWG server-sent events format).
//!
//! The gateway forwards an upstream stream to its client event by event, so the parser hands back
//! each event's exact wire bytes (`raw`) next to its decoded `data` and `event` fields: the caller
//! forwards `raw` untouched (the response body is passed through unchanged) and looks at `data` to
//! meter it. Concatenating the `raw` of every event, then [`SseParser::pending`], reproduces the
//! input byte for byte, whatever the chunking.
//!
//! Parsing follows <https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream>
//! with three deliberate differences, all because a gateway must account for every byte:
//! - a blank line with nothing before it (or only comments / ignored fields) is still returned, as an
//!   event with `data: None`, so its bytes are not lost;
//! - invalid UTF-8 in a `data` or `event` value is an error rather than U+FFFD, since metering a
//!   mangled chunk would silently lose usage;
//! - an event larger than the configured bound is an error, to keep memory bounded against a
//!   hostile or broken upstream.

use std::fmt;

use bytes::{Bytes, BytesMut};

/// The UTF-8 byte order mark, which the format allows (once) at the very start of a stream.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One complete SSE event as it appeared on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    /// The exact bytes of the event, including its terminating blank line, so that concatenating
    /// `raw` of all events (plus any trailing remainder) reproduces the input byte for byte. The
    /// first event of a stream also carries the BOM, if the stream had one.
    pub raw: Bytes,
    /// The `data` field: all `data:` lines joined with '\n' (one leading space after the colon
    /// stripped, per the WHATWG rules). `None` if the event had no data line (e.g. comment-only
    /// ": keep-alive", or a stray blank line); `Some("")` for a bare `data` or `data:` line.
    pub data: Option<String>,
    /// The `event:` field, if any (the last one wins when an event repeats it).
    pub event: Option<String>,
}

/// Why a stream cannot be parsed any further.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SseError {
    /// An event grew past `limit` bytes (its raw size, terminator included) before it ended.
    EventTooLarge {
        /// The parser's `max_event_bytes`.
        limit: usize,
    },
    /// A `data` or `event` value was not valid UTF-8.
    InvalidUtf8,
}

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SseError::EventTooLarge { limit } => {
                write!(f, "server-sent event larger than {limit} bytes")
            }
            SseError::InvalidUtf8 => f.write_str("server-sent event field is not valid UTF-8"),
        }
    }
}

impl std::error::Error for SseError {}

/// Splits a byte stream into [`SseEvent`]s as chunks arrive.
///
/// Work is O(n) in the stream's length: each byte is scanned for a line end once (the scan
/// position is remembered across chunks), and completed events are split off the buffer without
/// copying. Memory is bounded by `max_event_bytes` plus the size of one chunk.
#[derive(Debug)]
pub struct SseParser {
    /// Bytes not yet returned in an event: the event under construction, starting at its first byte.
    buf: BytesMut,
    /// Offset in `buf` of the first line not yet applied to `data` / `event`.
    line_start: usize,
    /// Offset in `buf` where the search for that line's end resumes, so a long line arriving in
    /// many chunks is scanned once, not once per chunk.
    scan: usize,
    /// `data` of the event under construction, from the lines applied so far.
    data: Option<String>,
    /// `event` of the event under construction.
    event: Option<String>,
    /// Whether the stream's first line has been seen (and any BOM on it skipped).
    past_first_line: bool,
    max_event_bytes: usize,
    /// An error is final: the stream is out of sync, so later bytes cannot be trusted either.
    failed: Option<SseError>,
    /// Bytes examined while looking for line ends, to prove the O(n) claim in tests.
    #[cfg(test)]
    scanned: usize,
}

impl SseParser {
    /// `max_event_bytes`: an event growing past this is an error (bounded memory against a hostile
    /// upstream).
    pub fn new(max_event_bytes: usize) -> Self {
        SseParser {
            buf: BytesMut::new(),
            line_start: 0,
            scan: 0,
            data: None,
            event: None,
            past_first_line: false,
            max_event_bytes,
            failed: None,
            #[cfg(test)]
            scanned: 0,
        }
    }

    /// Feed the next chunk as received; returns the events completed by it, in order.
    ///
    /// When a chunk completes some events and then breaks the protocol, those events are returned
    /// (they were well formed and may carry usage) and the error comes from the next call to `push`
    /// or [`finish`](Self::finish); the offending bytes stay in [`pending`](Self::pending). Once an
    /// error has been returned, every later call returns it again and buffers nothing more.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        self.buf.extend_from_slice(chunk);
        self.parse(false)
    }

    /// Call when the stream has ended: returns an event whose terminating blank line was a lone
    /// `\r` as the stream's very last byte. `push` cannot return that event itself, because a `\n`
    /// in the next chunk would have made the `\r\n` one line end and the event longer.
    ///
    /// Afterwards, a non-empty [`pending`](Self::pending) means the stream was cut off mid-event.
    /// Upstreams that end lines with `\n` or `\r\n` (OpenAI does) never need this call.
    pub fn finish(&mut self) -> Result<Vec<SseEvent>, SseError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        self.parse(true)
    }

    /// Bytes of an incomplete event still buffered (a stream that ends here was cut off
    /// mid-event, unless [`finish`](Self::finish) still has an event to return).
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Applies every complete line in the buffer, remembering an error rather than losing the
    /// events completed before it.
    fn parse(&mut self, at_eof: bool) -> Result<Vec<SseEvent>, SseError> {
        // Room for the events of a chat stream's chunks (~200 bytes and more each), so a
        // stream that arrives in one read is not regrown event by event.
        let mut events = Vec::with_capacity(self.buf.len() / 128 + 1);
        match self.parse_into(&mut events, at_eof) {
            Ok(()) => Ok(events),
            Err(e) => {
                self.failed = Some(e);
                if events.is_empty() {
                    Err(e)
                } else {
                    Ok(events)
                }
            }
        }
    }

    fn parse_into(&mut self, events: &mut Vec<SseEvent>, at_eof: bool) -> Result<(), SseError> {
        let too_large = SseError::EventTooLarge { limit: self.max_event_bytes };
        loop {
            let unscanned = &self.buf[self.scan..];
            let found = memchr::memchr2(b'\n', b'\r', unscanned);
            #[cfg(test)]
            {
                self.scanned += found.map_or(unscanned.len(), |i| i + 1);
            }
            let Some(offset) = found else {
                self.scan = self.buf.len();
                break;
            };
            let line_end = self.scan + offset;
            let terminator_len = match (self.buf[line_end], self.buf.get(line_end + 1)) {
                (b'\r', Some(b'\n')) => 2,
                // A `\r` as the last byte buffered may be the first half of `\r\n`: wait for the
                // next byte rather than end the line (and perhaps the event) one byte early.
                (b'\r', None) if !at_eof => {
                    self.scan = line_end;
                    break;
                }
                _ => 1,
            };
            let next_line = line_end + terminator_len;
            // Checked per line, not only when the event ends, so that the error a stream gets
            // does not depend on where it was split into chunks.
            if next_line > self.max_event_bytes {
                return Err(too_large);
            }

            let mut line = &self.buf[self.line_start..line_end];
            if !self.past_first_line {
                self.past_first_line = true;
                line = line.strip_prefix(BOM).unwrap_or(line);
            }
            // The common event, one `data: …` line and then a blank one: taken whole, without
            // a search for the blank line's end or a look at the field's name.
            let data_line = line.strip_prefix(b"data: ");
            if let (Some(value), None, None, Some(b'\n')) =
                (data_line, &self.data, &self.event, self.buf.get(next_line))
            {
                let end = next_line + 1;
                if end > self.max_event_bytes {
                    return Err(too_large);
                }
                let data = simdutf8::basic::from_utf8(value).map_err(|_| SseError::InvalidUtf8)?.to_owned();
                #[cfg(test)]
                {
                    self.scanned += 1;
                }
                events.push(SseEvent { raw: self.buf.split_to(end).freeze(), data: Some(data), event: None });
                self.line_start = 0;
                self.scan = 0;
                continue;
            }
            if line.is_empty() {
                let raw = self.buf.split_to(next_line).freeze();
                events.push(SseEvent { raw, data: self.data.take(), event: self.event.take() });
                self.line_start = 0;
                self.scan = 0;
            } else {
                apply_line(line, &mut self.data, &mut self.event)?;
                self.line_start = next_line;
                self.scan = next_line;
            }
        }
        // The buffer now holds only the unfinished event: refuse to keep more than the bound.
        if self.buf.len() > self.max_event_bytes {
            return Err(too_large);
        }
        Ok(())
    }
}

/// Applies one non-empty line (without its line end) to the event under construction.
fn apply_line(line: &[u8], data: &mut Option<String>, event: &mut Option<String>) -> Result<(), SseError> {
    if line.first() == Some(&b':') {
        // A comment, typically a keep-alive; it stays in `raw` and carries nothing to parse.
        return Ok(());
    }
    let (name, value) = match memchr::memchr(b':', line) {
        Some(colon) => {
            let value = &line[colon + 1..];
            (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
        }
        // A field name alone, e.g. `data`, has the empty string as its value.
        None => (line, &b""[..]),
    };
    match name {
        b"data" => {
            let value = simdutf8::basic::from_utf8(value).map_err(|_| SseError::InvalidUtf8)?;
            match data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => *data = Some(value.to_owned()),
            }
        }
        b"event" => {
            let value = simdutf8::basic::from_utf8(value).map_err(|_| SseError::InvalidUtf8)?;
            *event = Some(value.to_owned());
        }
        // `id`, `retry` and unknown fields mean nothing to the gateway; they stay in `raw`.
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests;
