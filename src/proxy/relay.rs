//! Relay: the upstream's answer to the client — read whole, metered and recorded before it
//! is answered (JSON), or event by event as they arrive (SSE), with `[DONE]` held back until
//! the record is durable.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::answer::{forwarded_error, insert_cost, respond, retryable};
use super::detach::{unless_cut, Detachable, Panicked};
use super::settle::{cut_off, failed, Meter, Outcome, Produced};
use crate::config::OnLedgerError;
use crate::error::ApiError;
use crate::metering::sse::SseParser;
use crate::metering::usage::{self, ChunkKind, StreamAccumulator};
use crate::policy::models::Model;
use crate::upstream::{ReadError, UpstreamResponse};

/// Largest single SSE event accepted from an upstream.
const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;
/// Generated text kept per stream for estimating output tokens.
const MAX_STREAM_TEXT: usize = 4 * 1024 * 1024;
/// Events buffered between the upstream reader and a slow client.
const STREAM_BUFFER: usize = 16;

/// A non-streamed answer: read it whole, meter, record durably, then answer.
pub(super) async fn whole_response(
    meter: Meter,
    served: Arc<Model>,
    mut upstream: UpstreamResponse,
    mut headers: HeaderMap,
    before_upstream: std::time::Duration,
    cut: &CancellationToken,
) -> Response {
    let app = meter.app.clone();
    let status = upstream.status;
    let Some(read) = unless_cut(cut, upstream.read_all(app.config.max_response_bytes)).await else {
        return cut_off(meter, &served, headers);
    };
    let after_upstream = Instant::now();
    let body = match read {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(model = %served.name, error = %e, "upstream body failed");
            let error = match e {
                ReadError::Body(crate::upstream::BodyError::Idle) => ApiError::UpstreamTimeout,
                // A 200 whose body was cut off is a body that is not JSON (SPEC §4).
                ReadError::Body(_) if status.is_success() => ApiError::InvalidUpstreamResponse,
                ReadError::Body(_) => {
                    ApiError::Upstream { status: None, message: "The upstream connection failed mid-response.".into() }
                }
                ReadError::TooLarge => {
                    ApiError::Upstream { status: None, message: "The upstream response was too large.".into() }
                }
            };
            return failed(meter, &served, error, headers);
        }
    };
    let answer = usage::read_answer(&body);
    if status.is_success() {
        let Some((reported, text)) = answer else {
            return failed(meter, &served, ApiError::InvalidUpstreamResponse, headers);
        };
        let settled = meter.settle(Outcome {
            status: status.as_u16(),
            model: &served,
            reported,
            produced: Some(Produced { text: &text, overflow_bytes: 0 }),
        });
        if let Err(failed) = settled.durable {
            if app.config.on_ledger_error == OnLedgerError::Reject {
                // The client receives a 503: the record (which reaches the database from
                // memory) must say so.
                let error = ApiError::LedgerNotDurable;
                let status = error.status().as_u16();
                app.ledger.amend(crate::ledger::RequestRecord { status, ..*failed.record }, false, None);
                return forwarded_error(error, headers, settled.cost);
            }
        }
        insert_cost(&mut headers, settled.cost);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        app.metrics.observe_overhead(before_upstream + after_upstream.elapsed());
        return respond(status, headers, Body::from(body));
    }
    // The upstream refused the request itself (4xx): its error body reaches the client
    // unchanged; 401/403 mean tollgate's provider credentials are wrong, which is not the
    // client's to see as its own key's fault.
    let reported = answer.and_then(|(usage, _)| usage);
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN || retryable(status) {
        let error = ApiError::Upstream {
            status: Some(status.as_u16()),
            message: format!("The upstream failed with status {}.", status.as_u16()),
        };
        let settled =
            meter.settle(Outcome { status: error.status().as_u16(), model: &served, reported, produced: None });
        let mut response = forwarded_error(error, headers, settled.cost);
        if let Some(retry) = upstream.headers.get(header::RETRY_AFTER) {
            response.headers_mut().insert(header::RETRY_AFTER, retry.clone());
        }
        return response;
    }
    let settled = meter.settle(Outcome { status: status.as_u16(), model: &served, reported, produced: None });
    insert_cost(&mut headers, settled.cost);
    let content_type =
        upstream.headers.get(header::CONTENT_TYPE).cloned().unwrap_or(HeaderValue::from_static("application/json"));
    headers.insert(header::CONTENT_TYPE, content_type);
    respond(status, headers, Body::from(body))
}

/// Reads a stream's body until it can tell whether it starts like SSE (usually its first
/// chunk): what it read, for the pump to go on from. A body that starts with anything but an
/// SSE field (`data`, `event`, `id`, `retry`), a `:` comment or a blank line, or that ends or
/// fails first, is refused with a 502 before the client sees a 200 (one that falls silent
/// for `idle_timeout_ms` first, with a 504).
pub(super) async fn first_sse_bytes(upstream: &mut UpstreamResponse) -> Result<Bytes, ApiError> {
    let mut read = Bytes::new();
    loop {
        let chunk = match upstream.next_chunk().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(crate::upstream::BodyError::Idle)) => return Err(ApiError::UpstreamTimeout),
            Some(Err(_)) | None => return Err(ApiError::InvalidUpstreamResponse),
        };
        // Usually the first chunk decides, and is handed on as it is; joining is for the
        // rare start split inside its first few bytes.
        read = if read.is_empty() { chunk } else { [read, chunk].concat().into() };
        match starts_like_sse(&read) {
            Some(true) => return Ok(read),
            Some(false) => return Err(ApiError::InvalidUpstreamResponse),
            None => {}
        }
    }
}

/// Whether `bytes`, the start of a body, start like an SSE stream (`None`: too few to tell).
fn starts_like_sse(bytes: &[u8]) -> Option<bool> {
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    const FIELDS: [&[u8]; 4] = [b"data", b"event", b"id", b"retry"];
    if bytes.len() < BOM.len() && BOM.starts_with(bytes) {
        return None;
    }
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    match bytes.iter().position(|&b| matches!(b, b':' | b'\r' | b'\n')) {
        // A comment or a blank line, or a field's name.
        Some(0) => Some(true),
        Some(end) => Some(FIELDS.contains(&&bytes[..end])),
        None if bytes.is_empty() || FIELDS.iter().any(|f| f.starts_with(bytes)) => None,
        None => Some(false),
    }
}

/// Starts relaying a stream: the response goes out at once with the upstream's status; its
/// body runs the pump, which forwards `first` (the body's first bytes, read already), then
/// reads the upstream, forwards each event as it completes, and settles.
pub(super) fn relay_stream(
    meter: Meter,
    served: Arc<Model>,
    mut upstream: UpstreamResponse,
    first: Bytes,
    client_wants_usage: bool,
    mut headers: HeaderMap,
) -> Response {
    // The pump needs no upstream header: free them rather than hold them for the stream's life.
    upstream.headers = HeaderMap::new();
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(STREAM_BUFFER);
    let app = meter.app.clone();
    let drain = std::time::Duration::from_millis(app.config.disconnect_drain_ms);
    let status = upstream.status;
    // The body is polled outside the handler's span: the pump takes the request's along.
    let pump = pump(meter, served, upstream, first, client_wants_usage, tx, drain).instrument(tracing::Span::current());
    let pump = Detachable::new(&app.tracker, pump);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    respond(status, headers, Body::from_stream(Relay { pump: Some(pump), rx, held: None, panicked: false }))
}

/// A stream's response body: the events the pump hands over, as they come.
///
/// The body polls the pump itself, on the connection's task, before it looks for events:
/// an upstream read wakes the task that writes to the client, and no task is spawned a
/// stream. When hyper drops the body before the pump has finished (the client hung up, or
/// the connection closed), the pump goes on in a tracked task: it notices the client is gone
/// at its next hand-over and keeps metering. The pump runs ahead of the client by at most
/// the channel's [`STREAM_BUFFER`] hand-overs, and while the client reads nothing hyper
/// stops polling the body, which leaves the rest of the stream in the upstream connection.
///
/// An error (the cut-off) is held back for one poll: hyper drops its unflushed buffer —
/// response head included — when a body errors in the same write pass, and the client must
/// see a 200 that stops before `[DONE]`, not a connection that closed without a response
/// (which SDKs retry, charging twice).
struct Relay<F: Future<Output = ()> + Send + 'static> {
    pump: Option<Detachable<F>>,
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    held: Option<std::io::Error>,
    panicked: bool,
}

impl<F: Future<Output = ()> + Send + 'static> futures::Stream for Relay<F> {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        if let Some(e) = this.held.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if let Some(pump) = this.pump.as_mut() {
            match std::pin::Pin::new(pump).poll(cx) {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => this.pump = None,
                Poll::Ready(Err(Panicked)) => {
                    tracing::error!("stream relay panicked");
                    this.pump = None;
                    this.panicked = true;
                }
            }
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(Err(e))) => {
                this.held = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            // The events it handed over went out; then the stream is cut off, not ended as
            // if complete.
            Poll::Ready(None) if this.panicked => {
                this.panicked = false;
                Poll::Ready(Some(Err(std::io::Error::other("stream relay panicked"))))
            }
            other => other,
        }
    }
}

/// With `include_usage` (which tollgate adds), OpenAI puts `"usage":null` at the end of
/// every chunk; a client that did not ask for usage would not see that field, so it is
/// removed when it is exactly there. Anything else passes untouched. Appends to `out`.
fn push_without_null_usage(out: &mut BytesMut, raw: &[u8]) {
    const FIELD: &[u8] = b",\"usage\":null}";
    let end = memchr::memrchr(b'}', raw).map_or(0, |i| i + 1);
    if end >= FIELD.len() && &raw[end - FIELD.len()..end] == FIELD {
        out.extend_from_slice(&raw[..end - FIELD.len()]);
        out.extend_from_slice(b"}");
        out.extend_from_slice(&raw[end..]);
    } else {
        out.extend_from_slice(raw);
    }
}

/// Reads the upstream stream to its end, forwarding events to the client while it listens:
/// the events that arrived in one upstream read leave in one write, at once. `[DONE]` is held
/// back until the record is durable. If the client goes away, reading continues (for at most
/// `drain`) to learn the usage; if the upstream stops early, or shutdown's grace period ends
/// (`AppState::cut`), the client's stream is cut off too, without `[DONE]`, and charged by
/// estimate from what was read.
async fn pump(
    meter: Meter,
    served: Arc<Model>,
    mut upstream: UpstreamResponse,
    first: Bytes,
    client_wants_usage: bool,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    drain: std::time::Duration,
) {
    let mut parser = SseParser::new(MAX_EVENT_BYTES);
    let mut acc = StreamAccumulator::new(MAX_STREAM_TEXT);
    let mut client_gone = false;
    let mut gone_at: Option<Instant> = None;
    let mut done_event: Option<Bytes> = None;
    let mut failure: Option<String> = None;
    let mut first = Some(first);
    let cut = meter.app.cut_token();
    loop {
        if let Some(at) = gone_at {
            if at.elapsed() > drain {
                failure = Some("client gone; stopped draining the upstream".into());
                break;
            }
        }
        let next = match first.take() {
            Some(first) => Some(Ok(first)),
            None => match unless_cut(&cut, upstream.next_chunk()).await {
                Some(next) => next,
                None => {
                    failure = Some("grace period over at shutdown; stream cut".into());
                    break;
                }
            },
        };
        let (events, at_end) = match next {
            // End of body: a final event may still be waiting on its line ending.
            None => match parser.finish() {
                Ok(events) => (events, true),
                Err(e) => {
                    failure = Some(format!("malformed SSE from the upstream: {e}"));
                    break;
                }
            },
            Some(Ok(chunk)) => match parser.push(&chunk) {
                Ok(events) => (events, false),
                Err(e) => {
                    failure = Some(format!("malformed SSE from the upstream: {e:?}"));
                    break;
                }
            },
            Some(Err(e)) => {
                failure = Some(e.to_string());
                break;
            }
        };
        // Sized for every event: grown event by event, it was reallocated and copied a
        // handful of times per read.
        let mut out = BytesMut::with_capacity(events.iter().map(|e| e.raw.len()).sum());
        for event in events {
            // A chunk held unread (`None`) is forwarded like any other content.
            let kind = event.data.and_then(|data| acc.observe_later(data));
            match kind {
                Some(ChunkKind::Done) => {
                    done_event = Some(event.raw);
                    break;
                }
                Some(ChunkKind::UsageOnly) if !client_wants_usage => continue,
                _ => {}
            }
            if client_wants_usage {
                out.extend_from_slice(&event.raw);
            } else {
                push_without_null_usage(&mut out, &event.raw);
            }
        }
        if !out.is_empty() && !client_gone && tx.send(Ok(out.freeze())).await.is_err() {
            client_gone = true;
            gone_at = Some(Instant::now());
            tracing::info!(request_id = %meter.request_id, "client disconnected mid-stream; still metering");
        }
        if done_event.is_some() || at_end {
            break;
        }
    }
    let complete = done_event.is_some();
    if let Some(why) = &failure {
        tracing::warn!(request_id = %meter.request_id, model = %served.name, reason = %why, "stream ended early");
    }
    acc.finish();
    let app = meter.app.clone();
    let settled = meter.settle(Outcome {
        status: upstream.status.as_u16(),
        model: &served,
        reported: acc.usage(),
        produced: Some(Produced { text: acc.produced_text(), overflow_bytes: acc.overflow_bytes() }),
    });
    if client_gone {
        return;
    }
    let keep = settled.durable.is_ok() || app.config.on_ledger_error == OnLedgerError::Serve;
    match done_event {
        Some(done) if complete && keep => {
            let _ = tx.send(Ok(done)).await;
        }
        _ => {
            // Cut the client's stream off: an error ends the chunked body without its terminator.
            let _ = tx.send(Err(std::io::Error::other("upstream stream ended early"))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;

    #[test]
    fn an_sse_start_is_a_field_a_comment_or_a_blank_line() {
        for sse in [
            &b"data: {}"[..],
            b"data:x",
            b"data\n",
            b"event: x\r\n",
            b"id: 1",
            b"retry: 5",
            b": hi",
            b"\n",
            b"\r\n",
            b"\xEF\xBB\xBFdata: x",
        ] {
            assert_eq!(starts_like_sse(sse), Some(true), "{sse:?}");
        }
        for not in [
            &b"{\"id\":1}"[..],
            b"<html>",
            b"HTTP/1.1",
            b"dat x",
            b"datum: x",
            b"data_x: 1",
            b"ids:",
            b" data: x",
            b"\xEF\xBB\xBF{",
        ] {
            assert_eq!(starts_like_sse(not), Some(false), "{not:?}");
        }
        for undecided in [
            &b""[..],
            b"d",
            b"dat",
            b"data",
            b"ev",
            b"i",
            b"retr",
            b"\xEF",
            b"\xEF\xBB",
            b"\xEF\xBB\xBF",
            b"\xEF\xBB\xBFda",
        ] {
            assert_eq!(starts_like_sse(undecided), None, "{undecided:?}");
        }
    }

    #[test]
    fn null_usage_is_removed_only_where_openai_puts_it() {
        let without_null_usage = |raw: &[u8]| {
            let mut out = BytesMut::from(&b"before|"[..]);
            push_without_null_usage(&mut out, raw);
            out.strip_prefix(b"before|").expect("appends").to_vec()
        };
        assert_eq!(
            without_null_usage(b"data: {\"id\":\"c\",\"choices\":[],\"usage\":null}\n\n"),
            b"data: {\"id\":\"c\",\"choices\":[]}\n\n"
        );
        assert_eq!(without_null_usage(b"data: {\"a\":1,\"usage\":null}\r\n\r\n"), b"data: {\"a\":1}\r\n\r\n");
        for untouched in [
            &b"data: {\"usage\":{\"prompt_tokens\":1}}\n\n"[..],
            b"data: {\"text\":\"\\\"usage\\\":null\",\"x\":1}\n\n",
            b": comment\n\n",
            b"data: [DONE]\n\n",
        ] {
            assert_eq!(without_null_usage(untouched), untouched);
        }
    }
}
