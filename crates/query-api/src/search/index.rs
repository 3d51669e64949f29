//! The search index: an embedded tantivy index per query process, kept
//! from the event log by its own reader, like any other projection.
//!
//! * **Checkpoint in the commit.** Each commit carries, as its payload, the
//!   stream sequence of the last event it applied, with the schema version
//!   and the stream it was built from: the documents and the checkpoint
//!   are one atomic write, so a crash (even `kill -9`) leaves the last
//!   commit, and reading resumes right after its checkpoint.
//! * **Rebuilt when it cannot be trusted.** A missing directory, an index
//!   of another schema version or stream, a checkpoint past the end of the
//!   log (the log was reset), or an index that an OS crash left torn (its
//!   files are never synced, see [`unsynced`]) start over from an empty
//!   index and the first event.
//! * **Batches, not events.** Events are applied in batches, at most one
//!   every [`MAX_DELAY`]: a batch takes everything already waiting (up to
//!   [`MAX_BATCH`]), and what arrives until `MAX_DELAY` after the last
//!   batch began. A batch costs a few milliseconds whatever its size (see
//!   [`overlay`]), so under load, when applying one takes longer than
//!   `MAX_DELAY`, the next goes as soon as it is done, with all that came
//!   in meanwhile: waiting `MAX_DELAY` after its first event instead put
//!   10 ms on every write's way to being searchable.
//! * **Searchable before it is on disk.** Each batch goes into an in-memory
//!   overlay ([`overlay`]), searchable at once, and to the disk writer,
//!   which commits about every [`DISK_COMMIT_EVERY`] on a thread of its
//!   own: a commit (a segment, a reload, merges) costs tens to hundreds of
//!   milliseconds on a busy machine, too much to pay per batch. The
//!   checkpoint searches wait for moves with the overlay; the one a
//!   restart resumes from moves with the disk commits, and the overlay is
//!   simply rebuilt from the log after it.
//! * **Catching up in few commits.** A full batch of [`CATCH_UP_BATCH`]
//!   events (a backlog: nobody waits on one write) skips the overlay and
//!   is held: the disk writer commits it with the batches after it, about
//!   every [`CATCH_UP_COMMIT_EVERY`], and it is searchable from then on.
//!   A commit per batch wrote a segment of 10,000 agents at a time, each
//!   merged again and again, and stalled the reading at every one: a
//!   rebuild of a million events took 67 s beside the PostgreSQL
//!   rebuild's 58. An update of an agent a held batch touched, a batch
//!   for the overlay, or a pause of the log (caught up) first commits
//!   what is held (an update is folded
//!   onto the agent as the index last committed it). The documents of a
//!   batch that skips the overlay are built on the disk writer's thread,
//!   at its lower priority ([`DISK_NICENESS`]): a backlog is indexed with
//!   the cores the requests and the live projection leave.
//! * **Bounded memory.** One indexing thread with a heap of
//!   [`WRITER_HEAP_BYTES`] (tantivy flushes a segment when it is full),
//!   and the overlay's bounds ([`overlay::MAX_DOCS`],
//!   [`overlay::MAX_BYTES`], [`overlay::MAX_PIECES`]).

mod overlay;
mod unsynced;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use events::agent::{AgentChanges, AgentEvent};
use events::envelope::EventCodec;
use events::{AggregateType, Envelope};
use infra::EventStore;
use infra::event_store::StoredMessage;
use infra::projection::ProjectionWatch;
use infra::views::AgentView;
use serde::{Deserialize, Serialize};
use tantivy::collector::TopDocs;
use tantivy::index::SegmentComponent;
use tantivy::merge_policy::LogMergePolicy;
use tantivy::query::TermQuery;
use tantivy::schema::{IndexRecordOption, Value};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, Searcher, TantivyDocument};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::overlay::Overlay;
pub(crate) use self::overlay::View;
use self::unsynced::UnsyncedDirectory;
use super::schema::{Fields, SCHEMA_VERSION};

/// The indexing heap: tantivy's writer buffers this much before it writes
/// a segment. One thread, so this is the whole of it.
pub const WRITER_HEAP_BYTES: usize = 64 * 1024 * 1024;
/// The most events applied in one commit.
pub const MAX_BATCH: usize = 10_000;
/// The shortest time between two batches (see the module doc).
pub const MAX_DELAY: Duration = Duration::from_millis(10);
/// How often the disk index commits what the overlay holds (sooner when
/// the overlay is full). Often, because every piece of the overlay is a
/// segment each search visits: at 2,300 writes/s, committing once a second
/// left about a hundred pieces and put the write-to-searchable p99 at
/// 1.3 s; every 250 ms it was 325 ms. The commits run on the disk
/// writer's thread, off the path of a write to its being searchable.
pub const DISK_COMMIT_EVERY: Duration = Duration::from_millis(250);
/// The longest a shutdown waits for the last commit.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);
/// A batch this large goes to disk directly (see the module doc): only a
/// full batch, read from a backlog of at least [`MAX_BATCH`] events. At
/// 1,000 a live write burst (a second of writes and a few slow batches)
/// tipped the index into synchronous disk commits, each making the next
/// batch larger: write-to-searchable went to a p50 of 0.9 s at 2,600
/// writes/s.
pub const CATCH_UP_BATCH: usize = MAX_BATCH;
/// How often the disk index commits while catching up (see the module
/// doc): a segment is then the size of the writer's heap, not of a batch.
pub const CATCH_UP_COMMIT_EVERY: Duration = Duration::from_secs(2);

/// What every commit records besides its documents.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Payload {
    schema_version: u32,
    stream: String,
    /// The stream sequence of the last event applied.
    checkpoint: u64,
    /// The boot of the machine the commit was written in (Linux's boot
    /// id): the files of a commit of an earlier boot may have been torn by
    /// an OS crash, as nothing syncs them.
    #[serde(default)]
    boot: Option<String>,
}

/// The niceness of the disk writer's thread and of those tantivy starts
/// from it (its indexing worker, the segment updater, the merges): the
/// disk index is behind the overlay, off the way of a write to its being
/// searchable, so under load it takes the cores the requests and the
/// overlay leave. At 2,500 writes/s it took the write-to-searchable p99
/// from 78–81 ms to 70 ms. Should it fall behind, the overlay fills and
/// indexing waits for it (see [`overlay`]).
const DISK_NICENESS: i32 = 10;

/// Lowers the calling thread's priority to [`DISK_NICENESS`]: on Linux a
/// thread's niceness is its own, and the threads it starts inherit it.
fn lower_priority() {
    let thread = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(thread), DISK_NICENESS) {
        tracing::debug!(error = %e, "could not lower the search disk writer's priority");
    }
}

/// How the disk index merges its segments: tantivy's log-sized levels,
/// merged once four segments share one (its default waits for eight).
/// Every search walks each segment's term dictionaries, so their number is
/// what a query's cost grows with: a million agents built from the log
/// stood in 9 segments under the default.
fn merge_policy() -> LogMergePolicy {
    let mut policy = LogMergePolicy::default();
    policy.set_min_num_segments(MERGE_AT_SEGMENTS);
    policy
}

/// See [`merge_policy`].
const MERGE_AT_SEGMENTS: usize = 4;

/// This boot of the machine, where the OS names it.
fn current_boot() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_owned())
}

/// One query process's search index.
pub struct SearchIndex {
    pub(crate) fields: Fields,
    dir: PathBuf,
    /// The disk index, for the schema and settings the overlay's pieces
    /// copy.
    index: Index,
    /// The disk writer's thread: each batch's changes, and when to commit.
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    disk_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The disk writer's last commit, as it reports it.
    disk: watch::Receiver<DiskCommit>,
    /// The overlay, as the indexing loop keeps it.
    overlay: Mutex<Overlay>,
    /// What searches read, published after each batch.
    view: RwLock<Arc<View>>,
    checkpoint: watch::Sender<u64>,
}

impl std::fmt::Debug for SearchIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SearchIndex")
            .field("dir", &self.dir)
            .field("checkpoint", &self.checkpoint())
            .finish_non_exhaustive()
    }
}

/// What the indexing loop asks of the disk writer's thread.
enum Job {
    /// Delete each id's document (if it may have one) and add its new one
    /// (if any), up to event `last`; committed within [`DISK_COMMIT_EVERY`],
    /// or, if `held`, when asked.
    Apply {
        ops: Vec<DiskOp>,
        last: u64,
        held: bool,
    },
    /// Commit what was applied now.
    Commit,
    /// Empty the index and commit it at checkpoint 0.
    Reset,
    /// Take jobs again after a failure (the ones sent before were dropped).
    Resume,
}

/// How a batch goes into the index (see [`SearchIndex::apply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Into the overlay, searchable at once, and to disk.
    Overlay,
    /// To disk, committed later (catching up).
    Held,
    /// To disk, committed before the batch is searchable.
    Commit,
}

/// One agent's change on disk: the term of its document to delete (none
/// for an agent created in the batch: it has no document yet), and its
/// new document (none once deleted).
type DiskOp = (Option<tantivy::Term>, Option<NewDoc>);

/// An agent's new document, for the disk writer.
enum NewDoc {
    /// Built already: it went into the overlay too.
    Built(TantivyDocument),
    /// To build on the disk writer's thread: a batch that skips the
    /// overlay (catching up) is built there, at the writer's lower
    /// priority, so that a backlog being indexed leaves the cores to the
    /// requests and to the live projection first.
    Agent(Box<AgentView>),
}

/// The disk writer's report after each job that commits.
#[derive(Clone)]
struct DiskCommit {
    /// Counts the reports, so a job's own can be waited for.
    report: u64,
    /// The checkpoint of the last commit.
    seq: u64,
    /// The disk index at that commit.
    searcher: Searcher,
    /// Why the last job failed: the writer went back to its last commit
    /// and drops jobs until [`Job::Resume`].
    error: Option<Arc<String>>,
}

/// The disk writer's thread: applies the batches it is sent, and commits
/// them with their checkpoint as a payload about every
/// [`DISK_COMMIT_EVERY`], or when asked.
struct DiskWriter {
    fields: Fields,
    writer: IndexWriter,
    reader: IndexReader,
    stream: String,
    /// [`current_boot`], recorded in every commit.
    boot: Option<String>,
    report: watch::Sender<DiskCommit>,
}

impl DiskWriter {
    fn run(mut self, jobs: std::sync::mpsc::Receiver<Job>) {
        use std::sync::mpsc::RecvTimeoutError;
        let mut committed = self.report.borrow().seq;
        let mut applied = committed;
        let mut last_commit = Instant::now();
        let mut failed = false;
        // What was applied last is held: committed when asked only.
        let mut holding = false;
        loop {
            let job = if applied > committed && !holding {
                let due =
                    (last_commit + DISK_COMMIT_EVERY).saturating_duration_since(Instant::now());
                match jobs.recv_timeout(due) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match jobs.recv() {
                    Ok(job) => Some(job),
                    Err(_) => break,
                }
            };
            let done = match job {
                Some(Job::Resume) => {
                    failed = false;
                    Ok(())
                }
                _ if failed => continue,
                Some(Job::Apply { ops, last, held }) => {
                    let added = self.apply(ops);
                    applied = last;
                    holding = held;
                    match added {
                        Ok(()) if held || last_commit.elapsed() < DISK_COMMIT_EVERY => continue,
                        Ok(()) => self.commit(applied),
                        Err(e) => Err(e),
                    }
                }
                Some(Job::Commit) | None if applied == committed => Ok(()),
                Some(Job::Commit) | None => self.commit(applied),
                Some(Job::Reset) => {
                    applied = 0;
                    self.writer
                        .delete_all_documents()
                        .map_err(anyhow::Error::from)
                        .and_then(|_| self.commit(0))
                }
            };
            let error = match done {
                Ok(()) => {
                    committed = applied;
                    last_commit = Instant::now();
                    holding = false;
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "the search index's disk writer failed; going back to its last commit");
                    if let Err(e) = self.writer.rollback() {
                        tracing::warn!(error = %e, "rolling the search index's writer back failed");
                    }
                    applied = committed;
                    failed = true;
                    Some(Arc::new(format!("{e:#}")))
                }
            };
            self.report.send_modify(|r| {
                r.report += 1;
                r.seq = committed;
                r.searcher = self.reader.searcher();
                r.error = error;
            });
        }
        // The index is closing: what was applied is committed, so a
        // restart resumes right after it.
        if applied > committed
            && !failed
            && let Err(e) = self.commit(applied)
        {
            tracing::warn!(error = %format!("{e:#}"), "the search index's last commit failed");
        }
        if let Err(e) = self.writer.wait_merging_threads() {
            tracing::warn!(error = %e, "the search index's merges ended in error");
        }
    }

    fn apply(&mut self, ops: Vec<DiskOp>) -> anyhow::Result<()> {
        for (id, doc) in ops {
            if let Some(id) = id {
                self.writer.delete_term(id);
            }
            match doc {
                Some(NewDoc::Built(doc)) => self.writer.add_document(doc)?,
                Some(NewDoc::Agent(agent)) => {
                    self.writer.add_document(self.fields.document(&agent))?
                }
                None => continue,
            };
        }
        Ok(())
    }

    /// Commits what the writer holds with checkpoint `last`, and reloads
    /// the reader.
    fn commit(&mut self, last: u64) -> anyhow::Result<()> {
        let payload = serde_json::to_string(&Payload {
            schema_version: SCHEMA_VERSION,
            stream: self.stream.clone(),
            checkpoint: last,
            boot: self.boot.clone(),
        })?;
        let started = Instant::now();
        let mut commit = self.writer.prepare_commit()?;
        commit.set_payload(&payload);
        commit.commit()?;
        self.reader.reload()?;
        infra::metrics::record_search_commit(last, started.elapsed());
        Ok(())
    }
}

impl SearchIndex {
    /// Opens the index in `dir` for the log in `stream`, or makes an empty
    /// one there when none is usable (see the module doc).
    pub fn open(dir: &Path, stream: &str) -> anyhow::Result<SearchIndex> {
        let fields = Fields::new();
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the search directory {}", dir.display()))?;
        let is_index = dir.join("meta.json").exists();
        anyhow::ensure!(
            is_index || std::fs::read_dir(dir)?.next().is_none(),
            "{} is neither a search index nor empty: name a directory of its own",
            dir.display()
        );
        let boot = current_boot();
        let existing = is_index
            .then(|| Self::open_existing(dir, stream, boot.as_deref()))
            .flatten();
        let (index, checkpoint) = match existing {
            Some(found) => found,
            None => {
                // Start over in an emptied directory (an index's own:
                // anything else was refused above).
                std::fs::remove_dir_all(dir)
                    .and_then(|()| std::fs::create_dir_all(dir))
                    .with_context(|| format!("emptying {}", dir.display()))?;
                tracing::info!(dir = %dir.display(), "building the search index from the log");
                let directory = UnsyncedDirectory::open(dir)?;
                let index =
                    Index::create(directory, fields.schema.clone(), super::schema::settings())?;
                (index, 0)
            }
        };
        Fields::register_tokenizers(&index);
        let reader: IndexReader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        let searcher = reader.searcher();
        let (report, disk) = watch::channel(DiskCommit {
            report: 0,
            seq: checkpoint,
            searcher: searcher.clone(),
            error: None,
        });
        let (jobs, received) = std::sync::mpsc::channel();
        // The writer is made on the disk writer's thread, once its priority
        // is lowered, so that the threads tantivy starts for it inherit it.
        let (made, writer_made) = std::sync::mpsc::sync_channel(1);
        let disk_index = index.clone();
        let disk_fields = fields.clone();
        let stream = stream.to_owned();
        let disk_thread = std::thread::Builder::new()
            .name("search-disk".into())
            .spawn(move || {
                lower_priority();
                let writer = match disk_index.writer_with_num_threads(1, WRITER_HEAP_BYTES) {
                    Ok(writer) => writer,
                    Err(e) => {
                        let _ = made.send(Err(e));
                        return;
                    }
                };
                writer.set_merge_policy(Box::new(merge_policy()));
                let _ = made.send(Ok(()));
                let disk_writer = DiskWriter {
                    fields: disk_fields,
                    writer,
                    reader,
                    stream,
                    boot,
                    report,
                };
                disk_writer.run(received)
            })?;
        writer_made
            .recv()
            .context("the search index's disk writer stopped")??;
        let overlay = Overlay::new(searcher, checkpoint);
        let view = overlay.view(checkpoint);
        Ok(SearchIndex {
            fields,
            dir: dir.to_owned(),
            index,
            jobs: Mutex::new(Some(jobs)),
            disk_thread: Mutex::new(Some(disk_thread)),
            disk,
            overlay: Mutex::new(overlay),
            view: RwLock::new(Arc::new(view)),
            checkpoint: watch::channel(checkpoint).0,
        })
    }

    /// The index in `dir` and its checkpoint, if it is one that opens, of
    /// this schema version, for this stream, and whole: written in this
    /// `boot`, or its files match their checksums.
    fn open_existing(dir: &Path, stream: &str, boot: Option<&str>) -> Option<(Index, u64)> {
        let index = UnsyncedDirectory::open(dir)
            .map_err(tantivy::TantivyError::from)
            .and_then(Index::open)
            .inspect_err(
                |e| tracing::warn!(error = %e, "the search index cannot be opened; rebuilding it"),
            )
            .ok()?;
        let payload = index.load_metas().ok()?.payload;
        let payload: Option<Payload> = payload.and_then(|p| serde_json::from_str(&p).ok());
        let p = match payload {
            Some(p) if p.schema_version == SCHEMA_VERSION && p.stream == stream => p,
            _ => {
                tracing::info!("the search index is of another version or log; rebuilding it");
                return None;
            }
        };
        if (boot.is_none() || p.boot.as_deref() != boot) && !is_whole(&index) {
            tracing::warn!(
                "the search index was torn by a restart of the machine (its files are not \
                 synced); rebuilding it"
            );
            return None;
        }
        tracing::info!(checkpoint = p.checkpoint, "resuming the search index");
        Some((index, p.checkpoint))
    }

    /// The stream sequence of the last event the searchable documents
    /// reflect.
    pub fn checkpoint(&self) -> u64 {
        *self.checkpoint.borrow()
    }

    /// Follows the checkpoint: what `/health` reports and what
    /// `X-Min-Event-Seq` on search waits for.
    pub fn watch(&self) -> ProjectionWatch {
        ProjectionWatch::following(self.checkpoint.subscribe())
    }

    /// What searches read now: the disk index and the overlay, at a
    /// checkpoint at least the one [`SearchIndex::checkpoint`] reported
    /// before.
    pub(crate) fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Makes `overlay` what searches read, at event `seq`.
    fn publish(&self, overlay: &Overlay, seq: u64) {
        let view = Arc::new(overlay.view(seq));
        let disk = view.searcher().segment_readers().len();
        infra::metrics::record_search_segments(disk, view.segments().count() - disk);
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = view;
        // After the view: a search that waited for `seq` reads it.
        self.checkpoint.send_replace(seq);
    }

    /// Follows the log from the checkpoint on until `shutdown`, reading it
    /// again after an outage.
    pub async fn run(self: Arc<Self>, store: EventStore, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let followed = tokio::select! {
                _ = shutdown.cancelled() => {
                    // What the overlay holds goes to disk, so a restart
                    // resumes from where this process stopped.
                    let last = self.checkpoint();
                    let committed = |r: &DiskCommit| r.seq >= last || r.error.is_some();
                    let flushed =
                        tokio::time::timeout(SHUTDOWN_FLUSH, self.disk_job(Job::Commit, committed));
                    if !matches!(flushed.await, Ok(Ok(_))) {
                        tracing::warn!("the search index's last commit did not complete; a restart reads the log from the one before");
                    }
                    return;
                }
                r = self.follow(&store, None) => r,
            };
            match followed {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "search indexing interrupted; resuming");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Applies the log from the checkpoint on, in batches, until the read
    /// ends, or until `until` is applied and committed to disk.
    /// Cancel-safe between batches.
    pub async fn follow(
        self: &Arc<Self>,
        store: &EventStore,
        until: Option<u64>,
    ) -> anyhow::Result<()> {
        if self.disk.borrow().error.is_some() {
            self.recover().await?;
        }
        let last = store.last_seq().await?;
        if self.checkpoint() > last {
            tracing::warn!(
                checkpoint = self.checkpoint(),
                last,
                "the search index is ahead of the log (was the log reset?); rebuilding it"
            );
            self.reset().await?;
        }
        if until.is_some_and(|u| self.checkpoint() >= u) {
            return self.settle(self.checkpoint()).await;
        }
        let mut reader = store.read_log(self.checkpoint() + 1).await?;
        // When the last batch was applied: a batch is applied at most
        // every MAX_DELAY, and what arrived while the last one was being
        // applied goes at once.
        let mut began = tokio::time::Instant::now()
            .checked_sub(MAX_DELAY)
            .unwrap_or_else(tokio::time::Instant::now);
        loop {
            let next = match self.held_through() {
                // Caught up with batches held: they are committed (made
                // searchable) as soon as the log has nothing more to read.
                Some(held) => match tokio::time::timeout(MAX_DELAY, reader.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        self.settle(held).await?;
                        reader.next().await
                    }
                },
                None => reader.next().await,
            };
            let Some(first) = next else {
                anyhow::bail!("the log read ended");
            };
            let mut batch = vec![first?];
            let deadline = (began + MAX_DELAY).max(tokio::time::Instant::now());
            while batch.len() < MAX_BATCH && batch.last().is_some_and(|m| Some(m.seq) != until) {
                let waiting = batch.last().is_some_and(|m| m.pending > 0);
                let next = if waiting {
                    tokio::time::timeout(Duration::from_secs(1), reader.next()).await
                } else {
                    tokio::time::timeout_at(deadline, reader.next()).await
                };
                match next {
                    Ok(Some(m)) => batch.push(m?),
                    Ok(None) | Err(_) => break,
                }
            }
            let done = until.is_some_and(|u| batch.last().is_some_and(|m| m.seq >= u));
            began = tokio::time::Instant::now();
            self.apply(batch, done).await?;
            if done {
                return Ok(());
            }
        }
    }

    /// Applies a batch: into the overlay, searchable at once, and to the
    /// disk writer, which commits it within [`DISK_COMMIT_EVERY`]. A batch
    /// of [`CATCH_UP_BATCH`] events or more (the index is catching up, no
    /// write is waiting on it) goes to disk only, held for a later commit
    /// (see the module doc); one to `settle` goes to disk only and is
    /// committed before it is searchable, as is everything before it.
    async fn apply(
        self: &Arc<Self>,
        batch: Vec<StoredMessage>,
        settle: bool,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let Some(last) = batch.last().map(|m| m.seq) else {
            return Ok(());
        };
        let events = batch.len();
        let route = if settle {
            Route::Commit
        } else if events >= CATCH_UP_BATCH {
            Route::Held
        } else {
            Route::Overlay
        };
        let this = self.clone();
        let (docs, commit) =
            tokio::task::spawn_blocking(move || this.apply_blocking(&batch, last, route)).await??;
        if commit {
            self.settle(last).await?;
        }
        infra::metrics::record_search_batch(events as u64, last, started.elapsed());
        tracing::debug!(
            events,
            docs,
            checkpoint = last,
            "search index applied a batch"
        );
        Ok(())
    }

    /// Returns the number of agents the batch touched, and whether the
    /// batch is to be committed now (`route` asks it, the overlay is full,
    /// or too much is held).
    fn apply_blocking(
        &self,
        batch: &[StoredMessage],
        last: u64,
        route: Route,
    ) -> anyhow::Result<(usize, bool)> {
        let mut overlay = self.overlay.lock().unwrap_or_else(|p| p.into_inner());
        // A disk commit since the last batch: the overlay drops what it
        // covers.
        let disk = self.disk.borrow().clone();
        if let Some(e) = &disk.error {
            anyhow::bail!("the search index's disk writer failed: {e}");
        }
        if disk.seq > overlay.disk_seq {
            overlay.committed(&self.fields, disk.searcher, disk.seq)?;
        }
        // The overlay may only hold what follows searchable documents.
        if route == Route::Overlay && overlay.held.is_some() {
            self.commit_held(&mut overlay)?;
        }
        // Each agent the batch touches, as it stands after the batch
        // (`None`: deleted). Updates fold onto this, then onto the overlay
        // or the disk index.
        let mut touched: HashMap<Uuid, Option<AgentView>> = HashMap::new();
        // The agents the batch creates: no segment holds them yet.
        let mut created: HashSet<Uuid> = HashSet::new();
        for m in batch {
            let Some((env, event)) = agent_event(m) else {
                continue;
            };
            let id = env.aggregate_id;
            match event {
                AgentEvent::Created(_) => {
                    let state = events::agent::evolve(Default::default(), &recorded(&env, event));
                    touched.insert(id, state.live().map(AgentView::from));
                    created.insert(id);
                }
                AgentEvent::Updated(changes) => {
                    let current = match touched.remove(&id) {
                        Some(current) => current,
                        None => {
                            // Held: on disk, but not in what a searcher
                            // reads before a commit.
                            if overlay.is_held(id) {
                                self.commit_held(&mut overlay)?;
                            }
                            overlay.lookup(id, |s, id| self.stored(s, id))?
                        }
                    };
                    let Some(mut view) = current else {
                        tracing::warn!(seq = m.seq, %id, "an update of an agent the index does not have");
                        continue;
                    };
                    fold(&mut view, &changes, &env);
                    touched.insert(id, Some(view));
                }
                AgentEvent::Deleted => {
                    touched.insert(id, None);
                }
            }
        }
        let docs = touched.len();
        let earlier = |id: Uuid| (!created.contains(&id)).then(|| self.fields.id_term(id));
        let (ops, commit) = match route {
            Route::Overlay => {
                // Each document is built once, for the overlay and the
                // disk alike.
                let built: Vec<(Uuid, Option<TantivyDocument>)> = touched
                    .iter()
                    .map(|(id, view)| (*id, view.as_ref().map(|v| self.fields.document(v))))
                    .collect();
                let live = built.iter().filter_map(|(_, doc)| doc.clone()).collect();
                overlay.add(&self.fields, &self.index, last, &touched, &created, live)?;
                self.publish(&overlay, last);
                let ops = built
                    .into_iter()
                    .map(|(id, doc)| (earlier(id), doc.map(NewDoc::Built)))
                    .collect();
                (ops, overlay.is_full())
            }
            Route::Held | Route::Commit => {
                let ids: Vec<Uuid> = touched.keys().copied().collect();
                let ops = touched
                    .into_iter()
                    .map(|(id, view)| (earlier(id), view.map(|v| NewDoc::Agent(Box::new(v)))))
                    .collect();
                let commit = route == Route::Commit || overlay.hold(ids.into_iter(), last);
                (ops, commit)
            }
        };
        let held = route == Route::Held;
        self.send(Job::Apply { ops, last, held })?;
        Ok((docs, commit))
    }

    /// The last event of the batches the disk writer holds, if any.
    fn held_through(&self) -> Option<u64> {
        let overlay = self.overlay.lock().unwrap_or_else(|p| p.into_inner());
        overlay.held.is_some().then(|| overlay.held_through())
    }

    /// Commits what the disk writer holds, and makes it searchable, from
    /// the indexing loop's blocking thread.
    fn commit_held(&self, overlay: &mut Overlay) -> anyhow::Result<()> {
        let through = overlay.held_through();
        let committed = |r: &DiskCommit| r.seq >= through || r.error.is_some();
        let report =
            tokio::runtime::Handle::current().block_on(self.disk_job(Job::Commit, committed))?;
        if let Some(e) = &report.error {
            anyhow::bail!("the search index's disk writer failed: {e}");
        }
        overlay.committed(&self.fields, report.searcher, report.seq)?;
        self.publish(overlay, report.seq.max(self.checkpoint()));
        Ok(())
    }

    fn send(&self, job: Job) -> anyhow::Result<()> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.as_ref()
            .context("the search index is closed")?
            .send(job)
            .ok()
            .context("the search index's disk writer stopped")
    }

    /// Sends `job` and waits for the disk writer's first report after it
    /// that is `done` (a report of a job sent before may come first).
    async fn disk_job(
        &self,
        job: Job,
        done: impl Fn(&DiskCommit) -> bool,
    ) -> anyhow::Result<DiskCommit> {
        let mut disk = self.disk.clone();
        let before = disk.borrow_and_update().report;
        self.send(job)?;
        let report = disk
            .wait_for(|r| r.report > before && done(r))
            .await
            .ok()
            .context("the search index's disk writer stopped")?
            .clone();
        Ok(report)
    }

    /// Commits to disk everything up to event `last` (and all applied
    /// before), then empties the overlay of it and makes it searchable.
    async fn settle(&self, last: u64) -> anyhow::Result<()> {
        let committed = |r: &DiskCommit| r.seq >= last || r.error.is_some();
        let report = self.disk_job(Job::Commit, committed).await?;
        if let Some(e) = &report.error {
            anyhow::bail!("the search index's disk writer failed: {e}");
        }
        let mut overlay = self.overlay.lock().unwrap_or_else(|p| p.into_inner());
        if report.seq > overlay.disk_seq {
            overlay.committed(&self.fields, report.searcher, report.seq)?;
        }
        self.publish(&overlay, last.max(self.checkpoint()));
        Ok(())
    }

    /// After the disk writer failed: it went back to its last commit, so
    /// the overlay starts over from there, and so does the reading.
    async fn recover(&self) -> anyhow::Result<()> {
        // A failed writer reports nothing before it resumes.
        let report = self.disk_job(Job::Resume, |_| true).await?;
        let overlay = Overlay::new(report.searcher, report.seq);
        self.publish(&overlay, report.seq);
        *self.overlay.lock().unwrap_or_else(|p| p.into_inner()) = overlay;
        Ok(())
    }

    /// Empties the index, at checkpoint 0.
    async fn reset(&self) -> anyhow::Result<()> {
        let emptied = |r: &DiskCommit| r.seq == 0 || r.error.is_some();
        let report = self.disk_job(Job::Reset, emptied).await?;
        if let Some(e) = &report.error {
            anyhow::bail!("emptying the search index failed: {e}");
        }
        let overlay = Overlay::new(report.searcher, 0);
        self.publish(&overlay, 0);
        *self.overlay.lock().unwrap_or_else(|p| p.into_inner()) = overlay;
        Ok(())
    }

    /// The agent `id` as the committed disk index holds it.
    fn stored(&self, searcher: &Searcher, id: Uuid) -> anyhow::Result<Option<AgentView>> {
        let query = TermQuery::new(self.fields.id_term(id), IndexRecordOption::Basic);
        let Some((_, address)) = searcher
            .search(&query, &TopDocs::with_limit(1).order_by_score())?
            .into_iter()
            .next()
        else {
            return Ok(None);
        };
        let doc: TantivyDocument = searcher.doc(address)?;
        self.agent_of(&doc).map(Some)
    }

    /// Calls `f` with the stored agent of a document of `view`, as the
    /// JSON `serde_json` wrote of its [`AgentView`].
    pub(crate) fn with_agent_json<T>(
        &self,
        view: &View,
        address: tantivy::DocAddress,
        f: impl FnOnce(&str) -> T,
    ) -> anyhow::Result<T> {
        let doc = view.doc(address)?;
        let bytes = doc
            .get_first(self.fields.agent)
            .and_then(|v| v.as_str())
            .context("a search document without its agent")?;
        Ok(f(bytes))
    }

    fn agent_of(&self, doc: &TantivyDocument) -> anyhow::Result<AgentView> {
        let bytes = doc
            .get_first(self.fields.agent)
            .and_then(|v| v.as_str())
            .context("a search document without its agent")?;
        Ok(serde_json::from_str(bytes)?)
    }

    /// Stops the disk writer, once it has committed what it was sent, and
    /// waits for its merges to finish, so the directory can be moved.
    fn close(self: Arc<Self>) -> anyhow::Result<()> {
        let this = Arc::into_inner(self).context("the search index is still in use")?;
        drop(this);
        Ok(())
    }
}

impl Drop for SearchIndex {
    /// Closes the disk writer: its last commit, its merges, and the
    /// directory's lock released before this returns, so the directory
    /// can be opened again at once.
    fn drop(&mut self) {
        drop(self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take());
        let thread = self
            .disk_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::warn!("the search index's disk writer panicked");
        }
    }
}

/// Builds a search index of the whole log into a fresh directory beside
/// `dir`, then puts it in `dir`'s place: what `ymera rebuild --search`
/// runs, with no query-api using `dir`. Returns the checkpoint reached.
pub async fn rebuild_offline(dir: &Path, store: &EventStore) -> anyhow::Result<u64> {
    if dir.join("meta.json").exists() {
        // Taking the writer's lock fails while a query process holds it.
        let live = Index::open_in_dir(dir)?;
        // (tantivy's smallest heap is 15 MB.)
        let writer: Result<IndexWriter, _> = live.writer_with_num_threads(1, 20_000_000);
        if let Err(e) = writer {
            anyhow::bail!(
                "{} is in use ({e}): stop its query process first, or delete the directory \
                 and let the query process rebuild it",
                dir.display()
            );
        }
    }
    let last = store.last_seq().await?;
    build_in_place(dir, store, last).await
}

/// Builds the search index of events 1..=`until` into `dir`, which must not
/// exist yet: what `ymera replay --into-search-dir` runs, with `until` the
/// last event its replay of the PostgreSQL read models applied, so both
/// stand at the same event. Returns the checkpoint reached.
pub async fn replay_offline(dir: &Path, store: &EventStore, until: u64) -> anyhow::Result<u64> {
    anyhow::ensure!(
        !dir.exists(),
        "{} already exists: replay into a directory of its own",
        dir.display()
    );
    build_in_place(dir, store, until).await
}

/// Builds a search index of events 1..=`until` into a fresh directory
/// beside `dir`, then puts it in `dir`'s place, so `dir` holds either its
/// old index or the whole new one.
async fn build_in_place(dir: &Path, store: &EventStore, until: u64) -> anyhow::Result<u64> {
    let fresh = sibling(dir, "rebuild");
    let old = sibling(dir, "old");
    for leftover in [&fresh, &old] {
        if leftover.exists() {
            std::fs::remove_dir_all(leftover)?;
        }
    }
    let index = Arc::new(SearchIndex::open(&fresh, store.stream_name())?);
    index.follow(store, Some(until)).await?;
    let checkpoint = index.checkpoint();
    index.close()?;
    if dir.exists() {
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&fresh, dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(checkpoint)
}

/// Whether every file of the index's last commit is there and matches the
/// checksum tantivy wrote at its end.
fn is_whole(index: &Index) -> bool {
    let Ok(metas) = index.load_metas() else {
        return false;
    };
    const COMPONENTS: [SegmentComponent; 6] = [
        SegmentComponent::Postings,
        SegmentComponent::Positions,
        SegmentComponent::Terms,
        SegmentComponent::Store,
        SegmentComponent::FastFields,
        SegmentComponent::FieldNorms,
    ];
    metas.segments.iter().all(|segment| {
        let deletes = segment.has_deletes().then_some(SegmentComponent::Delete);
        COMPONENTS
            .into_iter()
            .chain(deletes)
            .map(|component| segment.relative_path(component))
            .all(|path| index.directory().validate_checksum(&path).unwrap_or(false))
    })
}

/// `<dir>.<suffix>`, beside `dir`.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}

/// The agent event of a message; `None` for another aggregate's events
/// and for what cannot be decoded (the projector parks those; the index
/// passes them by, as the read models do not show them either).
fn agent_event(m: &StoredMessage) -> Option<(Envelope, AgentEvent)> {
    let env = match serde_json::from_slice::<Envelope>(m.payload()) {
        Ok(env) if env.aggregate_type == AggregateType::Agent => env,
        Ok(_) => return None,
        Err(e) => {
            tracing::warn!(seq = m.seq, error = %e, "search index skips an unreadable event");
            return None;
        }
    };
    match AgentEvent::decode(&env) {
        Ok(event) => Some((env, event)),
        Err(e) => {
            tracing::warn!(seq = m.seq, error = %e, "search index skips an undecodable event");
            None
        }
    }
}

fn recorded(env: &Envelope, event: AgentEvent) -> events::envelope::Recorded<AgentEvent> {
    events::envelope::Recorded {
        meta: env.meta(),
        event,
    }
}

/// Folds an update onto the agent as the index holds it, as `evolve`
/// does onto the aggregate.
fn fold(view: &mut AgentView, c: &AgentChanges, env: &Envelope) {
    if let Some(v) = &c.name {
        view.name = v.to_string();
    }
    if let Some(v) = &c.agent_type {
        view.agent_type = v.to_string();
    }
    if let Some(v) = &c.description {
        view.description = v.to_string();
    }
    if let Some(v) = c.status {
        view.status = v.as_str().to_owned();
    }
    if let Some(v) = &c.capabilities {
        view.capabilities = v.as_slice().to_vec();
    }
    if let Some(v) = &c.config {
        view.config = serde_json::Value::Object(v.as_map().clone());
    }
    if let Some(v) = &c.tags {
        view.tags = v.as_map().clone();
    }
    if let Some(v) = c.project_id {
        view.project_id = v;
    }
    view.version = env.aggregate_version;
    view.updated_at = env.occurred_at;
}
