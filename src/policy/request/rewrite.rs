//! The body sent upstream: the client's bytes with `model` and `stream_options` spliced.

use bytes::Bytes;
use serde_json::Value;

use super::ParsedRequest;

impl ParsedRequest {
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
