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
//! [`Plan`] builds one Levenshtein automaton per word and query (the
//! widest the word allows: its typos, as a prefix for the last word), walks
//! each field's dictionary in each segment with it once, places each term
//! it accepts in its tier by the distance the automaton gives (an
//! automaton per tier walked the dictionary up to four times), and reads
//! those terms' postings lazily: a word is the best of its terms
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

use std::sync::{Arc, LazyLock};

use levenshtein_automata::{DFA, Distance, LevenshteinAutomatonBuilder};
use tantivy::postings::SegmentPostings;
use tantivy::postings::TermInfo;
use tantivy::query::{
    BitSetDocSet, ConstScorer, EnableScoring, PhraseQuery, Query, Scorer, Weight,
};
use tantivy::schema::IndexRecordOption;
use tantivy::{
    BitSet, DocId, DocSet, InvertedIndexReader, Score, Searcher, SeekDangerResult, SegmentReader,
    TERMINATED, Term,
};

use super::schema::{Fields, Key, pairs_near, tag_term};
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
/// Most terms of one (field, tier) read as postings of
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

/// The Levenshtein automaton builders for 0, 1 and 2 typos, a swap of
/// neighbouring letters counted as one (as tantivy's fuzzy queries build
/// them).
static BUILDERS: LazyLock<[LevenshteinAutomatonBuilder; 3]> =
    LazyLock::new(|| [0, 1, 2].map(|d| LevenshteinAutomatonBuilder::new(d, true)));

/// A query word's automaton: the terms within its typos, or with a prefix
/// within them for the last word. It also tells how far a term it accepts
/// is from the word, so one walk of a dictionary finds every term of every
/// tier.
struct WordDfa(DFA);

impl WordDfa {
    fn new(word: &str, typos: u8, prefix: bool) -> WordDfa {
        let builder = &BUILDERS[usize::from(typos.min(2))];
        WordDfa(if prefix {
            builder.build_prefix_dfa(word)
        } else {
            builder.build_dfa(word)
        })
    }

    /// The typos between `term` (one it accepts) and the word.
    fn typos(&self, term: &[u8]) -> u8 {
        match self.0.eval(term) {
            Distance::Exact(d) | Distance::AtLeast(d) => d,
        }
    }
}

impl tantivy_fst::Automaton for WordDfa {
    type State = u32;

    fn start(&self) -> u32 {
        self.0.initial_state()
    }

    fn is_match(&self, state: &u32) -> bool {
        matches!(self.0.distance(*state), Distance::Exact(_))
    }

    fn can_match(&self, state: &u32) -> bool {
        *state != levenshtein_automata::SINK_STATE
    }

    fn accept(&self, state: &u32, byte: u8) -> u32 {
        self.0.transition(*state, byte)
    }
}

/// How a word's terms are found in a field's dictionary.
enum Lookup {
    /// The word itself, one term: a word with no typo allowed that is not
    /// the last.
    Exact,
    /// Every term the automaton accepts, in one walk of the dictionary,
    /// each then placed in its tier ([`tier`]).
    Walk(Arc<WordDfa>),
}

/// The tiers of a word's matches, best first, and what each is worth
/// (before the field's weight).
const TIERS: [f32; 4] = [3.0 * TIER + EXACT, 3.0 * TIER, 2.0 * TIER, TIER];

/// The tier ([`TIERS`]) of `term`, accepted by `dfa` for `word`: the word
/// itself, a word it is a prefix of (the last word), then by typos.
fn tier(word: &[u8], dfa: &WordDfa, term: &[u8]) -> usize {
    if term == word {
        return 0;
    }
    // An accepted term is within two typos.
    usize::from(dfa.typos(term).min(2)) + 1
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

/// A query word, and how its terms are found.
struct WordPlan {
    word: String,
    lookup: Lookup,
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
            let typos = typos_allowed(word);
            let lookup = if last || typos > 0 {
                Lookup::Walk(Arc::new(WordDfa::new(word, typos, last)))
            } else {
                Lookup::Exact
            };
            plans.push(WordPlan {
                word: word.clone(),
                lookup,
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
                    [a, b] if a != b && pairs_near(a) && pairs_near(b) => {
                        Some(fields.near_term(ordinal, a, b))
                    }
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
    /// worth its tier there; `None` when no term matches.
    fn word_scorer(
        &self,
        reader: &SegmentReader,
        word: &WordPlan,
    ) -> tantivy::Result<Option<MaxUnion>> {
        let mut parts: Vec<Box<dyn Scorer>> = Vec::new();
        for f in &self.fields.text {
            let index = reader.inverted_index(f.field)?;
            let dfa = match &word.lookup {
                Lookup::Exact => {
                    let term = Term::from_field_text(f.field, &word.word);
                    if let Some(info) = index.get_term_info(&term)? {
                        let postings =
                            index.read_postings_from_terminfo(&info, IndexRecordOption::Basic)?;
                        parts.push(Box::new(ConstScorer::new(postings, TIERS[0] + f.weight)));
                    }
                    continue;
                }
                Lookup::Walk(dfa) => dfa,
            };
            let mut tiers: [Vec<TermInfo>; TIERS.len()] = Default::default();
            let mut terms = index.terms().search(dfa.as_ref()).into_stream()?;
            while terms.advance() {
                let tier = tier(word.word.as_bytes(), dfa, terms.key());
                tiers[tier].push(terms.value().clone());
            }
            for (infos, worth) in tiers.iter().zip(TIERS) {
                let worth = worth + f.weight;
                if infos.len() > MAX_LAZY_TERMS {
                    parts.push(Box::new(ConstScorer::new(
                        union_bitset(&index, reader.max_doc(), infos)?,
                        worth,
                    )));
                    continue;
                }
                for info in infos {
                    let postings =
                        index.read_postings_from_terminfo(info, IndexRecordOption::Basic)?;
                    parts.push(Box::new(ConstScorer::new(postings, worth)));
                }
            }
        }
        Ok((!parts.is_empty()).then(|| MaxUnion::new(parts)))
    }
}

/// The documents of any of `infos`' postings, read into a bitset in one
/// pass each.
fn union_bitset(
    index: &InvertedIndexReader,
    max_doc: DocId,
    infos: &[TermInfo],
) -> tantivy::Result<BitSetDocSet> {
    let mut docs = BitSet::with_max_value(max_doc);
    for info in infos {
        let mut block = index.read_block_postings_from_terminfo(info, IndexRecordOption::Basic)?;
        while !block.docs().is_empty() {
            for &doc in block.docs() {
                docs.insert(doc);
            }
            block.advance();
        }
    }
    Ok(BitSetDocSet::from(docs))
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

/// The filters as `keys` terms, all required.
fn filter_terms(fields: &Fields, filters: &Filters) -> Vec<Term> {
    let mut terms = Vec::new();
    if let Some(s) = filters.status {
        terms.push(fields.key(Key::Status, s.as_str()));
    }
    if let Some(t) = &filters.agent_type {
        terms.push(fields.key(Key::Type, t.as_str()));
    }
    if let Some(p) = filters.project_id {
        terms.push(fields.key(Key::ProjectId, &p.to_string()));
    }
    for (k, v) in &filters.tags {
        let v = v.as_str().unwrap_or_default();
        terms.push(fields.key(Key::Tag, &tag_term(k, v)));
    }
    terms
}

#[cfg(test)]
mod tests {
    use super::*;
    use tantivy::query::FuzzyTermQuery;
    use tantivy_fst::Automaton;

    fn accepts<A: Automaton>(a: &A, term: &str) -> bool {
        let mut state = a.start();
        for &b in term.as_bytes() {
            state = a.accept(&state, b);
        }
        a.is_match(&state)
    }

    /// The tier of each term as an automaton per tier (tantivy's fuzzy
    /// queries) puts it: the best whose automaton accepts it.
    fn tier_by_automata(word: &str, last: bool, term: &str) -> Option<usize> {
        if term == word {
            return Some(0);
        }
        let t = Term::from_field_text(Fields::new().name, word);
        let query = |d| {
            if last {
                FuzzyTermQuery::new_prefix(t.clone(), d, true)
            } else {
                FuzzyTermQuery::new(t.clone(), d, true)
            }
        };
        (0..=typos_allowed(word))
            .filter(|&d| d > 0 || last)
            .find(|&d| accepts(&query(d).automaton().unwrap(), term))
            .map(|d| usize::from(d) + 1)
    }

    #[test]
    fn one_walk_places_each_term_in_the_tier_an_automaton_per_tier_does() {
        let terms = [
            "summarizer",
            "summarizers",
            "sumarizer",
            "summarzier",
            "summariser",
            "sumarizzer",
            "summ",
            "sum",
            "summary",
            "scout",
            "scouts",
            "scoutt",
            "socut",
            "shout",
            "scot",
            "planner",
            "plannre",
            "planer",
            "plan",
            "invoice",
            "invoise",
            "invoices",
            "transl",
            "translator",
            "tanslator",
            "trnslatr",
            "424242",
            "424243",
            "4242420",
            "a",
            "",
        ];
        let words = [
            "summarizer",
            "sumarizzer",
            "scout",
            "plannre",
            "invoise",
            "transl",
            "424242",
            "sum",
            "a",
        ];
        for word in words {
            for last in [false, true] {
                let typos = typos_allowed(word);
                let dfa = (last || typos > 0).then(|| WordDfa::new(word, typos, last));
                for term in terms {
                    let walked = match &dfa {
                        Some(dfa) => {
                            accepts(dfa, term).then(|| tier(word.as_bytes(), dfa, term.as_bytes()))
                        }
                        None => (term == word).then_some(0),
                    };
                    assert_eq!(
                        walked,
                        tier_by_automata(word, last, term),
                        "{word:?} (last: {last}) against {term:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn typo_allowances_follow_word_length() {
        assert_eq!(typos_allowed("bot"), 0);
        assert_eq!(typos_allowed("scout"), 1);
        assert_eq!(typos_allowed("invoise"), 1);
        assert_eq!(typos_allowed("summarzier"), 2);
        assert_eq!(typos_allowed("20261127"), 0);
    }
}
