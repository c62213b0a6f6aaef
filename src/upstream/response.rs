//! An upstream's answer as the rest of tollgate sees it, from a provider over HTTP or from
//! the built-in mock: status, headers, and a body read chunk by chunk under the idle timeout.

use std::pin::Pin;
use std::time::Duration;

use axum::http::{header, HeaderMap, StatusCode};
use bytes::Bytes;
use futures::{Stream, StreamExt};

/// A response body as a stream of chunks.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, BodyError>> + Send>>;

/// Why reading an upstream body stopped early.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BodyError {
    #[error("the upstream was silent for longer than idle_timeout_ms")]
    Idle,
    #[error("the upstream connection failed mid-body: {0}")]
    Broken(String),
}

/// An upstream's answer: status and headers, body still to read.
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: BodyStream,
    /// Longest silence allowed inside the body.
    pub idle_timeout: Duration,
}

/// Why an upstream call failed before any response headers arrived.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    #[error("could not connect to the upstream: {0}")]
    Connect(String),
    #[error("no response headers within first_byte_timeout_ms")]
    Timeout,
    #[error("upstream request failed: {0}")]
    Other(String),
}

impl UpstreamResponse {
    /// The next body chunk, or `None` at the end; a gap longer than the idle timeout is an error.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, BodyError>> {
        match tokio::time::timeout(self.idle_timeout, self.body.next()).await {
            Err(_) => Some(Err(BodyError::Idle)),
            Ok(item) => item,
        }
    }

    /// Reads the whole body, at most `limit` bytes.
    pub async fn read_all(&mut self, limit: usize) -> Result<Bytes, ReadError> {
        let mut body = Joined::new(None);
        while let Some(chunk) = self.next_chunk().await {
            let chunk = chunk.map_err(ReadError::Body)?;
            if body.len() + chunk.len() > limit {
                return Err(ReadError::TooLarge);
            }
            body.push(chunk);
        }
        Ok(body.into_bytes())
    }

    pub fn content_type(&self) -> &str {
        self.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

/// A body read chunk by chunk, joined. A small body usually arrives as one chunk: that
/// chunk is the body, uncopied; a second chunk starts a buffer of the expected size (twice
/// what has arrived, when the size is not known).
pub struct Joined {
    first: Option<Bytes>,
    rest: bytes::BytesMut,
    len: usize,
    expected: Option<usize>,
}

impl Joined {
    pub(crate) fn new(expected: Option<usize>) -> Joined {
        Joined { first: None, rest: bytes::BytesMut::new(), len: 0, expected }
    }

    /// Bytes so far.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        match self.first.take() {
            None if self.rest.is_empty() => self.first = Some(chunk),
            earlier => {
                if let Some(earlier) = earlier {
                    self.rest.reserve(self.expected.unwrap_or(2 * self.len).max(self.len));
                    self.rest.extend_from_slice(&earlier);
                }
                self.rest.extend_from_slice(&chunk);
            }
        }
    }

    pub(crate) fn into_bytes(self) -> Bytes {
        self.first.unwrap_or_else(|| self.rest.freeze())
    }
}

/// Why a whole-body read failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Body(BodyError),
    #[error("the upstream response exceeded max_response_bytes")]
    TooLarge,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(chunks: &[&'static str]) -> UpstreamResponse {
        let chunks: Vec<Result<Bytes, BodyError>> =
            chunks.iter().map(|c| Ok(Bytes::from_static(c.as_bytes()))).collect();
        UpstreamResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Box::pin(futures::stream::iter(chunks)),
            idle_timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn read_all_joins_chunks_and_keeps_the_limit() {
        assert_eq!(response(&[]).read_all(10).await.unwrap(), "");
        assert_eq!(response(&["abc"]).read_all(10).await.unwrap(), "abc");
        assert_eq!(response(&["ab", "", "cd", "e"]).read_all(10).await.unwrap(), "abcde");
        assert_eq!(response(&["", "xy"]).read_all(10).await.unwrap(), "xy");
        assert_eq!(response(&["abcde", "fghij"]).read_all(10).await.unwrap(), "abcdefghij");
        assert!(matches!(response(&["abcde", "fghijk"]).read_all(10).await, Err(ReadError::TooLarge)));
        assert!(matches!(response(&["abcdefghijk"]).read_all(10).await, Err(ReadError::TooLarge)));
    }
}
