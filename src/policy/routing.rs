//! Choosing the model that serves a request, and reserving its worst-case cost.
//!
//! The candidates are the asked model and its downgrade chain (`[routing] downgrade`). A
//! budget past its `downgrade_at` threshold moves the asked model to the back of the line;
//! any candidate whose worst-case cost does not fit what is left is passed over. A cheaper
//! model is only a candidate if it can serve the request: allowed for the key and the team,
//! the same kind (chat / embedding), the capabilities the request uses, and a context
//! window that holds the prompt plus the output asked for.
//!
//! Counting a long prompt exactly costs milliseconds, so the worst case is first priced on a
//! cheap upper bound (bytes, never fewer than tokens); only when that does not fit is the
//! prompt counted exactly and the reservation tried again. Far from the limit no request
//! pays for the tokenizer; near it, decisions are exact.

use std::sync::Arc;

use crate::policy::budget::{Applicable, BudgetStore, Hold, Loose, Refusal, Reservation, Unavailable};
use crate::policy::models::{Catalog, Model};
use crate::policy::pricing::NanoUsd;
use crate::policy::request::ParsedRequest;
use crate::policy::tokens::{self, Encoding};

/// Which models a caller may use (its key's and its team's lists).
pub trait Allows: Sync {
    fn allows(&self, model: &str) -> bool;
}

/// What routing decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Serve,
    Downgrade,
    Refuse,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Serve => "serve",
            Decision::Downgrade => "downgrade",
            Decision::Refuse => "refuse",
        }
    }
}

/// A routed, reserved request.
#[derive(Debug)]
pub struct Admission {
    pub model: Arc<Model>,
    pub decision: Decision,
    /// Why this model (for logs and dry runs).
    pub reason: String,
    pub reservation: Reservation,
    /// Prompt tokens for the served model: exact if `prompt_exact`, else an upper bound.
    pub prompt_tokens: u64,
    pub prompt_exact: bool,
    /// The reserved worst case.
    pub max_cost: NanoUsd,
}

/// Prompt token counts for one request, computed lazily: each model's bound and each
/// encoding's exact count at most once.
pub struct PromptCounter<'a> {
    request: &'a ParsedRequest,
    /// Bounds walked over the body, per model (they differ by the model's per-message, tool
    /// and image constants: gpt-4o-mini's worst-case image is ~40 times gpt-4o's).
    bounds: Vec<(String, u64)>,
    /// Exact counts per encoding (at most two encodings exist).
    exact: Vec<(Encoding, u64)>,
}

impl<'a> PromptCounter<'a> {
    pub fn new(request: &'a ParsedRequest) -> Self {
        PromptCounter { request, bounds: Vec::new(), exact: Vec::new() }
    }

    /// An upper bound on the prompt's tokens for `model` (its upstream model's tokenizer
    /// and chat rule), without running the tokenizer.
    pub fn bound(&mut self, model: &Model) -> u64 {
        let model = model.upstream_model.as_str();
        let r = self.request;
        if let Some(chat) = r.plain_chat {
            return chat.upper_bound(model);
        }
        if let Some(&(_, n)) = self.bounds.iter().find(|(m, _)| m == model) {
            return n;
        }
        let n = tokens::prompt_tokens_upper_bound(r.endpoint.prompt_kind(), model, r.prompt.value());
        self.bounds.push((model.to_owned(), n));
        n
    }

    /// The exact prompt tokens for `model`, counted with its upstream model's tokenizer and
    /// chat rule (an alias's name says nothing of either).
    pub fn exact(&mut self, model: &Model) -> u64 {
        let model = model.upstream_model.as_str();
        let encoding = Encoding::for_model(model);
        if let Some(&(_, n)) = self.exact.iter().find(|(e, _)| *e == encoding) {
            return n;
        }
        let n = tokens::prompt_tokens(self.request.endpoint.prompt_kind(), model, self.request.prompt.value());
        self.exact.push((encoding, n));
        n
    }
}

/// Output tokens to reserve for on `model`: the request's limit or the model's, per choice.
pub fn max_output(request: &ParsedRequest, model: &Model) -> u64 {
    request.max_output().unwrap_or(model.max_output_tokens).saturating_mul(request.n)
}

/// Why a candidate cannot serve the request, if it cannot.
fn unfit(
    request: &ParsedRequest,
    caller: &dyn Allows,
    asked: &Model,
    m: &Model,
    counter: &mut PromptCounter,
) -> Option<String> {
    if !caller.allows(&m.name) {
        return Some(format!("{} is not allowed for this key or team", m.name));
    }
    if m.kind != asked.kind {
        return Some(format!("{} serves a different kind of request", m.name));
    }
    if !m.capabilities.covers(&request.needs) {
        return Some(format!("{} lacks a capability the request uses", m.name));
    }
    if request.output_limit_over(m.max_output_tokens).is_some() {
        return Some(format!("{} cannot produce the max_tokens asked for", m.name));
    }
    let out = max_output(request, m) / request.n.max(1);
    if counter.bound(m).saturating_add(out) > m.context_window
        && counter.exact(m).saturating_add(out) > m.context_window
    {
        return Some(format!("the prompt plus max output does not fit {}'s context window", m.name));
    }
    None
}

/// Who asks for what: the request side of [`admit`].
#[derive(Clone, Copy)]
pub struct Ask<'a> {
    /// Which models the caller may use.
    pub caller: &'a dyn Allows,
    /// The caller's budgets (its key's and its team's).
    pub budgets: &'a [Applicable],
    pub request: &'a ParsedRequest,
    /// The model the request names.
    pub asked: &'a Arc<Model>,
    /// The request's id, which its reservations are held under.
    pub request_id: &'a str,
}

/// Why a request was not admitted.
#[derive(Debug)]
pub enum NotAdmitted {
    /// Nothing the request may use fits its budgets: why, and the last refusing budget.
    Refused(String, Option<Refusal>),
    /// The budget store could not be reached; nothing was decided.
    Unavailable(Unavailable),
}

impl From<Unavailable> for NotAdmitted {
    fn from(e: Unavailable) -> Self {
        NotAdmitted::Unavailable(e)
    }
}

/// Routes the request and reserves its worst case, or says why nothing fits.
pub async fn admit(
    catalog: &Catalog,
    book: &impl BudgetStore,
    ask: Ask<'_>,
    counter: &mut PromptCounter<'_>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Admission, NotAdmitted> {
    let Ask { caller, budgets, request, asked, request_id } = ask;
    let chain = catalog.chain(asked);
    let mut past_threshold = chain.len() > 1 && book.past_threshold(budgets, now).await?;
    if past_threshold {
        // Loose reservations may overstate what is held: decide on exact figures.
        let pending = book.loose_on(budgets);
        if !pending.is_empty() {
            book.tighten(&pending);
            past_threshold = book.past_threshold(budgets, now).await?;
        }
    }
    // Past the threshold the asked model goes last: used only if no cheaper one can serve.
    let order: Vec<usize> =
        if past_threshold { (1..chain.len()).chain([0]).collect() } else { (0..chain.len()).collect() };
    let mut reasons = Vec::new();
    let mut last_refusal = None;
    if past_threshold {
        reasons.push(format!("a budget is past its downgrade threshold; {} is tried last", asked.name));
    }
    for i in order {
        let m = &chain[i];
        if i > 0 {
            if let Some(why) = unfit(request, caller, asked, m, counter) {
                reasons.push(why);
                continue;
            }
        }
        let out = max_output(request, m);
        match reserve(book, budgets, request, request_id, m, out, counter, now).await? {
            Ok((reservation, prompt_tokens, exact, max_cost)) => {
                let decision = if i == 0 { Decision::Serve } else { Decision::Downgrade };
                let reason = match (decision, reasons.is_empty()) {
                    (Decision::Serve, true) => "within budget".to_string(),
                    _ => reasons.join("; "),
                };
                return Ok(Admission {
                    model: m.clone(),
                    decision,
                    reason,
                    reservation,
                    prompt_tokens,
                    prompt_exact: exact,
                    max_cost,
                });
            }
            Err((cost, refusal)) => {
                reasons.push(does_not_fit(m, cost, &refusal));
                last_refusal = Some(refusal);
            }
        }
    }
    Err(NotAdmitted::Refused(reasons.join("; "), last_refusal))
}

/// Moves a request's reservation to the fallback deployment `m`, at `m`'s own worst case.
/// `held` was priced for a deployment that failed before it answered (nothing billed), so it
/// is released first. A fallback that cannot serve the request — the checks a downgrade target
/// passes — keeps `held` and says why; one whose worst case does not fit says why and leaves
/// the request holding nothing. Either way it is skipped, like a target the key may not use.
pub async fn reserve_fallback(
    book: &impl BudgetStore,
    ask: Ask<'_>,
    held: Reservation,
    m: &Arc<Model>,
    counter: &mut PromptCounter<'_>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Reservation, (Reservation, String)> {
    let Ask { caller, budgets, request, asked, request_id } = ask;
    if let Some(why) = unfit(request, caller, asked, m, counter) {
        return Err((held, why));
    }
    book.release(held).await;
    match reserve(book, budgets, request, request_id, m, max_output(request, m), counter, now).await {
        Ok(Ok((reservation, ..))) => Ok(reservation),
        Ok(Err((cost, refusal))) => Err((Reservation::none(), does_not_fit(m, cost, &refusal))),
        Err(Unavailable(why)) => Err((Reservation::none(), format!("the budget store is unavailable: {why}"))),
    }
}

/// Why `m` was passed over for the budget: its worst case and what the refusing budget has left.
fn does_not_fit(m: &Model, cost: NanoUsd, refusal: &Refusal) -> String {
    format!(
        "{}'s worst-case cost ${} does not fit the {} budget's remaining ${}",
        m.name,
        cost,
        refusal.scope.label(),
        refusal.remaining
    )
}

/// Reserves `m`'s worst case: on the token bound if that fits (a loose reservation, exact
/// count deferred), else on the exact count; if even that does not fit while other requests
/// hold loose reservations, those are tightened to their exact worst case first, so a
/// refusal is only ever given on exact figures.
#[allow(clippy::too_many_arguments)]
async fn reserve(
    book: &impl BudgetStore,
    budgets: &[Applicable],
    request: &ParsedRequest,
    request_id: &str,
    m: &Arc<Model>,
    out: u64,
    counter: &mut PromptCounter<'_>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Result<(Reservation, u64, bool, NanoUsd), (NanoUsd, Refusal)>, Unavailable> {
    let limited = budgets.iter().any(|b| b.spec.limit.is_some());
    let bound = counter.bound(m);
    let bound_cost = m.price.worst_case(bound, out);
    let hold = |loose, prompt| Hold { request_id, loose, floor: m.price.worst_case(prompt, 0) };
    if !limited || !book.tightens() {
        if limited {
            // Nobody else can tighten a loose reservation: price it exactly now.
            let exact = counter.exact(m);
            let cost = m.price.worst_case(exact, out);
            let r = book.reserve(budgets, cost, now, hold(None, exact)).await?;
            return Ok(r.map(|r| (r, exact, true, cost)).map_err(|e| (cost, e)));
        }
        let r = book.reserve(budgets, bound_cost, now, hold(None, bound)).await?;
        return Ok(r.map(|r| (r, bound, false, bound_cost)).map_err(|e| (bound_cost, e)));
    }
    let prompt = request.prompt.clone();
    let (kind, upstream, price) = (request.endpoint.prompt_kind(), m.upstream_model.clone(), m.price);
    let loose =
        Loose::new(bound_cost, move || price.worst_case(tokens::prompt_tokens(kind, &upstream, prompt.value()), out));
    if let Ok(r) = book.reserve(budgets, bound_cost, now, hold(Some(loose), bound)).await? {
        return Ok(Ok((r, bound, false, bound_cost)));
    }
    let exact = counter.exact(m);
    let cost = m.price.worst_case(exact, out);
    match book.reserve(budgets, cost, now, hold(None, exact)).await? {
        Ok(r) => Ok(Ok((r, exact, true, cost))),
        Err(refusal) => {
            let pending = book.loose_on(budgets);
            if pending.is_empty() {
                return Ok(Err((cost, refusal)));
            }
            book.tighten(&pending);
            let r = book.reserve(budgets, cost, now, hold(None, exact)).await?;
            Ok(r.map(|r| (r, exact, true, cost)).map_err(|e| (cost, e)))
        }
    }
}
