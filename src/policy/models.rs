//! The models clients may ask for, priced and bounded, and how they relate: the downgrade
//! chain (a cheaper model to move to as a budget runs low) and the fallbacks (other
//! deployments to try when one fails before answering). Built once from the config.

use std::sync::Arc;

use foldhash::HashMap;

use crate::policy::pricing::{Capabilities, ModelKind, Price};

/// A model clients may ask for, served by a provider, with its price and limits.
#[derive(Clone, Debug)]
pub struct Model {
    pub name: String,
    /// The name of the provider that serves it (`[[providers]]`).
    pub provider: String,
    pub upstream_model: String,
    pub price: Price,
    /// Tokens (prompt + output) the model accepts.
    pub context_window: u64,
    /// Most output tokens one request may ask for.
    pub max_output_tokens: u64,
    pub kind: ModelKind,
    pub capabilities: Capabilities,
}

/// Every model, with the routes between them.
#[derive(Debug, Default)]
pub struct Catalog {
    pub models: HashMap<String, Arc<Model>>,
    /// Model names in config order (for `/v1/models`).
    pub model_order: Vec<String>,
    /// asked model -> cheaper model.
    pub downgrade: HashMap<String, String>,
    /// model -> deployments tried in order when it fails before answering.
    pub fallbacks: HashMap<String, Vec<String>>,
}

/// Most steps followed along a downgrade chain (config validation rejects cycles already).
const MAX_CHAIN: usize = 16;

impl Catalog {
    /// The asked model and its downgrade chain, in order.
    pub fn chain(&self, asked: &Arc<Model>) -> Vec<Arc<Model>> {
        let mut out = vec![asked.clone()];
        let mut at = asked.name.as_str();
        while let Some(next) = self.downgrade.get(at) {
            let Some(model) = self.models.get(next) else { break };
            if out.iter().any(|m| m.name == model.name) || out.len() >= MAX_CHAIN {
                break;
            }
            out.push(model.clone());
            at = next;
        }
        out
    }

    /// `model`'s fallback deployments, in order.
    pub fn fallbacks_of<'a>(&'a self, model: &str) -> impl Iterator<Item = &'a Arc<Model>> + 'a {
        self.fallbacks.get(model).into_iter().flatten().filter_map(|name| self.models.get(name))
    }
}
