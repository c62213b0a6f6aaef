//! Per-model constants: message framing, tool definitions, image rules.

use super::Encoding;

/// The model's name without a `provider/` prefix, and `ft:BASE:org::id` reduced to `BASE`.
pub(super) fn base_model(model: &str) -> &str {
    let m = model.rsplit('/').next().unwrap_or(model);
    match m.strip_prefix("ft:") {
        Some(rest) => rest.split(':').next().unwrap_or(rest),
        None => m,
    }
}

/// The oracle's tool-definition constants (OpenAI cookbook, "counting tokens for tools").
pub(super) struct ToolConstants {
    pub(super) func_init: i64,
    pub(super) prop_init: i64,
    pub(super) prop_key: i64,
    pub(super) enum_init: i64,
    pub(super) enum_item: i64,
    pub(super) func_end: i64,
}

pub(super) const TOOLS_4O: ToolConstants =
    ToolConstants { func_init: 7, prop_init: 3, prop_key: 3, enum_init: -3, enum_item: 3, func_end: 12 };

/// gpt-3.5-turbo and gpt-4 spend 3 more tokens opening each function.
pub(super) const TOOLS_LEGACY: ToolConstants = ToolConstants { func_init: 10, ..TOOLS_4O };

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum ImageRule {
    /// `detail: low` costs `base`; otherwise the image is fit into 2048×2048, its shortest side
    /// scaled down to 768, and each 512-pixel tile costs `per_tile` more.
    Tiles { base: u64, per_tile: u64 },
    /// 32-pixel patches, at most 1536, times a per-model multiplier.
    Patches { multiplier: f64 },
}

/// gpt-4o's rule, also the fallback for models without a published one.
pub(super) const TILES_4O: ImageRule = ImageRule::Tiles { base: 85, per_tile: 170 };

/// The most tiles an image can cost: after scaling, the longest side is at most 2048 px (4 tiles)
/// and the shortest at most 768 px (2 tiles).
pub(super) const MAX_TILES: u64 = 8;
pub(super) const MAX_PATCHES: u64 = 1536;

impl ImageRule {
    pub(super) fn for_base_model(m: &str) -> ImageRule {
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
    pub(super) fn tokens(self, size: Option<(u64, u64)>, low_detail: bool) -> u64 {
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
pub(super) fn tile_count(w: u64, h: u64) -> u64 {
    let (wf, hf) = (w as f64, h as f64);
    let s = 1f64.min(2048.0 / wf.max(hf)).min(768.0 / wf.min(hf));
    let sw = floor_to_u64(wf * s).max(1);
    let sh = floor_to_u64(hf * s).max(1);
    sw.div_ceil(512) * sh.div_ceil(512)
}

/// 32-pixel patches, shrunk to fit 1536 as in OpenAI's docs; the oracle's float operations. The
/// ratio `1536·32² / (w·h)` is rounded once, as Python's int division is, while `w·h < 2^53`.
pub(super) fn patch_count(w: u64, h: u64) -> u64 {
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
pub(super) fn floor_to_u64(x: f64) -> u64 {
    x.floor() as u64
}

pub(super) fn ceil_to_u64(x: f64) -> u64 {
    x.ceil() as u64
}

/// Tokens framing each message and each `name`, for a base model name. gpt-3.5-turbo-0301
/// framed messages differently: 4 per message, and a name replaced the role (-1).
pub(super) fn message_constants(base: &str) -> (i64, i64) {
    if base.ends_with("gpt-3.5-turbo-0301") {
        (4, -1)
    } else {
        (3, 1)
    }
}

/// Everything about `model` that the counting rules depend on.
pub(super) struct ModelRules {
    pub(super) encoding: Encoding,
    pub(super) per_message: i64,
    pub(super) per_name: i64,
    pub(super) tools: &'static ToolConstants,
    pub(super) image: ImageRule,
}

impl ModelRules {
    pub(super) fn for_model(model: &str) -> ModelRules {
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
