//! A skim over a JSON document: checks that it is well-formed, the way serde_json would parse
//! it, while its caller walks the members it wants to read, without building anything.
//!
//! Reading an upstream's non-streamed answer for its `usage` through serde's typed reader
//! matches every key against the fields of the typed view and decodes every string; a skim
//! only passes them, strings eight bytes at a time, which is far cheaper. It is only ever a
//! shortcut: whatever it cannot judge cheaply and surely — an exponent or a very long number, a
//! `\u` escape of a surrogate, deep nesting, a top-level key written with escapes — it answers
//! "can't tell" (`None`), and the caller takes the full reader, whose answer is the same for
//! every document the skim accepts.

/// Nesting deeper than this is left to the full reader (serde_json stops at 128).
const MAX_DEPTH: u32 = 64;
/// Numbers with more digits than this are left to the full reader (serde_json refuses a float
/// that overflows `f64`; no upstream sends numbers this long).
const MAX_DIGITS: usize = 64;

/// A position in a JSON document being skimmed. Every method passes what it reads and
/// answers `None` when the text is not well-formed or holds something the skim leaves to the
/// full reader (see the module docs): the caller then gives up on the skim.
pub struct Skim<'a> {
    doc: &'a str,
    i: usize,
    depth: u32,
}

/// A value as [`Skim::scalar`] passed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scalar {
    Null,
    /// An integer written with digits only (no sign, fraction or exponent), saturated at
    /// `u64::MAX`.
    Uint(u64),
    /// Anything else that is not negative: a string, `true`/`false`, a fraction, an array or
    /// an object.
    Other,
}

impl<'a> Skim<'a> {
    pub fn new(doc: &'a str) -> Self {
        let mut s = Skim { doc, i: 0, depth: 0 };
        s.ws();
        s
    }

    /// The document's bytes.
    #[inline(always)]
    fn bytes(&self) -> &'a [u8] {
        self.doc.as_bytes()
    }

    /// The next byte of the document (after whitespace): what kind of value comes next.
    pub fn peek(&self) -> Option<u8> {
        self.bytes().get(self.i).copied()
    }

    /// Passes an object member by member: `member` gets each key (`None` when it is written
    /// with escapes) and must pass its value (with `value`, `scalar`, `object`, ...).
    pub fn object(&mut self, mut member: impl FnMut(&mut Self, Option<&'a [u8]>) -> Option<()>) -> Option<()> {
        self.open(b'{')?;
        if self.peek()? == b'}' {
            self.i += 1;
            return self.close();
        }
        loop {
            if self.peek()? != b'"' {
                return None;
            }
            let (key, escaped) = self.string_text()?;
            self.eat(b':')?;
            self.ws();
            member(self, (!escaped).then_some(key))?;
            match self.next()? {
                b',' => self.ws(),
                b'}' => return self.close(),
                _ => return None,
            }
        }
    }

    /// Passes any value.
    pub fn value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.string()?;
                self.ws();
            }
            b'{' => self.object(|s, _| s.value())?,
            b'[' => self.array()?,
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'n' => self.literal(b"null")?,
            b'0'..=b'9' | b'-' => {
                self.number()?;
            }
            _ => return None,
        }
        Some(())
    }

    /// Passes a value, telling `null` and digit-only integers from the rest. A negative
    /// number is left to the full reader (`None`).
    pub fn scalar(&mut self) -> Option<Scalar> {
        match self.peek()? {
            b'n' => self.literal(b"null").map(|()| Scalar::Null),
            b'0'..=b'9' => self.number(),
            b'-' => None,
            _ => self.value().map(|()| Scalar::Other),
        }
    }

    /// Passes an array element by element: `element` must pass each one. The number of
    /// elements.
    pub fn elements(&mut self, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<usize> {
        self.open(b'[')?;
        if self.peek()? == b']' {
            self.i += 1;
            self.close()?;
            return Some(0);
        }
        let mut n = 0;
        loop {
            element(self)?;
            n += 1;
            match self.next()? {
                b',' => self.ws(),
                b']' => {
                    self.close()?;
                    return Some(n);
                }
                _ => return None,
            }
        }
    }

    /// Passes a number or `null`; any other value (and a number left to the full reader:
    /// an exponent, too many digits) is `None`.
    pub fn number_or_null(&mut self) -> Option<()> {
        match self.peek()? {
            b'n' => self.literal(b"null"),
            b'0'..=b'9' | b'-' => self.number().map(drop),
            _ => None,
        }
    }

    /// Passes `true`, `false` or `null` (`Some(None)`); any other value is `None`.
    pub fn boolean(&mut self) -> Option<Option<bool>> {
        match self.peek()? {
            b't' => self.literal(b"true").map(|()| Some(true)),
            b'f' => self.literal(b"false").map(|()| Some(false)),
            b'n' => self.literal(b"null").map(|()| None),
            _ => None,
        }
    }

    /// Passes a string: its bytes as written between the quotes, escapes and all (never
    /// shorter than the UTF-8 text they stand for). Any other value is `None`.
    pub fn written_str(&mut self) -> Option<&'a [u8]> {
        if self.peek()? != b'"' {
            return None;
        }
        self.string_text().map(|(text, _)| text)
    }

    /// Runs `pass` over the value that comes next: what it answers, and the value's byte
    /// range in the document (without the whitespace after it).
    pub fn spanned<T>(&mut self, pass: impl FnOnce(&mut Self) -> Option<T>) -> Option<(T, (usize, usize))> {
        let start = self.i;
        let out = pass(self)?;
        // No JSON value ends in whitespace: what the pass skipped after it is not its own.
        let mut end = self.i;
        while end > start && matches!(self.bytes()[end - 1], b' ' | b'\n' | b'\r' | b'\t') {
            end -= 1;
        }
        Some((out, (start, end)))
    }

    /// Passes a value; whether it is an array with at least one element.
    pub fn non_empty_array(&mut self) -> Option<bool> {
        if self.peek()? != b'[' {
            return self.value().map(|()| false);
        }
        let after = &self.bytes()[self.i + 1..];
        let empty = after.iter().find(|c| !matches!(c, b' ' | b'\n' | b'\r' | b'\t')) == Some(&b']');
        self.array()?;
        Some(!empty)
    }

    /// Passes a value; the text of a string written without escapes, `Some(None)` for any
    /// other value. A string with escapes is left to the full reader (`None`).
    pub fn plain_str(&mut self) -> Option<Option<&'a str>> {
        if self.peek()? != b'"' {
            return self.value().map(|()| None);
        }
        let start = self.i + 1;
        let (text, escaped) = self.string_text()?;
        if escaped {
            return None;
        }
        // Between two quotes of a `str`, so on character boundaries: no UTF-8 check needed.
        self.doc.get(start..start + text.len()).map(Some)
    }

    /// Passes the string at `i` and the whitespace after it: its bytes between the quotes, as
    /// written, and whether they hold escapes. Inlined like `string` (a call's entry and exit
    /// were a third of its cost for a typical key).
    #[inline(always)]
    fn string_text(&mut self) -> Option<(&'a [u8], bool)> {
        let start = self.i + 1;
        let escaped = self.string()?;
        let text = &self.bytes()[start..self.i - 1];
        self.ws();
        Some((text, escaped))
    }

    /// Whether only whitespace is left.
    pub fn at_end(&self) -> bool {
        self.i == self.doc.len()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    fn open(&mut self, c: u8) -> Option<()> {
        self.eat(c)?;
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return None;
        }
        self.ws();
        Some(())
    }

    /// After the closing bracket.
    fn close(&mut self) -> Option<()> {
        self.depth -= 1;
        self.ws();
        Some(())
    }

    fn array(&mut self) -> Option<()> {
        self.elements(Self::value).map(|_| ())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        if self.bytes().get(self.i..end)? != word {
            return None;
        }
        self.i = end;
        self.ws();
        Some(())
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)?`; an exponent is left to the full reader.
    fn number(&mut self) -> Option<Scalar> {
        let start = self.i;
        let negative = self.peek()? == b'-';
        self.i += usize::from(negative);
        let mut n: u64 = 0;
        match self.next()? {
            b'0' => {}
            c @ b'1'..=b'9' => {
                n = u64::from(c - b'0');
                while let Some(c @ b'0'..=b'9') = self.peek() {
                    n = n.saturating_mul(10).saturating_add(u64::from(c - b'0'));
                    self.i += 1;
                }
            }
            _ => return None,
        }
        let mut whole = !negative;
        if self.peek() == Some(b'.') {
            self.i += 1;
            let first = self.i;
            while let Some(b'0'..=b'9') = self.peek() {
                self.i += 1;
            }
            if self.i == first {
                return None;
            }
            whole = false;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) || self.i - start > MAX_DIGITS {
            return None;
        }
        self.ws();
        Some(if whole { Scalar::Uint(n) } else { Scalar::Other })
    }

    /// Passes the string whose opening quote is at `i`; whether it holds escapes. Control
    /// characters and malformed escapes are refused, as serde_json refuses them; a `\u`
    /// escape of a surrogate is left to the full reader (which pairs them). Inlined into its
    /// callers: most strings are short keys, and for those a call's register saves and restores
    /// are a large part of the cost.
    #[inline(always)]
    fn string(&mut self) -> Option<bool> {
        let b = self.bytes();
        let mut i = self.i + 1;
        let mut escaped = false;
        loop {
            i += plain_run(&b[i..]);
            match *b.get(i)? {
                b'"' => {
                    self.i = i + 1;
                    return Some(escaped);
                }
                b'\\' => {
                    escaped = true;
                    match *b.get(i + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                        b'u' => {
                            let hex = b.get(i + 2..i + 6)?;
                            let mut code = 0u32;
                            for &c in hex {
                                code = code * 16 + char::from(c).to_digit(16)?;
                            }
                            if (0xD800..0xE000).contains(&code) {
                                return None;
                            }
                            i += 6;
                        }
                        _ => return None,
                    }
                }
                // A control character.
                _ => return None,
            }
        }
    }
}

/// How many bytes at the start of `b` are plain string content: not `"`, not `\`, not a
/// control character. Eight bytes at a time: for a word `w`, `(w - 0x01..) & !w & 0x80..`
/// flags its zero bytes, exactly at the lowest one (a borrow can only flag bytes above it), so
/// the first byte to stop at is the lowest flagged one of three such tests.
fn plain_run(b: &[u8]) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    const QUOTE: u64 = u64::from_ne_bytes([b'"'; 8]);
    const BACKSLASH: u64 = u64::from_ne_bytes([b'\\'; 8]);
    const SPACE: u64 = u64::from_ne_bytes([0x20; 8]);
    let zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGH;
    let mut n = 0;
    while let Some(chunk) = b.get(n..n + 8) {
        let w = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let stop = zero(w ^ QUOTE) | zero(w ^ BACKSLASH) | (w.wrapping_sub(SPACE) & !w & HIGH);
        if stop != 0 {
            return n + (stop.trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    n + b[n..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20).unwrap_or(b.len() - n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The value of the top-level member `name` of `doc`, skimmed as a whole (`None`: the
    /// skim gave up; `Some(None)`: no such member).
    fn member<'a>(doc: &'a str, name: &str) -> Option<Option<&'a str>> {
        let mut s = Skim::new(doc);
        let mut found = None;
        if s.peek()? != b'{' {
            return None;
        }
        s.object(|s, key| {
            let start = s.i;
            s.value()?;
            if key? == name.as_bytes() {
                if found.is_some() {
                    return None;
                }
                found = Some(doc[start..s.i].trim_end());
            }
            Some(())
        })?;
        s.at_end().then_some(found)
    }

    #[test]
    fn scalars_tell_null_and_whole_numbers_apart() {
        let doc = r#"{"a":null,"b":12,"c":0,"d":1.5,"e":"7","f":[1],"g":{"x":1},"h":true,"i":99999999999999999999999}"#;
        let mut got = Vec::new();
        let mut s = Skim::new(doc);
        s.object(|s, _| s.scalar().map(|v| got.push(v))).unwrap();
        assert!(s.at_end());
        use Scalar::*;
        assert_eq!(got, [Null, Uint(12), Uint(0), Other, Other, Other, Other, Other, Uint(u64::MAX)]);
        assert_eq!(Skim::new("-1").scalar(), None);
    }

    #[test]
    fn arrays_and_plain_strings() {
        let doc = r#"{"a":[],"b":[ ],"c":[0],"d":[[]],"e":{},"f":"x"}"#;
        let mut got = Vec::new();
        let mut s = Skim::new(doc);
        s.object(|s, _| s.non_empty_array().map(|v| got.push(v))).unwrap();
        assert_eq!(got, [false, false, true, true, false, false]);
        let doc = r#"{"a":"error","b":"","c":1,"d":null,"e":["x"]}"#;
        let mut got = Vec::new();
        let mut s = Skim::new(doc);
        s.object(|s, _| s.plain_str().map(|v| got.push(v))).unwrap();
        assert!(s.at_end());
        assert_eq!(got, [Some("error"), Some(""), None, None, None]);
        assert_eq!(Skim::new(r#""\u0065rror""#).plain_str(), None);
    }

    #[test]
    fn finds_a_top_level_member_and_only_that() {
        let doc = r#" {"id":"x","choices":[{"usage":{"a":1}}],"usage" : {"prompt_tokens":3} , "n":-1.5} "#;
        assert_eq!(member(doc, "usage"), Some(Some(r#"{"prompt_tokens":3}"#)));
        assert_eq!(member(doc, "n"), Some(Some("-1.5")));
        assert_eq!(member(doc, "missing"), Some(None));
        assert_eq!(member("{}", "usage"), Some(None));
        assert_eq!(member(r#"{"usage":null}"#, "usage"), Some(Some("null")));
    }

    #[test]
    fn cannot_tell_what_only_the_full_reader_judges() {
        for doc in [
            r#"{"usage":1,"usage":2}"#,
            r#"{"us\u0061ge":1}"#,
            r#"{"a":1e5}"#,
            r#"{"a":"\ud83d\ude00"}"#,
            &format!("{{\"a\":{}1{}}}", "[".repeat(70), "]".repeat(70)),
            &format!("{{\"a\":{}}}", "9".repeat(100)),
        ] {
            assert_eq!(member(doc, "usage"), None, "{doc}");
            assert!(serde_json::from_str::<serde_json::Value>(doc).is_ok(), "{doc}");
        }
    }

    #[test]
    fn refuses_what_is_not_well_formed() {
        for doc in [
            "",
            "[]",
            "null",
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":1}x",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":-}",
            "{\"a\":tru}",
            "{\"a\":\"\u{1}\"}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12g4\"}",
            "{\"a\":[1,]}",
            "{\"a\":[1 2]}",
            "{\"a\":{\"b\" 1}}",
            "{\"a\":\"open}",
            "{a:1}",
        ] {
            assert_eq!(member(doc, "a"), None, "{doc:?}");
            assert!(serde_json::from_str::<serde_json::Value>(doc).map_or(true, |v| !v.is_object()), "{doc:?}");
        }
    }

    #[test]
    fn plain_run_stops_at_the_first_special_byte() {
        for len in 0..40 {
            for at in 0..=len {
                for special in [b'"', b'\\', 0x00, 0x1f] {
                    let mut b = vec![b'a'; len];
                    if at < len {
                        b[at] = special;
                        // Bytes after the first special one (and bytes >= 0x80) must not matter.
                        for later in b.iter_mut().skip(at + 1).step_by(3) {
                            *later = 0x80;
                        }
                    }
                    assert_eq!(plain_run(&b), at, "len {len} at {at} special {special}");
                }
            }
        }
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            // Floats that serde writes without an exponent (the skim leaves exponents to serde).
            (-8_000_000i64..8_000_000).prop_map(|n| Value::from(n as f64 / 8.0)),
            "\\PC{0,12}".prop_map(Value::String),
            "[\"\\\\\\x00-\\x1f\\u{80}-\\u{10ffff}a-z]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec((prop_oneof![Just("usage".to_string()), "[a-z]{1,6}"], inner), 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// On serialised JSON (compact or pretty, escapes as serde writes them) the skim always
        /// decides, and finds what the parsed value holds.
        #[test]
        fn agrees_with_serde_on_serialised_objects(v in arb_json(), pretty in any::<bool>()) {
            let Some(object) = v.as_object() else { return Ok(()) };
            let doc = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) }.unwrap();
            let found = member(&doc, "usage").expect("the skim decides on serde's own output");
            let parsed = found.map(|s| serde_json::from_str::<serde_json::Value>(s).unwrap());
            prop_assert_eq!(parsed.as_ref(), object.get("usage"));
        }

        /// On any text, a document the skim accepts is one serde_json parses into an object
        /// with that member (when the skim found it, the range holds its value).
        #[test]
        fn accepts_only_what_serde_parses(v in arb_json(), cut in any::<prop::sample::Index>(), junk in "[\\[\\]{}\",:0-9a-z\\\\ .-]{0,3}") {
            let doc = serde_json::to_string(&v).unwrap();
            let at = cut.index(doc.len() + 1);
            let at = (0..=at).rev().find(|&i| doc.is_char_boundary(i)).unwrap_or(0);
            let mutated = format!("{}{}{}", &doc[..at], junk, &doc[at..]);
            if let Some(found) = member(&mutated, "usage") {
                let parsed: serde_json::Value = serde_json::from_str(&mutated).expect("accepted, so serde parses it");
                let object = parsed.as_object().expect("an object");
                let value = found.map(|s| serde_json::from_str::<serde_json::Value>(s).unwrap());
                prop_assert_eq!(value.as_ref(), object.get("usage"));
            }
        }
    }
}
