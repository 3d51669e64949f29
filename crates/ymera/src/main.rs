//! `ymera`: run YMERA's roles, migrate, manage users.
//!
//! Thin on purpose: parse the command line, set up logging, call the
//! library, and turn SIGTERM/Ctrl-C into a graceful shutdown.

mod progress;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use command_api::accounts;
use infra::auth::{Role as UserRole, Username};
use infra::config::{AuthConfig, DbConfig, HttpConfig, NatsConfig, SearchConfig};
use infra::telemetry::{self, TelemetryConfig};
use projector::rebuild::{RebuildError, Until};
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

/// `mi_option_arena_purge_mult`: its place in `mi_option_e` of the v2
/// `mimalloc.h` that libmimalloc-sys builds (which names no constant for it).
const ARENA_PURGE_MULT: libmimalloc_sys::mi_option_t = 24;
/// mimalloc's default for it, which tells the option is the one meant, and
/// that `MIMALLOC_ARENA_PURGE_MULT` did not set it otherwise.
const ARENA_PURGE_MULT_DEFAULT: std::ffi::c_long = 10;

/// Has mimalloc give a freed segment (a 32 MiB block of its arena) back to
/// the OS as soon as it is freed, not 100 ms later. A block freed with
/// 20 MiB of it touched (the 19 MiB an Argon2id password hash works in,
/// at the first admin's creation or at a login) was most often taken
/// again, whole and still resident, by the next thread that needed a
/// segment (a tantivy indexing thread, a blocking thread) before its purge
/// was due, and a block in use is never purged: an idle `ymera all` stayed
/// at 49 to 67 MiB instead of 31. Segments are freed seldom (a thread's
/// end, a block over 16 MiB), so purging them at once costs little; pages
/// freed inside a segment keep their delay.
#[allow(unsafe_code)]
fn purge_freed_segments_at_once() {
    // SAFETY: reading and setting an option's value have no preconditions
    // and may happen at any time; the value only changes when mimalloc
    // purges, never what is allocated.
    unsafe {
        if libmimalloc_sys::mi_option_get(ARENA_PURGE_MULT) == ARENA_PURGE_MULT_DEFAULT {
            libmimalloc_sys::mi_option_set(ARENA_PURGE_MULT, 0);
        }
    }
}

/// The version `--version` prints: the crate's, and the commit it was built
/// from ("unknown" outside a git checkout, e.g. from a source tarball).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("YMERA_GIT_SHA"), ")");

/// What `--help` says after the commands and options.
const AFTER_HELP: &str = "\
Without a command, ymera runs `all`. Options of the top level (logs and
traces) go anywhere on the line: `ymera --log-format json migrate`.

Exit codes:
  0  done
  1  failed (the message says why)
  2  usage: a bad option or value
  3  a dependency (PostgreSQL, NATS) is unreachable
  4  a check failed: rebuilt read models disagree with the live ones";

/// YMERA: an event-sourced backend for fleets of AI agents.
#[derive(Debug, Parser)]
#[command(name = "ymera", version = VERSION, about, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    telemetry: TelemetryConfig,
    #[command(subcommand)]
    command: Option<Command>,
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
        /// Rebuild the search index in --search-dir too (as --search does,
        /// its query process stopped), at the same time as the read models:
        /// the two builds share the machine instead of running one after
        /// the other.
        #[arg(long, conflicts_with = "search")]
        with_search: bool,
        #[command(flatten)]
        search_dir: SearchConfig,
        #[command(flatten)]
        nats: NatsConfig,
        #[command(flatten)]
        db: DbConfig,
    },
    /// Replay the log into a schema of its own for analysis (and, with
    /// --into-search-dir, into a search index of its own), leaving the live
    /// read models alone.
    Replay {
        /// Stop after this stream sequence, or before the first event that
        /// occurred after this RFC 3339 time. Default: the end of the log.
        #[arg(long)]
        until: Option<String>,
        /// The schema to create and fill (a-z, 0-9, _).
        #[arg(long)]
        into_schema: String,
        /// Also build the search index as of the same event, into this
        /// directory (which must not exist yet).
        #[arg(long, value_name = "DIR")]
        into_search_dir: Option<PathBuf>,
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
    /// Print a shell completion script: `source <(ymera completions bash)`,
    /// or save it where your shell loads completions from.
    Completions { shell: clap_complete::Shell },
}

/// How a command that lists things prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
enum Format {
    /// Aligned columns, for people.
    #[default]
    Text,
    /// One JSON array, for scripts.
    Json,
}

/// The output option of the commands that list things.
#[derive(Debug, clap::Args)]
struct Output {
    /// Output format.
    #[arg(short, long = "output", value_enum, default_value_t = Format::Text)]
    output: Format,
}

#[derive(Debug, Subcommand)]
enum ParkedCommand {
    /// List parked events with the reason each was parked.
    List {
        #[command(flatten)]
        output: Output,
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
        /// The new user's name.
        #[arg(long)]
        username: String,
        /// What the user may do.
        #[arg(long, value_enum)]
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
        output: Output,
        #[command(flatten)]
        db: DbConfig,
    },
    /// Delete a user; every token of theirs stops working. The last admin
    /// cannot be deleted.
    Delete {
        /// The user to delete.
        #[arg(long)]
        username: String,
        #[command(flatten)]
        db: DbConfig,
    },
    /// Set a user's password; every token of theirs issued before stops
    /// working. The password is read like `user add`'s.
    Passwd {
        /// The user whose password to set.
        #[arg(long)]
        username: String,
        /// Read the password from standard input.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        db: DbConfig,
    },
}

/// An error in what the user asked for, found after parsing (a username
/// no user can have, a bad time): exit code 2, like clap's own.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// The exit code for `error`, as `--help` lists them.
fn exit_code(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<Usage>().is_some() {
        2
    } else if error.downcast_ref::<ymera::Unreachable>().is_some() {
        3
    } else if matches!(
        error.downcast_ref::<RebuildError>(),
        Some(RebuildError::Mismatch { .. })
    ) {
        4
    } else {
        1
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    purge_freed_segments_at_once();
    let Cli { telemetry, command } = Cli::parse();
    let _telemetry = match telemetry::init(&telemetry, progress::log_writer()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("Error: {e:?}");
            return ExitCode::FAILURE;
        }
    };
    // `ymera` alone (or with top-level options only) runs every role.
    match run(command.unwrap_or_else(all_from_env)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// `ymera` without a command: `all`, configured from the environment.
fn all_from_env() -> Command {
    let matches = Serve::augment_args(clap::Command::new("ymera all")).get_matches_from(["ymera"]);
    Command::All(Serve::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::All(s) => serve(Role::All, s).await,
        Command::CommandApi(s) => serve(Role::Command, s).await,
        Command::QueryApi(s) => serve(Role::Query, s).await,
        Command::Projector(s) => serve(Role::Projector, s).await,
        Command::Migrate { db } => {
            let pool = ready_pool(&db).await?;
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
            let store = ymera::connect_store(&nats).await?;
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
            force,
            with_search,
            search_dir,
            nats,
            db,
            ..
        } => {
            let deps = ymera::connect(&nats, &db).await?;
            let (reporter, shown) = progress::show("rebuild");
            let started = std::time::Instant::now();
            let search = async {
                if !with_search {
                    return Ok(None);
                }
                let dir = &search_dir.search_dir;
                let checkpoint =
                    query_api::search::index::rebuild_offline(dir, &deps.store).await?;
                anyhow::Ok(Some((checkpoint, started.elapsed())))
            };
            let (report, search) = tokio::join!(
                projector::rebuild::rebuild(&deps.store, &db, &deps.pool, force, &reporter),
                search
            );
            drop(reporter);
            shown.await?;
            let report = report?;
            if let Some((checkpoint, took)) = search? {
                println!(
                    "rebuilt the search index in {} from events 1..={checkpoint} in {:.1}s",
                    search_dir.search_dir.display(),
                    took.as_secs_f64()
                );
            }
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
            into_search_dir,
            nats,
            db,
        } => {
            if let Some(dir) = into_search_dir.as_ref().filter(|d| d.exists()) {
                return Err(Usage(format!(
                    "--into-search-dir {}: it already exists; name a new directory",
                    dir.display()
                ))
                .into());
            }
            let until = match until.as_deref() {
                None => Until::End,
                Some(u) => match u.parse::<u64>() {
                    Ok(seq) => Until::Seq(seq),
                    Err(_) => Until::Time(
                        chrono::DateTime::parse_from_rfc3339(u)
                            .map_err(|_| {
                                Usage(format!(
                                    "--until {u:?}: a stream sequence or an RFC 3339 time"
                                ))
                            })?
                            .with_timezone(&chrono::Utc),
                    ),
                },
            };
            let deps = ymera::connect(&nats, &db).await?;
            let (reporter, shown) = progress::show("replay");
            let last = projector::rebuild::replay(
                &deps.store,
                &db,
                &deps.pool,
                &into_schema,
                until,
                &reporter,
            )
            .await;
            drop(reporter);
            shown.await?;
            let last = last?;
            println!("replayed events 1..={last} into schema {into_schema}");
            if let Some(dir) = &into_search_dir {
                query_api::search::index::replay_offline(dir, &deps.store, last).await?;
                println!("and into the search index in {}", dir.display());
            }
            Ok(())
        }
        Command::Parked(ParkedCommand::List { output, db }) => {
            let pool = ready_pool(&db).await?;
            let parked = projector::parked::list(&pool).await?;
            if output.output == Format::Json {
                return print_json(&parked);
            }
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
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "ymera", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// A pool on `db`, once PostgreSQL answers.
async fn ready_pool(db: &DbConfig) -> anyhow::Result<sqlx::PgPool> {
    let pool = infra::db::pool(db)?;
    infra::db::wait_ready(&pool, db.wait())
        .await
        .context(ymera::Unreachable("PostgreSQL"))?;
    Ok(pool)
}

/// Prints `rows` as one JSON array.
fn print_json(rows: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, rows)?;
    writeln!(out)?;
    Ok(())
}

/// `ymera user …`: the users table, straight through the database.
async fn user(command: UserCommand) -> anyhow::Result<()> {
    let (UserCommand::Add { db, .. }
    | UserCommand::List { db, .. }
    | UserCommand::Delete { db, .. }
    | UserCommand::Passwd { db, .. }) = &command;
    let pool = ready_pool(db).await?;
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
        UserCommand::List { output, .. } => {
            let users = accounts::list(&pool).await?;
            if output.output == Format::Json {
                return print_json(&users);
            }
            for u in users {
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
    Username::parse(name)
        .ok_or_else(|| Usage(format!("username {name:?} {}", Username::RULE)).into())
}

/// A new password from standard input or `YMERA_NEW_USER_PASSWORD`.
fn new_password(from_stdin: bool) -> anyhow::Result<SecretString> {
    let password =
        if from_stdin {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            SecretString::from(s.trim_end_matches(['\r', '\n']).to_owned())
        } else {
            SecretString::from(std::env::var("YMERA_NEW_USER_PASSWORD").map_err(|_| {
                Usage("set YMERA_NEW_USER_PASSWORD or pass --password-stdin".into())
            })?)
        };
    if !(8..=1024).contains(&password.expose_secret().chars().count()) {
        return Err(Usage("the password needs 8 to 1024 characters".into()).into());
    }
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
