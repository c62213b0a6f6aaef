//! Request parsing and rewriting on arbitrary client bytes: never panics; a refusal is a 4xx;
//! an accepted body rewrites into a JSON object with the new model (and the usage option for
//! streams), which parses again to the same request.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tollgate::request::{parse, Endpoint};

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    for endpoint in [Endpoint::Chat, Endpoint::Completions, Endpoint::Embeddings] {
        match parse(endpoint, data) {
            Err(e) => assert!(e.status().is_client_error(), "{e:?}"),
            Ok(p) => {
                for upstream in [p.model.as_str(), "gpt-4o-2024-08-06", "we\"ird\\\u{2028}😀"] {
                    let out = p.rewrite(&body, upstream);
                    let v: serde_json::Value = serde_json::from_slice(&out).expect("rewrite is JSON");
                    assert_eq!(v["model"], upstream);
                    if p.stream {
                        assert_eq!(v["stream_options"]["include_usage"], true);
                    }
                    let again = parse(endpoint, &out).expect("rewritten body parses");
                    assert_eq!((again.stream, again.n, again.max_output), (p.stream, p.n, p.max_output));
                }
            }
        }
    }
});
