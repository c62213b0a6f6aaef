//! One contract suite, run against every ledger backend: SQLite always, PostgreSQL when it
//! is reachable (`TOLLGATE_TEST_POSTGRES_URL`, default the local `test` database). Without
//! PostgreSQL the PostgreSQL cases report that they were skipped, by name — unless
//! `TOLLGATE_REQUIRE_POSTGRES=1` (CI), where an unreachable database fails them.

use tollgate::ledger::{
    Backend, GroupBy, KeyRow, LedgerError, LogFilter, RequestRecord, SpendFilter, TeamRow, UsageSource,
};
use tollgate::metering::usage::Usage;
use tollgate::policy::budget::{BudgetSpec, Period};
use tollgate::policy::pricing::NanoUsd;

#[path = "common/postgres.rs"]
#[allow(dead_code)] // Redis is for the replica tests.
mod postgres;

use postgres::postgres_url;

/// A record with an id as the server makes them (`req_` + start time in hex + 64 bits), the
/// 64 bits being `tag`.
fn record(tag: u64, time_ms: i64, key: &str, team: &str, model: &str, cost: i64, source: UsageSource) -> RequestRecord {
    RequestRecord {
        request_id: id(tag, time_ms),
        time_ms,
        key_id: key.into(),
        team: team.into(),
        endpoint: "chat.completions",
        model: "gpt-4o".into(),
        served_model: model.into(),
        usage: Usage { input_tokens: 100, cached_input_tokens: 10, output_tokens: 20 },
        cost: NanoUsd(cost),
        usage_source: source,
        status: 200,
        latency_ms: 5,
        stream: false,
    }
}

fn id(tag: u64, time_ms: i64) -> String {
    format!("req_{time_ms:012x}{tag:016x}")
}

const DAY: i64 = 86_400_000;
const T0: i64 = 1_795_000_000_000; // 2026-11-18

async fn contract(db: Backend) {
    // Teams.
    let budget = BudgetSpec {
        limit: Some(NanoUsd(5_000_000_000)),
        period: Period::Weekly,
        downgrade_at: Some(0.8),
        models: vec!["gpt-4o".into()],
        rpm: Some(10),
        tpm: None,
    };
    db.create_team(&TeamRow { name: "search".into(), budget: budget.clone(), created_ms: T0 }).await.unwrap();
    db.create_team(&TeamRow { name: "growth".into(), budget: BudgetSpec::default(), created_ms: T0 }).await.unwrap();
    let dup = db.create_team(&TeamRow { name: "search".into(), budget: BudgetSpec::default(), created_ms: T0 }).await;
    assert!(matches!(dup, Err(LedgerError::Conflict(_))), "{dup:?}");
    let teams = db.load_teams().await.unwrap();
    assert_eq!(teams.len(), 2);
    let search = teams.iter().find(|t| t.name == "search").unwrap();
    assert_eq!(search.budget, budget);
    let v0 = db.directory_version().await.unwrap();

    // Keys.
    let (key, secret) = tollgate::api::admin::new_key("search", "web", BudgetSpec::default());
    db.create_key(&key).await.unwrap();
    assert!(db.directory_version().await.unwrap() > v0, "changes bump the directory version");
    let (orphan, _) = tollgate::api::admin::new_key("nope", "x", BudgetSpec::default());
    assert!(matches!(db.create_key(&orphan).await, Err(LedgerError::NotFound(_))));
    let keys = db.load_keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].key_hash, tollgate::auth::hash_secret(&secret));
    assert!(!keys[0].prefix.is_empty() && !secret.contains(&keys[0].id));
    let mut renamed: KeyRow = keys[0].clone();
    renamed.name = "web2".into();
    renamed.budget.limit = Some(NanoUsd(7));
    db.update_key(&renamed).await.unwrap();
    let keys = db.load_keys().await.unwrap();
    assert_eq!((keys[0].name.as_str(), keys[0].budget.limit), ("web2", Some(NanoUsd(7))));

    // Records: a journal entry is replaced by its final record and never counted as spend.
    let k = key.id.as_str();
    db.insert_records(&[record(0xa, T0, k, "search", "gpt-4o", 1000, UsageSource::Pending)]).await.unwrap();
    assert_eq!(db.spent_since(true, k, 0).await.unwrap(), NanoUsd(0));
    db.insert_records(&[
        record(0xa, T0, k, "search", "gpt-4o", 700, UsageSource::Reported),
        record(0xb, T0 + DAY, k, "search", "gpt-4o-mini", 300, UsageSource::Estimated),
        record(0xc, T0 + DAY, "key_other", "growth", "gpt-4o-mini", 50, UsageSource::Reported),
        record(0xd, T0 + 2 * DAY, k, "search", "gpt-4o", 9, UsageSource::Pending),
        // A journal entry arriving after its final record must not overwrite it.
        record(0xa, T0, k, "search", "gpt-4o", 1000, UsageSource::Pending),
    ])
    .await
    .unwrap();
    assert_eq!(db.spent_since(true, k, 0).await.unwrap(), NanoUsd(1000));
    assert_eq!(db.spent_since(false, "search", T0 + DAY).await.unwrap(), NanoUsd(300));

    let (total, groups) =
        db.spend(&SpendFilter::default(), &[GroupBy::Team, GroupBy::Model, GroupBy::Day]).await.unwrap();
    assert_eq!(total.requests, 3);
    assert_eq!(total.cost, NanoUsd(1050));
    assert_eq!(total.input_tokens, 300);
    assert_eq!(total.cached_input_tokens, 30);
    let labels: Vec<Vec<String>> = groups.iter().map(|g| g.labels.iter().map(|(_, l)| l.clone()).collect()).collect();
    assert_eq!(
        labels,
        vec![
            vec!["growth".to_string(), "gpt-4o-mini".into(), "2026-11-19".into()],
            vec!["search".to_string(), "gpt-4o".into(), "2026-11-18".into()],
            vec!["search".to_string(), "gpt-4o-mini".into(), "2026-11-19".into()],
        ]
    );
    let filtered = SpendFilter {
        from_ms: Some(T0 + DAY),
        to_ms: Some(T0 + 2 * DAY),
        team: Some("search".into()),
        ..Default::default()
    };
    let (total, _) = db.spend(&filtered, &[]).await.unwrap();
    assert_eq!((total.requests, total.cost), (1, NanoUsd(300)));
    // A time range alone (found through the request ids, which begin with their time):
    // `from` is inclusive, `to` exclusive.
    let range = |from, to| SpendFilter { from_ms: Some(from), to_ms: Some(to), ..Default::default() };
    let (total, _) = db.spend(&range(T0 + DAY, T0 + 2 * DAY), &[]).await.unwrap();
    assert_eq!((total.requests, total.cost), (2, NanoUsd(350)));
    let (total, _) = db.spend(&range(T0, T0 + DAY), &[]).await.unwrap();
    assert_eq!((total.requests, total.cost), (1, NanoUsd(700)));
    let (total, _) = db.spend(&range(T0 + 1, T0 + DAY + 1), &[]).await.unwrap();
    assert_eq!((total.requests, total.cost), (2, NanoUsd(350)));
    let (total, _) = db.spend(&SpendFilter { from_ms: Some(-5), ..Default::default() }, &[]).await.unwrap();
    assert_eq!(total.requests, 3);
    let by_model = SpendFilter { model: Some("gpt-4o-mini".into()), ..Default::default() };
    assert_eq!(db.spend(&by_model, &[]).await.unwrap().0.requests, 2);

    // Logs: newest first, paginated by cursor; journal entries are visible as pending.
    let page = db.logs(&LogFilter { limit: 2, ..Default::default() }).await.unwrap();
    let ids: Vec<&str> = page.records.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids, vec![id(0xd, T0 + 2 * DAY), id(0xc, T0 + DAY)]);
    assert_eq!(page.records[0].usage_source, UsageSource::Pending);
    let next = db.logs(&LogFilter { limit: 2, before: page.next_before.clone(), ..Default::default() }).await.unwrap();
    let ids: Vec<&str> = next.records.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids, vec![id(0xb, T0 + DAY), id(0xa, T0)]);
    assert!(next.next_before.is_none());
    assert_eq!(next.records[1].usage_source, UsageSource::Reported);
    assert_eq!(next.records[1].usage, Usage { input_tokens: 100, cached_input_tokens: 10, output_tokens: 20 });

    // After a crash, the entries the journal left in flight become interrupted and count at
    // the cost they carry. (On PostgreSQL only those named: other replicas' are theirs.)
    assert_eq!(db.mark_interrupted(&["req_not_here".to_string()]).await.unwrap(), u64::from(db.postgres().is_none()));
    assert_eq!(db.mark_interrupted(&[id(0xd, T0 + 2 * DAY)]).await.unwrap(), u64::from(db.postgres().is_some()));
    assert_eq!(db.spent_since(true, k, 0).await.unwrap(), NanoUsd(1009));

    // Revocation and team deletion.
    db.revoke_key(k, T0).await.unwrap();
    assert_eq!(db.load_keys().await.unwrap()[0].revoked_ms, Some(T0));
    assert!(matches!(db.revoke_key("key_missing", T0).await, Err(LedgerError::NotFound(_))));
    db.delete_team("growth", T0).await.unwrap();
    assert!(matches!(db.delete_team("growth", T0).await, Err(LedgerError::NotFound(_))));
    assert_eq!(db.load_teams().await.unwrap().len(), 1);
    db.ping().await.unwrap();
    db.close().await;
}

// SQLite writes record batches on a connection of its own, as blocking calls, when the
// ledger runs on a multi-threaded runtime (the server's main runtime has one worker); on a
// current-thread runtime they go through sqlx. Each SQLite case runs on both.

#[tokio::test]
async fn sqlite_backend_meets_the_ledger_contract() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("nested/dir/ledger.db").display());
    contract(Backend::connect(&url).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn sqlite_backend_meets_the_ledger_contract_on_the_servers_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    contract(Backend::connect(&url).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_backend_meets_the_ledger_contract() {
    let Some(url) = postgres_url("postgres_backend_meets_the_ledger_contract").await else { return };
    contract(Backend::connect(&url).await.unwrap()).await;
}

#[tokio::test]
async fn big_batches_fit_each_backends_parameter_limit() {
    big_batches(Some("big_batches_fit_each_backends_parameter_limit")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn big_batches_fit_sqlites_parameter_limit_on_the_servers_runtime() {
    big_batches(None).await;
}

/// 5,000 records: statements of 2,048, 2,048, 512, 256, 128 and 8 rows in one transaction;
/// on PostgreSQL too when `postgres` names the test's schema.
async fn big_batches(postgres: Option<&str>) {
    let records: Vec<RequestRecord> =
        (0..5000).map(|i| record(i as u64, T0 + i, "k", "t", "gpt-4o", 1, UsageSource::Reported)).collect();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Backend::connect(&format!("sqlite://{}", dir.path().join("l.db").display())).await.unwrap();
    sqlite.insert_records(&records).await.unwrap();
    assert_eq!(sqlite.spend(&SpendFilter::default(), &[]).await.unwrap().0.requests, 5000);
    let Some(name) = postgres else { return };
    if let Some(url) = postgres_url(name).await {
        let pg = Backend::connect(&url).await.unwrap();
        pg.insert_records(&records).await.unwrap();
        assert_eq!(pg.spend(&SpendFilter::default(), &[]).await.unwrap().0.requests, 5000);
    }
}

/// The record connection binds each record's texts where they lie, for as long as its
/// statement runs: batch after batch of records, each batch freed (and its memory reused)
/// before the next is written, every size of statement, texts from empty to long; every
/// value must read back as it was written, and none from an earlier batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn record_batches_read_back_field_by_field_on_the_servers_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let db = Backend::connect(&format!("sqlite://{}", dir.path().join("l.db").display())).await.unwrap();
    let make = |batch: usize, i: usize| {
        let n = batch * 1000 + i;
        RequestRecord {
            request_id: id(n as u64, T0 + n as i64),
            time_ms: T0 + n as i64,
            key_id: format!("key_{}", "k".repeat(i % 40)),
            team: if i.is_multiple_of(7) { String::new() } else { format!("team-{batch}-{i}") },
            endpoint: if i.is_multiple_of(2) { "chat.completions" } else { "embeddings" },
            model: "m".repeat(1 + (n * 13) % 300),
            served_model: if i.is_multiple_of(5) { String::new() } else { format!("served-{n}") },
            usage: Usage { input_tokens: n as u64, cached_input_tokens: (n / 2) as u64, output_tokens: (n * 3) as u64 },
            cost: NanoUsd(n as i64 * 1_000_003),
            usage_source: if i.is_multiple_of(3) { UsageSource::Estimated } else { UsageSource::Reported },
            status: 200 + (i % 300) as u16,
            latency_ms: n as u64,
            stream: i % 2 == 1,
        }
    };
    // 1 row, then 2 + 1, then 128 + 64 + 32 + 16 + 8 + 4 + 2 + 1, then 128 × 3 + 1 ...
    let sizes = [1usize, 3, 255, 385, 1, 200];
    let mut expected = Vec::new();
    for (batch, &size) in sizes.iter().enumerate() {
        let records: Vec<RequestRecord> = (0..size).map(|i| make(batch, i)).collect();
        db.insert_records(&records).await.unwrap();
        expected.extend(records.iter().cloned());
        // The batch's own strings are freed here; the next batch's may take their memory.
        drop(records);
    }
    let mut read = Vec::new();
    let mut before = None;
    loop {
        let page = db.logs(&LogFilter { limit: 1000, before: before.clone(), ..Default::default() }).await.unwrap();
        read.extend(page.records);
        match page.next_before {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    assert_eq!(read.len(), expected.len());
    read.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    expected.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    for (got, want) in read.iter().zip(&expected) {
        assert_eq!(format!("{got:?}"), format!("{want:?}"));
    }
    db.close().await;
}

/// The server's record connection leaves checkpoints to a thread of its own (it checkpoints
/// itself only past a 64 MiB backstop): records written in a few batches, far below the
/// backstop, still reach the database file — which in WAL mode only a checkpoint writes —
/// within a few of the checkpointer's rounds, and read back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_checkpointer_moves_record_batches_into_the_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("l.db");
    let db = Backend::connect(&format!("sqlite://{}", file.display())).await.unwrap();
    let size = || std::fs::metadata(&file).unwrap().len();
    let empty = size();
    for batch in 0..4u64 {
        let records: Vec<RequestRecord> = (0..500)
            .map(|i| {
                record(batch * 1000 + i, T0 + (batch * 1000 + i) as i64, "k", "t", "gpt-4o", 1, UsageSource::Reported)
            })
            .collect();
        db.insert_records(&records).await.unwrap();
    }
    let wal = std::fs::metadata(dir.path().join("l.db-wal")).unwrap().len();
    assert!(wal > 100 * 4096, "the batches went to the WAL ({wal} bytes)");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while size() < empty + 64 * 1024 {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint within 5 s: the database file is {} bytes, as created ({empty})",
            size()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(db.spend(&SpendFilter::default(), &[]).await.unwrap().0.requests, 2000);
    db.close().await;
}

/// The CLI writes keys and teams through its own connection while the server's ledger writer
/// commits batches to the same SQLite file: every such write must wait its turn, not fail with
/// "database is locked" (a transaction that reads before it writes must take the write lock
/// up front; SQLite's busy wait does not cover a read lock that turns into a write lock).
#[tokio::test]
async fn sqlite_admin_writes_wait_for_a_busy_ledger_writer_instead_of_failing() {
    admin_writes_beside_a_busy_writer().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_admin_writes_wait_for_a_busy_ledger_writer_on_the_servers_runtime() {
    admin_writes_beside_a_busy_writer().await;
}

async fn admin_writes_beside_a_busy_writer() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("l.db").display());
    let server = Backend::connect(&url).await.unwrap();
    let cli = Backend::connect(&url).await.unwrap();
    cli.create_team(&TeamRow { name: "t".into(), budget: BudgetSpec::default(), created_ms: 0 }).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<RequestRecord> =
                    (0..20).map(|j| record(j, T0 + i, "k", "t", "gpt-4o", 1, UsageSource::Reported)).collect();
                server.insert_records(&batch).await.unwrap();
                i += 1;
            }
        })
    };
    for i in 0..150 {
        let (row, _) = tollgate::api::admin::new_key("t", &format!("k{i}"), BudgetSpec::default());
        cli.create_key(&row).await.unwrap_or_else(|e| panic!("key {i}: {e}"));
        cli.revoke_key(&row.id, T0).await.unwrap_or_else(|e| panic!("revoking key {i}: {e}"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
}
