//! Virtual keys: generation, hashing, and the in-memory directory every request
//! authenticates against (no database round trip per request).
//!
//! A presented key is hashed with SHA-256 and the hash looked up; secrets are never stored
//! or compared directly, so lookup time says nothing about how many leading characters of a
//! guess were right. The directory is a snapshot of the teams and keys tables, swapped whole
//! when they change: at once after an admin API write, and within `POLL_INTERVAL` after a
//! change made by the CLI in another process (it bumps `directory_version`) — or at once,
//! for a key the CLI just created, when a request presents it (`authenticate_fresh`). A CLI
//! command that takes rights away (a key revoked, a team deleted or changed) returns only
//! after `CLI_SETTLE`, by when a running server has polled the change: a key revoked with
//! the CLI fails at once after the command returns, as one revoked through the admin API does.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use foldhash::HashMap;
use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::ledger::{Backend, KeyRow, LedgerError, TeamRow};
use crate::policy::budget::{Applicable, Scope};

/// How often a running server checks whether teams or keys changed in the database (one
/// small query: the directory's version).
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long a CLI command that revokes rights waits before it returns: a few polls, so that
/// a running server has seen the change by then even when a poll runs late.
pub const CLI_SETTLE: Duration = Duration::from_millis(4 * POLL_INTERVAL.as_millis() as u64);

/// Random base62 characters after `tg-`.
const KEY_RANDOM_CHARS: usize = 40;

/// Generates a new virtual key secret: `tg-` and 40 random base62 characters (~238 bits).
pub fn generate_secret() -> String {
    format!("tg-{}", Alphanumeric.sample_string(&mut rand::rng(), KEY_RANDOM_CHARS))
}

/// Generates a key id (not secret): `key_` and 16 base62 characters.
pub fn generate_key_id() -> String {
    format!("key_{}", Alphanumeric.sample_string(&mut rand::rng(), 16))
}

/// SHA-256 of a key secret.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The display prefix stored beside the hash: `tg-` and the first 4 random characters.
pub fn display_prefix(secret: &str) -> String {
    secret.chars().take(7).collect()
}

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key: Arc<KeyRow>,
    pub team: Arc<TeamRow>,
    /// The key's and the team's budget scopes, made once per snapshot.
    scopes: [Scope; 2],
}

impl Caller {
    /// The budgets and limits this request must fit: the key's, then the team's.
    pub fn budgets(&self) -> [Applicable; 2] {
        let [key, team] = self.scopes.clone();
        [
            Applicable { scope: key, spec: self.key.budget.clone() },
            Applicable { scope: team, spec: self.team.budget.clone() },
        ]
    }

    /// Whether both the key's and the team's allow-lists admit `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.key.budget.allows(model) && self.team.budget.allows(model)
    }
}

impl crate::policy::routing::Allows for Caller {
    fn allows(&self, model: &str) -> bool {
        Caller::allows(self, model)
    }
}

/// A snapshot of teams and keys.
#[derive(Default)]
pub struct Snapshot {
    version: i64,
    by_hash: HashMap<[u8; 32], (Arc<KeyRow>, Scope)>,
    teams: HashMap<String, (Arc<TeamRow>, Scope)>,
}

/// The directory: the current snapshot, swapped whole on change.
#[derive(Default)]
pub struct Directory {
    current: RwLock<Arc<Snapshot>>,
    /// When the last catch-up check for an unknown key started (see `authenticate_fresh`);
    /// the lock makes concurrent checks one.
    checked: tokio::sync::Mutex<Option<Instant>>,
}

/// Longest an unknown key's request waits for the catch-up check before its 401.
const CATCH_UP_TIMEOUT: Duration = Duration::from_millis(250);

impl Directory {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reloads from the database if its version moved (or `force`).
    pub async fn refresh(&self, db: &Backend, force: bool) -> Result<(), LedgerError> {
        let version = db.directory_version().await?;
        if !force && version == self.snapshot().version {
            return Ok(());
        }
        let teams = db.load_teams().await?;
        let keys = db.load_keys().await?;
        self.install(version, teams, keys);
        Ok(())
    }

    /// Replaces the snapshot with these rows, read at `version` (revoked keys and keys of
    /// missing teams drop out); an older version than the current one is ignored.
    pub fn install(&self, version: i64, teams: Vec<TeamRow>, keys: Vec<KeyRow>) {
        let teams: HashMap<String, (Arc<TeamRow>, Scope)> = teams
            .into_iter()
            .map(|t| {
                let scope = Scope::Team(t.name.as_str().into());
                (t.name.clone(), (Arc::new(t), scope))
            })
            .collect();
        let by_hash = keys
            .into_iter()
            .filter(|k| k.revoked_ms.is_none() && teams.contains_key(&k.team))
            .map(|k| {
                let scope = Scope::Key(k.id.as_str().into());
                (k.key_hash, (Arc::new(k), scope))
            })
            .collect();
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        // A slow poll that read an older version must not undo a newer install (e.g. the one
        // an admin API write just made).
        if version >= current.version {
            *current = Arc::new(Snapshot { version, by_hash, teams });
        }
    }

    /// Authenticates a bearer secret.
    pub fn authenticate(&self, secret: &str) -> Option<Caller> {
        let snapshot = self.snapshot();
        let (key, key_scope) = snapshot.by_hash.get(&hash_secret(secret))?.clone();
        let (team, team_scope) = snapshot.teams.get(&key.team)?.clone();
        Some(Caller { key, team, scopes: [key_scope, team_scope] })
    }

    /// Authenticates a bearer secret; a key the snapshot does not know may have been created
    /// by the CLI since the last poll, so the database's directory version is checked once
    /// (reloading if it moved) before giving up. Concurrent unknown keys share one check
    /// that started after they arrived, so a flood of bad keys costs one cheap query at a
    /// time, and a script that creates a key with the CLI can use it at once.
    pub async fn authenticate_fresh(&self, db: &Backend, secret: &str) -> Option<Caller> {
        if let Some(caller) = self.authenticate(secret) {
            return Some(caller);
        }
        let arrived = Instant::now();
        let _ = tokio::time::timeout(CATCH_UP_TIMEOUT, async {
            let mut checked = self.checked.lock().await;
            if checked.is_some_and(|started| started >= arrived) {
                return;
            }
            let started = Instant::now();
            if let Err(e) = self.refresh(db, false).await {
                tracing::debug!(error = %e, "could not check for new keys");
            }
            *checked = Some(started);
        })
        .await;
        self.authenticate(secret)
    }

    /// The team named `name`, as of the snapshot.
    pub fn team(&self, name: &str) -> Option<Arc<TeamRow>> {
        self.snapshot().teams.get(name).map(|(team, _)| team.clone())
    }
}

/// The bearer token of a request (`Authorization: Bearer …`, or `api-key:` as Azure clients send).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?.trim();
        let (scheme, token) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty());
    }
    headers.get("api-key").and_then(|v| v.to_str().ok()).map(str::trim).filter(|t| !t.is_empty())
}

/// Authenticates a virtual key, or answers 401.
pub async fn authenticate(directory: &Directory, db: &Backend, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let Some(secret) = bearer(headers) else {
        return Err(ApiError::InvalidApiKey(
            "You didn't provide an API key. Provide your tollgate virtual key as a Bearer token in the Authorization header.",
        ));
    };
    directory
        .authenticate_fresh(db, secret)
        .await
        .ok_or(ApiError::InvalidApiKey("Incorrect API key provided, or the key was revoked."))
}

/// Checks the master key for the admin API. Both sides are hashed first, so the comparison
/// takes the same time wherever a guess goes wrong.
pub fn is_master(master: Option<&crate::config::Secret>, headers: &HeaderMap) -> bool {
    match (master, bearer(headers)) {
        (Some(master), Some(given)) => hash_secret(master.expose()) == hash_secret(given),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_tg_prefixed_base62() {
        let s = generate_secret();
        assert!(s.starts_with("tg-"));
        assert!(s.len() >= 3 + 32);
        assert!(s[3..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(s, generate_secret());
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert("authorization", "Bearer tg-abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("tg-abc"));
        h.insert("authorization", "bearer   tg-abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("tg-abc"));
        h.insert("authorization", "Basic xyz".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
