//! From a parsed search to a tantivy query, and the ranking it scores.
//!
//! Every query word is a required clause; its score is the best of its
//! matches across the fields (a disjunction-max), each a constant, so a
//! score depends on the agent and the query alone, never on what else is
//! indexed: scores, and the keyset cursor that carries one, stay the same
//! from page to page. A word's match is worth, best first:
//!
//! | match | worth |
//! | --- | --- |
//! | the word exactly | 3000 + field + 0.5 |
//! | a prefix of a word (the last query word only) | 3000 + field |
//! | one typo (words of 5+ characters) | 2000 + field |
//! | two typos (words of 9+ characters) | 1000 + field |
//!
//! with `field` 4 for the name, 3 for type and capabilities, 2 for tags and
//! 1 for the description. A typo is one insertion, deletion, substitution
//! or swap of neighbouring letters (Levenshtein automata with transposition
//! cost one). Words of several query words near each other (a phrase with
//! a slop of [`PROXIMITY_SLOP`] in one field) add [`PROXIMITY`]. The
//! scales nest: fewer typos always outrank proximity, proximity outranks
//! the field (at most 16 words × 4.5 < 100), the field outranks exactness.
//!
//! Filters are required clauses worth nothing, so they select inside the
//! engine without touching the ranking.
//!
//! ## Evaluation
//!
//! The query is not handed to tantivy's generic boolean machinery: a word's
//! fuzzy and prefix matches would each fill a bitset of every matching
//! document before the first hit, and every match would be scored. Instead
//! [`Plan`] builds each word's Levenshtein automata once per query, finds
//! the terms they accept in each segment's dictionary, and reads those
//! terms' postings lazily: a word is the best of its terms
//! ([`MaxUnion`]), a query the leapfrog intersection of its words and
//! filters ([`SegmentMatches`]). Each segment also knows the best score any
//! of its documents could reach ([`SegmentMatches::bound`]): the index keeps
//! its documents in descending id order (see [`super::schema`]), so once a
//! page is full of hits worth that bound, no later document can enter it
//! and the segment stops there (see [`super::facets::PageSegment`]).
//!
//! Proximity is read for the documents that are scored, not searched for
//! ahead: a phrase is only checked on a document that matches every word.
//! For two words, the `near` term of the pair (see [`super::schema`]) says
//! first which documents of a field can hold them near each other, so a
//! pair that never stands near adds nothing to the bound, and the page
//! closes early, without reading the positions of every document that
//! holds both words.

use std::collections::HashSet;
use std::sync::Arc;

use tantivy::postings::SegmentPostings;
use tantivy::query::{
    AutomatonWeight, ConstScorer, DfaWrapper, EnableScoring, FuzzyTermQuery, PhraseQuery, Query,
    Scorer, Weight,
};
use tantivy::schema::IndexRecordOption;
use tantivy::{DocId, DocSet, Score, Searcher, SeekDangerResult, SegmentReader, TERMINATED, Term};

use super::schema::{Fields, near_term, pairs_near, tag_term};
use crate::filters::Filters;

/// What a multi-word query gains when its words stand near each other.
pub const PROXIMITY: f32 = 100.0;
/// How far apart (in words) the words of a query may stand and still count
/// as near.
pub const PROXIMITY_SLOP: u32 = 2;
/// What a word's typo tier is worth.
const TIER: f32 = 1000.0;
/// What matching a whole word adds over matching its prefix.
const EXACT: f32 = 0.5;
/// Most terms of one (field, prefix or typo class) read as postings of
/// their own; past it (`a` as a prefix of thousands of words) the class is
/// read once into a bitset, as tantivy does, which costs a pass over its
/// postings but keeps the union narrow.
const MAX_LAZY_TERMS: usize = 16;

/// How many typos a word may have: none under 5 characters, one from 5,
/// two from 9; none for a number (another number is not a typo).
pub fn typos_allowed(word: &str) -> u8 {
    if word.chars().all(|c| c.is_ascii_digit()) {
        return 0;
    }
    match word.chars().count() {
        0..=4 => 0,
        5..=8 => 1,
        _ => 2,
    }
}

/// One way a word matches a field's terms, with its tier's worth (before
/// the field's weight).
enum Class {
    /// The word itself: one term.
    Exact,
    /// The terms an automaton accepts: the last word's prefixes (with no
    /// typo), and typos (with or without the prefix).
    Automaton(Arc<DfaWrapper>),
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field(
                "words",
                &self.words.iter().map(|w| &w.word).collect::<Vec<_>>(),
            )
            .field("filters", &self.filters)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for MaxUnion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaxUnion")
            .field("parts", &self.parts.len())
            .field("doc", &self.doc)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SegmentMatches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentMatches")
            .field("doc", &self.doc)
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

/// A query word: its classes, best first.
struct WordPlan {
    word: String,
    classes: Vec<(Class, f32)>,
}

/// The words of a multi-word query near each other in one field.
struct NearPlan {
    /// The phrase of the query's words, with [`PROXIMITY_SLOP`].
    phrase: Box<dyn Weight>,
    /// For two different words (neither a number): their `near` term, which
    /// every document where the phrase matches holds.
    pair: Option<Term>,
}

/// A search, ready to run on each segment of one searcher.
pub struct Plan {
    fields: Fields,
    words: Vec<WordPlan>,
    /// One per field (multi-word only).
    near: Vec<NearPlan>,
    filters: Vec<Term>,
}

impl Plan {
    /// The plan of `words` (lowercased, as [`super::query_words`] splits
    /// them) under `filters`; the automata are built here, once.
    pub fn new(
        fields: &Fields,
        words: &[String],
        filters: &Filters,
        searcher: &Searcher,
    ) -> tantivy::Result<Plan> {
        let mut plans = Vec::with_capacity(words.len());
        for (i, word) in words.iter().enumerate() {
            let last = i + 1 == words.len();
            // Any text field names the term: an automaton reads the text.
            let term = Term::from_field_text(fields.name, word);
            let mut classes = vec![(Class::Exact, 3.0 * TIER + EXACT)];
            if last {
                let prefix = FuzzyTermQuery::new_prefix(term.clone(), 0, true).automaton()?;
                classes.push((Class::Automaton(Arc::new(prefix)), 3.0 * TIER));
            }
            for d in 1..=typos_allowed(word) {
                let fuzzy = if last {
                    FuzzyTermQuery::new_prefix(term.clone(), d, true)
                } else {
                    FuzzyTermQuery::new(term.clone(), d, true)
                };
                let worth = f32::from(3 - d) * TIER;
                classes.push((Class::Automaton(Arc::new(fuzzy.automaton()?)), worth));
            }
            plans.push(WordPlan {
                word: word.clone(),
                classes,
            });
        }
        let mut near = Vec::new();
        if words.len() > 1 {
            for (ordinal, f) in fields.text.iter().enumerate() {
                let terms = words
                    .iter()
                    .map(|w| Term::from_field_text(f.field, w))
                    .collect();
                let mut phrase = PhraseQuery::new(terms);
                phrase.set_slop(PROXIMITY_SLOP);
                let pair = match words {
                    [a, b] if a != b && pairs_near(a) && pairs_near(b) => Some(
                        Term::from_field_text(fields.near, &near_term(ordinal, a, b)),
                    ),
                    _ => None,
                };
                near.push(NearPlan {
                    phrase: phrase.weight(EnableScoring::enabled_from_searcher(searcher))?,
                    pair,
                });
            }
        }
        Ok(Plan {
            fields: fields.clone(),
            words: plans,
            near,
            filters: filter_terms(fields, filters),
        })
    }

    /// The matches in one segment; `None` when nothing there can match.
    pub fn segment(&self, reader: &SegmentReader) -> tantivy::Result<Option<SegmentMatches>> {
        if self.words.is_empty() {
            return Ok(None);
        }
        let mut required: Vec<Box<dyn Scorer>> = Vec::new();
        let mut bound = 0.0;
        for filter in &self.filters {
            let postings = reader
                .inverted_index(filter.field())?
                .read_postings(filter, IndexRecordOption::Basic)?;
            let Some(postings) = postings else {
                return Ok(None);
            };
            required.push(Box::new(ConstScorer::new(postings, 0.0)));
        }
        for word in &self.words {
            let Some(union) = self.word_scorer(reader, word)? else {
                return Ok(None);
            };
            bound += union.best;
            required.push(Box::new(union));
        }
        let mut near = Vec::new();
        for plan in &self.near {
            if let Some(field) = NearField::new(reader, plan)? {
                near.push(field);
            }
        }
        if !near.is_empty() {
            bound += PROXIMITY;
        }
        Ok(Some(SegmentMatches::new(required, near, bound)))
    }

    /// One word's matches in a segment: each of its terms in each field,
    /// worth its best class there; `None` when no term matches.
    fn word_scorer(
        &self,
        reader: &SegmentReader,
        word: &WordPlan,
    ) -> tantivy::Result<Option<MaxUnion>> {
        let mut parts: Vec<Box<dyn Scorer>> = Vec::new();
        for f in &self.fields.text {
            let index = reader.inverted_index(f.field)?;
            // A term the better class took already adds nothing.
            let mut seen: HashSet<usize> = HashSet::new();
            for (class, worth) in &word.classes {
                let worth = worth + f.weight;
                match class {
                    Class::Exact => {
                        let term = Term::from_field_text(f.field, &word.word);
                        if let Some(info) = index.get_term_info(&term)? {
                            seen.insert(info.postings_range.start);
                            let postings = index
                                .read_postings_from_terminfo(&info, IndexRecordOption::Basic)?;
                            parts.push(Box::new(ConstScorer::new(postings, worth)));
                        }
                    }
                    Class::Automaton(dfa) => {
                        let weight = AutomatonWeight::<DfaWrapper>::new(f.field, dfa.clone());
                        let infos: Vec<_> = weight
                            .get_match_term_infos(reader)?
                            .into_iter()
                            .filter(|info| seen.insert(info.postings_range.start))
                            .collect();
                        if infos.len() > MAX_LAZY_TERMS {
                            parts.push(weight.scorer(reader, worth)?);
                            continue;
                        }
                        for info in infos {
                            let postings = index
                                .read_postings_from_terminfo(&info, IndexRecordOption::Basic)?;
                            parts.push(Box::new(ConstScorer::new(postings, worth)));
                        }
                    }
                }
            }
        }
        Ok((!parts.is_empty()).then(|| MaxUnion::new(parts)))
    }
}

/// The documents of any of several scorers, each scored by the best of
/// those that hold it (a disjunction-max over constant scores).
pub struct MaxUnion {
    parts: Vec<Box<dyn Scorer>>,
    doc: DocId,
    /// The best any part is worth.
    best: Score,
}

impl MaxUnion {
    fn new(parts: Vec<Box<dyn Scorer>>) -> MaxUnion {
        let mut parts = parts;
        let best = parts.iter_mut().map(|p| p.score()).fold(f32::MIN, f32::max);
        let doc = parts.iter().map(|p| p.doc()).min().unwrap_or(TERMINATED);
        MaxUnion { parts, doc, best }
    }
}

impl DocSet for MaxUnion {
    fn advance(&mut self) -> DocId {
        let current = self.doc;
        let mut next = TERMINATED;
        for p in &mut self.parts {
            let d = if p.doc() == current {
                p.advance()
            } else {
                p.doc()
            };
            next = next.min(d);
        }
        self.doc = next;
        next
    }

    fn seek(&mut self, target: DocId) -> DocId {
        if self.doc >= target {
            return self.doc;
        }
        let mut next = TERMINATED;
        for p in &mut self.parts {
            let d = if p.doc() < target {
                p.seek(target)
            } else {
                p.doc()
            };
            next = next.min(d);
        }
        self.doc = next;
        next
    }

    fn doc(&self) -> DocId {
        self.doc
    }

    fn size_hint(&self) -> u32 {
        self.parts
            .iter()
            .map(|p| p.size_hint())
            .fold(0, u32::saturating_add)
    }
}

impl Scorer for MaxUnion {
    fn score(&mut self) -> Score {
        let doc = self.doc;
        self.parts
            .iter_mut()
            .filter(|p| p.doc() == doc)
            .map(|p| p.score())
            .fold(0.0, f32::max)
    }
}

/// Whether the words of a query stand near each other in one field of the
/// documents of a segment, asked of documents in increasing order.
enum NearField {
    /// Without a `near` term: the phrase's matches, found ahead (a scan of
    /// the documents holding every word, reading their positions).
    Phrase(Box<dyn Scorer>),
    /// With one: the documents holding the `near` term, where the phrase is
    /// checked when asked.
    Paired {
        /// Boxed: a segment's postings reader is large, and a query holds
        /// one of these per field.
        candidates: Box<SegmentPostings>,
        phrase: Box<dyn Scorer>,
        /// No document below this one matches the phrase, except the one
        /// `found` at creation.
        floor: DocId,
        found: Option<DocId>,
    },
}

impl NearField {
    /// `None` when no document of the segment can match.
    fn new(reader: &SegmentReader, plan: &NearPlan) -> tantivy::Result<Option<NearField>> {
        let Some(pair) = &plan.pair else {
            let scorer = plan.phrase.scorer(reader, 1.0)?;
            return Ok((scorer.doc() != TERMINATED).then_some(NearField::Phrase(scorer)));
        };
        let Some(candidates) = reader
            .inverted_index(pair.field())?
            .read_postings(pair, IndexRecordOption::Basic)?
        else {
            return Ok(None);
        };
        let first = candidates.doc();
        if first == TERMINATED {
            return Ok(None);
        }
        // Placed at the first candidate without scanning ahead: from here on
        // the phrase is only asked about candidates, in increasing order.
        let (at_first, phrase) = plan.phrase.scorer_danger(reader, first, 1.0)?;
        let (floor, found) = match at_first {
            SeekDangerResult::Found => (first + 1, Some(first)),
            SeekDangerResult::SeekLowerBound(lower) => (lower, None),
        };
        Ok(Some(NearField::Paired {
            candidates: Box::new(candidates),
            phrase,
            floor,
            found,
        }))
    }

    /// Whether the words stand near each other in `doc`, which is above
    /// every document asked before.
    fn holds(&mut self, doc: DocId) -> bool {
        match self {
            NearField::Phrase(scorer) => scorer.doc() <= doc && scorer.seek(doc) == doc,
            NearField::Paired {
                candidates,
                phrase,
                floor,
                found,
            } => {
                if candidates.doc() < doc {
                    candidates.seek(doc);
                }
                if candidates.doc() != doc {
                    return false;
                }
                if *found == Some(doc) {
                    return true;
                }
                if doc < *floor {
                    return false;
                }
                // A phrase scorer left where a document was not found takes
                // only `seek_danger`, to strictly increasing targets.
                match phrase.seek_danger(doc) {
                    SeekDangerResult::Found => {
                        *floor = doc + 1;
                        true
                    }
                    SeekDangerResult::SeekLowerBound(lower) => {
                        *floor = lower;
                        false
                    }
                }
            }
        }
    }
}

/// A query's matches in one segment, in document order: the documents of
/// every required scorer (words and filters), scored by their sum, plus
/// [`PROXIMITY`] when the words stand near each other.
pub struct SegmentMatches {
    /// Rarest first, so the leapfrog proposes as few candidates as it can.
    required: Vec<Box<dyn Scorer>>,
    /// One per field that can hold the words near each other.
    near: Vec<NearField>,
    doc: DocId,
    /// The best score a document of this segment could have.
    pub bound: Score,
}

impl SegmentMatches {
    fn new(
        mut required: Vec<Box<dyn Scorer>>,
        near: Vec<NearField>,
        bound: Score,
    ) -> SegmentMatches {
        required.sort_by_key(|s| s.size_hint());
        let mut matches = SegmentMatches {
            required,
            near,
            doc: 0,
            bound,
        };
        let first = matches.required.first().map_or(TERMINATED, |s| s.doc());
        matches.doc = matches.align(first);
        matches
    }

    /// The first document at or after `candidate` that every required
    /// scorer holds.
    fn align(&mut self, mut candidate: DocId) -> DocId {
        'search: while candidate != TERMINATED {
            for s in &mut self.required {
                let d = if s.doc() < candidate {
                    s.seek(candidate)
                } else {
                    s.doc()
                };
                if d > candidate {
                    candidate = d;
                    continue 'search;
                }
            }
            return candidate;
        }
        TERMINATED
    }

    /// The current document, [`TERMINATED`] at the end.
    pub fn doc(&self) -> DocId {
        self.doc
    }

    /// Moves to the next match.
    pub fn advance(&mut self) -> DocId {
        if self.doc == TERMINATED {
            return TERMINATED;
        }
        let next = match self.required.first_mut() {
            Some(first) => first.advance(),
            None => TERMINATED,
        };
        self.doc = self.align(next);
        self.doc
    }

    /// The current document's score.
    pub fn score(&mut self) -> Score {
        let doc = self.doc;
        let mut score: Score = self.required.iter_mut().map(|s| s.score()).sum();
        if self.near.iter_mut().any(|field| field.holds(doc)) {
            score += PROXIMITY;
        }
        score
    }
}

/// The filters as terms of the fast fields, all required.
fn filter_terms(fields: &Fields, filters: &Filters) -> Vec<Term> {
    let mut terms = Vec::new();
    if let Some(s) = filters.status {
        terms.push(Term::from_field_text(fields.status, s.as_str()));
    }
    if let Some(t) = &filters.agent_type {
        terms.push(Term::from_field_text(fields.agent_type, t.as_str()));
    }
    if let Some(p) = filters.project_id {
        terms.push(Term::from_field_text(fields.project_id, &p.to_string()));
    }
    for (k, v) in &filters.tags {
        let v = v.as_str().unwrap_or_default();
        terms.push(Term::from_field_text(fields.tag, &tag_term(k, v)));
    }
    terms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typo_allowances_follow_word_length() {
        assert_eq!(typos_allowed("bot"), 0);
        assert_eq!(typos_allowed("scout"), 1);
        assert_eq!(typos_allowed("invoise"), 1);
        assert_eq!(typos_allowed("summarzier"), 2);
        assert_eq!(typos_allowed("20261127"), 0);
    }
}
