//! Criterion benchmarks for the pieces on every request's path: token counting, usage
//! extraction from a stream, cost computation, key lookup, and a ledger batch.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::json;

use tollgate::auth::{hash_secret, Directory};
use tollgate::ledger::journal::{self, Journal, LineOp};
use tollgate::ledger::{Backend, KeyRow, RequestRecord, TeamRow, UsageSource};
use tollgate::metering::sse::SseParser;
use tollgate::metering::usage::{read_answer, StreamAccumulator, Usage};
use tollgate::policy::budget::BudgetSpec;
use tollgate::policy::pricing::{catalog_entry, NanoUsd};
use tollgate::policy::tokens::{count_text, prompt_tokens, prompt_tokens_upper_bound, Encoding, PromptKind};

/// A mixed English / code / JSON document of roughly `tokens` o200k tokens.
fn document(tokens: usize) -> String {
    let para = "The quick brown fox jumps over the lazy dog; fn main() { println!(\"{}\", 42); } \
                {\"key\": [1, 2, 3], \"name\": \"tollgate\"} Prices: $0.15 / 1M tokens. ";
    let per = count_text(Encoding::O200kBase, para) as usize;
    para.repeat(tokens / per + 1)
}

fn tokens(c: &mut Criterion) {
    let mut g = c.benchmark_group("tokens");
    let short = json!({"model": "gpt-4o", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France? Answer in one word."}]});
    g.bench_function("short_chat_exact", |b| b.iter(|| prompt_tokens(PromptKind::Chat, "gpt-4o", black_box(&short))));
    g.bench_function("short_chat_bound", |b| {
        b.iter(|| prompt_tokens_upper_bound(PromptKind::Chat, "gpt-4o", black_box(&short)))
    });
    let doc = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": document(128_000)}]});
    g.sample_size(10);
    g.bench_function("chat_128k_exact", |b| b.iter(|| prompt_tokens(PromptKind::Chat, "gpt-4o", black_box(&doc))));
    g.bench_function("chat_128k_bound", |b| {
        b.iter(|| prompt_tokens_upper_bound(PromptKind::Chat, "gpt-4o", black_box(&doc)))
    });
    // Each hostile input at 256 KiB and at 1 MiB: linear time shows as the same bytes/s.
    let hostile: String = "a".repeat(1 << 20);
    g.throughput(Throughput::Bytes(1 << 18));
    g.bench_function("one_letter_256kib", |b| {
        b.iter(|| count_text(Encoding::O200kBase, black_box(&hostile[..1 << 18])))
    });
    g.throughput(Throughput::Bytes(hostile.len() as u64));
    g.bench_function("one_letter_1mib", |b| b.iter(|| count_text(Encoding::O200kBase, black_box(&hostile))));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let base62: String = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[(x % 62) as usize] as char
        })
        .collect();
    g.throughput(Throughput::Bytes(1 << 18));
    g.bench_function("base62_no_spaces_256kib", |b| {
        b.iter(|| count_text(Encoding::O200kBase, black_box(&base62[..1 << 18])))
    });
    g.throughput(Throughput::Bytes(base62.len() as u64));
    g.bench_function("base62_no_spaces_1mib", |b| b.iter(|| count_text(Encoding::O200kBase, black_box(&base62))));
    g.finish();
}

fn stream_usage(c: &mut Criterion) {
    let mut stream = String::new();
    for i in 0..200 {
        stream.push_str(&format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"word{i} \"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
        ));
    }
    stream.push_str("data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":200,\"total_tokens\":212}}\n\ndata: [DONE]\n\n");
    let bytes = stream.into_bytes();
    let mut g = c.benchmark_group("sse");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("parse_and_extract_usage_200_chunks", |b| {
        b.iter(|| {
            let mut parser = SseParser::new(1 << 24);
            let mut acc = StreamAccumulator::new(1 << 22);
            for chunk in bytes.chunks(1460) {
                for event in parser.push(chunk).unwrap_or_default() {
                    if let Some(d) = &event.data {
                        acc.observe(d);
                    }
                }
            }
            black_box(acc.usage())
        })
    });
    // As the proxy reads a stream: chunks that cannot report usage are held unread, and let
    // go once the last chunk reports usage.
    g.bench_function("hold_and_extract_usage_200_chunks", |b| {
        b.iter(|| {
            let mut parser = SseParser::new(1 << 24);
            let mut acc = StreamAccumulator::new(1 << 22);
            for chunk in bytes.chunks(1460) {
                for event in parser.push(chunk).unwrap_or_default() {
                    if let Some(d) = event.data {
                        acc.observe_later(d);
                    }
                }
            }
            acc.finish();
            black_box(acc.usage())
        })
    });
    g.finish();
}

/// A non-streamed chat answer as OpenAI writes it, read for its usage: by the skim, and — the
/// same body with its usage key written with an escape, which the skim leaves alone — by the
/// typed reader the skim falls back to.
fn answer_usage(c: &mut Criterion) {
    let answer = concat!(
        r#"{"id":"chatcmpl-abc","object":"chat.completion","created":1733000000,"model":"gpt-4o-mini-2024-07-18","#,
        r#""choices":[{"index":0,"message":{"role":"assistant","content":"Toll bridges fund their own upkeep, "#,
        r#"one crossing at a time.","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"#,
        r#""usage":{"prompt_tokens":27,"completion_tokens":12,"total_tokens":39,"#,
        r#""prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"#,
        r#""completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"#,
        r#""service_tier":"default","system_fingerprint":"fp_0ba0d124f1"}"#
    );
    let escaped = answer.replace(r#""usage":"#, r#""us\u0061ge":"#);
    let mut g = c.benchmark_group("answer");
    g.throughput(Throughput::Bytes(answer.len() as u64));
    g.bench_function("usage_skimmed", |b| b.iter(|| read_answer(black_box(answer.as_bytes()))));
    g.bench_function("usage_typed_reader", |b| b.iter(|| read_answer(black_box(escaped.as_bytes()))));
    g.finish();
}

fn cost(c: &mut Criterion) {
    let price = catalog_entry("gpt-4o").unwrap().price;
    let usage = Usage { input_tokens: 1234, cached_input_tokens: 200, output_tokens: 567 };
    c.bench_function("cost/gpt4o", |b| b.iter(|| price.cost(black_box(&usage))));
}

fn key_lookup(c: &mut Criterion) {
    let dir = Directory::default();
    let teams = vec![TeamRow { name: "t".into(), budget: BudgetSpec::default(), created_ms: 0 }];
    let mut keys = Vec::new();
    let mut secret = String::new();
    for i in 0..10_000 {
        let s = format!("tg-{i:040}");
        keys.push(KeyRow {
            id: format!("key_{i}"),
            team: "t".into(),
            name: "k".into(),
            key_hash: hash_secret(&s),
            prefix: s[..7].to_string(),
            budget: BudgetSpec::default(),
            created_ms: 0,
            revoked_ms: None,
        });
        secret = s;
    }
    dir.install(1, teams, keys);
    c.bench_function("auth/lookup_among_10k_keys", |b| b.iter(|| dir.authenticate(black_box(&secret)).is_some()));
}

/// The `n`th record of a typical non-streamed request.
fn bench_record(n: u64) -> RequestRecord {
    RequestRecord {
        request_id: format!("req_{n:020}"),
        time_ms: 1_700_000_000_000 + n as i64,
        key_id: "key_bench".into(),
        team: "bench".into(),
        endpoint: "chat.completions",
        model: "gpt-4o".into(),
        served_model: "gpt-4o-mini".into(),
        usage: Usage { input_tokens: 100, cached_input_tokens: 0, output_tokens: 20 },
        cost: NanoUsd(27_000),
        usage_source: UsageSource::Reported,
        status: 200,
        latency_ms: 12,
        stream: false,
    }
}

fn ledger_batch(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let backend = rt.block_on(Backend::connect(&url)).unwrap();
    let mut n: u64 = 0;
    let mut g = c.benchmark_group("ledger");
    g.throughput(Throughput::Elements(1024));
    g.sample_size(20);
    g.bench_function("sqlite_batch_1024_records", |b| {
        b.iter_batched(
            || {
                (0..1024)
                    .map(|_| {
                        n += 1;
                        bench_record(n)
                    })
                    .collect::<Vec<_>>()
            },
            |records| rt.block_on(backend.insert_records(&records)).unwrap(),
            BatchSize::LargeInput,
        )
    });
    // The request path's only ledger cost: one journal append (encode the line, copy it into
    // the mapped segment) per record.
    let journal_dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(journal_dir.path(), journal::SEGMENT_BYTES).unwrap();
    let record = bench_record(1);
    g.throughput(Throughput::Elements(1));
    g.sample_size(100);
    g.bench_function("journal_append", |b| {
        b.iter(|| journal.append_record(LineOp::Write, black_box(&record)).unwrap().commit())
    });
    g.finish();
}

criterion_group!(benches, tokens, stream_usage, answer_usage, cost, key_lookup, ledger_batch);
criterion_main!(benches);
