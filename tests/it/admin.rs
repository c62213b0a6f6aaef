//! The admin API: teams and keys.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn admin_requires_the_master_key() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let resp = app.http.get(app.url("/admin/teams")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = app.http.get(app.url("/admin/teams")).bearer_auth("sk-admin-test-0124").send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let key = app.team_and_key("t").await;
    let resp = app.http.get(app.url("/admin/teams")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn teams_and_keys_crud() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let (status, v) = app
        .admin(
            Method::POST,
            "/admin/teams",
            Some(json!({"name": "growth", "limit_usd": 200, "period": "monthly", "downgrade_at": 0.8})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["limit_usd"], 200.0);
    assert_eq!(v["spent_usd"], 0.0);
    assert_eq!(v["remaining_usd"], 200.0);
    assert!(v["resets_at"].as_str().unwrap().ends_with("T00:00:00Z"));

    let (status, _) = app.admin(Method::POST, "/admin/teams", Some(json!({"name": "growth"}))).await;
    assert_eq!(status, 409);
    let (status, v) = app.admin(Method::POST, "/admin/teams", Some(json!({"name": "x", "limit_usd": -1}))).await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("limit_usd")));
    let (status, v) = app.admin(Method::POST, "/admin/teams", Some(json!({"name": "x", "period": "hourly"}))).await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("period")));
    let (status, v) = app.admin(Method::POST, "/admin/teams", Some(json!({"name": "x", "limitusd": 5}))).await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("limitusd")));

    let (status, v) = app.admin(Method::PATCH, "/admin/teams/growth", Some(json!({"limit_usd": 300, "rpm": 10}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["limit_usd"], 300.0);
    assert_eq!(v["rpm"], 10);
    assert_eq!(v["downgrade_at"], 0.8);

    let (status, v) =
        app.admin(Method::POST, "/admin/keys", Some(json!({"team": "growth", "name": "web", "limit_usd": 5}))).await;
    assert_eq!(status, 201, "{v}");
    let secret = v["key"].as_str().unwrap().to_string();
    let id = v["id"].as_str().unwrap().to_string();
    assert!(secret.starts_with("tg-") && secret.len() >= 35);
    assert_eq!(v["team"], "growth");
    assert_eq!(v["name"], "web");

    // The secret is shown once: never again.
    let (_, v) = app.admin(Method::GET, &format!("/admin/keys/{id}"), None).await;
    assert!(!v.to_string().contains(&secret));
    assert_eq!(v["limit_usd"], 5.0);
    assert_eq!(v["spent_usd"], 0.0);
    let (_, v) = app.admin(Method::GET, "/admin/keys", None).await;
    assert!(!v.to_string().contains(&secret));

    let (status, _) = app.admin(Method::POST, "/admin/keys", Some(json!({"team": "nope"}))).await;
    assert_eq!(status, 404);

    let (status, _) = app.admin(Method::DELETE, "/admin/teams/growth", None).await;
    assert_eq!(status, 200);
    let (status, _) = app.admin(Method::GET, "/admin/teams/growth", None).await;
    assert_eq!(status, 404);
    // Deleting a team revokes its keys.
    let resp = app.chat(&secret, &chat_body("gpt-4o-mini", "x")).await;
    assert_eq!(resp.status(), 401);
    let (_, v) = app.admin(Method::GET, &format!("/admin/keys/{id}"), None).await;
    assert_eq!(v["revoked"], true);
}

#[tokio::test]
async fn keys_created_by_the_cli_process_work_on_a_running_server() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    // The CLI writes to the database directly; emulate it with a second connection.
    let db = app.dir.path().join("tollgate.db");
    let backend = tollgate::ledger::Backend::connect(&format!("sqlite://{}", db.display())).await.unwrap();
    backend
        .create_team(&tollgate::ledger::TeamRow { name: "cli".into(), budget: Default::default(), created_ms: 0 })
        .await
        .unwrap();
    // A script creates keys with the CLI and uses each at once, before the server's next
    // poll: the first request with an unknown key checks the database for new ones.
    for i in 0..5 {
        let (row, secret) = tollgate::api::admin::new_key("cli", &format!("k{i}"), Default::default());
        backend.create_key(&row).await.unwrap();
        let resp = app.chat(&secret, &chat_body("gpt-4o-mini", "x")).await;
        assert_eq!(resp.status(), 200, "key {i} right after the CLI created it: {}", resp.text().await.unwrap());
    }
    let (row, secret) = tollgate::api::admin::new_key("cli", "k", Default::default());
    backend.create_key(&row).await.unwrap();
    assert_eq!(app.chat(&secret, &chat_body("gpt-4o-mini", "x")).await.status(), 200);
    backend.revoke_key(&row.id, 1).await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let resp = app.chat(&secret, &chat_body("gpt-4o-mini", "x")).await;
        if resp.status() == 401 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "CLI revocation never took effect");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _: Value = Value::Null;
}

/// Runs the `tollgate` binary's CLI against `config`; its stdout.
async fn cli(config: &std::path::Path, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "tollgate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn a_key_revoked_with_the_cli_fails_as_soon_as_the_command_returns() {
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("hi", Some((5, 0, 2))));
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let db = app.dir.path().join("tollgate.db");
    let config = app.dir.path().join("cli.toml");
    std::fs::write(&config, config_text(db.to_str().unwrap(), &up.url(), DEFAULT_MODELS)).unwrap();
    app.create_team("t", json!({})).await;
    let body = chat_body("gpt-4o-mini", "x");
    for round in 0..3 {
        let (id, secret) = app.create_key("t", json!({})).await;
        // Used first, so the server's snapshot knows the key before it is revoked.
        assert_eq!(app.chat(&secret, &body).await.status(), 200);
        cli(&config, &["keys", "revoke", &id]).await;
        assert_eq!(app.chat(&secret, &body).await.status(), 401, "round {round}: revoked key still served");
    }
    // Deleting a team with the CLI revokes its keys at once too.
    let (_, secret) = app.create_key("t", json!({})).await;
    assert_eq!(app.chat(&secret, &body).await.status(), 200);
    cli(&config, &["teams", "delete", "t"]).await;
    assert_eq!(app.chat(&secret, &body).await.status(), 401, "key of a deleted team still served");
}

#[tokio::test]
async fn a_refused_patch_changes_nothing() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    app.create_team("t", json!({"limit_usd": 10})).await;
    let (id, secret) = app.create_key("t", json!({})).await;

    // Every field is checked before anything is written: a bad `revoked` after a good
    // `limit_usd` leaves the key as it was.
    let path = format!("/admin/keys/{id}");
    for patch in [
        json!({"limit_usd": 5, "revoked": false}),
        json!({"limit_usd": 5, "revoked": "yes"}),
        json!({"limit_usd": 5, "name": "bad/name"}),
        json!({"limit_usd": 5, "period": "hourly"}),
        json!({"name": "renamed", "team": "other"}),
    ] {
        let (status, v) = app.admin(Method::PATCH, &path, Some(patch.clone())).await;
        assert_eq!(status, 400, "{patch} -> {v}");
        let (_, key) = app.admin(Method::GET, &path, None).await;
        assert_eq!(
            (&key["limit_usd"], &key["name"], &key["revoked"]),
            (&Value::Null, &json!("test"), &json!(false)),
            "{patch} -> {key}"
        );
    }
    assert_eq!(app.chat(&secret, &chat_body("gpt-4o-mini", "x")).await.status(), 200);

    // The same for teams.
    for patch in [
        json!({"limit_usd": 5, "period": "hourly"}),
        json!({"limit_usd": 5, "name": "other"}),
        json!({"limit_usd": 5, "x": 1}),
    ] {
        let (status, v) = app.admin(Method::PATCH, "/admin/teams/t", Some(patch.clone())).await;
        assert_eq!(status, 400, "{patch} -> {v}");
        let (_, team) = app.admin(Method::GET, "/admin/teams/t", None).await;
        assert_eq!(team["limit_usd"], 10.0, "{patch} -> {team}");
    }

    // A valid patch with `revoked: true` applies its other fields and revokes.
    let (status, v) = app.admin(Method::PATCH, &path, Some(json!({"limit_usd": 5, "revoked": true}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!((&v["limit_usd"], &v["revoked"]), (&json!(5.0), &json!(true)), "{v}");
    assert_eq!(app.chat(&secret, &chat_body("gpt-4o-mini", "x")).await.status(), 401);
}
