//! The gateway on PostgreSQL: the same behaviour as on SQLite, and two replicas sharing one
//! ledger (keys created on one work on the other; spend is visible from both).

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

#[path = "../common/postgres.rs"]
mod pg;

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
}
