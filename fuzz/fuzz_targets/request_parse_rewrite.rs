//! Request parsing and rewriting on arbitrary client bytes: never panics; a refusal is a 4xx;
//! a body `parse` skims reads as the full reader reads it (fields, rewrite, a token bound at
//! least the walked one); an accepted body rewrites into a JSON object with the new model (and
//! the usage option for streams), which parses again to the same request.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tollgate::policy::tokens::{prompt_tokens_upper_bound, PromptKind};
use tollgate::policy::request::{parse, parse_full, Endpoint};

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    for endpoint in [Endpoint::Chat, Endpoint::Completions, Endpoint::Embeddings] {
        match parse(endpoint, &body) {
            Err(e) => assert!(tollgate::error::ApiError::from(e.clone()).status().is_client_error(), "{e:?}"),
            Ok(p) => {
                if let Some(chat) = p.plain_chat {
                    let full = parse_full(endpoint, &body).expect("a skimmed body parses in full");
                    assert_eq!(
                        (&p.model, p.stream, p.client_wants_usage, p.max_completion_tokens, p.max_tokens, p.n, p.needs),
                        (&full.model, full.stream, full.client_wants_usage, full.max_completion_tokens, full.max_tokens, full.n, full.needs)
                    );
                    assert_eq!(p.prompt.value(), full.prompt.value());
                    for model in ["gpt-4o", "gpt-3.5-turbo-0301"] {
                        assert!(chat.upper_bound(model) >= prompt_tokens_upper_bound(PromptKind::Chat, model, full.prompt.value()));
                    }
                    assert_eq!(p.rewrite(&body, "x"), full.rewrite(&body, "x"));
                }
                for upstream in [p.model.as_str(), "gpt-4o-2024-08-06", "we\"ird\\\u{2028}😀"] {
                    let out = p.rewrite(&body, upstream);
                    let v: serde_json::Value = serde_json::from_slice(&out).expect("rewrite is JSON");
                    assert_eq!(v["model"], upstream);
                    if p.stream {
                        assert_eq!(v["stream_options"]["include_usage"], true);
                    }
                    let again = parse(endpoint, &out).expect("rewritten body parses");
                    assert_eq!(
                        (again.stream, again.n, again.max_completion_tokens, again.max_tokens),
                        (p.stream, p.n, p.max_completion_tokens, p.max_tokens)
                    );
                }
            }
        }
    }
});
