//! Python's spelling of JSON values (the oracle formats them with `str()` and `json.dumps`).

use std::borrow::Cow;

use serde_json::Value;

/// Python's `str()` of a JSON scalar as `json.load` would have produced it. Arrays and objects
/// (Python would print its repr, e.g. `{'a': 1}`) are approximated by their JSON.
pub(super) fn py_str(v: &Value) -> Cow<'_, str> {
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

pub(super) fn py_number(num: &serde_json::Number) -> String {
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
pub(super) fn py_float_repr(x: f64) -> String {
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
pub(super) fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Where [`write_py_json`] writes: a `String` for the exact count, a byte counter for the bound.
pub(super) trait JsonSink {
    fn push_str(&mut self, s: &str);
}

impl JsonSink for String {
    fn push_str(&mut self, s: &str) {
        String::push_str(self, s);
    }
}

pub(super) struct JsonLen(pub(super) u64);

impl JsonSink for JsonLen {
    fn push_str(&mut self, s: &str) {
        self.0 = self.0.saturating_add(u64::try_from(s.len()).unwrap_or(u64::MAX));
    }
}

/// Writes `v` as Python's `json.dumps(v, separators=(",", ":"))`: ASCII only (`\uXXXX`, surrogate
/// pairs beyond the BMP), floats as `repr`. Keys come in `serde_json::Map` order: insertion order
/// with serde_json's `preserve_order` feature, sorted otherwise (then a nested schema written with
/// unsorted keys may count a token or two differently from the oracle). Iterative, so a deeply
/// nested value cannot overflow the stack.
pub(super) fn write_py_json<S: JsonSink>(v: &Value, out: &mut S) {
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

pub(super) fn write_py_json_str<S: JsonSink>(s: &str, out: &mut S) {
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
