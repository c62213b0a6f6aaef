//! PostgreSQL for tests: a fresh schema per test, or a by-name skip when the server is not
//! reachable (a laptop without PostgreSQL). CI sets `TOLLGATE_REQUIRE_POSTGRES=1`, turning
//! an unreachable server into a failure instead.

/// A PostgreSQL URL with a fresh schema of its own, or None (skipped) when unreachable.
pub async fn postgres_url(test: &str) -> Option<String> {
    let base = std::env::var("TOLLGATE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let required = std::env::var("TOLLGATE_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
    let pool = match tokio::time::timeout(std::time::Duration::from_secs(3), sqlx::PgPool::connect(&base)).await {
        Ok(Ok(pool)) => pool,
        Ok(Err(e)) if !required => {
            println!("skipped: {test} (PostgreSQL unavailable: {e})");
            return None;
        }
        Err(_) if !required => {
            println!("skipped: {test} (PostgreSQL unavailable: timeout)");
            return None;
        }
        other => panic!("PostgreSQL is required (TOLLGATE_REQUIRE_POSTGRES=1) but unreachable: {:?}", other.err()),
    };
    let schema = format!("tg_{}_{}", test.replace(|c: char| !c.is_ascii_alphanumeric(), "_"), std::process::id());
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).execute(&pool).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&pool).await.unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}
