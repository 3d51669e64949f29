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

use tantivy::Term;
use tantivy::query::{
    BooleanQuery, ConstScoreQuery, DisjunctionMaxQuery, EmptyQuery, FuzzyTermQuery, Occur,
    PhraseQuery, Query, TermQuery,
};
use tantivy::schema::IndexRecordOption;

use super::schema::{Fields, tag_term};
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

/// The query for `words` (lowercased, as [`super::query_words`] splits
/// them) under `filters`.
pub fn build(fields: &Fields, words: &[String], filters: &Filters) -> Box<dyn Query> {
    if words.is_empty() {
        return Box::new(EmptyQuery);
    }
    let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
    for (i, word) in words.iter().enumerate() {
        let last = i + 1 == words.len();
        clauses.push((Occur::Must, word_query(fields, word, last)));
    }
    if words.len() > 1 {
        let near: Vec<Box<dyn Query>> = fields
            .text
            .iter()
            .map(|f| {
                let terms = words
                    .iter()
                    .map(|w| Term::from_field_text(f.field, w))
                    .collect();
                let mut phrase = PhraseQuery::new(terms);
                phrase.set_slop(PROXIMITY_SLOP);
                constant(Box::new(phrase), PROXIMITY)
            })
            .collect();
        clauses.push((Occur::Should, Box::new(DisjunctionMaxQuery::new(near))));
    }
    for filter in filter_terms(fields, filters) {
        clauses.push((
            Occur::Must,
            constant(
                Box::new(TermQuery::new(filter, IndexRecordOption::Basic)),
                0.0,
            ),
        ));
    }
    Box::new(BooleanQuery::new(clauses))
}

/// One word's matches in every field, worth the best of them.
fn word_query(fields: &Fields, word: &str, last: bool) -> Box<dyn Query> {
    let typos = typos_allowed(word);
    let mut matches: Vec<Box<dyn Query>> = Vec::new();
    for f in &fields.text {
        let term = Term::from_field_text(f.field, word);
        matches.push(constant(
            Box::new(TermQuery::new(term.clone(), IndexRecordOption::Basic)),
            3.0 * TIER + f.weight + EXACT,
        ));
        if last {
            matches.push(constant(
                Box::new(FuzzyTermQuery::new_prefix(term.clone(), 0, true)),
                3.0 * TIER + f.weight,
            ));
        }
        for d in 1..=typos {
            let worth = f32::from(3 - d) * TIER + f.weight;
            let fuzzy = if last {
                FuzzyTermQuery::new_prefix(term.clone(), d, true)
            } else {
                FuzzyTermQuery::new(term.clone(), d, true)
            };
            matches.push(constant(Box::new(fuzzy), worth));
        }
    }
    Box::new(DisjunctionMaxQuery::new(matches))
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

fn constant(query: Box<dyn Query>, score: f32) -> Box<dyn Query> {
    Box::new(ConstScoreQuery::new(query, score))
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
