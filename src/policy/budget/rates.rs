//! rpm / tpm: sliding 60-second windows per budget scope.

use std::collections::VecDeque;
use std::sync::Mutex;

use foldhash::HashMap;

use super::{Applicable, Scope};

/// Sliding 60-second windows for rpm / tpm.
#[derive(Default)]
pub struct RateLimiter {
    windows: Mutex<HashMap<Scope, Window>>,
}

#[derive(Default)]
struct Window {
    /// (admitted at, Unix ms; tokens charged) — oldest first.
    events: VecDeque<(i64, u64)>,
    tokens: u64,
}

const WINDOW_MS: i64 = 60_000;

/// A rate limit was hit: which, and seconds until there is room.
#[derive(Debug, Clone)]
pub struct RateRefusal {
    pub scope: Scope,
    pub what: &'static str,
    pub limit: u64,
    pub retry_after_s: u64,
}

/// A slot taken in the windows; its tokens are corrected once the real count is known.
#[derive(Debug)]
pub struct RateTicket {
    entries: Vec<(Scope, i64)>,
    tokens: u64,
}

impl RateLimiter {
    /// Admits a request charging `tokens` (its prompt estimate) to every limited scope, or
    /// refuses it without charging any.
    pub fn admit(&self, budgets: &[Applicable], tokens: u64, now_ms: i64) -> Result<RateTicket, RateRefusal> {
        let limited = Self::limited(budgets);
        if limited.is_empty() {
            return Ok(RateTicket { entries: Vec::new(), tokens });
        }
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        Self::room(&mut windows, &limited, tokens, now_ms)?;
        let mut entries = Vec::with_capacity(limited.len());
        for b in limited {
            let w = windows.entry(b.scope.clone()).or_default();
            w.events.push_back((now_ms, tokens));
            w.tokens += tokens;
            entries.push((b.scope.clone(), now_ms));
        }
        Ok(RateTicket { entries, tokens })
    }

    /// Whether [`admit`](Self::admit) would admit a request charging `tokens` now, without
    /// taking a slot (a dry run).
    pub fn check(&self, budgets: &[Applicable], tokens: u64, now_ms: i64) -> Result<(), RateRefusal> {
        let limited = Self::limited(budgets);
        if limited.is_empty() {
            return Ok(());
        }
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        Self::room(&mut windows, &limited, tokens, now_ms)
    }

    /// The budgets with an rpm or tpm limit.
    fn limited(budgets: &[Applicable]) -> Vec<&Applicable> {
        budgets.iter().filter(|b| b.spec.rpm.is_some() || b.spec.tpm.is_some()).collect()
    }

    /// Whether every limited scope's window has room for one more request of `tokens`.
    fn room(
        windows: &mut HashMap<Scope, Window>,
        limited: &[&Applicable],
        tokens: u64,
        now_ms: i64,
    ) -> Result<(), RateRefusal> {
        for b in limited {
            let w = windows.entry(b.scope.clone()).or_default();
            w.expire(now_ms);
            if let Some(rpm) = b.spec.rpm {
                if w.events.len() as u64 >= rpm {
                    let oldest = w.events.front().map_or(now_ms, |e| e.0);
                    return Err(RateRefusal {
                        scope: b.scope.clone(),
                        what: "requests per minute",
                        limit: rpm,
                        retry_after_s: retry_after(oldest, now_ms),
                    });
                }
            }
            if let Some(tpm) = b.spec.tpm {
                // A request is admitted while the window has room; one request may overshoot.
                if w.tokens >= tpm || (w.tokens > 0 && w.tokens + tokens > tpm) {
                    let retry = w.time_until_room(tpm.saturating_sub(tokens), now_ms);
                    return Err(RateRefusal {
                        scope: b.scope.clone(),
                        what: "tokens per minute",
                        limit: tpm,
                        retry_after_s: retry,
                    });
                }
            }
        }
        Ok(())
    }

    /// Replaces the ticket's estimated tokens with the real count.
    pub fn correct(&self, ticket: RateTicket, actual_tokens: u64) {
        if ticket.entries.is_empty() || ticket.tokens == actual_tokens {
            return;
        }
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        for (scope, at) in ticket.entries {
            if let Some(w) = windows.get_mut(&scope) {
                if let Some(e) = w.events.iter_mut().find(|e| e.0 == at && e.1 == ticket.tokens) {
                    w.tokens = w.tokens - e.1 + actual_tokens;
                    e.1 = actual_tokens;
                }
            }
        }
    }
}

impl Window {
    fn expire(&mut self, now_ms: i64) {
        while let Some(&(at, tokens)) = self.events.front() {
            if at + WINDOW_MS > now_ms {
                break;
            }
            self.events.pop_front();
            self.tokens -= tokens;
        }
    }

    /// Seconds until the window's tokens drop to `target` or below.
    fn time_until_room(&self, target: u64, now_ms: i64) -> u64 {
        let mut tokens = self.tokens;
        for &(at, t) in &self.events {
            if tokens <= target {
                break;
            }
            tokens -= t;
            if tokens <= target {
                return retry_after(at, now_ms);
            }
        }
        retry_after(self.events.back().map_or(now_ms, |e| e.0), now_ms)
    }
}

fn retry_after(oldest_ms: i64, now_ms: i64) -> u64 {
    (((oldest_ms + WINDOW_MS - now_ms).max(1000)) as u64).div_ceil(1000)
}
