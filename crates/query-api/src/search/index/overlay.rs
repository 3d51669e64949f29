//! The documents applied since the disk index's last commit, held in
//! memory, so a write is searchable as soon as its batch is indexed rather
//! than after a commit to disk (a new segment, a reload, merges: tens to
//! hundreds of milliseconds on a busy machine).
//!
//! * **Pieces.** Each batch becomes a small index of its own in RAM, one
//!   segment written in one go ([`tantivy::SingleSegmentIndexWriter`]): no
//!   writer threads, no commit, no merges, nothing on the filesystem.
//! * **Newer versions hide older ones.** A document that a later batch
//!   replaces or deletes stays in its segment (on disk or in an older
//!   piece) but is marked in that segment's skip set, updated once per
//!   batch from the batch's ids: a search checks one bit per match, facet
//!   counts included, and every agent is seen once, in its newest version.
//! * **Dropped once on disk.** When a disk commit covers a piece, the
//!   piece goes, and the skip sets of the new disk segments are worked out
//!   again from the agents still in memory.
//! * **Bounded.** At most [`MAX_DOCS`] documents, [`MAX_BYTES`] of pieces
//!   and [`MAX_PIECES`] pieces: past any of them the indexing waits for
//!   the disk commit that empties the overlay.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use tantivy::directory::RamDirectory;
use tantivy::index::SegmentReader;
use tantivy::schema::IndexRecordOption;
use tantivy::{
    BitSet, DocAddress, DocId, DocSet, Index, ReloadPolicy, Searcher, TERMINATED, TantivyDocument,
};
use uuid::Uuid;

use infra::views::AgentView;

use super::super::schema::Fields;

/// Most documents the overlay holds.
pub const MAX_DOCS: usize = 50_000;
/// Most bytes the overlay's pieces take.
pub const MAX_BYTES: usize = 64 * 1024 * 1024;
/// Most pieces (batches) the overlay holds: each is a segment every search
/// visits, so they are kept few (see `DISK_COMMIT_EVERY`).
pub const MAX_PIECES: usize = 64;
/// Most agents the batches held for a later commit may touch (see
/// [`Overlay::hold`]).
pub const MAX_HELD: usize = 250_000;
/// The memory budget of the writer of one piece. A piece's writer never
/// flushes (one segment, written whole by `finalize`), so this only sizes
/// the term table tantivy allocates and zeroes up front for each piece;
/// the table grows if a batch needs more. Smaller than tantivy's minimum
/// for an `IndexWriter` on purpose: at 16 MiB, a piece of 75 agents took
/// 5.0 ms to build, at 1 MiB 4.0 ms.
const PIECE_HEAP_BYTES: usize = 1024 * 1024;

/// Per segment, the documents a newer version replaces or deletes.
type Skips = Vec<Option<Arc<BitSet>>>;

/// What a search reads: the disk index at its last commit, the pieces
/// applied since, and what each segment must skip.
pub(crate) struct View {
    /// The stream sequence of the last event the view reflects.
    pub seq: u64,
    disk: Searcher,
    pieces: Vec<Searcher>,
    /// Per segment, disk's first then each piece's: its searcher (0 for
    /// the disk, i + 1 for piece i), its ordinal there, and its skip set.
    segments: Vec<(usize, u32, Option<Arc<BitSet>>)>,
}

/// Whether a document of one segment is alive in a [`View`].
pub(crate) struct Live<'a> {
    deleted: Option<&'a tantivy::fastfield::AliveBitSet>,
    skip: Option<&'a BitSet>,
}

impl Live<'_> {
    pub fn is_alive(&self, doc: DocId) -> bool {
        self.deleted.is_none_or(|a| a.is_alive(doc)) && self.skip.is_none_or(|s| !s.contains(doc))
    }
}

impl View {
    /// The disk index's searcher: what statistics and settings are read
    /// from (the pieces share its schema and settings).
    pub fn searcher(&self) -> &Searcher {
        &self.disk
    }

    fn searcher_at(&self, i: usize) -> &Searcher {
        if i == 0 {
            &self.disk
        } else {
            &self.pieces[i - 1]
        }
    }

    /// Every segment, disk's first, with what is alive in it; a document's
    /// address names the segment by its position here.
    pub fn segments(&self) -> impl Iterator<Item = (&SegmentReader, Live<'_>)> {
        self.segments.iter().map(|(i, ord, skip)| {
            let reader = self.searcher_at(*i).segment_reader(*ord);
            let live = Live {
                deleted: reader.alive_bitset(),
                skip: skip.as_deref(),
            };
            (reader, live)
        })
    }

    /// The stored document at `address` (its segment numbered as in
    /// [`View::segments`]).
    pub fn doc(&self, address: DocAddress) -> tantivy::Result<TantivyDocument> {
        let (i, ord, _) = self.segments[address.segment_ord as usize];
        self.searcher_at(i)
            .doc(DocAddress::new(ord, address.doc_id))
    }
}

/// One batch's documents, in RAM.
struct Piece {
    /// The batch's last event.
    last: u64,
    searcher: Searcher,
    skips: Skips,
    docs: usize,
    bytes: usize,
}

/// The overlay as the indexing loop keeps it.
pub(super) struct Overlay {
    /// The disk index as last committed, and the event it reflects.
    disk: Searcher,
    pub disk_seq: u64,
    disk_skips: Skips,
    pieces: Vec<Piece>,
    /// Each agent a batch since `disk` touched: the last event that did,
    /// and the agent after it (`None`: deleted).
    recent: HashMap<Uuid, (u64, Option<AgentView>)>,
    /// What the disk writer holds uncommitted (catching up), if anything.
    pub held: Option<Held>,
}

/// The batches the disk writer holds for a later commit.
pub(super) struct Held {
    /// When the first of them was applied.
    since: Instant,
    /// The last event of the last of them.
    through: u64,
    /// The agents they touched.
    agents: HashSet<Uuid>,
}

impl Overlay {
    pub fn new(disk: Searcher, disk_seq: u64) -> Overlay {
        let disk_skips = vec![None; disk.segment_readers().len()];
        Overlay {
            disk,
            disk_seq,
            disk_skips,
            pieces: Vec::new(),
            recent: HashMap::new(),
            held: None,
        }
    }

    /// Whether agent `id` was touched by a batch the disk writer holds.
    pub fn is_held(&self, id: Uuid) -> bool {
        self.held.as_ref().is_some_and(|h| h.agents.contains(&id))
    }

    /// The last event the disk writer holds (or the last committed).
    pub fn held_through(&self) -> u64 {
        self.held.as_ref().map_or(self.disk_seq, |h| h.through)
    }

    /// Notes a batch the disk writer holds: the `agents` it touched, up to
    /// event `last`. Returns whether it is time to commit: about every
    /// [`CATCH_UP_COMMIT_EVERY`](super::CATCH_UP_COMMIT_EVERY), or at
    /// [`MAX_HELD`] agents.
    pub fn hold(&mut self, agents: impl Iterator<Item = Uuid>, last: u64) -> bool {
        let held = self.held.get_or_insert_with(|| Held {
            since: Instant::now(),
            through: last,
            agents: HashSet::new(),
        });
        held.through = last;
        held.agents.extend(agents);
        held.since.elapsed() >= super::CATCH_UP_COMMIT_EVERY || held.agents.len() >= MAX_HELD
    }

    /// The agent `id` as the overlay, or else the disk, holds it.
    pub fn lookup(
        &self,
        id: Uuid,
        stored: impl FnOnce(&Searcher, Uuid) -> anyhow::Result<Option<AgentView>>,
    ) -> anyhow::Result<Option<AgentView>> {
        match self.recent.get(&id) {
            Some((_, agent)) => Ok(agent.clone()),
            None => stored(&self.disk, id),
        }
    }

    /// Adds the batch that ends at event `last`: each agent it touched as
    /// it stands after it (`None`: deleted), those of them it created, and
    /// the documents of those that live.
    pub fn add(
        &mut self,
        fields: &Fields,
        like: &Index,
        last: u64,
        touched: &HashMap<Uuid, Option<AgentView>>,
        created: &HashSet<Uuid>,
        live: Vec<TantivyDocument>,
    ) -> anyhow::Result<()> {
        // An agent the batch created has no earlier version to hide.
        let ids = || touched.keys().copied().filter(|id| !created.contains(id));
        mark(fields, &self.disk, &mut self.disk_skips, ids())?;
        for piece in &mut self.pieces {
            mark(fields, &piece.searcher, &mut piece.skips, ids())?;
        }
        if !live.is_empty() {
            let docs = live.len();
            let directory = RamDirectory::create();
            let mut writer = Index::builder()
                .schema(like.schema())
                .settings(like.settings().clone())
                .tokenizers(like.tokenizers().clone())
                .single_segment_index_writer(directory.clone(), PIECE_HEAP_BYTES)?;
            for doc in live {
                writer.add_document(doc)?;
            }
            let index = writer.finalize()?;
            let searcher = index
                .reader_builder()
                .reload_policy(ReloadPolicy::Manual)
                .try_into()?
                .searcher();
            let skips = vec![None; searcher.segment_readers().len()];
            self.pieces.push(Piece {
                last,
                searcher,
                skips,
                docs,
                bytes: directory.total_mem_usage(),
            });
        }
        for (id, agent) in touched {
            self.recent.insert(*id, (last, agent.clone()));
        }
        Ok(())
    }

    /// Takes in a disk commit of the events up to `seq`: the pieces it
    /// covers go, and the new disk segments skip what remains in memory.
    pub fn committed(&mut self, fields: &Fields, disk: Searcher, seq: u64) -> anyhow::Result<()> {
        self.pieces.retain(|p| p.last > seq);
        if self.held.as_ref().is_some_and(|h| h.through <= seq) {
            self.held = None;
        }
        // An agent last touched at or before `seq` is on disk as it
        // stands, and in no remaining piece.
        self.recent.retain(|_, (at, _)| *at > seq);
        self.disk_skips = vec![None; disk.segment_readers().len()];
        mark(
            fields,
            &disk,
            &mut self.disk_skips,
            self.recent.keys().copied(),
        )?;
        self.disk = disk;
        self.disk_seq = seq;
        Ok(())
    }

    /// Whether the overlay is at one of its bounds.
    pub fn is_full(&self) -> bool {
        let docs: usize = self.pieces.iter().map(|p| p.docs).sum();
        let bytes: usize = self.pieces.iter().map(|p| p.bytes).sum();
        docs >= MAX_DOCS || bytes >= MAX_BYTES || self.pieces.len() >= MAX_PIECES
    }

    /// What searches read, at event `seq`.
    pub fn view(&self, seq: u64) -> View {
        let disk = self
            .disk_skips
            .iter()
            .enumerate()
            .map(|(ord, s)| (0, ord, s));
        let pieces = self.pieces.iter().enumerate().flat_map(|(i, p)| {
            p.skips
                .iter()
                .enumerate()
                .map(move |(ord, s)| (i + 1, ord, s))
        });
        View {
            seq,
            disk: self.disk.clone(),
            pieces: self.pieces.iter().map(|p| p.searcher.clone()).collect(),
            segments: disk
                .chain(pieces)
                .map(|(i, ord, s)| (i, ord as u32, s.clone()))
                .collect(),
        }
    }
}

/// Marks, in each segment of `searcher`, the documents of `ids` as skipped.
fn mark(
    fields: &Fields,
    searcher: &Searcher,
    skips: &mut Skips,
    ids: impl Iterator<Item = Uuid> + Clone,
) -> anyhow::Result<()> {
    for (reader, skip) in searcher.segment_readers().iter().zip(skips.iter_mut()) {
        let inverted = reader.inverted_index(fields.keys)?;
        for id in ids.clone() {
            let Some(mut postings) =
                inverted.read_postings(&fields.id_term(id), IndexRecordOption::Basic)?
            else {
                continue;
            };
            let mut doc = postings.doc();
            while doc != TERMINATED {
                let set =
                    skip.get_or_insert_with(|| Arc::new(BitSet::with_max_value(reader.max_doc())));
                // Copied only when a search still reads the set as it was.
                Arc::make_mut(set).insert(doc);
                doc = postings.advance();
            }
        }
    }
    Ok(())
}
