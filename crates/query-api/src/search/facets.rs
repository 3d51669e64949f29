//! One pass over the matches: the best hits after the cursor, and, when
//! asked, the facet counts of every match.
//!
//! Hits are ordered by score, then id, both descending; the id comes from
//! two fast `u64` columns and is read only for a match that could enter
//! the page. Facets count the values of a fast column over the whole
//! matching set (not just the page), so they stay the same across pages.

use std::cmp::Ordering;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::{LazyLock, Mutex};

use infra::http::ApiError;
use tantivy::collector::{Collector, SegmentCollector};
use tantivy::columnar::{Column, StrColumn};
use tantivy::index::SegmentId;
use tantivy::{DocAddress, DocId, Score, SegmentOrdinal, SegmentReader};

use super::schema::{ID_HI, ID_LO, PROJECT_ID, STATUS, TAG, TAG_SEPARATOR, TYPE, id_of_halves};

/// Most facets one search may ask for.
pub const MAX_FACETS: usize = 8;
/// Most values a facet lists: the most frequent ones.
pub const MAX_FACET_VALUES: usize = 100;

/// A facet a search counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Facet {
    Status,
    Type,
    ProjectId,
    /// The values of one tag key.
    Tag(String),
}

impl Facet {
    /// `facets=status,type,project_id,tag:<key>`: each at most once, at
    /// most [`MAX_FACETS`].
    pub fn parse_list(text: &str) -> Result<Vec<Facet>, ApiError> {
        let mut out = Vec::new();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let facet = match name {
                "status" => Facet::Status,
                "type" => Facet::Type,
                "project_id" => Facet::ProjectId,
                _ => match name.strip_prefix("tag:") {
                    Some(key) if !key.is_empty() && !key.contains('\0') => {
                        Facet::Tag(key.to_owned())
                    }
                    _ => {
                        return Err(ApiError::BadRequest(format!(
                            "unknown facet {name:?}: use status, type, project_id or tag:<key>"
                        )));
                    }
                },
            };
            if !out.contains(&facet) {
                out.push(facet);
            }
        }
        if out.len() > MAX_FACETS {
            return Err(ApiError::BadRequest(format!(
                "at most {MAX_FACETS} facets per search"
            )));
        }
        Ok(out)
    }

    /// Its name in the response.
    pub fn name(&self) -> String {
        match self {
            Facet::Status => "status".into(),
            Facet::Type => "type".into(),
            Facet::ProjectId => "project_id".into(),
            Facet::Tag(key) => format!("tag:{key}"),
        }
    }

    fn column(&self) -> &'static str {
        match self {
            Facet::Status => STATUS,
            Facet::Type => TYPE,
            Facet::ProjectId => PROJECT_ID,
            Facet::Tag(_) => TAG,
        }
    }

    /// The value a column value counts as, if it counts for this facet.
    fn value<'a>(&self, raw: &'a str) -> Option<&'a str> {
        match self {
            Facet::Tag(key) => raw
                .strip_prefix(key.as_str())
                .and_then(|rest| rest.strip_prefix(TAG_SEPARATOR)),
            _ => Some(raw),
        }
    }
}

/// Most segments whose id columns [`ID_COLUMNS`] keeps: a few times the
/// disk segments of one searcher.
const MAX_CACHED_SEGMENTS: usize = 64;
/// Segments smaller than this open their columns each time: the search
/// overlay's pieces are many, short-lived and cheap to open, and would
/// only push the large disk segments out of the cache.
const MIN_CACHED_DOCS: u32 = 10_000;

/// A segment's id columns, high half first.
type IdColumns = (Column<u64>, Column<u64>);

/// The id columns of the segments searched lately: opening a column reads
/// its whole block index, which cost a search more than collecting its
/// page. A segment never changes, so its columns stay valid as long as it
/// lives; when the cache is full it starts over, which also lets go of
/// the files of segments merged away since.
static ID_COLUMNS: LazyLock<Mutex<HashMap<SegmentId, IdColumns>>> = LazyLock::new(Mutex::default);

/// `reader`'s id columns, high half first.
fn id_columns(reader: &SegmentReader) -> tantivy::Result<IdColumns> {
    let fast = reader.fast_fields();
    if reader.max_doc() < MIN_CACHED_DOCS {
        return Ok((fast.u64(ID_HI)?, fast.u64(ID_LO)?));
    }
    let segment = reader.segment_id();
    let cached = ID_COLUMNS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&segment)
        .cloned();
    if let Some(columns) = cached {
        return Ok(columns);
    }
    let columns = (fast.u64(ID_HI)?, fast.u64(ID_LO)?);
    let mut cache = ID_COLUMNS.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= MAX_CACHED_SEGMENTS {
        cache.clear();
    }
    cache.insert(segment, columns.clone());
    Ok(columns)
}

/// Counts per facet, in the order asked: value → count.
pub type FacetCounts = BTreeMap<String, BTreeMap<String, u64>>;

/// A hit: its score, its id (the tiebreak) and where its document is.
#[derive(Debug, Clone, Copy)]
pub struct Hit {
    pub score: Score,
    pub id: u128,
    pub address: DocAddress,
}

impl Hit {
    fn key(&self) -> (Score, u128) {
        (self.score, self.id)
    }
}

fn cmp_key(a: (Score, u128), b: (Score, u128)) -> Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

impl PartialEq for Hit {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Hit {}
impl PartialOrd for Hit {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Hit {
    fn cmp(&self, other: &Self) -> Ordering {
        cmp_key(self.key(), other.key())
    }
}

/// The best `limit` hits strictly after `after` (score, id), and the facet
/// counts of every match.
#[derive(Debug)]
pub struct PageCollector {
    pub limit: usize,
    pub after: Option<(Score, u128)>,
    pub facets: Vec<Facet>,
}

/// What one segment (or the whole index) yields.
#[derive(Debug, Default)]
pub struct PageFruit {
    /// Best first, at most `limit`.
    pub hits: Vec<Hit>,
    pub facets: Vec<HashMap<String, u64>>,
}

/// [`PageCollector`] on one segment.
pub struct PageSegment {
    segment: SegmentOrdinal,
    limit: usize,
    after: Option<(Score, u128)>,
    hi: Column<u64>,
    lo: Column<u64>,
    /// A min-heap of the best hits so far.
    best: BinaryHeap<Reverse<Hit>>,
    facets: Vec<(Facet, Option<StrColumn>, Vec<u64>)>,
}

impl std::fmt::Debug for PageSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageSegment")
            .field("segment", &self.segment)
            .field("best", &self.best.len())
            .finish_non_exhaustive()
    }
}

impl Collector for PageCollector {
    type Fruit = PageFruit;
    type Child = PageSegment;

    fn for_segment(
        &self,
        segment: SegmentOrdinal,
        reader: &SegmentReader,
    ) -> tantivy::Result<PageSegment> {
        let fast = reader.fast_fields();
        let mut facets = Vec::with_capacity(self.facets.len());
        for f in &self.facets {
            let column = fast.str(f.column())?;
            let terms = column.as_ref().map_or(0, |c| c.num_terms());
            facets.push((f.clone(), column, vec![0; terms]));
        }
        let (hi, lo) = id_columns(reader)?;
        Ok(PageSegment {
            segment,
            limit: self.limit,
            after: self.after,
            hi,
            lo,
            best: BinaryHeap::with_capacity(self.limit + 1),
            facets,
        })
    }

    fn requires_scoring(&self) -> bool {
        true
    }

    fn merge_fruits(&self, fruits: Vec<PageFruit>) -> tantivy::Result<PageFruit> {
        let mut hits: Vec<Hit> = fruits.iter().flat_map(|f| f.hits.iter().copied()).collect();
        hits.sort_unstable_by(|a, b| b.cmp(a));
        hits.truncate(self.limit);
        let mut facets = vec![HashMap::new(); self.facets.len()];
        for fruit in fruits {
            for (into, from) in facets.iter_mut().zip(fruit.facets) {
                for (value, n) in from {
                    *into.entry(value).or_insert(0) += n;
                }
            }
        }
        Ok(PageFruit { hits, facets })
    }
}

impl PageSegment {
    /// Whether no match from `doc` on can change what this segment yields,
    /// when its documents come in descending id order and none scores
    /// above `bound`: no facet to count, and a full page whose worst hit is
    /// worth at least any later match (the bound, or the cursor's score when
    /// lower) and has a higher id than `doc` and every document after it.
    /// The id's high half decides, so two ids that share it never stop the
    /// scan early.
    pub fn is_closed(&self, bound: Score, doc: DocId) -> bool {
        if !self.facets.is_empty() {
            return false;
        }
        if self.limit == 0 {
            return true;
        }
        if self.best.len() < self.limit {
            return false;
        }
        let Some(Reverse(worst)) = self.best.peek() else {
            return false;
        };
        let ceiling = self.after.map_or(bound, |(s, _)| s.min(bound));
        worst.score >= ceiling && self.hi.first(doc).unwrap_or_default() < (worst.id >> 64) as u64
    }
}

impl SegmentCollector for PageSegment {
    type Fruit = PageFruit;

    fn collect(&mut self, doc: DocId, score: Score) {
        for (_, column, counts) in &mut self.facets {
            if let Some(column) = column {
                for ord in column.term_ords(doc) {
                    if let Some(n) = counts.get_mut(ord as usize) {
                        *n += 1;
                    }
                }
            }
        }
        if self.limit == 0 {
            return;
        }
        // Past the cursor's score, or below the page's worst: skip before
        // reading the id.
        if self.after.is_some_and(|(s, _)| score > s) {
            return;
        }
        if self.best.len() >= self.limit
            && self.best.peek().is_some_and(|Reverse(w)| score < w.score)
        {
            return;
        }
        let id = id_of_halves(
            self.hi.first(doc).unwrap_or_default(),
            self.lo.first(doc).unwrap_or_default(),
        )
        .as_u128();
        if self
            .after
            .is_some_and(|after| cmp_key((score, id), after) != Ordering::Less)
        {
            return;
        }
        let hit = Hit {
            score,
            id,
            address: DocAddress::new(self.segment, doc),
        };
        if self.best.len() < self.limit {
            self.best.push(Reverse(hit));
        } else if self.best.peek().is_some_and(|Reverse(w)| hit > *w) {
            self.best.pop();
            self.best.push(Reverse(hit));
        }
    }

    fn harvest(self) -> PageFruit {
        let mut hits: Vec<Hit> = self.best.into_iter().map(|Reverse(h)| h).collect();
        hits.sort_unstable_by(|a, b| b.cmp(a));
        let facets = self
            .facets
            .into_iter()
            .map(|(facet, column, counts)| {
                let mut out = HashMap::new();
                let Some(column) = column else {
                    return out;
                };
                let mut raw = String::new();
                for (ord, n) in counts.into_iter().enumerate().filter(|(_, n)| *n > 0) {
                    raw.clear();
                    if column.ord_to_str(ord as u64, &mut raw).unwrap_or(false)
                        && let Some(value) = facet.value(&raw)
                    {
                        *out.entry(value.to_owned()).or_insert(0) += n;
                    }
                }
                out
            })
            .collect();
        PageFruit { hits, facets }
    }
}

/// The counts as the response gives them: each facet's
/// [`MAX_FACET_VALUES`] most frequent values.
pub fn counts(facets: &[Facet], found: Vec<HashMap<String, u64>>) -> FacetCounts {
    facets
        .iter()
        .zip(found)
        .map(|(facet, values)| {
            let mut values: Vec<(String, u64)> = values.into_iter().collect();
            values.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            values.truncate(MAX_FACET_VALUES);
            (facet.name(), values.into_iter().collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facet_lists_parse_and_refuse_unknown_names() {
        assert_eq!(
            Facet::parse_list("status,type,tag:team,status").unwrap(),
            [Facet::Status, Facet::Type, Facet::Tag("team".into())]
        );
        assert!(Facet::parse_list("colour").is_err());
        assert!(Facet::parse_list("tag:").is_err());
        assert_eq!(
            Facet::Tag("team".into()).value("team\u{1f}red"),
            Some("red")
        );
        assert_eq!(Facet::Tag("team".into()).value("teams\u{1f}red"), None);
    }
}
