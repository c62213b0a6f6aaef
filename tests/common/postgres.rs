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
    // Named by a hash of the test's name: a long name would be cut at PostgreSQL's 63 bytes,
    // and two tests sharing a prefix would share a schema.
    let schema = format!("tg_{:016x}_{}", name_hash(test), std::process::id());
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).execute(&pool).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&pool).await.unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}

fn name_hash(test: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    test.hash(&mut h);
    h.finish()
}

/// Redis for tests: the URL and a key prefix of the test's own, or None (skipped) when Redis
/// is not reachable. CI sets `TOLLGATE_REQUIRE_REDIS=1`, turning that into a failure.
pub async fn redis_url(test: &str) -> Option<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = std::env::var("TOLLGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let addr = url.trim_start_matches("redis://").split('/').next().unwrap_or("127.0.0.1:6379").to_string();
    let required = std::env::var("TOLLGATE_REQUIRE_REDIS").is_ok_and(|v| v == "1");
    let ping = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        s.write_all(b"PING\r\n").await?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await?;
        Ok::<bool, std::io::Error>(&buf == b"+PONG\r\n")
    };
    match tokio::time::timeout(std::time::Duration::from_secs(3), ping).await {
        Ok(Ok(true)) => {}
        other if !required => {
            println!("skipped: {test} (Redis unavailable: {other:?})");
            return None;
        }
        other => panic!("Redis is required (TOLLGATE_REQUIRE_REDIS=1) but unreachable: {other:?}"),
    }
    Some((url, format!("tg-test:{:016x}:{}:", name_hash(test), std::process::id())))
}
