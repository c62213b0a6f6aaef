//! Budgets and rate windows shared by replicas through Redis (`redis_url`): the same
//! operations as `shared.rs` runs on PostgreSQL, each one Lua script, which Redis runs
//! atomically. The ledger stays in PostgreSQL: a budget's account starts from its sum there,
//! and the requests of swept reservations are marked there.
//!
//! Keys, under the configured prefix: `replicas` (a sorted set: replica → lease end, Unix ms
//! on Redis's clock), `acct:<scope>:<period start>` (a hash: spent, reserved),
//! `hold:<name>` (a hash: amount, floor, request, accounts), `holds:<replica>` (a set of its
//! hold names), `rate:<scope>` (a sorted set: ticket → admitted at) and `ratetok:<scope>`
//! (a hash: ticket → tokens). Money is integer nano-dollars; Lua's numbers are doubles, exact
//! below 2^53 nano-dollars (about 9 million dollars), which bounds the limits this path takes.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::shared::{split_scope, Correction, HoldRow, RateAsk, RateRefused, Refused, SettleRow};
use super::{LedgerError, PostgresBackend};

const NOW: &str = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)";

const RENEW: &str = r"
local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 0";

/// KEYS: replicas, the hold, the replica's holds, then each account. ARGV: replica, hold
/// name, amount, floor, request id, then each account's limit.
const RESERVE: &str = r"
local lease = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not lease or tonumber(lease) < now then return {-1, 0, 0} end
local amount = tonumber(ARGV[3])
local n = #KEYS - 3
for i = 1, n do
  local a = redis.call('HMGET', KEYS[3 + i], 'spent', 'reserved')
  if not a[1] then return {-2, i, 0} end
  local spent = tonumber(a[1])
  local reserved = tonumber(a[2] or '0')
  if spent + reserved + amount > tonumber(ARGV[5 + i]) then return {i, spent, reserved} end
end
local accounts = {}
for i = 1, n do
  redis.call('HINCRBY', KEYS[3 + i], 'reserved', ARGV[3])
  accounts[i] = KEYS[3 + i]
end
redis.call('HSET', KEYS[2], 'amount', ARGV[3], 'floor', ARGV[4], 'request', ARGV[5],
  'accounts', table.concat(accounts, '\n'))
redis.call('SADD', KEYS[3], ARGV[2])
return {0, 0, 0}";

/// ARGV: the prefix, then per settlement: hold name, replica, cost, floor, n, n accounts. As
/// `tg_settle`: a held hold is released and its cost booked; a swept one books what it cost
/// beyond its floor, once; one never taken books nothing. Only accounts that exist are
/// touched (one that vanished, with Redis's data, is opened again from the ledger).
const SETTLE: &str = r"
local p = ARGV[1]
local i = 2
while i <= #ARGV do
  local hold, replica, cost, floor, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  local amount = redis.call('HGET', p .. 'hold:' .. hold, 'amount')
  local late = not amount and redis.call('SREM', p .. 'swept', hold) == 1
  for j = 1, n do
    local acct = ARGV[i + 4 + j]
    if redis.call('EXISTS', acct) == 1 then
      if amount then
        if redis.call('HINCRBY', acct, 'reserved', -tonumber(amount)) < 0 then redis.call('HSET', acct, 'reserved', 0) end
        redis.call('HINCRBY', acct, 'spent', cost)
      elseif late and cost > floor then
        redis.call('HINCRBY', acct, 'spent', cost - floor)
      end
    end
  end
  if amount then
    redis.call('DEL', p .. 'hold:' .. hold)
    redis.call('SREM', p .. 'holds:' .. replica, hold)
  end
  i = i + 5 + n
end
return 0";

/// KEYS: replicas. ARGV: the prefix. Returns request id, floor, request id, floor, …
const SWEEP: &str = r"
local p = ARGV[1]
local out = {}
for _, r in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)) do
  local set = p .. 'holds:' .. r
  for _, h in ipairs(redis.call('SMEMBERS', set)) do
    local v = redis.call('HMGET', p .. 'hold:' .. h, 'amount', 'floor', 'request', 'accounts')
    if v[1] then
      for acct in string.gmatch(v[4], '[^\n]+') do
        if redis.call('EXISTS', acct) == 1 then
          if redis.call('HINCRBY', acct, 'reserved', -tonumber(v[1])) < 0 then redis.call('HSET', acct, 'reserved', 0) end
          redis.call('HINCRBY', acct, 'spent', v[2])
        end
      end
      table.insert(out, v[3])
      table.insert(out, v[2])
      redis.call('DEL', p .. 'hold:' .. h)
      redis.call('SADD', p .. 'swept', h)
    end
  end
  redis.call('DEL', set)
  redis.call('ZREM', KEYS[1], r)
end
return out";

/// KEYS: per window, its events and its tokens (with their running total, `_sum`). ARGV:
/// ticket, tokens, now, record (1/0), then per window its rpm and tpm ('' for none). Returns
/// {0, '', 0} or {window, what, ms until there is room}.
const RATE_ADMIT: &str = r"
local ticket, tokens, now, record = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local n = #KEYS / 2
for i = 1, n do
  local z, h = KEYS[2 * i - 1], KEYS[2 * i]
  for _, old in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', now - 60000)) do
    local t = redis.call('HGET', h, old)
    if t then
      redis.call('HINCRBY', h, '_sum', -tonumber(t))
      redis.call('HDEL', h, old)
    end
    redis.call('ZREM', z, old)
  end
  local rpm, tpm = ARGV[3 + 2 * i], ARGV[4 + 2 * i]
  if rpm ~= '' and redis.call('ZCARD', z) >= tonumber(rpm) then
    local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
    return {i, 'requests per minute', tonumber(first[2]) + 60000 - now}
  end
  if tpm ~= '' then
    local limit = tonumber(tpm)
    local sum = tonumber(redis.call('HGET', h, '_sum') or '0')
    -- As in one process: admitted while the window has room; one request may overshoot.
    if sum >= limit or (sum > 0 and sum + tokens > limit) then
      local target = math.max(limit - tokens, 0)
      local left, room_at = sum, now
      local events = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
      for k = 1, #events, 2 do
        left = left - tonumber(redis.call('HGET', h, events[k]) or '0')
        if left <= target then
          room_at = tonumber(events[k + 1])
          break
        end
      end
      return {i, 'tokens per minute', room_at + 60000 - now}
    end
  end
end
if record then
  for i = 1, n do
    redis.call('ZADD', KEYS[2 * i - 1], now, ticket)
    redis.call('HSET', KEYS[2 * i], ticket, ARGV[2])
    redis.call('HINCRBY', KEYS[2 * i], '_sum', ARGV[2])
    redis.call('PEXPIRE', KEYS[2 * i - 1], 120000)
    redis.call('PEXPIRE', KEYS[2 * i], 120000)
  end
end
return {0, '', 0}";

/// KEYS: per window, its events and its tokens. ARGV: ticket, tokens.
const RATE_CORRECT: &str = r"
for i = 1, #KEYS / 2 do
  local z, h = KEYS[2 * i - 1], KEYS[2 * i]
  local old = redis.call('HGET', h, ARGV[1])
  if old and redis.call('ZSCORE', z, ARGV[1]) then
    redis.call('HSET', h, ARGV[1], ARGV[2])
    redis.call('HINCRBY', h, '_sum', tonumber(ARGV[2]) - tonumber(old))
  end
end
return 0";

/// The scripts, each hashed once (Redis runs them by hash, loading one it has not seen).
static SCRIPTS: LazyLock<[Script; 6]> = LazyLock::new(|| {
    let with_now = |body: &str| Script::new(&format!("{NOW}\n{body}"));
    [
        Script::new(RENEW),
        with_now(RESERVE),
        Script::new(SETTLE),
        with_now(SWEEP),
        Script::new(RATE_ADMIT),
        Script::new(RATE_CORRECT),
    ]
});

fn script(which: usize) -> &'static Script {
    &SCRIPTS[which]
}

const S_RENEW: usize = 0;
const S_RESERVE: usize = 1;
const S_SETTLE: usize = 2;
const S_SWEEP: usize = 3;
const S_RATE_ADMIT: usize = 4;
const S_RATE_CORRECT: usize = 5;

/// Budgets and rate windows in Redis, the ledger in PostgreSQL.
#[derive(Clone)]
pub struct RedisShared {
    conn: ConnectionManager,
    prefix: String,
    pg: PostgresBackend,
}

impl RedisShared {
    /// Connects lazily: a replica starts while Redis is down, and refuses budgeted requests
    /// (503) until it is back. Commands time out after a second.
    pub fn connect(url: &str, prefix: &str, pg: PostgresBackend) -> Result<RedisShared, LedgerError> {
        let client = redis::Client::open(url).map_err(|e| LedgerError::Redis(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(redis_error)?;
        Ok(RedisShared { conn, prefix: prefix.to_string(), pg })
    }

    /// The PostgreSQL ledger beside Redis.
    pub fn ledger(&self) -> &PostgresBackend {
        &self.pg
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Redis's key of a budget account.
    pub fn account_key(&self, scope: &str, start: i64) -> String {
        self.key(&format!("acct:{scope}:{start}"))
    }

    pub async fn ping(&self) -> Result<(), LedgerError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<String>(&mut conn).await.map_err(redis_error)?;
        Ok(())
    }

    pub async fn renew_lease(&self, replica: &str, lease_ms: u64) -> Result<(), LedgerError> {
        let mut conn = self.conn.clone();
        script(S_RENEW)
            .key(self.key("replicas"))
            .arg(replica)
            .arg(lease_ms)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    /// Ends the lease at once: what the replica still holds is released by the next sweep.
    pub async fn end_lease(&self, replica: &str) -> Result<(), LedgerError> {
        let mut conn = self.conn.clone();
        redis::cmd("ZADD")
            .arg(self.key("replicas"))
            .arg(0)
            .arg(replica)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    /// Releases the reservations of replicas whose lease ran out, each charged its floor, and
    /// marks their requests' entries in the ledger interrupted at that charge.
    pub async fn sweep(&self) -> Result<i64, LedgerError> {
        let mut conn = self.conn.clone();
        let out: Vec<String> = script(S_SWEEP)
            .key(self.key("replicas"))
            .arg(&self.prefix)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let swept: Vec<(String, i64)> =
            out.chunks(2).filter_map(|c| Some((c[0].clone(), c.get(1)?.parse().ok()?))).collect();
        if !swept.is_empty() {
            self.pg.mark_swept(&swept).await?;
        }
        Ok(swept.len() as i64)
    }

    /// Starts `scope`'s account for the period at `start` from the ledger, unless another
    /// replica already has.
    async fn open_account(&self, scope: &str, start: i64) -> Result<(), LedgerError> {
        let (is_key, id) = split_scope(scope);
        let spent = self.pg.spent_since(is_key, id, start).await?;
        let mut conn = self.conn.clone();
        redis::cmd("HSETNX")
            .arg(self.account_key(scope, start))
            .arg("spent")
            .arg(spent.0)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    pub async fn budget_account(&self, scope: &str, start: i64) -> Result<(i64, i64), LedgerError> {
        for _ in 0..2 {
            let mut conn = self.conn.clone();
            let (spent, reserved): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
                .arg(self.account_key(scope, start))
                .arg("spent")
                .arg("reserved")
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            match spent {
                Some(spent) => return Ok((spent, reserved.unwrap_or(0))),
                None => self.open_account(scope, start).await?,
            }
        }
        Err(LedgerError::Redis("a budget account could not be opened".into()))
    }

    pub async fn reserve(&self, row: &HoldRow<'_>) -> Result<Result<(), Refused>, LedgerError> {
        for _ in 0..=row.scopes.len() {
            let mut conn = self.conn.clone();
            let script = script(S_RESERVE);
            let mut call = script.prepare_invoke();
            call.key(self.key("replicas"))
                .key(self.key(&format!("hold:{}", row.hold)))
                .key(self.key(&format!("holds:{}", row.replica)));
            for (scope, start) in row.scopes.iter().zip(row.starts) {
                call.key(self.account_key(scope, *start));
            }
            call.arg(row.replica).arg(row.hold).arg(row.amount).arg(row.floor).arg(row.request_id);
            for limit in row.limits {
                call.arg(*limit);
            }
            let (code, a, b): (i64, i64, i64) = call.invoke_async(&mut conn).await.map_err(redis_error)?;
            match code {
                0 => return Ok(Ok(())),
                -1 => return Err(LedgerError::LeaseExpired),
                -2 => {
                    let i = (a - 1) as usize;
                    self.open_account(&row.scopes[i], row.starts[i]).await?;
                }
                i => return Ok(Err(Refused { index: (i - 1) as usize, spent: a, reserved: b })),
            }
        }
        Err(LedgerError::Redis("budget accounts could not be opened".into()))
    }

    pub async fn settle(&self, rows: &[SettleRow]) -> Result<(), LedgerError> {
        let script = script(S_SETTLE);
        let mut call = script.prepare_invoke();
        call.arg(&self.prefix);
        // Rows come one per (hold, budget), a hold's rows together.
        let mut i = 0;
        while i < rows.len() {
            let hold = &rows[i].hold;
            let n = rows[i..].iter().take_while(|r| &r.hold == hold).count();
            // A hold's name is its replica's, a colon, and a number.
            let replica = hold.split(':').next().unwrap_or(hold);
            call.arg(hold).arg(replica).arg(rows[i].cost).arg(rows[i].floor).arg(n);
            for r in &rows[i..i + n] {
                call.arg(self.account_key(&r.scope, r.period_start));
            }
            i += n;
        }
        let mut conn = self.conn.clone();
        call.invoke_async::<i64>(&mut conn).await.map_err(redis_error)?;
        Ok(())
    }

    pub async fn rate_admit(&self, ask: &RateAsk<'_>) -> Result<Result<(), RateRefused>, LedgerError> {
        let script = script(S_RATE_ADMIT);
        let mut call = script.prepare_invoke();
        for scope in ask.scopes {
            call.key(self.key(&format!("rate:{scope}"))).key(self.key(&format!("ratetok:{scope}")));
        }
        call.arg(ask.ticket).arg(ask.tokens).arg(ask.now_ms).arg(if ask.record { 1 } else { 0 });
        let text = |v: &Option<i64>| v.map_or_else(String::new, |v| v.to_string());
        for (r, t) in ask.rpm.iter().zip(ask.tpm) {
            call.arg(text(r)).arg(text(t));
        }
        let mut conn = self.conn.clone();
        let (code, what, retry_ms): (i64, String, i64) = call.invoke_async(&mut conn).await.map_err(redis_error)?;
        match code {
            0 => Ok(Ok(())),
            i => Ok(Err(RateRefused { index: (i - 1) as usize, what, retry_ms })),
        }
    }

    pub async fn rate_correct(&self, tickets: &[Correction]) -> Result<(), LedgerError> {
        let script = script(S_RATE_CORRECT);
        for Correction { ticket, scopes, tokens } in tickets {
            let mut call = script.prepare_invoke();
            for scope in scopes {
                call.key(self.key(&format!("rate:{scope}"))).key(self.key(&format!("ratetok:{scope}")));
            }
            call.arg(ticket).arg(*tokens);
            let mut conn = self.conn.clone();
            call.invoke_async::<i64>(&mut conn).await.map_err(redis_error)?;
        }
        Ok(())
    }
}

fn redis_error(e: redis::RedisError) -> LedgerError {
    LedgerError::Redis(e.to_string())
}
