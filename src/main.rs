//! The `tollgate` command line: serve, check-config, and the team / key / spend commands,
//! which work on the configured database directly.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use tollgate::api::admin::{new_key, validate_name};
use tollgate::api::spend::{group_name, parse_group_by, parse_time, record_json, spend_json, Edge, DEFAULT_GROUP_BY};
use tollgate::ledger::{now_ms, Backend, LogFilter, SpendFilter, TeamRow};
use tollgate::policy::budget::{BudgetSpec, Period};
use tollgate::policy::pricing::NanoUsd;
use tollgate::{Config, RunOptions};

/// jemalloc instead of glibc's malloc: the gateway allocates and frees many small buffers per
/// request across threads, where glibc's allocator is slow and keeps the memory of a burst of
/// streams after it ends; mimalloc was as fast but held more memory with many open streams
/// (docs/benchmarks.md, decision table).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (read once, at its start): a background thread returns freed pages to
/// the OS within about a second, so memory goes back down after a burst even when idle.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 63] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000\0";

#[derive(Parser)]
#[command(name = "tollgate", version, about = "A cost-aware gateway for OpenAI-compatible APIs")]
struct Cli {
    /// Config file [default: $TOLLGATE_CONFIG, else config/tollgate.toml]
    #[arg(long, global = true, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Listen address, overriding the config's `listen`.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Validate the config and exit (non-zero with every problem listed if it is invalid).
    CheckConfig,
    /// Manage teams.
    #[command(subcommand)]
    Teams(TeamsCommand),
    /// Manage virtual keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Show spend from the ledger.
    Spend(SpendArgs),
    /// Show the newest request records.
    Logs {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        team: Option<String>,
        #[arg(long)]
        key: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Default)]
struct BudgetArgs {
    /// Budget in US dollars per period.
    #[arg(long)]
    limit_usd: Option<f64>,
    /// Budget period: daily, weekly, monthly or total.
    #[arg(long)]
    period: Option<String>,
    /// Fraction of the limit past which requests are downgraded (e.g. 0.8).
    #[arg(long)]
    downgrade_at: Option<f64>,
    /// Allowed models, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// Requests per minute.
    #[arg(long)]
    rpm: Option<u64>,
    /// Tokens per minute.
    #[arg(long)]
    tpm: Option<u64>,
}

impl BudgetArgs {
    fn apply(&self, spec: &mut BudgetSpec) -> Result<()> {
        if let Some(l) = self.limit_usd {
            spec.limit = Some(NanoUsd::from_usd(l).context("--limit-usd must be a non-negative number")?);
        }
        if let Some(p) = &self.period {
            spec.period = p.parse::<Period>().map_err(anyhow::Error::msg)?;
        }
        if let Some(d) = self.downgrade_at {
            if !(d > 0.0 && d <= 1.0) {
                bail!("--downgrade-at must be a fraction in (0, 1]");
            }
            spec.downgrade_at = Some(d);
        }
        if let Some(m) = &self.models {
            spec.models = m.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        }
        if let Some(r) = self.rpm {
            spec.rpm = Some(r).filter(|r| *r > 0);
        }
        if let Some(t) = self.tpm {
            spec.tpm = Some(t).filter(|t| *t > 0);
        }
        Ok(())
    }
}

#[derive(Subcommand)]
enum TeamsCommand {
    /// Create a team.
    Create {
        name: String,
        #[command(flatten)]
        budget: BudgetArgs,
    },
    /// Change a team's budget and limits.
    Update {
        name: String,
        #[command(flatten)]
        budget: BudgetArgs,
    },
    /// List teams.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a team and revoke its keys.
    Delete { name: String },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; its secret is printed once.
    Create {
        #[arg(long)]
        team: String,
        #[arg(long, default_value = "default")]
        name: String,
        #[command(flatten)]
        budget: BudgetArgs,
        #[arg(long)]
        json: bool,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        team: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key at once.
    Revoke { id: String },
}

#[derive(Args)]
struct SpendArgs {
    #[arg(long)]
    from: Option<String>,
    #[arg(long)]
    to: Option<String>,
    #[arg(long)]
    team: Option<String>,
    #[arg(long)]
    key: Option<String>,
    #[arg(long)]
    model: Option<String>,
    /// Comma-separated: team, key, model, day.
    #[arg(long, default_value = DEFAULT_GROUP_BY)]
    group_by: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // One thread: the request workers run runtimes of their own (server.rs); this one holds
    // the accept loop, the ledger's group commit and the directory poll, none of them busy
    // enough for two threads, and with two every wake-up of the ledger could also wake the
    // other thread to look for work to steal.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    runtime.block_on(dispatch(cli))
}

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    Config::load(path.map(PathBuf::as_path)).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Waits until running servers have polled a change this command made (they check the
/// database's directory version every `POLL_INTERVAL`), so that what it revoked is refused
/// by the time the command returns. On PostgreSQL the change is pushed to every replica as
/// it commits (`LISTEN/NOTIFY`): nothing to wait for.
async fn settle_servers(db: &Backend) {
    if db.postgres().is_none() {
        tokio::time::sleep(tollgate::auth::CLI_SETTLE).await;
    }
}

async fn open_db(config: &Config) -> Result<Backend> {
    Backend::connect(&config.database_url).await.map_err(|e| anyhow::anyhow!("cannot open the ledger: {e}"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Installs the SIGTERM / SIGINT handlers now (so a signal during start-up is a clean
/// shutdown, not a kill) and returns the future that resolves on the first of them.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    #[cfg(unix)]
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    })
}

async fn dispatch(cli: Cli) -> Result<()> {
    let config_path = cli.config.as_ref();
    match cli.command {
        Command::Serve { log_format, listen } => {
            let shutdown = shutdown_signal()?;
            init_logging(log_format);
            let mut config = load_config(config_path)?;
            if let Some(addr) = listen {
                config.listen = addr;
            }
            let listener = tokio::net::TcpListener::bind(&config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            let options = RunOptions {
                // Tests and scripts read the bound address (useful with port 0) from this line,
                // printed once the ledger is open and requests can be served.
                on_ready: Some(Box::new(|addr| println!("tollgate listening on http://{addr}"))),
                ..RunOptions::default()
            };
            tollgate::run(config, listener, shutdown, options).await?;
            Ok(())
        }
        Command::CheckConfig => {
            let config = load_config(config_path)?;
            println!(
                "config ok: {} models, {} providers, database {}",
                config.catalog.models.len(),
                config.providers.len(),
                tollgate::ledger::redact_url(&config.database_url)
            );
            Ok(())
        }
        Command::Teams(cmd) => teams(cmd, &load_config(config_path)?).await,
        Command::Keys(cmd) => keys(cmd, &load_config(config_path)?).await,
        Command::Spend(args) => spend(args, &load_config(config_path)?).await,
        Command::Logs { limit, team, key, json } => {
            let db = open_db(&load_config(config_path)?).await?;
            let page = db.logs(&LogFilter { before: None, team, key_id: key, limit: limit.clamp(1, 1000) }).await?;
            if json {
                let data: Vec<_> = page.records.iter().map(record_json).collect();
                println!("{}", serde_json::to_string_pretty(&json!({"data": data, "next_before": page.next_before}))?);
            } else {
                println!(
                    "{:<34} {:<20} {:<12} {:<16} {:>8} {:>8} {:>14} {:<9} {:>6}",
                    "request_id", "time", "team", "served_model", "input", "output", "cost_usd", "usage", "status"
                );
                for r in &page.records {
                    let time = chrono::DateTime::from_timestamp_millis(r.time_ms)
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_default();
                    println!(
                        "{:<34} {:<20} {:<12} {:<16} {:>8} {:>8} {:>14} {:<9} {:>6}",
                        r.request_id,
                        time,
                        r.team,
                        r.served_model,
                        r.usage.input_tokens,
                        r.usage.output_tokens,
                        r.cost.to_string(),
                        r.usage_source.as_str(),
                        r.status
                    );
                }
            }
            Ok(())
        }
    }
}

fn check_name(name: &str) -> Result<()> {
    validate_name("name", name).map_err(|e| anyhow::anyhow!("{e}"))
}

fn fmt_limit(spec: &BudgetSpec) -> String {
    spec.limit.map_or_else(|| "-".to_string(), |l| format!("${l}/{}", spec.period.as_str()))
}

async fn teams(cmd: TeamsCommand, config: &Config) -> Result<()> {
    let db = open_db(config).await?;
    match cmd {
        TeamsCommand::Create { name, budget } => {
            check_name(&name)?;
            let mut spec = BudgetSpec::default();
            budget.apply(&mut spec)?;
            db.create_team(&TeamRow { name: name.clone(), budget: spec.clone(), created_ms: now_ms() }).await?;
            println!("created team {name} (budget {})", fmt_limit(&spec));
        }
        TeamsCommand::Update { name, budget } => {
            let mut team = db.load_teams().await?.into_iter().find(|t| t.name == name).context("no such team")?;
            budget.apply(&mut team.budget)?;
            db.update_team(&team).await?;
            settle_servers(&db).await;
            println!("updated team {name} (budget {})", fmt_limit(&team.budget));
        }
        TeamsCommand::List { json } => {
            let teams = db.load_teams().await?;
            if json {
                let data: Vec<_> = teams
                    .iter()
                    .map(|t| json!({"name": t.name, "limit_usd": t.budget.limit.map(|l| l.as_usd()), "period": t.budget.period.as_str(),
                                    "downgrade_at": t.budget.downgrade_at, "models": t.budget.models, "rpm": t.budget.rpm, "tpm": t.budget.tpm}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                println!("{:<24} {:<20} {:<10} {:<8} {:<8}", "team", "budget", "downgrade", "rpm", "tpm");
                for t in teams {
                    let b = &t.budget;
                    println!(
                        "{:<24} {:<20} {:<10} {:<8} {:<8}",
                        t.name,
                        fmt_limit(b),
                        b.downgrade_at.map_or("-".into(), |d| d.to_string()),
                        b.rpm.map_or("-".into(), |v| v.to_string()),
                        b.tpm.map_or("-".into(), |v| v.to_string())
                    );
                }
            }
        }
        TeamsCommand::Delete { name } => {
            db.delete_team(&name, now_ms()).await?;
            settle_servers(&db).await;
            println!("deleted team {name}; its keys are revoked");
        }
    }
    db.close().await;
    Ok(())
}

async fn keys(cmd: KeysCommand, config: &Config) -> Result<()> {
    let db = open_db(config).await?;
    match cmd {
        KeysCommand::Create { team, name, budget, json } => {
            check_name(&name)?;
            let mut spec = BudgetSpec::default();
            budget.apply(&mut spec)?;
            let (row, secret) = new_key(&team, &name, spec);
            db.create_key(&row).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"id": row.id, "key": secret, "team": row.team, "name": row.name})
                    )?
                );
            } else {
                println!("created key {} for team {team} (name {name})", row.id);
                println!("key: {secret}");
                println!("This is the only time the key is shown; store it now.");
            }
        }
        KeysCommand::List { team, json } => {
            let keys = db.load_keys().await?;
            let keys: Vec<_> = keys.into_iter().filter(|k| team.as_ref().is_none_or(|t| &k.team == t)).collect();
            if json {
                let data: Vec<_> = keys
                    .iter()
                    .map(|k| json!({"id": k.id, "team": k.team, "name": k.name, "prefix": k.prefix, "revoked": k.revoked_ms.is_some(),
                                    "limit_usd": k.budget.limit.map(|l| l.as_usd()), "period": k.budget.period.as_str()}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                println!("{:<22} {:<20} {:<16} {:<10} {:<20} state", "id", "team", "name", "prefix", "budget");
                for k in keys {
                    let state = if k.revoked_ms.is_some() { "revoked" } else { "active" };
                    println!(
                        "{:<22} {:<20} {:<16} {:<10} {:<20} {}",
                        k.id,
                        k.team,
                        k.name,
                        k.prefix,
                        fmt_limit(&k.budget),
                        state
                    );
                }
            }
        }
        KeysCommand::Revoke { id } => {
            db.revoke_key(&id, now_ms()).await?;
            settle_servers(&db).await;
            println!("revoked key {id}");
        }
    }
    db.close().await;
    Ok(())
}

async fn spend(args: SpendArgs, config: &Config) -> Result<()> {
    let db = open_db(config).await?;
    let err = |e: tollgate::error::ApiError| anyhow::anyhow!("{e}");
    let filter = SpendFilter {
        from_ms: args.from.as_deref().map(|s| parse_time(Edge::From, s)).transpose().map_err(err)?,
        to_ms: args.to.as_deref().map(|s| parse_time(Edge::To, s)).transpose().map_err(err)?,
        team: args.team,
        key_id: args.key,
        model: args.model,
    };
    let group_by = parse_group_by(&args.group_by).map_err(err)?;
    let (total, groups) = db.spend(&filter, &group_by).await?;
    if args.json {
        // The same shape as `GET /spend`'s answer.
        let queried_ms = chrono::Utc::now().timestamp_millis();
        println!("{}", serde_json::to_string_pretty(&spend_json(&filter, queried_ms, &total, &groups))?);
    } else {
        let mut header: Vec<String> = group_by.iter().map(|g| format!("{:<22}", group_name(*g))).collect();
        header.push(format!("{:>9} {:>12} {:>12} {:>12} {:>16}", "requests", "input", "cached", "output", "cost_usd"));
        println!("{}", header.join(""));
        for g in &groups {
            let labels: String = g.labels.iter().map(|(_, l)| format!("{l:<22}")).collect();
            let t = &g.totals;
            println!(
                "{labels}{:>9} {:>12} {:>12} {:>12} {:>16}",
                t.requests,
                t.input_tokens,
                t.cached_input_tokens,
                t.output_tokens,
                t.cost.to_string()
            );
        }
        let pad = " ".repeat(22 * group_by.len().saturating_sub(1));
        let label = if group_by.is_empty() { String::new() } else { format!("{:<22}", "TOTAL") };
        println!(
            "{label}{pad}{:>9} {:>12} {:>12} {:>12} {:>16}",
            total.requests,
            total.input_tokens,
            total.cached_input_tokens,
            total.output_tokens,
            total.cost.to_string()
        );
    }
    db.close().await;
    Ok(())
}
