//! The gateway on PostgreSQL: the same behaviour as on SQLite, and replicas sharing one
//! ledger: keys, spend, budgets and rate windows agree on every replica.

use std::time::Duration;

use futures::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

#[path = "../common/postgres.rs"]
pub(crate) mod pg;

#[tokio::test]
async fn postgres_ledger_records_and_answers_spend() {
    let Some(url) = pg::postgres_url("postgres_ledger_records_and_answers_spend").await else { return };
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("x", Some((100, 20, 10))));
    let text = config_text("unused", &up.url(), DEFAULT_MODELS).replace("sqlite://unused", &url);
    let app = TestApp::start_with_config(tempfile::tempdir().unwrap(), &text).await;
    let key = app.team_and_key("search").await;
    let r = app.chat(&key, &chat_body("gpt-4o", "hi")).await;
    assert_eq!(r.status(), 200);
    let logs = app.logs().await;
    assert_eq!(logs.len(), 1);
    assert_eq!(usd_to_nanos(&logs[0]["cost_usd"]), nanos(100, 20, 10, GPT4O.0, GPT4O.1, GPT4O.2));
    let v: Value = app
        .http
        .get(app.url("/spend?group_by=team,day"))
        .bearer_auth(MASTER)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["total"]["requests"], 1);
    assert_eq!(v["groups"][0]["team"], "search");
    assert_eq!(v["groups"][0]["day"].as_str().unwrap().len(), 10);
    app.stop().await;
}

#[tokio::test]
async fn two_replicas_share_keys_and_spend_through_postgres() {
    let Some(url) = pg::postgres_url("two_replicas_share_keys_and_spend_through_postgres").await else { return };
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("x", Some((10, 0, 5))));
    let text = config_text("unused", &up.url(), DEFAULT_MODELS).replace("sqlite://unused", &url);
    let a = TestApp::start_with_config(tempfile::tempdir().unwrap(), &text).await;
    let b = TestApp::start_with_config(tempfile::tempdir().unwrap(), &text).await;
    a.create_team("shared", json!({})).await;
    let (id, key) = a.create_key("shared", json!({})).await;
    // Replica b learns of the key through the directory version within its poll interval.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if b.chat(&key, &chat_body("gpt-4o-mini", "x")).await.status() == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "replica b never accepted the key");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.chat(&key, &chat_body("gpt-4o-mini", "x")).await.status(), 200);
    // A spend query waits for its own replica's writer only: the other replica's record may
    // still be on its way to the shared database. Each sees both once both have landed.
    for app in [&a, &b] {
        app.wait_records(2).await;
        let v: Value = app.http.get(app.url("/spend")).bearer_auth(MASTER).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["total"]["requests"], 2);
    }
    // Revoking on one replica reaches the other.
    let (status, _) = a.admin(Method::DELETE, &format!("/admin/keys/{id}"), None).await;
    assert_eq!(status, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if b.chat(&key, &chat_body("gpt-4o-mini", "x")).await.status() == 401 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "replica b kept accepting a revoked key");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_all(vec![a, b]).await;
}

// ---------------------------------------------------------------------------------------
// Several replicas on one PostgreSQL ledger (SPEC §8): budgets, rate windows and the
// directory shared; each test starts three replicas on a schema of its own.
// ---------------------------------------------------------------------------------------

const MAX_TOKENS: u64 = 100;

fn usd(nanos: i64) -> f64 {
    nanos as f64 / 1e9
}

/// Stops replicas gracefully: each ends its lease and closes its connections (a server left
/// running past its test would hold them, and PostgreSQL takes 100 at most).
async fn stop_all(apps: Vec<TestApp>) {
    for app in apps {
        app.stop().await;
    }
}

/// Three replicas of `text` (a config naming `url`), each with its own journal.
async fn three_replicas(text: &str) -> Vec<TestApp> {
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(TestApp::start_with_config(tempfile::tempdir().unwrap(), text).await);
    }
    apps
}

/// What a replica test runs on: PostgreSQL (a schema of its own) and, with `redis`, Redis
/// (a key prefix of its own). Gives the database URL and the top-level config lines naming
/// both, or None (the test skipped, by name) when a service is missing.
pub(crate) async fn services(test: &str, redis: bool) -> Option<(String, String)> {
    let name = if redis { format!("{test}_through_redis") } else { test.to_string() };
    let url = pg::postgres_url(&name).await?;
    if !redis {
        return Some((url, String::new()));
    }
    let (redis_url, prefix) = pg::redis_url(&name).await?;
    Some((url, format!("redis_url = {redis_url:?}\nredis_key_prefix = {prefix:?}")))
}

fn pg_config(url: &str, upstream: &str, extra: &str) -> String {
    format!("{extra}\n{}", config_text("unused", upstream, DEFAULT_MODELS).replace("sqlite://unused", url))
}

/// Polls `check` every 20 ms until it is true, for at most `within`; returns how long it took.
async fn within(within: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = tokio::time::Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A key made through one replica, once every replica accepts it.
async fn shared_key(apps: &[TestApp], team: &str, key_fields: Value) -> (String, String) {
    let (id, key) = apps[0].create_key(team, key_fields).await;
    for app in apps {
        within(Duration::from_secs(2), "every replica knows the new key", async || {
            let r = app.http.get(app.url("/v1/models")).bearer_auth(&key).send().await.unwrap();
            r.status() == 200
        })
        .await;
    }
    (id, key)
}

/// What a team's view says on every replica, once no reservation is held any more.
async fn settled_team(apps: &[TestApp], team: &str) -> Vec<Value> {
    let mut views = Vec::new();
    for app in apps {
        let mut view = Value::Null;
        within(Duration::from_secs(5), "reservations released", async || {
            let (_, v) = app.admin(Method::GET, &format!("/admin/teams/{team}"), None).await;
            view = v;
            view["reserved_usd"] == 0.0
        })
        .await;
        views.push(view);
    }
    views
}

async fn race_over_replicas(redis: bool) {
    let Some((url, extra)) = services("a_race_spread_over_three_replicas_serves_exactly_what_fits", redis).await else {
        return;
    };
    let up = FakeUpstream::start().await;
    let b = json!({"model": "gpt-4o-mini", "max_tokens": MAX_TOKENS,
                   "messages": [{"role": "user", "content": "How much is it?"}]});
    let prompt = tollgate::policy::tokens::prompt_tokens(tollgate::policy::tokens::PromptKind::Chat, "gpt-4o-mini", &b);
    let cost = nanos(prompt, 0, MAX_TOKENS, MINI.0, MINI.1, MINI.2);
    // Every answer costs exactly its worst case, slowly: all 240 are in flight at once.
    up.reply(Reply::chat_json("x", Some((prompt, 0, MAX_TOKENS))).with_header_delay(Duration::from_millis(300)));
    let apps = three_replicas(&pg_config(&url, &up.url(), &extra)).await;
    const N: i64 = 37;
    let limit = N * cost + cost - 1;
    apps[0].create_team("t", json!({"limit_usd": usd(limit)})).await;
    let (_, key) = shared_key(&apps, "t", json!({})).await;

    let racing = (0..240).map(|i| {
        let (app, key, b) = (&apps[i % 3], &key, &b);
        async move { app.chat(key, b).await.status().as_u16() }
    });
    let statuses = join_all(racing).await;
    let served = statuses.iter().filter(|s| **s == 200).count() as i64;
    let refused = statuses.iter().filter(|s| **s == 429).count() as i64;
    assert_eq!((served, refused), (N, 240 - N), "exactly what fits is served across the replicas");
    assert_eq!(up.hits() as i64, N);
    for view in settled_team(&apps, "t").await {
        assert_eq!(usd_to_nanos(&view["spent_usd"]), N * cost, "every replica sees the same spend: {view}");
    }
    for app in &apps {
        app.wait_records(N as usize).await;
        let v: Value = app.http.get(app.url("/spend")).bearer_auth(MASTER).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["total"]["requests"], N);
        assert_eq!(usd_to_nanos(&v["total"]["cost_usd"]), N * cost);
    }
    stop_all(apps).await;
}

async fn rates_over_replicas(redis: bool) {
    let Some((url, extra)) = services("rpm_and_tpm_are_counted_once_across_replicas", redis).await else { return };
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("x", Some((10, 0, 5))));
    let apps = three_replicas(&pg_config(&url, &up.url(), &extra)).await;
    apps[0].create_team("t", json!({})).await;
    let (_, key) = shared_key(&apps, "t", json!({"rpm": 5})).await;
    let b = chat_body("gpt-4o-mini", "x");
    let racing = (0..12).map(|i| {
        let (app, key, b) = (&apps[i % 3], &key, &b);
        async move { app.chat(key, b).await }
    });
    let mut served = 0;
    for r in join_all(racing).await {
        match r.status().as_u16() {
            200 => served += 1,
            429 => {
                assert!(r.headers().contains_key("retry-after"));
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["code"], "rate_limit_exceeded");
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(served, 5, "rpm 5 admits five requests however they are spread");

    // tpm on a team, smaller than one request's prompt: the first request is admitted (one
    // may overshoot), and its tokens, whichever replica counted them, refuse the next.
    apps[0].create_team("u", json!({"tpm": 5})).await;
    let (_, key) = shared_key(&apps, "u", json!({})).await;
    assert_eq!(apps[1].chat(&key, &b).await.status(), 200);
    assert_eq!(apps[2].chat(&key, &b).await.status(), 429);
    assert_eq!(apps[0].chat(&key, &b).await.status(), 429);
    stop_all(apps).await;
}

async fn revocation_over_replicas(redis: bool) {
    let Some((url, extra)) =
        services("a_revocation_through_one_replica_or_the_cli_refuses_on_every_replica_within_a_second", redis).await
    else {
        return;
    };
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("x", Some((10, 0, 5))));
    // The poll backstop is far slower than a second: the push must carry the change.
    let text = pg_config(&url, &up.url(), &extra);
    let apps = three_replicas(&text).await;
    apps[0].create_team("t", json!({})).await;
    let (id, key) = shared_key(&apps, "t", json!({})).await;
    let b = chat_body("gpt-4o-mini", "x");
    let (status, _) = apps[0].admin(Method::DELETE, &format!("/admin/keys/{id}"), None).await;
    assert_eq!(status, 200);
    for app in &apps[1..] {
        within(Duration::from_secs(1), "a key revoked on replica 0 is refused here", async || {
            app.chat(&key, &b).await.status() == 401
        })
        .await;
    }

    // The CLI returns without waiting; every replica refuses within a second.
    let (id, key) = shared_key(&apps, "t", json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, &text).unwrap();
    let started = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["--config", config_path.to_str().unwrap(), "keys", "revoke", &id])
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli = started.elapsed();
    for app in &apps {
        within(Duration::from_secs(1), "a key revoked by the CLI is refused", async || {
            app.chat(&key, &b).await.status() == 401
        })
        .await;
    }
    assert!(cli < Duration::from_secs(5), "the CLI took {cli:?}");
    stop_all(apps).await;
}

async fn fallback_over_replicas(redis: bool) {
    let Some((url, extra)) =
        services("a_cheap_model_falling_back_to_a_dearer_one_never_overspends_across_replicas", redis).await
    else {
        return;
    };
    let primary = FakeUpstream::start().await;
    let backup = FakeUpstream::start().await;
    primary.reply(Reply::error(500, "boom"));
    backup.reply(Reply::chat_json("from dear", Some((20, 0, 10))).with_header_delay(Duration::from_millis(600)));
    let text = format!(
        "{extra}\n{}",
        crate::routing::cheap_to_dear_fallback_config("unused", &primary.url(), &backup.url())
            .replace("sqlite://unused", &url)
    );
    let apps = three_replicas(&text).await;
    let body = json!({"model": "cheap", "max_tokens": 1000, "messages": [{"role": "user", "content": "hello there"}]});
    apps[0].create_team("probe", json!({})).await;
    let (_, probe) = shared_key(&apps, "probe", json!({})).await;
    let mut worst = Vec::new();
    for model in ["cheap", "dear"] {
        let mut b = body.clone();
        b["model"] = json!(model);
        worst.push(usd_to_nanos(&apps[0].dry_run(&probe, &b).await["max_cost_usd"]));
    }
    let (cheap, dear) = (worst[0], worst[1]);
    // Room for three dear answers beside four cheap reservations (see routing.rs).
    let limit = 3 * dear + 4 * cheap;
    apps[0].create_team("t", json!({"limit_usd": usd(limit)})).await;
    let (_, key) = shared_key(&apps, "t", json!({})).await;
    let racing = (0..4).map(|i| {
        let (app, key, body) = (&apps[i % 3], &key, &body);
        async move { app.chat(key, body).await.status().as_u16() }
    });
    let statuses = join_all(racing).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 502).count(), 1, "{statuses:?}");
    assert_eq!(backup.hits(), 3, "a fallback that does not fit is never forwarded");
    for view in settled_team(&apps, "t").await {
        assert!(usd_to_nanos(&view["spent_usd"]) <= limit, "spent past the limit: {view}");
    }
    stop_all(apps).await;
}

async fn readiness_of_replicas(redis: bool) {
    let Some((url, extra)) = services("readiness_says_where_budgets_are_held", redis).await else { return };
    let up = FakeUpstream::start().await;
    let app = TestApp::start_with_config(tempfile::tempdir().unwrap(), &pg_config(&url, &up.url(), &extra)).await;
    let v: Value = app.http.get(app.url("/health/ready")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["budgets"], if redis { "redis" } else { "postgres" }, "{v}");
    assert!(v["replica"].as_str().is_some_and(|r| r.starts_with("rep_")), "{v}");
    let local = TestApp::start(&up, DEFAULT_MODELS).await;
    let v: Value = local.http.get(local.url("/health/ready")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["budgets"], "in-process", "{v}");
    stop_all(vec![app, local]).await;
}

// The tests, each on PostgreSQL alone and with Redis beside it.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_race_spread_over_three_replicas_serves_exactly_what_fits() {
    race_over_replicas(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_race_spread_over_three_replicas_serves_exactly_what_fits_through_redis() {
    race_over_replicas(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_and_tpm_are_counted_once_across_replicas() {
    rates_over_replicas(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_and_tpm_are_counted_once_across_replicas_through_redis() {
    rates_over_replicas(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_replica_or_the_cli_refuses_on_every_replica_within_a_second() {
    revocation_over_replicas(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_replica_or_the_cli_refuses_on_every_replica_within_a_second_through_redis() {
    revocation_over_replicas(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cheap_model_falling_back_to_a_dearer_one_never_overspends_across_replicas() {
    fallback_over_replicas(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cheap_model_falling_back_to_a_dearer_one_never_overspends_across_replicas_through_redis() {
    fallback_over_replicas(true).await;
}

#[tokio::test]
async fn readiness_says_where_budgets_are_held() {
    readiness_of_replicas(false).await;
}

#[tokio::test]
async fn readiness_says_where_budgets_are_held_through_redis() {
    readiness_of_replicas(true).await;
}

/// Redis unreachable: a budgeted request is refused with a 503 (never served without its
/// budget checked), readiness says so, and a request no budget or window limits still flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_a_budgeted_request_is_refused_and_readiness_says_so() {
    let test = "with_redis_down_a_budgeted_request_is_refused_and_readiness_says_so";
    let Some(url) = pg::postgres_url(test).await else { return };
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("x", Some((10, 0, 5))));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let extra = format!("redis_url = \"redis://{closed}/0\"");
    let app = TestApp::start_unready(tempfile::tempdir().unwrap(), &pg_config(&url, &up.url(), &extra)).await;
    let r = app.http.get(app.url("/health/ready")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["budgets"], "unavailable", "{v}");
    app.create_team("limited", json!({"limit_usd": 1.0})).await;
    let (_, team) = app.admin(Method::GET, "/admin/teams/limited", None).await;
    assert!(team["spent_usd"].is_null() && team["remaining_usd"].is_null(), "no figure it cannot know: {team}");
    let (_, key) = app.create_key("limited", json!({})).await;
    let r = app.chat(&key, &chat_body("gpt-4o-mini", "x")).await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "budget_store_unavailable", "{v}");
    app.create_team("free", json!({})).await;
    let (_, key) = app.create_key("free", json!({})).await;
    assert_eq!(app.chat(&key, &chat_body("gpt-4o-mini", "x")).await.status(), 200);
    assert_eq!(up.hits(), 1, "only the request nothing limits went upstream");
    app.stop().await;
}
