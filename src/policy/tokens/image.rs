//! Image sizes from `data:` URLs, reading exactly what the oracle reads.

/// How much of a data URL the oracle looks at: the first 65,536 base64 characters, and of the
/// decoded bytes the first 49,152 (enough for any header; a JPEG whose size marker comes later
/// counts as unknown).
pub(super) const MAX_B64_CHARS: usize = 65_536;
pub(super) const MAX_IMAGE_BYTES: usize = 49_152;

/// Width and height in pixels of a `data:…;base64,` URL's PNG, GIF, WebP or JPEG image.
pub(super) fn image_size_from_data_url(url: &str) -> Option<(u64, u64)> {
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
pub(super) fn py_b64decode_lenient(input: &[u8], limit: usize) -> Option<Vec<u8>> {
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
pub(super) fn image_size_from_bytes(b: &[u8]) -> Option<(u64, u64)> {
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
