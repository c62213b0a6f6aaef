//! Local token counting: OpenAI's tokenizers plus OpenAI's published prompt accounting.
//!
//! Two uses: the reservation taken before an upstream call (prompt tokens × input price), and the
//! estimate recorded when the upstream reports no `usage`. Upstream `usage` is always the billing
//! truth; everything here is an estimate of it.
//!
//! The chat rule is the one in `shared/oracle/count_tokens.py` (the OpenAI cookbook's: 3 tokens per
//! message, every string field encoded, +1 per `name`, +3 priming the reply; tool definitions and
//! image tiles by the published constants), reproduced exactly, with these deliberate differences,
//! all of which only ever count *more* than the oracle, never less:
//! - An image whose size cannot be read (an `http(s)` URL, a truncated or corrupt `data:` URL, a
//!   zero dimension) is charged its model's worst case (8 tiles, or the full patch budget) where the
//!   oracle leaves it uncounted: a reservation must not be under-estimated by a caller who sends
//!   URLs instead of bytes. With `detail: "low"` the tile rule's size-independent base applies.
//! - A model without a published image rule (`gpt-4`, `gpt-5`, an unknown model behind a
//!   compatible provider) is charged gpt-4o's tile rule (85 + 170 per tile) instead of nothing.
//! - `ft:` fine-tunes get their base model's tool and image constants (the oracle strips `ft:`
//!   only when choosing the encoding).
//!
//! Where the oracle would crash on a malformed body (a wrong JSON type), this module skips the
//! offending value instead; such bodies are rejected by the upstream anyway.
//!
//! Two known limits, both inside nested tool schemas (themselves the oracle's approximation) and
//! both worth a token or two at most: the oracle serializes nested schemas in their source key
//! order, which `serde_json::Value` keeps only with serde_json's `preserve_order` feature (sorted
//! otherwise); and serde_json parses a float with 17 significant digits to within one ulp unless
//! its `float_roundtrip` feature is on, which can change the float's printed digits.
//!
//! Cost: [`prompt_tokens`] runs the BPE over every counted string, linear in the body's size
//! (`bpe-openai`'s encoder is linear even on one-letter megabytes, where tiktoken is quadratic).
//! [`prompt_tokens_upper_bound`] walks the same fields without the BPE, for the common case where a
//! budget is far from its limit.

use std::borrow::Cow;

use bpe_openai::Tokenizer;
use serde_json::{Map, Value};

/// A BPE vocabulary of OpenAI's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// gpt-4o, gpt-4.1, gpt-5, the o-series, and any model not known to be older.
    O200kBase,
    /// gpt-4, gpt-4-turbo, gpt-3.5-turbo, the `text-embedding-*` models, davinci-002/babbage-002.
    Cl100kBase,
}

impl Encoding {
    /// The encoding `model` tokenizes with, by tiktoken 0.14's model table: `o200k_base` for
    /// gpt-4o / gpt-4.1 / the o-series and unknown (newer) models, `cl100k_base` for gpt-4,
    /// gpt-4-turbo, gpt-3.5*, `text-embedding-*`. A `provider/` prefix is ignored and
    /// `ft:BASE:org::id` counts as `BASE`, as the oracle does.
    pub fn for_model(model: &str) -> Encoding {
        let m = base_model(model);
        let cl100k = m == "gpt-4"
            || m.starts_with("gpt-4-")
            || m.starts_with("gpt-3.5")
            || m == "gpt-35-turbo"
            || m.starts_with("gpt-35-turbo-")
            || m.starts_with("text-embedding-")
            || m == "davinci-002"
            || m == "babbage-002";
        if cl100k {
            Encoding::Cl100kBase
        } else {
            Encoding::O200kBase
        }
    }

    fn tokenizer(self) -> &'static Tokenizer {
        // Both vocabularies are compiled into the binary by bpe-openai's build script (nothing is
        // downloaded); the first call deserializes one, later calls are free.
        match self {
            Encoding::O200kBase => bpe_openai::o200k_base(),
            Encoding::Cl100kBase => bpe_openai::cl100k_base(),
        }
    }
}

/// Which request body [`prompt_tokens`] is reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptKind {
    /// `/v1/chat/completions`: `messages`, `tools` / `functions`.
    Chat,
    /// `/v1/completions`: `prompt`.
    Completion,
    /// `/v1/embeddings`: `input`.
    Embedding,
}

/// The number of tokens (not bytes, not characters) `text` encodes to with `enc`.
///
/// Text that looks like a special token (`<|endoftext|>`) is counted as ordinary text, as
/// tiktoken's `encode_ordinary` and the oracle do. The first call for each encoding loads its
/// vocabulary (about 100 ms in a release build); call `count_text(enc, "")` at start-up to keep
/// that off the first request's path.
pub fn count_text(enc: Encoding, text: &str) -> u64 {
    to_u64(enc.tokenizer().count(text))
}

/// The prompt tokens OpenAI bills for a request `body` of this `kind` sent for `model`.
///
/// `model` (the upstream model name) decides the encoding and the chat constants; `body["model"]`
/// is not read. Chat: the oracle's rule (see the module docs for where unknown images and unknown
/// models deliberately count more). Completion: `prompt`; embedding: `input`; each may be a
/// string, an array of strings, a token array or an array of token arrays, a token array counting
/// its length. Never panics; a value of the wrong JSON type is skipped. Linear in the body's size.
pub fn prompt_tokens(kind: PromptKind, model: &str, body: &Value) -> u64 {
    let rules = ModelRules::for_model(model);
    let exact = Exact(rules.encoding.tokenizer());
    count_body(&exact, &rules, kind, body)
}

/// An upper bound on [`prompt_tokens`] for the same arguments, in tokens, computed without the BPE:
/// linear in the body's bytes and far cheaper than the exact count.
///
/// Why it bounds: every BPE token covers at least one byte, so a string never encodes to more
/// tokens than its UTF-8 length; the fixed per-message and per-tool overheads are added as in the
/// exact count; every image is charged its model's worst case (which is what the exact count
/// charges when the size is unknown). Use it to skip exact counting when a budget is far from its
/// limit; it can be several times the exact count (a byte of English is about 0.25 tokens).
pub fn prompt_tokens_upper_bound(kind: PromptKind, model: &str, body: &Value) -> u64 {
    let rules = ModelRules::for_model(model);
    count_body(&ByteBound, &rules, kind, body)
}

/// A chat body whose messages hold only string fields (no content parts, tool calls or tool
/// definitions), tallied as the request parser passed it: what [`prompt_tokens_upper_bound`]
/// needs of such a body, without a `Value` to walk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlainChat {
    /// Messages in `messages`.
    pub messages: u64,
    /// Their `name` fields.
    pub names: u64,
    /// Bytes of all their string fields as written in the JSON, escapes included: at least
    /// the UTF-8 length of the text, so at least its tokens.
    pub text_bytes: u64,
}

impl PlainChat {
    /// An upper bound on the prompt tokens of the body for `model`: the byte bound's terms
    /// (every string at most a token a byte, the per-message and per-name constants, the
    /// reply's priming), equal to [`prompt_tokens_upper_bound`] when no string holds escapes.
    pub fn upper_bound(&self, model: &str) -> u64 {
        let (per_message, per_name) = message_constants(base_model(model));
        let mut n = Tally::default();
        n.add(self.text_bytes);
        n.add_signed(per_message.saturating_mul(i64::try_from(self.messages).unwrap_or(i64::MAX)));
        n.add_signed(per_name.saturating_mul(i64::try_from(self.names).unwrap_or(i64::MAX)));
        n.add(3);
        n.total()
    }
}

// ------------------------------------------------------------------------------------------------
// Measures: the exact count and the byte bound share one walk over the body, so that the bound
// holds term by term: each string measured by the bound is at least its exact token count, and
// every constant is added identically by both.

trait Measure {
    /// Tokens in `s`.
    fn text(&self, s: &str) -> u64;
    /// Tokens in the concatenation of `parts` (BPE pieces can straddle the joins).
    fn joined(&self, parts: &[&str]) -> u64;
    /// Tokens in `v` dumped as Python's `json.dumps(v, separators=(",", ":"))` does.
    fn json(&self, v: &Value) -> u64;
    /// An image's pixel size, if this measure reads image headers; `None` means "charge the worst
    /// case".
    fn image_size(&self, url: &str) -> Option<(u64, u64)>;
}

struct Exact(&'static Tokenizer);

impl Measure for Exact {
    fn text(&self, s: &str) -> u64 {
        to_u64(self.0.count(s))
    }

    fn joined(&self, parts: &[&str]) -> u64 {
        self.text(&parts.concat())
    }

    fn json(&self, v: &Value) -> u64 {
        let mut out = String::new();
        write_py_json(v, &mut out);
        self.text(&out)
    }

    fn image_size(&self, url: &str) -> Option<(u64, u64)> {
        image_size_from_data_url(url)
    }
}

/// One token per byte at most: the bound behind [`prompt_tokens_upper_bound`].
struct ByteBound;

impl Measure for ByteBound {
    fn text(&self, s: &str) -> u64 {
        to_u64(s.len())
    }

    fn joined(&self, parts: &[&str]) -> u64 {
        parts.iter().map(|p| to_u64(p.len())).sum()
    }

    fn json(&self, v: &Value) -> u64 {
        let mut len = JsonLen(0);
        write_py_json(v, &mut len);
        len.0
    }

    fn image_size(&self, _url: &str) -> Option<(u64, u64)> {
        // Decoding base64 would cost as much as the BPE saves; the worst case bounds every size.
        None
    }
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A running total that may dip below zero mid-way (the tool rule has a negative constant) and
/// saturates instead of overflowing.
#[derive(Default)]
struct Tally(i64);

impl Tally {
    fn add(&mut self, n: u64) {
        self.0 = self.0.saturating_add(i64::try_from(n).unwrap_or(i64::MAX));
    }

    fn add_signed(&mut self, n: i64) {
        self.0 = self.0.saturating_add(n);
    }

    fn total(&self) -> u64 {
        u64::try_from(self.0).unwrap_or(0)
    }
}

// ------------------------------------------------------------------------------------------------
// Per-model constants

/// The model's name without a `provider/` prefix, and `ft:BASE:org::id` reduced to `BASE`.
fn base_model(model: &str) -> &str {
    let m = model.rsplit('/').next().unwrap_or(model);
    match m.strip_prefix("ft:") {
        Some(rest) => rest.split(':').next().unwrap_or(rest),
        None => m,
    }
}

/// The oracle's tool-definition constants (OpenAI cookbook, "counting tokens for tools").
struct ToolConstants {
    func_init: i64,
    prop_init: i64,
    prop_key: i64,
    enum_init: i64,
    enum_item: i64,
    func_end: i64,
}

const TOOLS_4O: ToolConstants =
    ToolConstants { func_init: 7, prop_init: 3, prop_key: 3, enum_init: -3, enum_item: 3, func_end: 12 };

/// gpt-3.5-turbo and gpt-4 spend 3 more tokens opening each function.
const TOOLS_LEGACY: ToolConstants = ToolConstants { func_init: 10, ..TOOLS_4O };

#[derive(Clone, Copy, Debug, PartialEq)]
enum ImageRule {
    /// `detail: low` costs `base`; otherwise the image is fit into 2048×2048, its shortest side
    /// scaled down to 768, and each 512-pixel tile costs `per_tile` more.
    Tiles { base: u64, per_tile: u64 },
    /// 32-pixel patches, at most 1536, times a per-model multiplier.
    Patches { multiplier: f64 },
}

/// gpt-4o's rule, also the fallback for models without a published one.
const TILES_4O: ImageRule = ImageRule::Tiles { base: 85, per_tile: 170 };

/// The most tiles an image can cost: after scaling, the longest side is at most 2048 px (4 tiles)
/// and the shortest at most 768 px (2 tiles).
const MAX_TILES: u64 = 8;
const MAX_PATCHES: u64 = 1536;

impl ImageRule {
    fn for_base_model(m: &str) -> ImageRule {
        // Order matters: the longest prefix of a family first, as in the oracle's table.
        const PATCHES: [(&str, f64); 3] = [("gpt-4.1-mini", 1.62), ("gpt-4.1-nano", 2.46), ("o4-mini", 1.72)];
        const TILES: [(&str, u64, u64); 8] = [
            ("gpt-4o-mini", 2833, 5667),
            ("gpt-4o", 85, 170),
            ("chatgpt-4o", 85, 170),
            ("gpt-4.1", 85, 170),
            ("gpt-4-turbo", 85, 170),
            ("gpt-4-vision", 85, 170),
            ("o1", 75, 150),
            ("o3", 75, 150),
        ];
        if let Some(&(_, multiplier)) = PATCHES.iter().find(|(p, _)| m.starts_with(p)) {
            return ImageRule::Patches { multiplier };
        }
        match TILES.iter().find(|(p, _, _)| m.starts_with(p)) {
            Some(&(_, base, per_tile)) => ImageRule::Tiles { base, per_tile },
            // No published rule: gpt-4o's rather than nothing (see the module docs).
            None => TILES_4O,
        }
    }

    /// Tokens for one image of `size` (width, height in pixels; `None` if unknown).
    fn tokens(self, size: Option<(u64, u64)>, low_detail: bool) -> u64 {
        // A zero side is a corrupt header (the oracle divides by it); treat it as unknown.
        let size = size.filter(|&(w, h)| w > 0 && h > 0);
        match self {
            ImageRule::Tiles { base, per_tile } => {
                if low_detail {
                    return base;
                }
                let tiles = size.map_or(MAX_TILES, |(w, h)| tile_count(w, h));
                base + tiles * per_tile
            }
            ImageRule::Patches { multiplier } => {
                let patches = size.map_or(MAX_PATCHES, |(w, h)| patch_count(w, h));
                // Float arithmetic exactly as the oracle's `math.ceil(patches * mult)`.
                ceil_to_u64(patches as f64 * multiplier)
            }
        }
    }
}

/// 512-pixel tiles after fitting into 2048×2048 and then the shortest side into 768 (never
/// upscaling); the same float operations as the oracle, so rounding agrees.
fn tile_count(w: u64, h: u64) -> u64 {
    let (wf, hf) = (w as f64, h as f64);
    let s = 1f64.min(2048.0 / wf.max(hf)).min(768.0 / wf.min(hf));
    let sw = floor_to_u64(wf * s).max(1);
    let sh = floor_to_u64(hf * s).max(1);
    sw.div_ceil(512) * sh.div_ceil(512)
}

/// 32-pixel patches, shrunk to fit 1536 as in OpenAI's docs; the oracle's float operations. The
/// ratio `1536·32² / (w·h)` is rounded once, as Python's int division is, while `w·h < 2^53`.
fn patch_count(w: u64, h: u64) -> u64 {
    let patches = w.div_ceil(32).saturating_mul(h.div_ceil(32));
    if patches <= MAX_PATCHES {
        return patches;
    }
    let (wf, hf) = (w as f64, h as f64);
    let mut r = (f64::from(32 * 32 * 1536) / w.saturating_mul(h) as f64).sqrt();
    let (a, b) = (wf * r / 32.0, hf * r / 32.0);
    r *= (a.floor() / a).min(b.floor() / b);
    let sw = floor_to_u64(wf * r);
    let sh = floor_to_u64(hf * r);
    MAX_PATCHES.min(sw.div_ceil(32) * sh.div_ceil(32))
}

/// `x` rounded down, for non-negative finite `x` below 2^64 (saturating `as` is the intent).
fn floor_to_u64(x: f64) -> u64 {
    x.floor() as u64
}

fn ceil_to_u64(x: f64) -> u64 {
    x.ceil() as u64
}

/// Tokens framing each message and each `name`, for a base model name. gpt-3.5-turbo-0301
/// framed messages differently: 4 per message, and a name replaced the role (-1).
fn message_constants(base: &str) -> (i64, i64) {
    if base.ends_with("gpt-3.5-turbo-0301") {
        (4, -1)
    } else {
        (3, 1)
    }
}

/// Everything about `model` that the counting rules depend on.
struct ModelRules {
    encoding: Encoding,
    per_message: i64,
    per_name: i64,
    tools: &'static ToolConstants,
    image: ImageRule,
}

impl ModelRules {
    fn for_model(model: &str) -> ModelRules {
        let m = base_model(model);
        let (per_message, per_name) = message_constants(m);
        let legacy = m.starts_with("gpt-3.5") || m == "gpt-4" || m.starts_with("gpt-4-");
        ModelRules {
            encoding: Encoding::for_model(model),
            per_message,
            per_name,
            tools: if legacy { &TOOLS_LEGACY } else { &TOOLS_4O },
            image: ImageRule::for_base_model(m),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Bodies

fn count_body<M: Measure>(m: &M, rules: &ModelRules, kind: PromptKind, body: &Value) -> u64 {
    let Some(body) = body.as_object() else {
        return 0;
    };
    match kind {
        PromptKind::Chat => chat_tokens(m, rules, body),
        PromptKind::Completion => input_tokens(m, body.get("prompt")),
        PromptKind::Embedding => input_tokens(m, body.get("input")),
    }
}

/// `prompt` / `input`: a string, strings, a token array, or token arrays.
fn input_tokens<M: Measure>(m: &M, input: Option<&Value>) -> u64 {
    match input {
        Some(Value::String(s)) => m.text(s),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => m.text(s),
                Value::Number(_) => 1,
                Value::Array(ids) => to_u64(ids.iter().filter(|id| id.is_number()).count()),
                _ => 0,
            })
            .fold(0u64, u64::saturating_add),
        _ => 0,
    }
}

fn chat_tokens<M: Measure>(m: &M, rules: &ModelRules, body: &Map<String, Value>) -> u64 {
    let mut n = Tally::default();
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for message in messages.iter().filter_map(Value::as_object) {
            message_tokens(m, rules, message, &mut n);
        }
    }
    n.add(3); // every reply is primed with <|start|>assistant<|message|>
    tools_tokens(m, rules, body, &mut n);
    n.total()
}

fn message_tokens<M: Measure>(m: &M, rules: &ModelRules, msg: &Map<String, Value>, n: &mut Tally) {
    n.add_signed(rules.per_message);
    for (key, value) in msg {
        match value {
            // Every string field is encoded, whatever its key (role, content, name, tool_call_id,
            // refusal, …); the keys themselves are part of the per-message constant.
            Value::String(s) => {
                n.add(m.text(s));
                if key == "name" {
                    n.add_signed(rules.per_name);
                }
            }
            Value::Array(parts) if key == "content" => {
                for part in parts.iter().filter_map(Value::as_object) {
                    content_part_tokens(m, rules, part, n);
                }
            }
            // Not in the cookbook: the oracle counts a call's function name and arguments.
            Value::Array(calls) if key == "tool_calls" => {
                for call in calls.iter().filter_map(Value::as_object) {
                    if let Some(Value::Object(function)) = call.get("function") {
                        function_call_tokens(m, function, n);
                    }
                }
            }
            Value::Object(function) if key == "function_call" => function_call_tokens(m, function, n),
            _ => {}
        }
    }
}

fn function_call_tokens<M: Measure>(m: &M, function: &Map<String, Value>, n: &mut Tally) {
    for field in ["name", "arguments"] {
        if let Some(Value::String(s)) = function.get(field) {
            n.add(m.text(s));
        }
    }
}

fn content_part_tokens<M: Measure>(m: &M, rules: &ModelRules, part: &Map<String, Value>, n: &mut Tally) {
    match part.get("type").and_then(Value::as_str) {
        Some("text") => {
            if let Some(Value::String(s)) = part.get("text") {
                n.add(m.text(s));
            }
        }
        Some("image_url") => {
            let (url, detail) = match part.get("image_url") {
                Some(Value::Object(image)) => match image.get("url") {
                    None => ("", image.get("detail")),
                    Some(Value::String(url)) => (url.as_str(), image.get("detail")),
                    Some(_) => return,
                },
                Some(Value::String(url)) => (url.as_str(), None),
                _ => return,
            };
            let low_detail = detail.and_then(Value::as_str) == Some("low");
            // Only the tile rule's high/auto detail depends on the size; skip decoding otherwise.
            let needs_size = !(low_detail && matches!(rules.image, ImageRule::Tiles { .. }));
            let size = if needs_size { m.image_size(url) } else { None };
            n.add(rules.image.tokens(size, low_detail));
        }
        // Other part types (input_audio, file, …) have no published rule; the oracle skips them.
        _ => {}
    }
}

/// The tool definitions' tokens: the cookbook's rule for `tools` (or legacy `functions`).
fn tools_tokens<M: Measure>(m: &M, rules: &ModelRules, body: &Map<String, Value>, n: &mut Tally) {
    // As the oracle's `body.get("tools") or [{"function": f} for f in body.get("functions", [])]`.
    let functions: Vec<&Map<String, Value>> = match body.get("tools") {
        Some(Value::Array(tools)) if !tools.is_empty() => tools
            .iter()
            .filter_map(Value::as_object)
            .filter_map(|tool| match tool.get("function") {
                None => Some(tool), // a legacy entry given directly
                Some(Value::Object(function)) => Some(function),
                Some(_) => None,
            })
            .collect(),
        _ => match body.get("functions") {
            Some(Value::Array(functions)) if !functions.is_empty() => {
                functions.iter().filter_map(Value::as_object).collect()
            }
            _ => return,
        },
    };
    let c = rules.tools;
    for f in functions {
        n.add_signed(c.func_init);
        let name = f.get("name").map_or(Cow::Borrowed(""), py_str);
        let description = match f.get("description") {
            Some(Value::String(d)) => d.trim_end_matches(py_isspace),
            _ => "",
        };
        let description = description.strip_suffix('.').unwrap_or(description);
        n.add(m.joined(&[&name, ":", description]));
        let properties = match f.get("parameters") {
            Some(Value::Object(parameters)) => match parameters.get("properties") {
                Some(Value::Object(properties)) if !properties.is_empty() => properties,
                _ => continue,
            },
            _ => continue,
        };
        n.add_signed(c.prop_init);
        for (key, p) in properties {
            let Some(p) = p.as_object() else { continue };
            n.add_signed(c.prop_key);
            if let Some(values) = p.get("enum") {
                enum_tokens(m, c, values, n);
            }
            let description = match p.get("description") {
                Some(Value::String(d)) => d.strip_suffix('.').unwrap_or(d),
                _ => "",
            };
            let ty = match p.get("type") {
                None => Cow::Borrowed(""),
                Some(Value::Array(types)) => Cow::Owned(types.iter().map(py_str).collect::<Vec<_>>().join("|")),
                Some(ty) => py_str(ty),
            };
            n.add(m.joined(&[key, ":", &ty, ":", description]));
            // The oracle's approximation beyond the cookbook: nested schemas count as their JSON.
            for nested in ["properties", "items"] {
                if let Some(v) = p.get(nested) {
                    n.add(m.json(v));
                }
            }
        }
    }
    n.add_signed(c.func_end);
}

fn enum_tokens<M: Measure>(m: &M, c: &ToolConstants, values: &Value, n: &mut Tally) {
    // Python iterates whatever it is given: a list's items, a string's characters, a dict's keys.
    match values {
        Value::Array(items) => {
            n.add_signed(c.enum_init);
            for item in items {
                n.add_signed(c.enum_item);
                n.add(m.text(&py_str(item)));
            }
        }
        Value::String(s) => {
            n.add_signed(c.enum_init);
            let mut buf = [0u8; 4];
            for ch in s.chars() {
                n.add_signed(c.enum_item);
                n.add(m.text(ch.encode_utf8(&mut buf)));
            }
        }
        Value::Object(keys) => {
            n.add_signed(c.enum_init);
            for key in keys.keys() {
                n.add_signed(c.enum_item);
                n.add(m.text(key));
            }
        }
        _ => {}
    }
}

// ------------------------------------------------------------------------------------------------
// Python's spelling of JSON values (the oracle formats them with `str()` and `json.dumps`)

/// Python's `str()` of a JSON scalar as `json.load` would have produced it. Arrays and objects
/// (Python would print its repr, e.g. `{'a': 1}`) are approximated by their JSON.
fn py_str(v: &Value) -> Cow<'_, str> {
    match v {
        Value::String(s) => Cow::Borrowed(s),
        Value::Null => Cow::Borrowed("None"),
        Value::Bool(true) => Cow::Borrowed("True"),
        Value::Bool(false) => Cow::Borrowed("False"),
        Value::Number(num) => Cow::Owned(py_number(num)),
        Value::Array(_) | Value::Object(_) => {
            let mut out = String::new();
            write_py_json(v, &mut out);
            Cow::Owned(out)
        }
    }
}

fn py_number(num: &serde_json::Number) -> String {
    if let Some(i) = num.as_i64() {
        i.to_string()
    } else if let Some(u) = num.as_u64() {
        u.to_string()
    } else {
        // Integers beyond 64 bits arrive here as floats (Python would keep every digit).
        py_float_repr(num.as_f64().unwrap_or(0.0))
    }
}

/// Python's `repr(float)`: the shortest round-trip digits (as Rust's), in positional notation for
/// decimal exponents -4..=15 and scientific (`1e-05`, `1.5e+16`) outside it.
fn py_float_repr(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.to_string();
    }
    if !x.is_finite() {
        // Not reachable from parsed JSON; Python spells them like this.
        return if x.is_nan() {
            "nan"
        } else if x > 0.0 {
            "inf"
        } else {
            "-inf"
        }
        .to_string();
    }
    let sci = format!("{:e}", x.abs());
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return sci;
    };
    let exp: i64 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if x < 0.0 { "-" } else { "" };
    let point = exp + 1; // digits[..point] are the integer part
    let n_digits = i64::try_from(digits.len()).unwrap_or(i64::MAX);
    if !(-3..=16).contains(&point) {
        let (first, rest) = digits.split_at(1.min(digits.len()));
        let frac = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{exp_sign}{:02}", exp.abs())
    } else if point <= 0 {
        let zeros = "0".repeat(usize::try_from(-point).unwrap_or(0));
        format!("{sign}0.{zeros}{digits}")
    } else if point < n_digits {
        let (int, frac) = digits.split_at(usize::try_from(point).unwrap_or(0));
        format!("{sign}{int}.{frac}")
    } else {
        let zeros = "0".repeat(usize::try_from(point - n_digits).unwrap_or(0));
        format!("{sign}{digits}{zeros}.0")
    }
}

/// Python's `str.isspace()`: Unicode's White_Space plus the ASCII separators U+001C..U+001F.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Where [`write_py_json`] writes: a `String` for the exact count, a byte counter for the bound.
trait JsonSink {
    fn push_str(&mut self, s: &str);
}

impl JsonSink for String {
    fn push_str(&mut self, s: &str) {
        String::push_str(self, s);
    }
}

struct JsonLen(u64);

impl JsonSink for JsonLen {
    fn push_str(&mut self, s: &str) {
        self.0 = self.0.saturating_add(to_u64(s.len()));
    }
}

/// Writes `v` as Python's `json.dumps(v, separators=(",", ":"))`: ASCII only (`\uXXXX`, surrogate
/// pairs beyond the BMP), floats as `repr`. Keys come in `serde_json::Map` order: insertion order
/// with serde_json's `preserve_order` feature, sorted otherwise (then a nested schema written with
/// unsorted keys may count a token or two differently from the oracle). Iterative, so a deeply
/// nested value cannot overflow the stack.
fn write_py_json<S: JsonSink>(v: &Value, out: &mut S) {
    enum Frame<'a> {
        Array(std::slice::Iter<'a, Value>, bool),
        Object(serde_json::map::Iter<'a>, bool),
    }
    fn open<'a, S: JsonSink>(v: &'a Value, out: &mut S, stack: &mut Vec<Frame<'a>>) {
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(num) => out.push_str(&py_number(num)),
            Value::String(s) => write_py_json_str(s, out),
            Value::Array(items) => {
                out.push_str("[");
                stack.push(Frame::Array(items.iter(), true));
            }
            Value::Object(map) => {
                out.push_str("{");
                stack.push(Frame::Object(map.iter(), true));
            }
        }
    }
    let mut stack = Vec::new();
    open(v, out, &mut stack);
    while let Some(frame) = stack.last_mut() {
        let next = match frame {
            Frame::Array(items, first) => match items.next() {
                Some(item) => {
                    if !std::mem::take(first) {
                        out.push_str(",");
                    }
                    Some(item)
                }
                None => {
                    out.push_str("]");
                    None
                }
            },
            Frame::Object(entries, first) => match entries.next() {
                Some((key, value)) => {
                    if !std::mem::take(first) {
                        out.push_str(",");
                    }
                    write_py_json_str(key, out);
                    out.push_str(":");
                    Some(value)
                }
                None => {
                    out.push_str("}");
                    None
                }
            },
        };
        match next {
            Some(value) => open(value, out, &mut stack),
            None => {
                stack.pop();
            }
        }
    }
}

fn write_py_json_str<S: JsonSink>(s: &str, out: &mut S) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    fn unit<S: JsonSink>(u: u16, out: &mut S) {
        let esc = [
            b'\\',
            b'u',
            HEX[usize::from(u >> 12)],
            HEX[usize::from((u >> 8) & 0xf)],
            HEX[usize::from((u >> 4) & 0xf)],
            HEX[usize::from(u & 0xf)],
        ];
        // Only ASCII bytes above, so this never fails.
        out.push_str(std::str::from_utf8(&esc).unwrap_or("\\u0000"));
    }
    out.push_str("\"");
    let mut plain_from = 0;
    for (i, c) in s.char_indices() {
        let escape = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            '\u{8}' => "\\b",
            '\u{c}' => "\\f",
            ' '..='~' => continue,
            _ => "",
        };
        out.push_str(&s[plain_from..i]);
        plain_from = i + c.len_utf8();
        if escape.is_empty() {
            let mut units = [0u16; 2];
            for &u in c.encode_utf16(&mut units).iter() {
                unit(u, out);
            }
        } else {
            out.push_str(escape);
        }
    }
    out.push_str(&s[plain_from..]);
    out.push_str("\"");
}

// ------------------------------------------------------------------------------------------------
// Image sizes from data: URLs, reading exactly what the oracle reads

/// How much of a data URL the oracle looks at: the first 65,536 base64 characters, and of the
/// decoded bytes the first 49,152 (enough for any header; a JPEG whose size marker comes later
/// counts as unknown).
const MAX_B64_CHARS: usize = 65_536;
const MAX_IMAGE_BYTES: usize = 49_152;

/// Width and height in pixels of a `data:…;base64,` URL's PNG, GIF, WebP or JPEG image.
fn image_size_from_data_url(url: &str) -> Option<(u64, u64)> {
    // The oracle's `re.match(r"data:[^;,]*;base64,(.*)", url, re.S)`: the media type runs to the
    // first ';' or ',', which must open ";base64,".
    let rest = url.strip_prefix("data:")?;
    let payload = rest[rest.find([';', ','])?..].strip_prefix(";base64,")?;
    let end = payload.char_indices().nth(MAX_B64_CHARS).map_or(payload.len(), |(i, _)| i);
    let b64 = &payload[..end];
    // Python's b64decode refuses a str with non-ASCII characters.
    if !b64.is_ascii() {
        return None;
    }
    let bytes = py_b64decode_lenient(b64.as_bytes(), MAX_IMAGE_BYTES)?;
    image_size_from_bytes(&bytes)
}

/// Python's `base64.b64decode(s + "====", validate=False)` (CPython 3.11's `a2b_base64`, non-strict),
/// keeping the first `limit` output bytes: characters outside the alphabet are skipped, a pad
/// sequence after two or three characters of a quad ends the input, and a dangling single
/// character is an error.
fn py_b64decode_lenient(input: &[u8], limit: usize) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u8> {
        match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(limit.min(input.len() / 4 * 3 + 3));
    let mut emit = |b: u8| {
        if out.len() < limit {
            out.push(b);
        }
    };
    let (mut quad_pos, mut pads, mut left) = (0u8, 0u8, 0u8);
    for &c in input.iter().chain(b"====") {
        if c == b'=' {
            if quad_pos >= 2 {
                pads += 1;
                if quad_pos + pads >= 4 {
                    return Some(out);
                }
            }
            continue;
        }
        let Some(v) = sextet(c) else { continue };
        pads = 0;
        match quad_pos {
            0 => {
                left = v;
                quad_pos = 1;
            }
            1 => {
                emit((left << 2) | (v >> 4));
                left = v & 0x0f;
                quad_pos = 2;
            }
            2 => {
                emit((left << 4) | (v >> 2));
                left = v & 0x03;
                quad_pos = 3;
            }
            _ => {
                emit((left << 6) | v);
                quad_pos = 0;
            }
        }
    }
    // Only reachable with a dangling character (the appended pads end every other input).
    (quad_pos == 0).then_some(out)
}

/// The oracle's header parsing, byte for byte (including how it reads past a short buffer).
fn image_size_from_bytes(b: &[u8]) -> Option<(u64, u64)> {
    let be16 = |s: &[u8]| u64::from(u16::from_be_bytes([s[0], s[1]]));
    let le16 = |s: &[u8]| u64::from(u16::from_le_bytes([s[0], s[1]]));
    let be32 = |s: &[u8]| u64::from(u32::from_be_bytes([s[0], s[1], s[2], s[3]]));
    // Python's int.from_bytes(b[x:y], "little") on a slice that may be cut short (or empty).
    let le_prefix = |from: usize, to: usize| -> u64 {
        b.get(from..to.min(b.len())).unwrap_or(&[]).iter().rev().fold(0, |acc, &x| (acc << 8) | u64::from(x))
    };
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        let ihdr = b.get(16..24)?;
        return Some((be32(&ihdr[0..4]), be32(&ihdr[4..8])));
    }
    if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        let screen = b.get(6..10)?;
        return Some((le16(&screen[0..2]), le16(&screen[2..4])));
    }
    if b.starts_with(b"RIFF") && b.get(8..12) == Some(b"WEBP") {
        match b.get(12..16) {
            Some(b"VP8X") => return Some((1 + le_prefix(24, 27), 1 + le_prefix(27, 30))),
            Some(b"VP8L") => {
                let bits = le_prefix(21, 25);
                return Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1));
            }
            Some(b"VP8 ") => {
                let frame = b.get(26..30)?;
                return Some((le16(&frame[0..2]) & 0x3fff, le16(&frame[2..4]) & 0x3fff));
            }
            _ => {}
        }
    }
    if b.starts_with(b"\xff\xd8") {
        let mut i = 2;
        // Each step advances at least one byte: linear in the (bounded) buffer.
        while i + 9 < b.len() {
            if b[i] != 0xff {
                i += 1;
                continue;
            }
            let marker = b[i + 1];
            if matches!(marker, 0xd8 | 0x01 | 0xd0..=0xd7) {
                i += 2;
                continue;
            }
            let segment_len = usize::from(u16::from_be_bytes([b[i + 2], b[i + 3]]));
            if matches!(marker, 0xc0..=0xc3 | 0xc5..=0xc7 | 0xc9..=0xcb | 0xcd..=0xcf) {
                // Start of frame: precision, then height, then width.
                return Some((be16(&b[i + 7..i + 9]), be16(&b[i + 5..i + 7])));
            }
            i += 2 + segment_len;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::{Duration, Instant};

    /// Chat, completion and embedding bodies with the oracle's counts, written by
    /// `gen_token_oracle.py` (delivered with this module): Python tiktoken 0.14 through
    /// `shared/oracle/count_tokens.py`'s `count_request` for chat bodies, and
    /// `len(enc.encode(s, disallowed_special=()))` per string for completion and embedding bodies.
    /// Bodies are stored (and were counted) with sorted keys, so the nested tool schemas the oracle
    /// serializes read the same here with or without serde_json's `preserve_order`. Every image in
    /// it has a size the oracle can read and a model with a published rule: the cases where this
    /// module deliberately counts more are tested separately below.
    const ORACLE_FIXTURE: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/token_oracle.json"));

    fn kind_of(name: &str) -> PromptKind {
        match name {
            "chat" => PromptKind::Chat,
            "completion" => PromptKind::Completion,
            "embedding" => PromptKind::Embedding,
            other => panic!("unknown fixture kind {other}"),
        }
    }

    #[test]
    fn counts_match_the_oracle_on_every_fixture() {
        let cases: Vec<Value> = serde_json::from_str(ORACLE_FIXTURE).expect("fixture is JSON");
        assert!(cases.len() >= 40, "fixture has {} cases", cases.len());
        let mut failures = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let kind = kind_of(case["kind"].as_str().expect("kind"));
            let model = case["model"].as_str().expect("model");
            let expected = case["expected"].as_u64().expect("expected");
            let got = prompt_tokens(kind, model, &case["body"]);
            let bound = prompt_tokens_upper_bound(kind, model, &case["body"]);
            if got != expected {
                failures.push(format!("#{i} {kind:?} {model}: got {got}, oracle {expected}"));
            }
            assert!(bound >= got, "#{i} {model}: bound {bound} < exact {got}");
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn bpe_count_equals_the_length_of_the_encoding() {
        // `count` skips building the token vector; check it agrees with `encode` on every string
        // of the fixture, for both vocabularies.
        let cases: Value = serde_json::from_str(ORACLE_FIXTURE).expect("fixture is JSON");
        let mut stack = vec![&cases];
        let mut strings = 0;
        while let Some(v) = stack.pop() {
            match v {
                Value::String(s) => {
                    for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
                        let encoded = enc.tokenizer().encode(s.as_str()).len();
                        assert_eq!(count_text(enc, s), to_u64(encoded), "{enc:?} {s:?}");
                    }
                    strings += 1;
                }
                Value::Array(items) => stack.extend(items),
                Value::Object(map) => stack.extend(map.values()),
                _ => {}
            }
        }
        assert!(strings > 200);
    }

    #[test]
    fn cookbook_examples_match_the_prompt_tokens_openai_reported() {
        // The prompt_tokens the OpenAI API reported in the cookbook notebook (the oracle's selftest).
        let messages = json!([
            {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
            {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
            {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
            {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
            {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
            {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
        ]);
        let tools = json!([{"type": "function", "function": {
            "name": "get_current_weather", "description": "Get the current weather in a given location",
            "parameters": {"type": "object", "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]}},
                "required": ["location"]}}}]);
        let tool_messages = json!([
            {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
            {"role": "user", "content": "What's the weather like in San Francisco?"},
        ]);
        for (model, want) in [("gpt-3.5-turbo", 129), ("gpt-4-0613", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)] {
            let body = json!({"model": model, "messages": messages});
            assert_eq!(prompt_tokens(PromptKind::Chat, model, &body), want, "{model}");
        }
        for (model, want) in [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)] {
            let body = json!({"model": model, "messages": tool_messages, "tools": tools});
            assert_eq!(prompt_tokens(PromptKind::Chat, model, &body), want, "{model} with tools");
        }
    }

    #[test]
    fn special_token_lookalikes_are_ordinary_text() {
        // tiktoken 0.14's len(enc.encode(s, disallowed_special=())).
        for (enc, mixed) in [(Encoding::O200kBase, 15), (Encoding::Cl100kBase, 16)] {
            assert_eq!(count_text(enc, "<|endoftext|>"), 7, "{enc:?}");
            assert_eq!(count_text(enc, "a<|endoftext|>b<|fim_prefix|>"), mixed, "{enc:?}");
            let text = "x <|endoftext|> y";
            assert_eq!(count_text(enc, text), to_u64(enc.tokenizer().encode(text).len()));
        }
    }

    #[test]
    fn encoding_follows_the_model_family() {
        use Encoding::{Cl100kBase as Cl, O200kBase as O2};
        for (model, enc) in [
            ("gpt-4o", O2),
            ("gpt-4o-mini-2024-07-18", O2),
            ("gpt-4.1-nano", O2),
            ("o1", O2),
            ("o3-mini", O2),
            ("gpt-5", O2),
            ("some-new-model", O2),
            ("gpt-4", Cl),
            ("gpt-4-0613", Cl),
            ("gpt-4-turbo", Cl),
            ("gpt-3.5-turbo-0125", Cl),
            ("gpt-3.5-turbo-instruct", Cl),
            ("gpt-35-turbo", Cl),
            ("text-embedding-3-small", Cl),
            ("text-embedding-ada-002", Cl),
            ("ft:gpt-3.5-turbo-0125:acme::abc123", Cl),
            ("ft:gpt-4o-2024-08-06:acme::abc123", O2),
            ("azure/gpt-4", Cl),
            ("openai/gpt-4o", O2),
            ("", O2),
        ] {
            assert_eq!(Encoding::for_model(model), enc, "{model}");
        }
    }

    #[test]
    fn tool_constants_follow_the_model_family_including_fine_tunes() {
        let body = json!({"messages": [], "tools": [{"type": "function", "function": {"name": "f"}}]});
        let gpt4 = prompt_tokens(PromptKind::Chat, "gpt-4", &body);
        let gpt4o = prompt_tokens(PromptKind::Chat, "gpt-4o", &body);
        assert_eq!(gpt4, gpt4o + 3, "func_init is 10 for gpt-4, 7 for gpt-4o");
        // The oracle would give a gpt-4 fine-tune gpt-4o's constants; its base model's are right.
        assert_eq!(prompt_tokens(PromptKind::Chat, "ft:gpt-4-0613:acme::x", &body), gpt4);
    }

    fn image_body(model: &str, url: &str, detail: &str) -> Value {
        json!({"model": model, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url, "detail": detail}}]}]})
    }

    /// Messages overhead of `image_body`: 3 per message + "user" (1) + 3 priming.
    const IMAGE_BODY_TEXT: u64 = 7;

    #[test]
    fn images_of_unknown_size_are_charged_the_worst_case() {
        for (model, detail, want) in [
            ("gpt-4o", "high", 85 + 8 * 170),
            ("gpt-4o", "auto", 85 + 8 * 170),
            ("gpt-4o", "low", 85),
            ("gpt-4o-mini", "auto", 2833 + 8 * 5667),
            ("o1", "high", 75 + 8 * 150),
            ("gpt-4.1-mini", "low", 2489), // ceil(1536 * 1.62): patches ignore detail
            ("gpt-4.1-nano", "high", 3779),
            ("o4-mini", "auto", 2642),
            ("gpt-5", "high", 85 + 8 * 170), // no published rule: gpt-4o's
        ] {
            for url in [
                "https://example.com/cat.png",
                "data:image/png;base64,iVBORw0KGgo=", // truncated before the size
                "data:image/png;charset=x;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==",
            ] {
                let body = image_body(model, url, detail);
                let got = prompt_tokens(PromptKind::Chat, model, &body);
                assert_eq!(got, IMAGE_BODY_TEXT + want, "{model} {detail} {url}");
                assert!(prompt_tokens_upper_bound(PromptKind::Chat, model, &body) >= got);
            }
        }
    }

    #[test]
    fn image_rules_reproduce_openais_published_examples() {
        // OpenAI's vision guide and the oracle's selftest.
        assert_eq!(TILES_4O.tokens(Some((1024, 1024)), false), 765);
        assert_eq!(TILES_4O.tokens(Some((2048, 4096)), false), 1105);
        assert_eq!(TILES_4O.tokens(Some((4096, 8192)), true), 85);
        assert_eq!(TILES_4O.tokens(Some((128, 64)), false), 255);
        let mini = ImageRule::for_base_model("gpt-4o-mini");
        assert_eq!(mini.tokens(Some((128, 64)), true), 2833);
        assert_eq!(mini.tokens(Some((128, 64)), false), 8500);
        // Patch rule: the oracle's image_tokens("gpt-4.1-mini", 1024, 1024, "auto") and so on.
        let patches = ImageRule::for_base_model("gpt-4.1-mini");
        assert_eq!(patches.tokens(Some((1024, 1024)), false), 1659);
        assert_eq!(patches.tokens(Some((1800, 2400)), false), 2353);
        assert_eq!(ImageRule::for_base_model("o4-mini").tokens(Some((1, 100_000)), false), 0);
    }

    #[test]
    fn no_image_exceeds_its_worst_case() {
        let mut rng = SplitMix64(7);
        for rule in [TILES_4O, ImageRule::for_base_model("gpt-4.1-nano")] {
            let worst = rule.tokens(None, false);
            for _ in 0..20_000 {
                let w = 1 + rng.next() % (1 << rng.below(33));
                let h = 1 + rng.next() % (1 << rng.below(33));
                assert!(rule.tokens(Some((w, h)), false) <= worst, "{rule:?} {w}x{h}");
            }
        }
    }

    #[test]
    fn data_url_decoding_matches_pythons_lenient_base64() {
        // Expected values from CPython 3.11: base64.b64decode(s + "====", validate=False).
        let cases: [(&str, Option<&[u8]>); 9] = [
            ("", Some(b"")),
            ("QQ", Some(b"A")),
            ("QUI", Some(b"AB")),
            ("QUJD", Some(b"ABC")),
            ("Q", None),
            ("QUJDR", None),
            ("QU\nJD\r\n", Some(b"ABC")),
            ("QU=JD", Some(b"ABC")),   // a pad after one char of a quad is ignored
            ("QUI=QUJD", Some(b"AB")), // a complete pad sequence ends the input
        ];
        for (input, want) in cases {
            let got = py_b64decode_lenient(input.as_bytes(), usize::MAX);
            assert_eq!(got.as_deref(), want, "{input:?}");
        }
        assert_eq!(py_b64decode_lenient(b"QUJDQUJD", 4).as_deref(), Some(&b"ABCA"[..]));
    }

    #[test]
    fn image_headers_are_read_like_the_oracle() {
        let png = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
        assert_eq!(image_size_from_data_url(png), Some((1, 1)));
        let gif = b"GIF89a\x40\x01\xf0\x00";
        assert_eq!(image_size_from_bytes(gif), Some((320, 240)));
        // A WebP VP8X header cut short: Python's int.from_bytes reads what is there.
        assert_eq!(image_size_from_bytes(b"RIFF\0\0\0\0WEBPVP8X\0\0\0\0\0\0\0\0\0\0\0\0\x10"), Some((1, 4097)));
        // A JPEG whose frame header lies beyond the 49,152 bytes the oracle decodes is unknown.
        let mut jpeg = vec![0xff, 0xd8];
        for _ in 0..2 {
            jpeg.extend_from_slice(&[0xff, 0xe1, 0xff, 0xff]);
            jpeg.resize(jpeg.len() + 0xfffd, 0);
        }
        jpeg.extend_from_slice(&[0xff, 0xc0, 0, 17, 8, 0x01, 0x00, 0x02, 0x00, 3]);
        assert_eq!(image_size_from_bytes(&jpeg), Some((512, 256)));
        let url = format!("data:image/jpeg;base64,{}", b64(&jpeg));
        assert_eq!(image_size_from_data_url(&url), None);
        // Non-ASCII inside the base64 makes Python's b64decode raise.
        assert_eq!(image_size_from_data_url("data:image/gif;base64,R0lGODlhQAHwAA==é"), None);
        assert_eq!(image_size_from_data_url("data:image/gif;base64,R0lGODlhQAHwAA=="), Some((320, 240)));
    }

    #[test]
    fn python_spellings_of_json_values() {
        for (x, want) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1234567890123456.7, "1234567890123456.8"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
            (-0.0, "-0.0"),
            (123.456, "123.456"),
            (0.1 + 0.2, "0.30000000000000004"),
        ] {
            assert_eq!(py_float_repr(x), want);
        }
        // serde_json keeps source key order (the `preserve_order` feature), as Python does.
        let v = json!({"a": "é😀\"\\\n\u{1}\u{7f}~", "b": [1, 2.0, null, true]});
        let mut out = String::new();
        write_py_json(&v, &mut out);
        assert_eq!(out, r#"{"a":"\u00e9\ud83d\ude00\"\\\n\u0001\u007f~","b":[1,2.0,null,true]}"#);
        let mut len = JsonLen(0);
        write_py_json(&v, &mut len);
        assert_eq!(len.0, to_u64(out.len()));
        assert_eq!(py_str(&json!(null)), "None");
        assert_eq!(py_str(&json!(false)), "False");
        assert_eq!(py_str(&json!(-7)), "-7");
        assert_eq!(py_str(&json!(u64::MAX)), u64::MAX.to_string());
        assert!(py_isspace('\u{1f}') && py_isspace('\u{3000}') && !py_isspace('\u{200b}'));
    }

    #[test]
    fn completion_and_embedding_inputs_in_every_shape() {
        let model = "gpt-3.5-turbo-instruct";
        let hello = count_text(Encoding::Cl100kBase, "Hello, world");
        for (prompt, want) in [
            (json!("Hello, world"), hello),
            (json!(["Hello, world", "Hello, world"]), 2 * hello),
            (json!([1, 2, 3]), 3),
            (json!([[1, 2], [3], []]), 3),
            (json!(null), 0),
            (json!({"text": "x"}), 0),
        ] {
            let body = json!({"model": model, "prompt": prompt});
            assert_eq!(prompt_tokens(PromptKind::Completion, model, &body), want, "{prompt}");
            let body = json!({"model": model, "input": prompt});
            assert_eq!(prompt_tokens(PromptKind::Embedding, model, &body), want, "{prompt}");
        }
        assert_eq!(prompt_tokens(PromptKind::Chat, "gpt-4o", &json!("not an object")), 0);
        assert_eq!(prompt_tokens(PromptKind::Chat, "gpt-4o", &json!({})), 3);
    }

    // --------------------------------------------------------------------------------- hostile

    /// A small deterministic PRNG (SplitMix64), easy to reproduce in Python for the oracle.
    struct SplitMix64(u64);

    impl SplitMix64 {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// `len` characters of base62, each `ALPHABET[next() % 62]` from SplitMix64 seeded with 62.
    fn random_base62(len: usize) -> String {
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut rng = SplitMix64(62);
        (0..len).map(|_| char::from(ALPHABET[(rng.below(62)) as usize])).collect()
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn hostile_megabytes_count_like_tiktoken_and_quickly() {
        const MIB: usize = 1 << 20;
        let one_letter = "a".repeat(MIB);
        let base62 = random_base62(MIB);
        // From `count_tokens.py --text-file F --encoding E` (tiktoken 0.14), F holding the same
        // string written by the same SplitMix64 in Python.
        for (name, text, o200k, cl100k) in
            [("1 MiB of 'a'", &one_letter, 131_072, 131_072), ("1 MiB of base62", &base62, 711_068, 750_395)]
        {
            for (enc, want) in [(Encoding::O200kBase, o200k), (Encoding::Cl100kBase, cl100k)] {
                let start = Instant::now();
                assert_eq!(count_text(enc, text), want, "{name} {enc:?}");
                // Generous for an unoptimized build on a shared machine; tiktoken's quadratic
                // merge needs minutes here. Release builds take ~10 ms.
                assert!(start.elapsed() < Duration::from_secs(20), "{name} {enc:?} took {:?}", start.elapsed());
            }
        }
    }

    /// A random JSON value shaped like a chat body: the right keys with values of any type.
    fn random_value(rng: &mut SplitMix64, depth: u32) -> Value {
        const KEYS: [&str; 16] = [
            "role",
            "content",
            "name",
            "tool_calls",
            "function_call",
            "function",
            "arguments",
            "type",
            "text",
            "image_url",
            "url",
            "detail",
            "description",
            "parameters",
            "properties",
            "enum",
        ];
        const STRINGS: [&str; 12] = [
            "",
            "user",
            "text",
            "image_url",
            "low",
            "high",
            ".",
            "hello world. ",
            "<|endoftext|>",
            "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJ",
            "data:image/gif;base64,R0lGODlhQAHwAA",
            "数据 😀\r\n",
        ];
        let leaf = depth == 0 || rng.below(3) == 0;
        match rng.below(if leaf { 5 } else { 7 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.below(2) == 0),
            2 => match rng.below(3) {
                0 => json!(rng.next() as i64),
                1 => json!(rng.below(10)),
                _ => json!((rng.next() as f64) / 3.0e7 - 3.0e11),
            },
            3 | 4 => {
                if rng.below(4) == 0 {
                    // Random bytes after an image magic number, to exercise the header parsers.
                    let magic: [&[u8]; 5] = [
                        b"\x89PNG\r\n\x1a\n",
                        b"GIF89a",
                        b"RIFF\0\0\0\0WEBPVP8X",
                        b"RIFF\0\0\0\0WEBPVP8 ",
                        b"\xff\xd8",
                    ];
                    let mut bytes = magic[rng.below(5) as usize].to_vec();
                    bytes.extend((0..rng.below(64)).map(|_| rng.next() as u8));
                    Value::String(format!("data:image/x;base64,{}", b64(&bytes)))
                } else {
                    Value::String(STRINGS[rng.below(STRINGS.len() as u64) as usize].to_string())
                }
            }
            5 => Value::Array((0..rng.below(5)).map(|_| random_value(rng, depth - 1)).collect()),
            _ => Value::Object(
                (0..rng.below(6))
                    .map(|_| (KEYS[rng.below(KEYS.len() as u64) as usize].to_string(), random_value(rng, depth - 1)))
                    .collect(),
            ),
        }
    }

    #[test]
    fn random_bodies_never_panic_and_stay_under_the_bound() {
        let mut rng = SplitMix64(2024);
        let models = ["gpt-4o", "gpt-4o-mini", "gpt-4", "gpt-3.5-turbo-0301", "gpt-4.1-nano", "o1", "x/ft:gpt-4o:a::b"];
        for round in 0..3000 {
            let mut body = Map::new();
            for key in ["messages", "tools", "functions", "prompt", "input"] {
                if rng.below(3) != 0 {
                    body.insert(key.to_string(), random_value(&mut rng, 5));
                }
            }
            // Bias towards well-formed shapes so the deep paths (tools, images) are reached.
            if rng.below(2) == 0 {
                let part =
                    json!({"type": "image_url", "image_url": {"url": random_value(&mut rng, 0), "detail": "high"}});
                let props = json!({"p": {"type": random_value(&mut rng, 1), "enum": random_value(&mut rng, 2),
                                         "items": random_value(&mut rng, 3), "description": random_value(&mut rng, 0)}});
                body.insert(
                    "messages".into(),
                    json!([{"role": "user", "name": "n", "content": [part, random_value(&mut rng, 2)]}]),
                );
                body.insert(
                    "tools".into(),
                    json!([{"function": {"name": random_value(&mut rng, 0), "parameters": {"properties": props}}}]),
                );
            }
            let body = Value::Object(body);
            let model = models[round % models.len()];
            for kind in [PromptKind::Chat, PromptKind::Completion, PromptKind::Embedding] {
                let exact = prompt_tokens(kind, model, &body);
                let bound = prompt_tokens_upper_bound(kind, model, &body);
                assert!(bound >= exact, "{kind:?} {model}: bound {bound} < exact {exact} for {body}");
            }
        }
    }

    #[test]
    fn deeply_nested_schemas_do_not_overflow_the_stack() {
        let mut nested = json!("leaf");
        for _ in 0..100_000 {
            // Not `json!([nested])`: that round-trips through the (recursive) serializer.
            nested = Value::Array(vec![nested]);
        }
        let mut len = JsonLen(0);
        write_py_json(&nested, &mut len);
        assert_eq!(len.0, 2 * 100_000 + 6);
        // serde_json drops values recursively; unwind the nesting by hand so the test itself
        // does not overflow.
        while let Value::Array(mut items) = nested {
            nested = items.pop().unwrap_or(Value::Null);
        }
    }

    /// About 128k o200k tokens of mixed prose, code, JSON and CJK, as one user message.
    fn document_128k() -> Value {
        let chunk = concat!(
            "The gateway reserves an estimate before each upstream call and settles it afterwards. ",
            "fn main() { let x: Vec<u32> = (0..10).map(|i| i * 2).collect(); println!(\"{x:?}\"); }\n",
            "{\"id\": 42, \"tags\": [\"alpha\", \"beta\"], \"price\": 0.075, \"ok\": true}\r\n",
            "预算在达到限制之前会降级到更便宜的模型。 😀 ",
        );
        let mut text = String::new();
        while count_text(Encoding::O200kBase, &text) < 128_000 {
            for _ in 0..200 {
                text.push_str(chunk);
            }
        }
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})
    }

    #[test]
    fn upper_bound_is_at_least_ten_times_faster_on_a_long_document() {
        let body = document_128k();
        let model = "gpt-4o";
        let _ = prompt_tokens(PromptKind::Chat, model, &json!({})); // load the vocabulary first
        let time = |f: &dyn Fn() -> u64| {
            (0..3)
                .map(|_| {
                    let start = Instant::now();
                    std::hint::black_box(f());
                    start.elapsed()
                })
                .min()
                .unwrap_or_default()
        };
        let exact_time = time(&|| prompt_tokens(PromptKind::Chat, model, &body));
        let bound_time = time(&|| prompt_tokens_upper_bound(PromptKind::Chat, model, &body));
        let exact = prompt_tokens(PromptKind::Chat, model, &body);
        let bound = prompt_tokens_upper_bound(PromptKind::Chat, model, &body);
        eprintln!("128k-token document: exact {exact} tokens in {exact_time:?}, bound {bound} in {bound_time:?}");
        assert!(bound >= exact);
        assert!(bound_time * 10 <= exact_time, "bound {bound_time:?} vs exact {exact_time:?}");
    }
}
