//! The built-in `mock` provider: answers in-process like OpenAI, deterministically, with real
//! `usage` counted by the same tokenizer tollgate meters with. It lets a newcomer send a first
//! request and see its cost with no network and no API key.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::response::{SendError, UpstreamResponse};
use crate::policy::tokens::{self, Encoding, PromptKind};

/// Answers a request the way OpenAI's API would.
pub async fn respond(path: &str, body: Bytes, idle_timeout: Duration) -> Result<UpstreamResponse, SendError> {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = request.get("model").and_then(Value::as_str).unwrap_or("mock").to_string();
    let stream = request.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let (status, content_type, chunks) = match path {
        "/chat/completions" => chat(&request, &model, stream),
        "/completions" => completion(&request, &model, stream),
        "/embeddings" => (StatusCode::OK, "application/json", vec![embeddings(&request, &model)]),
        _ => (
            StatusCode::NOT_FOUND,
            "application/json",
            vec![json!({"error": {"message": "Unknown path", "type": "invalid_request_error", "param": null, "code": null}})
                .to_string()],
        ),
    };
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static(content_type));
    let chunks: Vec<Result<Bytes, crate::upstream::BodyError>> =
        chunks.into_iter().map(|c| Ok(Bytes::from(c))).collect();
    Ok(UpstreamResponse { status, headers, body: Box::pin(futures::stream::iter(chunks)), idle_timeout })
}

fn id_for(request: &Value) -> String {
    let digest = Sha256::digest(request.to_string().as_bytes());
    digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

fn now_s() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The mock's answer: its text, its tokens in the model's encoding, and whether it was cut
/// to the request's limit (`finish_reason: "length"`).
struct Reply {
    text: String,
    tokens: u64,
    cut: bool,
}

impl Reply {
    fn finish_reason(&self) -> &'static str {
        if self.cut {
            "length"
        } else {
            "stop"
        }
    }

    /// The text as streamed: a piece a word, each after the first with its space.
    fn pieces(&self) -> Vec<String> {
        if self.text.is_empty() {
            return Vec::new();
        }
        self.text.split(' ').enumerate().map(|(i, w)| if i == 0 { w.to_string() } else { format!(" {w}") }).collect()
    }
}

/// The deterministic reply for `model`, cut at a word boundary to at most
/// `max_completion_tokens` (or `max_tokens`) tokens of the model's encoding, as OpenAI never
/// answers with more than that.
fn reply(said: &str, request: &Value, model: &str) -> Reply {
    let said: String = said.chars().take(60).collect();
    let text = format!("This is tollgate's mock provider answering. You said: {}", said.trim());
    let max = request
        .get("max_completion_tokens")
        .or_else(|| request.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let enc = Encoding::for_model(model);
    let whole = tokens::count_text(enc, &text);
    if whole <= max {
        return Reply { text, tokens: whole, cut: false };
    }
    // The longest run of whole words that fits (a few dozen words: counted prefix by prefix).
    let mut cut = Reply { text: String::new(), tokens: 0, cut: true };
    for word in text.split(' ') {
        let longer = if cut.text.is_empty() { word.to_string() } else { format!("{} {word}", cut.text) };
        let tokens = tokens::count_text(enc, &longer);
        if tokens > max {
            break;
        }
        cut.text = longer;
        cut.tokens = tokens;
    }
    cut
}

fn last_user_text(request: &Value) -> String {
    let Some(messages) = request.get("messages").and_then(Value::as_array) else { return String::new() };
    let Some(last) = messages.iter().rev().find(|m| m.get("role").and_then(Value::as_str) == Some("user")) else {
        return String::new();
    };
    match last.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join(" ")
        }
        _ => String::new(),
    }
}

fn include_usage(request: &Value) -> bool {
    request.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false)
}

fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    })
}

fn sse(events: Vec<Value>) -> Vec<String> {
    let mut out: Vec<String> = events.into_iter().map(|e| format!("data: {e}\n\n")).collect();
    out.push("data: [DONE]\n\n".to_string());
    out
}

fn chat(request: &Value, model: &str, stream: bool) -> (StatusCode, &'static str, Vec<String>) {
    if !request.get("messages").is_some_and(Value::is_array) {
        return bad_request("'messages' is a required property", "messages");
    }
    let answer = reply(&last_user_text(request), request, model);
    let prompt = tokens::prompt_tokens(PromptKind::Chat, model, request);
    let completion = answer.tokens;
    let id = format!("chatcmpl-mock{}", id_for(request));
    let created = now_s();
    if !stream {
        let body = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text, "refusal": null},
                         "logprobs": null, "finish_reason": answer.finish_reason()}],
            "usage": usage_json(prompt, completion), "system_fingerprint": "fp_tollgate_mock"
        });
        return (StatusCode::OK, "application/json", vec![body.to_string()]);
    }
    let with_usage = include_usage(request);
    let usage_field = |v: &mut Value| {
        if with_usage {
            v["usage"] = Value::Null;
        }
    };
    let chunk = |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
               "system_fingerprint": "fp_tollgate_mock",
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": "", "refusal": null}), Value::Null)];
    for piece in answer.pieces() {
        events.push(chunk(json!({"content": piece}), Value::Null));
    }
    events.push(chunk(json!({}), json!(answer.finish_reason())));
    for e in &mut events {
        usage_field(e);
    }
    if with_usage {
        events.push(json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "system_fingerprint": "fp_tollgate_mock", "choices": [],
                           "usage": usage_json(prompt, completion)}));
    }
    (StatusCode::OK, "text/event-stream", sse(events))
}

fn completion(request: &Value, model: &str, stream: bool) -> (StatusCode, &'static str, Vec<String>) {
    let said = match request.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "),
        _ => return bad_request("'prompt' is a required property", "prompt"),
    };
    let answer = reply(&said, request, model);
    let prompt = tokens::prompt_tokens(PromptKind::Completion, model, request);
    let completion = answer.tokens;
    let id = format!("cmpl-mock{}", id_for(request));
    let created = now_s();
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion});
    if !stream {
        let body = json!({"id": id, "object": "text_completion", "created": created, "model": model,
                          "choices": [{"text": answer.text, "index": 0, "logprobs": null, "finish_reason": answer.finish_reason()}],
                          "usage": usage});
        return (StatusCode::OK, "application/json", vec![body.to_string()]);
    }
    let mut events: Vec<Value> = answer
        .pieces()
        .into_iter()
        .map(|piece| {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"text": piece, "index": 0, "logprobs": null, "finish_reason": null}]})
        })
        .collect();
    events.push(json!({"id": id, "object": "text_completion", "created": created, "model": model,
                       "choices": [{"text": "", "index": 0, "logprobs": null, "finish_reason": answer.finish_reason()}]}));
    if include_usage(request) {
        events.push(json!({"id": id, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": usage}));
    }
    (StatusCode::OK, "text/event-stream", sse(events))
}

fn embeddings(request: &Value, model: &str) -> String {
    let inputs: Vec<String> = match request.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()
        }
        Some(Value::Array(items)) => items.iter().map(|v| v.to_string()).collect(),
        _ => vec![String::new()],
    };
    let dims = request.get("dimensions").and_then(Value::as_u64).unwrap_or(256).clamp(1, 3072) as usize;
    let base64 = request.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let vector = embed(input, dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let prompt = tokens::prompt_tokens(PromptKind::Embedding, model, request);
    json!({"object": "list", "data": data, "model": model,
           "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})
    .to_string()
}

/// A unit vector derived from the text's hash: equal texts embed equally.
fn embed(text: &str, dims: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(dims);
    let mut seed = Sha256::digest(text.as_bytes());
    while out.len() < dims {
        for pair in seed.chunks(2) {
            if out.len() == dims {
                break;
            }
            out.push((f32::from(u16::from_le_bytes([pair[0], pair[1]])) / 32768.0) - 1.0);
        }
        seed = Sha256::digest(seed);
    }
    let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::EPSILON);
    out.iter().map(|x| x / norm).collect()
}

fn bad_request(message: &str, param: &str) -> (StatusCode, &'static str, Vec<String>) {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": null}});
    (StatusCode::BAD_REQUEST, "application/json", vec![body.to_string()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(request: Value, stream: bool) -> Vec<Value> {
        let (status, _, chunks) = chat(&request, "gpt-4o-mini", stream);
        assert_eq!(status, StatusCode::OK);
        chunks
            .iter()
            .map(|c| c.strip_prefix("data: ").unwrap_or(c).trim())
            .filter(|c| *c != "[DONE]")
            .map(|c| serde_json::from_str(c).unwrap())
            .collect()
    }

    #[test]
    fn max_tokens_caps_the_answer_in_tokens_and_says_length() {
        for max in [0u64, 1, 3, 5] {
            let body =
                answer(json!({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": max}), false);
            let usage = &body[0]["usage"];
            let text = body[0]["choices"][0]["message"]["content"].as_str().unwrap();
            assert!(usage["completion_tokens"].as_u64().unwrap() <= max, "max {max}: {usage}");
            assert_eq!(
                tokens::count_text(Encoding::for_model("gpt-4o-mini"), text),
                usage["completion_tokens"].as_u64().unwrap()
            );
            assert_eq!(body[0]["choices"][0]["finish_reason"], "length", "max {max}");
        }
        let whole =
            answer(json!({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 1000}), false);
        assert_eq!(whole[0]["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn a_cut_stream_reports_length_and_the_tokens_it_sent() {
        let request = json!({"messages": [{"role": "user", "content": "hello there"}], "max_completion_tokens": 4,
                             "stream_options": {"include_usage": true}});
        let events = answer(request, true);
        let text: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
        let finish: Vec<&str> = events.iter().filter_map(|e| e["choices"][0]["finish_reason"].as_str()).collect();
        let usage = &events.last().unwrap()["usage"];
        assert_eq!(finish, ["length"]);
        assert!(usage["completion_tokens"].as_u64().unwrap() <= 4);
        assert_eq!(
            tokens::count_text(Encoding::for_model("gpt-4o-mini"), &text),
            usage["completion_tokens"].as_u64().unwrap()
        );
    }
}
