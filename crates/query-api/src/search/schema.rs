//! The search index's schema: which parts of an agent are searched, which
//! filter and count, and what a hit is read back from.
//!
//! Text fields share one analyser, [`WORDS`]: runs of letters and digits,
//! lowercased, the same split [`super::query_words`] makes of `q`, so a
//! query word and an indexed word compare as they are. Capabilities go
//! through it too, so `text-summarization` is indexed as `text` and
//! `summarization`. Positions are kept for proximity.
//!
//! Every exact term (the id, each filter value, each `near` pair) is a term
//! of one raw field, `keys`, named by its kind's prefix ([`Key`]): a filter
//! is a term query inside the engine, the id's term replaces or deletes a
//! document. One field rather than one per kind because each indexed
//! field costs every segment a term dictionary, whose builder tantivy
//! allocates and initialises whole (about 0.17 ms) however few its terms:
//! the overlay writes a small segment per batch (see `index::overlay`),
//! and with eleven indexed fields a piece of one agent took 2.5 ms to
//! build, with six 1.7 ms (of 75 agents: 4.0 and 3.2 ms). The filters'
//! values are also fast columns (`status`, `type`, `project_id`, `tag`,
//! not indexed): a facet is a count over one. The id has two fast `u64`
//! halves too (the tiebreak of equal scores). The agent as the API shows
//! it is stored whole, as JSON text: a hit needs no other read (it is
//! answered as stored), and an update folds onto it.
//!
//! Words that stand near each other in a field are also indexed as one
//! [`Key::Near`] term per pair ([`Fields::near_term`]), so a two-word query learns
//! from one term lookup whether (and where) its words can stand near each
//! other, instead of reading the positions of every document holding both.
//!
//! Every segment keeps its documents in descending id order ([`settings`]):
//! among equal scores the best hits come first, so a query can stop a
//! segment as soon as its page is full of the best scores it can reach.

use infra::views::AgentView;
use tantivy::schema::{
    FAST, Field, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing, TextOptions,
};
use tantivy::tokenizer::{
    LowerCaser, RemoveLongFilter, SimpleTokenizer, TextAnalyzer, TokenStream,
};
use tantivy::{Index, IndexSettings, IndexSortByField, Order, TantivyDocument};
use uuid::Uuid;

/// Raised whenever the schema or the analysis changes, or the JSON of an
/// [`AgentView`] (search answers each hit's stored JSON as it is): an
/// index written under another version is rebuilt from the log.
pub const SCHEMA_VERSION: u32 = 5;

/// The analyser of every searched field.
pub const WORDS: &str = "words";

/// Words longer than this many bytes are not indexed (nobody types them).
const LONGEST_WORD: usize = 64;

/// Separates a tag's key from its value in the `tag` filter term.
pub const TAG_SEPARATOR: char = '\u{1f}';

/// How many positions apart two words of a field may stand and still make
/// a `near` term: one more than the proximity slop, as a two-word phrase
/// with slop `s` accepts the second word from one position before the
/// first to `s + 1` positions after it.
pub const NEAR_WINDOW: u32 = super::query::PROXIMITY_SLOP + 1;

/// A searched text field and its rank among the fields: a match in a
/// higher one ranks first (name > type and capabilities > tags >
/// description).
#[derive(Debug, Clone, Copy)]
pub struct TextField {
    pub field: Field,
    pub weight: f32,
}

/// The kinds of exact term the `keys` field holds, each its own prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// The agent's id: its document's name, to replace or delete it.
    Id,
    Status,
    Type,
    ProjectId,
    /// A tag, as [`tag_term`] writes it.
    Tag,
    /// Two words near each other in one text field ([`Fields::near_term`]).
    Near,
}

impl Key {
    fn prefix(self) -> &'static str {
        match self {
            Key::Id => "id:",
            Key::Status => "status:",
            Key::Type => "type:",
            Key::ProjectId => "project:",
            Key::Tag => "tag:",
            Key::Near => "near:",
        }
    }
}

/// The fields, resolved once.
#[derive(Debug, Clone)]
pub struct Fields {
    pub schema: Schema,
    /// The searched fields, best first.
    pub text: [TextField; 5],
    pub name: Field,
    /// Every exact term, of each [`Key`].
    pub keys: Field,
    pub id_hi: Field,
    pub id_lo: Field,
    /// The filters' fast columns (not indexed: their terms are `keys`).
    pub status: Field,
    pub agent_type: Field,
    pub project_id: Field,
    pub tag: Field,
    pub agent: Field,
}

/// Fast column names, for the collectors.
pub const ID_HI: &str = "id_hi";
pub const ID_LO: &str = "id_lo";
pub const STATUS: &str = "status";
pub const TYPE: &str = "type";
pub const PROJECT_ID: &str = "project_id";
pub const TAG: &str = "tag";

impl Fields {
    pub fn new() -> Fields {
        let mut b = Schema::builder();
        let words = TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(WORDS)
                .set_fieldnorms(false)
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        );
        let name = b.add_text_field("name", words.clone());
        let type_words = b.add_text_field("type_words", words.clone());
        let capabilities = b.add_text_field("capabilities", words.clone());
        let tags = b.add_text_field("tags", words.clone());
        let description = b.add_text_field("description", words);
        let keys = b.add_text_field("keys", STRING);
        let id_hi = b.add_u64_field(ID_HI, FAST);
        let id_lo = b.add_u64_field(ID_LO, FAST);
        let status = b.add_text_field(STATUS, FAST);
        let agent_type = b.add_text_field(TYPE, FAST);
        let project_id = b.add_text_field(PROJECT_ID, FAST);
        let tag = b.add_text_field(TAG, FAST);
        // Text, not bytes: tantivy reads a stored bytes value back one byte
        // at a time, a text value in one copy (a tenth of a search's time
        // went to reading hits' bytes back).
        let agent = b.add_text_field("agent", STORED);
        let schema = b.build();
        let text = |field, weight| TextField { field, weight };
        Fields {
            text: [
                text(name, 4.0),
                text(type_words, 3.0),
                text(capabilities, 3.0),
                text(tags, 2.0),
                text(description, 1.0),
            ],
            name,
            keys,
            id_hi,
            id_lo,
            status,
            agent_type,
            project_id,
            tag,
            agent,
            schema,
        }
    }

    /// Registers the analyser the schema names on `index`.
    pub fn register_tokenizers(index: &Index) {
        index.tokenizers().register(WORDS, words_analyzer());
    }

    /// The `keys` term of `value` as a `kind`.
    pub fn key(&self, kind: Key, value: &str) -> tantivy::Term {
        let mut text = String::new();
        write_key(&mut text, kind, &[value]);
        tantivy::Term::from_field_text(self.keys, &text)
    }

    /// The term that names agent `id`'s document.
    pub fn id_term(&self, id: Uuid) -> tantivy::Term {
        self.key(
            Key::Id,
            id.hyphenated().encode_lower(&mut Uuid::encode_buffer()),
        )
    }

    /// The [`Key::Near`] term of two different words standing at most
    /// [`NEAR_WINDOW`] positions apart, in either order, in the text field
    /// of `ordinal` (its place in [`Fields::text`]).
    pub fn near_term(&self, ordinal: usize, a: &str, b: &str) -> tantivy::Term {
        let mut text = String::new();
        write_near(&mut text, ordinal, a, b);
        tantivy::Term::from_field_text(self.keys, &text)
    }

    /// The document of `agent`. Every key is written into one buffer and
    /// copied into the document from there (a document keeps its values'
    /// bytes, not the strings they came in): there are some fifty keys to
    /// an agent, most of them `near` pairs, and building each as a string
    /// of its own was a third of a document's cost.
    pub fn document(&self, agent: &AgentView) -> TantivyDocument {
        let [name, agent_type, capabilities, tags, description] = self.text.map(|t| t.field);
        let mut doc = TantivyDocument::new();
        let mut key = String::with_capacity(128);
        let tag_texts: Vec<String> = agent
            .tags
            .iter()
            .map(|(k, v)| [k.as_str(), " ", v.as_str()].concat())
            .collect();
        let values: [(Field, Vec<&str>); 5] = [
            (name, vec![agent.name.as_str()]),
            (agent_type, vec![agent.agent_type.as_str()]),
            (
                capabilities,
                agent.capabilities.iter().map(String::as_str).collect(),
            ),
            (tags, tag_texts.iter().map(String::as_str).collect()),
            (description, vec![agent.description.as_str()]),
        ];
        let mut analyzer = words_analyzer();
        let mut words = Vec::new();
        for (ordinal, (field, texts)) in values.iter().enumerate() {
            for text in texts {
                doc.add_text(*field, text);
            }
            field_words(&mut analyzer, ordinal, texts, &mut words);
        }
        let mut pairs = near_pairs(&words);
        pairs.sort_unstable();
        pairs.dedup();
        for (ordinal, a, b) in pairs {
            write_near(&mut key, ordinal, a, b);
            doc.add_text(self.keys, &key);
        }
        for (k, v) in &agent.tags {
            write_key(&mut key, Key::Tag, &[k, TAG_SEPARATOR_STR, v]);
            doc.add_text(self.keys, &key);
            doc.add_text(self.tag, &key[Key::Tag.prefix().len()..]);
        }
        let mut uuid = Uuid::encode_buffer();
        let id = agent.id.hyphenated().encode_lower(&mut uuid);
        write_key(&mut key, Key::Id, &[id]);
        doc.add_text(self.keys, &key);
        let (hi, lo) = id_halves(agent.id);
        doc.add_u64(self.id_hi, hi);
        doc.add_u64(self.id_lo, lo);
        write_key(&mut key, Key::Status, &[&agent.status]);
        doc.add_text(self.keys, &key);
        doc.add_text(self.status, &agent.status);
        write_key(&mut key, Key::Type, &[&agent.agent_type]);
        doc.add_text(self.keys, &key);
        doc.add_text(self.agent_type, &agent.agent_type);
        if let Some(p) = agent.project_id {
            let p = p.hyphenated().encode_lower(&mut uuid);
            write_key(&mut key, Key::ProjectId, &[p]);
            doc.add_text(self.keys, &key);
            doc.add_text(self.project_id, p);
        }
        // Serialising a view of plain data cannot fail.
        doc.add_text(self.agent, serde_json::to_string(agent).unwrap_or_default());
        doc
    }
}

impl Default for Fields {
    fn default() -> Self {
        Fields::new()
    }
}

/// [`TAG_SEPARATOR`] as a string.
const TAG_SEPARATOR_STR: &str = "\u{1f}";

/// Writes into `out` (emptied first) the text of the `keys` term of a
/// `kind` whose value is `parts` one after the other.
fn write_key(out: &mut String, kind: Key, parts: &[&str]) {
    out.clear();
    out.push_str(kind.prefix());
    for part in parts {
        out.push_str(part);
    }
}

/// Writes into `out` the text of [`Fields::near_term`]: the field's
/// ordinal and the two words, the lesser first.
fn write_near(out: &mut String, ordinal: usize, a: &str, b: &str) {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    // There are five text fields: an ordinal is one digit.
    let digit = char::from_digit(ordinal as u32, 10).unwrap_or('9');
    write_key(out, Key::Near, &[]);
    out.push(digit);
    out.push(TAG_SEPARATOR);
    out.push_str(first);
    out.push(TAG_SEPARATOR);
    out.push_str(second);
}

/// The analyser of the searched fields: runs of letters and digits,
/// lowercased, words over [`LONGEST_WORD`] bytes left out.
fn words_analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(LONGEST_WORD))
        .filter(LowerCaser)
        .build()
}

/// Whether a word takes part in `near` terms: not a number. Numbers are
/// left out because nearly every one is unique (an agent's own number
/// beside each word of its name would double the term dictionary), and a
/// rare word's phrase is cheap to check from its positions anyway.
pub fn pairs_near(word: &str) -> bool {
    !word.chars().all(|c| c.is_ascii_digit())
}

/// A word of a text field: the field's ordinal, the position tantivy gives
/// it, the word.
type Word = (usize, u32, String);

/// Adds to `out` the words of one text field's values, at the positions
/// tantivy gives them: each value starts one position after the end of
/// the one before.
fn field_words(analyzer: &mut TextAnalyzer, ordinal: usize, texts: &[&str], out: &mut Vec<Word>) {
    let mut start = 0;
    for text in texts {
        let mut end = start;
        let mut stream = analyzer.token_stream(text);
        while let Some(token) = stream.next() {
            let position = start + token.position as u32;
            end = end.max(position + 1);
            out.push((ordinal, position, token.text.clone()));
        }
        start = end + 1;
    }
}

/// The pairs of different words (neither a number) standing at most
/// [`NEAR_WINDOW`] positions apart in one field, as (ordinal, word, word).
fn near_pairs(words: &[Word]) -> Vec<(usize, &str, &str)> {
    let mut pairs = Vec::new();
    for (i, (ordinal, at, a)) in words.iter().enumerate() {
        for (other, to, b) in &words[i + 1..] {
            if other != ordinal || to - at > NEAR_WINDOW {
                break;
            }
            if a != b && pairs_near(a) && pairs_near(b) {
                let (first, second) = if a <= b { (a, b) } else { (b, a) };
                pairs.push((*ordinal, first.as_str(), second.as_str()));
            }
        }
    }
    pairs
}

/// The settings an index is created with: documents sorted by the id's
/// high half, descending.
pub fn settings() -> IndexSettings {
    IndexSettings {
        sort_by_field: Some(IndexSortByField {
            field: ID_HI.to_owned(),
            order: Order::Desc,
        }),
        ..IndexSettings::default()
    }
}

/// Whether `index` keeps its documents in descending id order, as
/// [`settings`] asks.
pub fn sorted_by_id(index: &Index) -> bool {
    index
        .settings()
        .sort_by_field
        .as_ref()
        .is_some_and(|s| s.field == ID_HI && s.order == Order::Desc)
}

/// The [`Key::Tag`] value of tag `key: value`, and its value in the `tag`
/// column.
pub fn tag_term(key: &str, value: &str) -> String {
    [key, TAG_SEPARATOR_STR, value].concat()
}

/// An id as two `u64`s, high first: compared as a pair, they order as the
/// id does.
pub fn id_halves(id: Uuid) -> (u64, u64) {
    let n = id.as_u128();
    ((n >> 64) as u64, n as u64)
}

/// The id of its two halves.
pub fn id_of_halves(hi: u64, lo: u64) -> Uuid {
    Uuid::from_u128((u128::from(hi) << 64) | u128::from(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `keys` values of `doc`.
    fn keys_of(fields: &Fields, doc: &TantivyDocument) -> Vec<String> {
        use tantivy::schema::Value;
        doc.get_all(fields.keys)
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    fn term_text(term: &tantivy::Term) -> String {
        term.value().as_str().unwrap_or_default().to_owned()
    }

    #[test]
    fn a_document_holds_the_keys_a_query_looks_up() {
        let fields = Fields::new();
        let id = Uuid::now_v7();
        let project = Uuid::now_v7();
        let agent = AgentView {
            id,
            name: "Alpha Beta".into(),
            agent_type: "llm".into(),
            description: "one two three four five 42 six".into(),
            status: "active".into(),
            capabilities: vec!["text-summarization".into()],
            config: serde_json::json!({}),
            tags: [("team".to_owned(), "atlas".to_owned())].into(),
            project_id: Some(project),
            version: 1,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            created_by: "admin".into(),
        };
        let keys = keys_of(&fields, &fields.document(&agent));
        let has = |term: tantivy::Term| keys.contains(&term_text(&term));
        assert!(has(fields.id_term(id)));
        assert!(has(fields.key(Key::Status, "active")));
        assert!(has(fields.key(Key::Type, "llm")));
        assert!(has(fields.key(Key::ProjectId, &project.to_string())));
        assert!(has(fields.key(Key::Tag, &tag_term("team", "atlas"))));
        // Near pairs: in either order, up to NEAR_WINDOW positions apart,
        // within one field, never with a number.
        assert!(has(fields.near_term(0, "beta", "alpha")));
        assert!(has(fields.near_term(4, "one", "four")));
        assert!(!has(fields.near_term(4, "one", "five")));
        assert!(!has(fields.near_term(4, "five", "42")));
        assert!(has(fields.near_term(4, "five", "six")));
        assert!(has(fields.near_term(2, "text", "summarization")));
        assert!(has(fields.near_term(3, "team", "atlas")));
        assert!(!has(fields.near_term(4, "alpha", "one")));
        let near = keys.iter().filter(|k| k.starts_with("near:")).count();
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "each key once: {keys:?}");
        assert_eq!(near, 1 + 1 + 1 + 11, "{keys:?}");
    }

    #[test]
    fn id_halves_round_trip_and_keep_order() {
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        let (ha, la) = id_halves(a);
        assert_eq!(id_of_halves(ha, la), a);
        assert_eq!((ha, la) < id_halves(b), a < b);
    }
}
