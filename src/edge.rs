//! What every route gets at tollgate's edge, the proxy's and the others' alike: a body read
//! under one size limit and one read timeout, refused in OpenAI's error envelope.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::Bytes;

use crate::error::ApiError;
use crate::upstream::Joined;

/// After refusing a body as too large, the 413 goes out at once while up to this many more
/// bytes of the body are read and thrown away in the background (for at most [`DRAIN_TIME`]):
/// most clients write their whole body before reading the answer, and closing a connection
/// with unread bytes resets it, so they would see a broken pipe instead of the 413 (nginx's
/// lingering close does the same).
const DRAIN_BYTES: u64 = 32 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads a request's body: at most `limit` bytes (a 413 past that), within `timeout` (a 408).
pub async fn read_body(body: Body, limit: usize, timeout: Duration, headers: &HeaderMap) -> Result<Bytes, ApiError> {
    tokio::time::timeout(timeout, read_limited(body, limit, headers)).await.map_err(|_| ApiError::BodyTimeout)?
}

async fn read_limited(mut body: Body, limit: usize, headers: &HeaderMap) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        if n - limit as u64 <= DRAIN_BYTES {
            tokio::spawn(drain(body, n));
        }
        return Err(ApiError::TooLarge { limit });
    }
    // Usually the body is one frame: handed on as it is, without a copy.
    let mut joined = Joined::new(declared.map(|n| n as usize));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ApiError::InvalidJson("The request body could not be read.".into()))?;
        let Ok(data) = frame.into_data() else { continue };
        if joined.len() + data.len() > limit {
            tokio::spawn(drain(body, DRAIN_BYTES));
            return Err(ApiError::TooLarge { limit });
        }
        joined.push(data);
    }
    Ok(joined.into_bytes())
}

/// Reads and discards up to `at_most` bytes of `body`, for at most [`DRAIN_TIME`].
async fn drain(mut body: Body, at_most: u64) {
    use http_body_util::BodyExt;
    let discard = async {
        let mut read = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len() as u64);
            if read >= at_most {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
}
