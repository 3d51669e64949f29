//! `ymera`: run YMERA's roles, migrate, manage users.
//!
//! Thin on purpose: parse the command line, set up logging, call the
//! library, and turn SIGTERM/Ctrl-C into a graceful shutdown.

use std::io::Read;

use anyhow::Context;
use clap::{Parser, Subcommand};
use command_api::accounts;
use infra::auth::{Role as UserRole, Username};
use infra::config::{AuthConfig, DbConfig, HttpConfig, NatsConfig, SearchConfig};
use infra::telemetry::{self, TelemetryConfig};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use ymera::{Role, Settings};

/// mimalloc (v2, without transparent huge pages, which keeps the idle
/// process under 50 MiB) rather than glibc's malloc: a bulk write of 1,000 agents spent
/// half its CPU time in glibc's malloc and free (chunk consolidation
/// across threads); mimalloc's thread-local free lists make the
/// short-lived allocations of JSON parsing and serialization cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// YMERA: an event-sourced backend for fleets of AI agents.
#[derive(Debug, Parser)]
#[command(name = "ymera", version, about)]
struct Cli {
    #[command(flatten)]
    telemetry: TelemetryConfig,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Serve {
    #[command(flatten)]
    nats: NatsConfig,
    #[command(flatten)]
    db: DbConfig,
    #[command(flatten)]
    auth: AuthConfig,
    #[command(flatten)]
    http: HttpConfig,
    #[command(flatten)]
    search: SearchConfig,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::enum_variant_names)] // the names are the subcommands users type
enum Command {
    /// All roles in one process on one port (the default).
    All(Serve),
    /// The write API only.
    CommandApi(Serve),
    /// The read API only.
    QueryApi(Serve),
    /// The projector only (serves the operational endpoints).
    Projector(Serve),
    /// Create or update the database schemas, then exit.
    Migrate {
        #[command(flatten)]
        db: DbConfig,
    },
    /// Build every read model afresh from the log in a new schema while the
    /// live ones keep serving, check both agree, and swap atomically. With
    /// --search, build a query process's search index instead.
    Rebuild {
        /// Swap even when the rebuilt models disagree with the live ones:
        /// to repair corrupted read models, or after an upgrade that added
        /// a read model. The differences are logged.
        #[arg(long)]
        force: bool,
        /// Rebuild the search index in --search-dir from the log (into a
        /// fresh directory beside it, then moved into its place), with the
        /// query process that uses it stopped. A running query process
        /// rebuilds a missing or outdated index by itself.
        #[arg(long, conflicts_with = "force")]
        search: bool,
        #[command(flatten)]
        search_dir: SearchConfig,
        #[command(flatten)]
        nats: NatsConfig,
        #[command(flatten)]
        db: DbConfig,
    },
    /// Replay the log into a schema of its own for analysis, leaving the
    /// live read models alone.
    Replay {
        /// Stop after this stream sequence, or before the first event that
        /// occurred after this RFC 3339 time. Default: the end of the log.
        #[arg(long)]
        until: Option<String>,
        /// The schema to create and fill (a-z, 0-9, _).
        #[arg(long)]
        into_schema: String,
        #[command(flatten)]
        nats: NatsConfig,
        #[command(flatten)]
        db: DbConfig,
    },
    /// Events the projector could not apply.
    #[command(subcommand)]
    Parked(ParkedCommand),
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(Debug, Subcommand)]
enum ParkedCommand {
    /// List parked events with the reason each was parked.
    List {
        #[command(flatten)]
        db: DbConfig,
    },
    /// Try to apply every parked event again (after an upgrade that
    /// understands them); those that still fail stay parked.
    Retry {
        #[command(flatten)]
        nats: NatsConfig,
        #[command(flatten)]
        db: DbConfig,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Add a user. The password is read from YMERA_NEW_USER_PASSWORD or,
    /// with --password-stdin, from standard input.
    Add {
        #[arg(long)]
        username: String,
        #[arg(long, value_parser = parse_role)]
        role: UserRole,
        /// Read the password from standard input.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        db: DbConfig,
    },
    /// List users with their role and who created them.
    List {
        #[command(flatten)]
        db: DbConfig,
    },
    /// Delete a user; every token of theirs stops working. The last admin
    /// cannot be deleted.
    Delete {
        #[arg(long)]
        username: String,
        #[command(flatten)]
        db: DbConfig,
    },
    /// Set a user's password; every token of theirs issued before stops
    /// working. The password is read like `user add`'s.
    Passwd {
        #[arg(long)]
        username: String,
        /// Read the password from standard input.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        db: DbConfig,
    },
}

fn parse_role(s: &str) -> Result<UserRole, String> {
    UserRole::parse(s).ok_or_else(|| "one of admin, editor, viewer".into())
}

/// `ymera` alone, or `ymera --some-flag`, means `ymera all`.
fn args() -> Vec<String> {
    let mut args: Vec<String> = std::env::args().collect();
    let first = args.get(1).map(String::as_str);
    let is_help_or_version = matches!(first, Some("-h" | "--help" | "-V" | "--version"));
    if first.is_none() || (first.is_some_and(|a| a.starts_with('-')) && !is_help_or_version) {
        args.insert(1, "all".into());
    }
    args
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_from(args());
    let _telemetry = telemetry::init(&cli.telemetry)?;
    match cli.command {
        Command::All(s) => serve(Role::All, s).await,
        Command::CommandApi(s) => serve(Role::Command, s).await,
        Command::QueryApi(s) => serve(Role::Query, s).await,
        Command::Projector(s) => serve(Role::Projector, s).await,
        Command::Migrate { db } => {
            let pool = infra::db::pool(&db)?;
            infra::db::wait_ready(&pool, std::time::Duration::from_secs(30)).await?;
            ymera::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Rebuild {
            search: true,
            search_dir,
            nats,
            ..
        } => {
            let store = infra::EventStore::connect(&nats)
                .await
                .context("NATS JetStream is not reachable")?;
            let started = std::time::Instant::now();
            let dir = &search_dir.search_dir;
            let checkpoint = query_api::search::index::rebuild_offline(dir, &store).await?;
            println!(
                "rebuilt the search index in {} from events 1..={checkpoint} in {:.1}s",
                dir.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Rebuild {
            force, nats, db, ..
        } => {
            let deps = ymera::connect(&nats, &db).await?;
            let report = projector::rebuild::rebuild(&deps.store, &db, &deps.pool, force).await?;
            println!(
                "rebuilt the read models from {} events in {:.1}s and swapped them in",
                report.events,
                report.elapsed.as_secs_f64()
            );
            println!(
                "every row agreed with the live models at event {} (and the rows changed since, at the swap):",
                report.checked_at
            );
            for t in &report.tables {
                println!("  {:<22} {:>10} rows  {}", t.table, t.rows, t.checksum);
            }
            Ok(())
        }
        Command::Replay {
            until,
            into_schema,
            nats,
            db,
        } => {
            let until = match until.as_deref() {
                None => projector::rebuild::Until::End,
                Some(u) => match u.parse::<u64>() {
                    Ok(seq) => projector::rebuild::Until::Seq(seq),
                    Err(_) => projector::rebuild::Until::Time(
                        chrono::DateTime::parse_from_rfc3339(u)
                            .context("--until takes a stream sequence or an RFC 3339 time")?
                            .with_timezone(&chrono::Utc),
                    ),
                },
            };
            let deps = ymera::connect(&nats, &db).await?;
            let last =
                projector::rebuild::replay(&deps.store, &db, &deps.pool, &into_schema, until)
                    .await?;
            println!("replayed events 1..={last} into schema {into_schema}");
            Ok(())
        }
        Command::Parked(ParkedCommand::List { db }) => {
            let pool = infra::db::pool(&db)?;
            let parked = projector::parked::list(&pool).await?;
            if parked.is_empty() {
                println!("no parked events");
            }
            for p in parked {
                println!(
                    "{:>10}  {}  {}  {}",
                    p.seq,
                    p.parked_at.to_rfc3339(),
                    p.subject,
                    p.error
                );
            }
            Ok(())
        }
        Command::Parked(ParkedCommand::Retry { nats, db }) => {
            let deps = ymera::connect(&nats, &db).await?;
            let r = projector::parked::retry(&deps.store, &deps.pool).await?;
            println!("{} applied, {} still parked", r.applied, r.still_parked);
            Ok(())
        }
        Command::User(command) => user(command).await,
    }
}

/// `ymera user …`: the users table, straight through the database.
async fn user(command: UserCommand) -> anyhow::Result<()> {
    let (UserCommand::Add { db, .. }
    | UserCommand::List { db }
    | UserCommand::Delete { db, .. }
    | UserCommand::Passwd { db, .. }) = &command;
    let pool = infra::db::pool(db)?;
    infra::db::wait_ready(&pool, std::time::Duration::from_secs(30)).await?;
    ymera::migrate(&pool).await?;
    match command {
        UserCommand::Add {
            username,
            role,
            password_stdin,
            ..
        } => {
            let username = parse_username(&username)?;
            let password = new_password(password_stdin)?;
            let added = accounts::add_user(&pool, &username, &password, role, "cli").await?;
            anyhow::ensure!(added, "a user named {username:?} exists already");
            println!("user {username} added as {}", role.as_str());
        }
        UserCommand::List { .. } => {
            for u in accounts::list(&pool).await? {
                println!(
                    "{:<24} {:<7} {}  by {}",
                    u.username,
                    u.role,
                    u.created_at.to_rfc3339(),
                    u.created_by
                );
            }
        }
        UserCommand::Delete { username, .. } => {
            let username = parse_username(&username)?;
            accounts::delete(&pool, &username).await?;
            println!("user {username} deleted");
        }
        UserCommand::Passwd {
            username,
            password_stdin,
            ..
        } => {
            let username = parse_username(&username)?;
            let password = new_password(password_stdin)?;
            let hash = accounts::hash(&password).await?;
            accounts::update(&pool, &username, None, Some(&hash)).await?;
            println!("password of {username} changed; their older tokens are revoked");
        }
    }
    Ok(())
}

fn parse_username(name: &str) -> anyhow::Result<Username> {
    Username::parse(name).with_context(|| format!("username {name:?} {}", Username::RULE))
}

/// A new password from standard input or `YMERA_NEW_USER_PASSWORD`.
fn new_password(from_stdin: bool) -> anyhow::Result<SecretString> {
    let password = if from_stdin {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        SecretString::from(s.trim_end_matches(['\r', '\n']).to_owned())
    } else {
        SecretString::from(
            std::env::var("YMERA_NEW_USER_PASSWORD")
                .context("set YMERA_NEW_USER_PASSWORD or pass --password-stdin")?,
        )
    };
    anyhow::ensure!(
        (8..=1024).contains(&password.expose_secret().chars().count()),
        "the password needs 8 to 1024 characters"
    );
    Ok(password)
}

async fn serve(role: Role, s: Serve) -> anyhow::Result<()> {
    let settings = Settings {
        nats: s.nats,
        db: s.db,
        auth: s.auth,
        http: s.http,
        search: s.search,
    };
    let listener = tokio::net::TcpListener::bind(settings.http.bind)
        .await
        .with_context(|| format!("cannot listen on {}", settings.http.bind))?;
    let shutdown = CancellationToken::new();
    let running = ymera::start(role, &settings, listener, shutdown.clone()).await?;
    if let Some(password) = &running.generated_admin_password {
        // Development mode only: shown once, never logged.
        println!(
            "\n  First admin created: username {:?}, password {:?}\n  (shown once; set YMERA_ADMIN_PASSWORD to choose it)\n",
            settings.auth.admin_username,
            password.expose_secret()
        );
    }
    println!("ymera {} listening on http://{}", role.name(), running.addr);
    wait_for_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    shutdown.cancel();
    running.join().await;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
