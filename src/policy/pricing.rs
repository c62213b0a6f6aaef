//! Money and prices: the built-in catalog and `Usage × Price → NanoUsd`.
//!
//! Money is integer nano-dollars everywhere (storage, budgets, arithmetic); it becomes a
//! float only at the JSON edge. Every catalog price is a whole number of nano-dollars per
//! 1,000 tokens, so a cost is exact until the single rounding up per request.

use std::fmt;
use std::ops::{Add, AddAssign, Sub};

use serde::Deserialize;

/// Token usage as an upstream reported it (units: tokens). `cached_input_tokens` is a part of
/// `input_tokens`, never more than it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Prompt tokens (`prompt_tokens` / `input_tokens`), cached ones included.
    pub input_tokens: u64,
    /// The part of `input_tokens` served from the prompt cache (billed at the cached price).
    pub cached_input_tokens: u64,
    /// Generated tokens (`completion_tokens` / `output_tokens`), reasoning tokens included; 0 for
    /// embeddings.
    pub output_tokens: u64,
}

/// An amount of money in nano-dollars (1e-9 USD).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NanoUsd(pub i64);

impl NanoUsd {
    pub const ZERO: NanoUsd = NanoUsd(0);

    /// From a USD amount given by a user (config, API, CLI), rounded to the nearest nano-dollar.
    pub fn from_usd(usd: f64) -> Option<NanoUsd> {
        (usd.is_finite() && (0.0..=1e9).contains(&usd)).then(|| NanoUsd((usd * 1e9).round() as i64))
    }

    /// As a USD float, for JSON responses only.
    pub fn as_usd(self) -> f64 {
        self.0 as f64 / 1e9
    }

    pub fn saturating_sub(self, other: NanoUsd) -> NanoUsd {
        NanoUsd(self.0.saturating_sub(other.0))
    }
}

impl Add for NanoUsd {
    type Output = NanoUsd;
    fn add(self, rhs: NanoUsd) -> NanoUsd {
        NanoUsd(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for NanoUsd {
    fn add_assign(&mut self, rhs: NanoUsd) {
        self.0 = self.0.saturating_add(rhs.0);
    }
}

impl Sub for NanoUsd {
    type Output = NanoUsd;
    fn sub(self, rhs: NanoUsd) -> NanoUsd {
        NanoUsd(self.0.saturating_sub(rhs.0))
    }
}

/// Prints as an exact decimal USD string (`0.000524`), as in `x-tollgate-cost-usd`.
impl fmt::Display for NanoUsd {
    /// Dollars, with the fraction's digits up to the last non-zero one (`0.0000123`, `2`).
    /// Written into a stack buffer and handed over once, because this formats every
    /// response's cost header and `write!` with a padded fraction is costly there.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // "-", 11 digits of whole dollars (i64::MAX nano-dollars), ".", 9 digits.
        let mut out = [0u8; 24];
        let mut at = out.len();
        let abs = self.0.unsigned_abs();
        let (mut whole, mut frac) = (abs / 1_000_000_000, abs % 1_000_000_000);
        if frac != 0 {
            let mut width = 9;
            while frac % 10 == 0 {
                frac /= 10;
                width -= 1;
            }
            for _ in 0..width {
                at -= 1;
                out[at] = b'0' + (frac % 10) as u8;
                frac /= 10;
            }
            at -= 1;
            out[at] = b'.';
        }
        loop {
            at -= 1;
            out[at] = b'0' + (whole % 10) as u8;
            whole /= 10;
            if whole == 0 {
                break;
            }
        }
        if self.0 < 0 {
            at -= 1;
            out[at] = b'-';
        }
        // Only ASCII digits, '.' and '-' were written.
        f.write_str(std::str::from_utf8(&out[at..]).map_err(|_| fmt::Error)?)
    }
}

/// A model's price, each in nano-dollars per 1M tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Price {
    pub input_per_mtok: NanoUsd,
    pub cached_input_per_mtok: NanoUsd,
    pub output_per_mtok: NanoUsd,
}

impl Price {
    /// The cost of `usage`, rounded up once to a whole nano-dollar.
    pub fn cost(&self, usage: &Usage) -> NanoUsd {
        let cached = usage.cached_input_tokens.min(usage.input_tokens);
        let uncached = usage.input_tokens - cached;
        let micro_total: u128 = uncached as u128 * self.input_per_mtok.0.max(0) as u128
            + cached as u128 * self.cached_input_per_mtok.0.max(0) as u128
            + usage.output_tokens as u128 * self.output_per_mtok.0.max(0) as u128;
        let nanos = micro_total.div_ceil(1_000_000);
        NanoUsd(i64::try_from(nanos).unwrap_or(i64::MAX))
    }

    /// The most `input_tokens` prompt tokens plus `output_tokens` output tokens can cost
    /// (cached tokens are never more expensive than uncached ones, so none are assumed).
    pub fn worst_case(&self, input_tokens: u64, output_tokens: u64) -> NanoUsd {
        let input = self.input_per_mtok.max(self.cached_input_per_mtok);
        Price { input_per_mtok: input, cached_input_per_mtok: input, output_per_mtok: self.output_per_mtok }
            .cost(&Usage { input_tokens, cached_input_tokens: 0, output_tokens })
    }
}

/// What a model serves.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Chat,
    Embedding,
}

/// Request features a model supports; a downgrade target must support what the request uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub tools: bool,
    pub vision: bool,
    pub json_schema: bool,
}

impl Capabilities {
    pub const ALL: Capabilities = Capabilities { tools: true, vision: true, json_schema: true };
    const NONE: Capabilities = Capabilities { tools: false, vision: false, json_schema: false };
    const TOOLS: Capabilities = Capabilities { tools: true, vision: false, json_schema: false };
    const TOOLS_VISION: Capabilities = Capabilities { tools: true, vision: true, json_schema: false };
    const TOOLS_SCHEMA: Capabilities = Capabilities { tools: true, vision: false, json_schema: true };

    /// Whether a model with these capabilities can serve a request that needs `needed`.
    pub fn covers(&self, needed: &Capabilities) -> bool {
        (self.tools || !needed.tools) && (self.vision || !needed.vision) && (self.json_schema || !needed.json_schema)
    }
}

/// One built-in catalog entry.
#[derive(Debug)]
pub struct CatalogEntry {
    pub name: &'static str,
    pub price: Price,
    pub context_window: u64,
    pub max_output_tokens: u64,
    pub kind: ModelKind,
    pub capabilities: Capabilities,
}

/// A catalog price: nano-dollars per 1M tokens.
const fn usd(nanos_per_mtok: i64) -> NanoUsd {
    NanoUsd(nanos_per_mtok)
}

macro_rules! entry {
    ($name:expr, $in:expr, $cached:expr, $out:expr, $ctx:expr, $max:expr, $kind:expr, $caps:expr) => {
        CatalogEntry {
            name: $name,
            price: Price { input_per_mtok: usd($in), cached_input_per_mtok: usd($cached), output_per_mtok: usd($out) },
            context_window: $ctx,
            max_output_tokens: $max,
            kind: $kind,
            capabilities: $caps,
        }
    };
}

/// Nano-dollars in one dollar: prices below read as `dollars * D`.
const D: i64 = 1_000_000_000;

/// Current OpenAI prices (USD per 1M tokens, cross-checked against OpenAI's announcements;
/// see `shared/oracle/README.md`). A model without a cached price bills cached tokens at input.
pub static CATALOG: &[CatalogEntry] = &[
    entry!(
        "gpt-4o-mini",
        150 * D / 1000,
        75 * D / 1000,
        600 * D / 1000,
        128_000,
        16_384,
        ModelKind::Chat,
        Capabilities::ALL
    ),
    entry!(
        "gpt-4o-mini-2024-07-18",
        150 * D / 1000,
        75 * D / 1000,
        600 * D / 1000,
        128_000,
        16_384,
        ModelKind::Chat,
        Capabilities::ALL
    ),
    entry!("gpt-4o", 2_500 * D / 1000, 1_250 * D / 1000, 10 * D, 128_000, 16_384, ModelKind::Chat, Capabilities::ALL),
    entry!(
        "gpt-4o-2024-08-06",
        2_500 * D / 1000,
        1_250 * D / 1000,
        10 * D,
        128_000,
        16_384,
        ModelKind::Chat,
        Capabilities::ALL
    ),
    entry!(
        "gpt-4o-2024-11-20",
        2_500 * D / 1000,
        1_250 * D / 1000,
        10 * D,
        128_000,
        16_384,
        ModelKind::Chat,
        Capabilities::ALL
    ),
    entry!("gpt-4o-2024-05-13", 5 * D, 5 * D, 15 * D, 128_000, 4_096, ModelKind::Chat, Capabilities::TOOLS_VISION),
    entry!("gpt-4-turbo", 10 * D, 10 * D, 30 * D, 128_000, 4_096, ModelKind::Chat, Capabilities::TOOLS_VISION),
    entry!(
        "gpt-4-turbo-2024-04-09",
        10 * D,
        10 * D,
        30 * D,
        128_000,
        4_096,
        ModelKind::Chat,
        Capabilities::TOOLS_VISION
    ),
    entry!("gpt-4", 30 * D, 30 * D, 60 * D, 8_192, 4_096, ModelKind::Chat, Capabilities::TOOLS),
    entry!("gpt-4-0613", 30 * D, 30 * D, 60 * D, 8_192, 4_096, ModelKind::Chat, Capabilities::TOOLS),
    entry!(
        "gpt-3.5-turbo",
        500 * D / 1000,
        500 * D / 1000,
        1_500 * D / 1000,
        16_385,
        4_096,
        ModelKind::Chat,
        Capabilities::TOOLS
    ),
    entry!(
        "gpt-3.5-turbo-0125",
        500 * D / 1000,
        500 * D / 1000,
        1_500 * D / 1000,
        16_385,
        4_096,
        ModelKind::Chat,
        Capabilities::TOOLS
    ),
    entry!("o1", 15 * D, 7_500 * D / 1000, 60 * D, 200_000, 100_000, ModelKind::Chat, Capabilities::ALL),
    entry!("o1-2024-12-17", 15 * D, 7_500 * D / 1000, 60 * D, 200_000, 100_000, ModelKind::Chat, Capabilities::ALL),
    entry!(
        "o1-mini",
        1_100 * D / 1000,
        550 * D / 1000,
        4_400 * D / 1000,
        128_000,
        65_536,
        ModelKind::Chat,
        Capabilities::NONE
    ),
    entry!(
        "o3-mini",
        1_100 * D / 1000,
        550 * D / 1000,
        4_400 * D / 1000,
        200_000,
        100_000,
        ModelKind::Chat,
        Capabilities::TOOLS_SCHEMA
    ),
    entry!(
        "o3-mini-2025-01-31",
        1_100 * D / 1000,
        550 * D / 1000,
        4_400 * D / 1000,
        200_000,
        100_000,
        ModelKind::Chat,
        Capabilities::TOOLS_SCHEMA
    ),
    entry!("gpt-4.1", 2 * D, 500 * D / 1000, 8 * D, 1_047_576, 32_768, ModelKind::Chat, Capabilities::ALL),
    entry!(
        "gpt-4.1-mini",
        400 * D / 1000,
        100 * D / 1000,
        1_600 * D / 1000,
        1_047_576,
        32_768,
        ModelKind::Chat,
        Capabilities::ALL
    ),
    entry!(
        "gpt-4.1-nano",
        100 * D / 1000,
        25 * D / 1000,
        400 * D / 1000,
        1_047_576,
        32_768,
        ModelKind::Chat,
        Capabilities::ALL
    ),
    entry!(
        "text-embedding-3-small",
        20 * D / 1000,
        20 * D / 1000,
        0,
        8_191,
        0,
        ModelKind::Embedding,
        Capabilities::NONE
    ),
    entry!(
        "text-embedding-3-large",
        130 * D / 1000,
        130 * D / 1000,
        0,
        8_191,
        0,
        ModelKind::Embedding,
        Capabilities::NONE
    ),
    entry!(
        "text-embedding-ada-002",
        100 * D / 1000,
        100 * D / 1000,
        0,
        8_191,
        0,
        ModelKind::Embedding,
        Capabilities::NONE
    ),
];

/// The catalog entry for an upstream model name, if it has one.
pub fn catalog_entry(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, cached: u64, output: u64) -> Usage {
        Usage { input_tokens: input, cached_input_tokens: cached, output_tokens: output }
    }

    #[test]
    fn catalog_prices_are_the_published_ones() {
        let mini = catalog_entry("gpt-4o-mini").unwrap();
        assert_eq!(mini.price.input_per_mtok, NanoUsd(150_000_000));
        assert_eq!(mini.price.cached_input_per_mtok, NanoUsd(75_000_000));
        assert_eq!(mini.price.output_per_mtok, NanoUsd(600_000_000));
        let o = catalog_entry("gpt-4o").unwrap();
        assert_eq!(o.price.output_per_mtok, NanoUsd(10_000_000_000));
        assert_eq!(catalog_entry("gpt-4.1-nano").unwrap().price.cached_input_per_mtok, NanoUsd(25_000_000));
    }

    #[test]
    fn one_million_tokens_cost_exactly_the_price() {
        let p = catalog_entry("gpt-4o-mini").unwrap().price;
        assert_eq!(p.cost(&usage(1_000_000, 0, 0)), NanoUsd(150_000_000));
        assert_eq!(p.cost(&usage(0, 0, 1_000_000)), NanoUsd(600_000_000));
        assert_eq!(p.cost(&usage(1_000_000, 1_000_000, 0)), NanoUsd(75_000_000));
    }

    #[test]
    fn cost_is_rounded_up_once_per_request() {
        // $0.15 / 1M is 150 nano-dollars a token: catalog prices never need rounding.
        let p = catalog_entry("gpt-4o-mini").unwrap().price;
        assert_eq!(p.cost(&usage(1, 0, 0)), NanoUsd(150));
        assert_eq!(p.cost(&usage(7, 0, 3)), NanoUsd(7 * 150 + 3 * 600));
        assert_eq!(p.cost(&usage(0, 0, 0)), NanoUsd(0));
        // A custom price of $0.0001 / 1M (0.1 nano-dollar a token): 7 input + 3 output
        // tokens = 1.0 nano exactly, 8 + 3 = 1.1 -> 2, rounded up once, not per component.
        let tiny = Price {
            input_per_mtok: NanoUsd(100_000),
            cached_input_per_mtok: NanoUsd(100_000),
            output_per_mtok: NanoUsd(100_000),
        };
        assert_eq!(tiny.cost(&usage(7, 0, 3)), NanoUsd(1));
        assert_eq!(tiny.cost(&usage(8, 0, 3)), NanoUsd(2));
        assert_eq!(tiny.cost(&usage(1, 0, 1)), NanoUsd(1));
        // Cached tokens are a part of input: 100 input of which 40 cached, 10 output on gpt-4o:
        // (60 * $2.50 + 40 * $1.25 + 10 * $10) / 1M = $300 / 1M = 300,000 nano-dollars.
        let o = catalog_entry("gpt-4o").unwrap().price;
        assert_eq!(o.cost(&usage(100, 40, 10)), NanoUsd(300_000));
    }

    proptest::proptest! {
        /// Every amount prints as its exact decimal: nine fraction digits, trailing zeros
        /// (and a bare point) dropped.
        #[test]
        fn display_is_the_exact_decimal_of_any_amount(n in proptest::prelude::any::<i64>()) {
            let abs = n.unsigned_abs();
            let full = format!("{}{}.{:09}", if n < 0 { "-" } else { "" }, abs / 1_000_000_000, abs % 1_000_000_000);
            let expected = full.trim_end_matches('0').trim_end_matches('.');
            proptest::prop_assert_eq!(NanoUsd(n).to_string(), expected);
        }
    }

    #[test]
    fn display_is_exact_decimal() {
        assert_eq!(NanoUsd(524_000).to_string(), "0.000524");
        assert_eq!(NanoUsd(1).to_string(), "0.000000001");
        assert_eq!(NanoUsd(2_500_000_000).to_string(), "2.5");
        assert_eq!(NanoUsd(0).to_string(), "0");
        assert_eq!(NanoUsd(-1_500_000_010).to_string(), "-1.50000001");
        assert_eq!(NanoUsd(7_000_000_000).to_string(), "7");
        assert_eq!(NanoUsd(i64::MIN).to_string(), "-9223372036.854775808");
    }

    #[test]
    fn worst_case_never_below_cost() {
        let p = catalog_entry("gpt-4o").unwrap().price;
        assert!(p.worst_case(1000, 500) >= p.cost(&usage(1000, 300, 500)));
    }
}
