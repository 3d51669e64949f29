//! `If-Match` and `If-None-Match` as RFC 9110 (section 13.1) defines them:
//! `*` or a comma-separated list of entity tags, each strong (`"3"`) or weak
//! (`W/"3"`), the list possibly spread over several header lines.
//! `If-None-Match` compares weakly (`W/"3"` matches our `"3"`); `If-Match`
//! compares strongly (a weak tag never matches).
//!
//! Our entity tags are strong: `"<version>"` of the resource.

use axum::http::{HeaderMap, HeaderName};

/// An `If-Match` or `If-None-Match` field value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntityTags {
    /// `*`: any current representation.
    Any,
    /// The listed tags.
    List(Vec<EntityTag>),
}

/// One entity tag of a list: its opaque text (without the quotes) and
/// whether it is weak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityTag {
    pub weak: bool,
    pub opaque: String,
}

/// A field value that is neither `*` nor a list of entity tags.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} must be * or a comma-separated list of entity tags such as \"3\" or W/\"3\"")]
pub struct Malformed(pub &'static str);

impl EntityTags {
    /// The field `name` of `headers`, all its lines taken together; `None`
    /// when absent.
    pub fn from_headers(
        headers: &HeaderMap,
        name: &'static HeaderName,
    ) -> Result<Option<EntityTags>, Malformed> {
        let mut lines = headers.get_all(name).iter().peekable();
        if lines.peek().is_none() {
            return Ok(None);
        }
        let mut tags = Vec::new();
        let mut any = false;
        for line in lines {
            let line = line.as_bytes().trim_ascii();
            if line == b"*" {
                any = true;
            } else {
                parse_list(line, &mut tags).ok_or(Malformed(name.as_str()))?;
            }
        }
        match (any, tags.is_empty()) {
            (true, true) => Ok(Some(EntityTags::Any)),
            // `*` stands alone: it is no member of a list.
            (true, false) => Err(Malformed(name.as_str())),
            (false, _) => Ok(Some(EntityTags::List(tags))),
        }
    }

    /// Weak comparison against the current strong tag `"<current>"`, as
    /// `If-None-Match` does: whether the client holds this representation.
    pub fn matches_weakly(&self, current: &str) -> bool {
        match self {
            EntityTags::Any => true,
            EntityTags::List(tags) => tags.iter().any(|t| t.opaque == current),
        }
    }

    /// The versions a strong comparison can match, as `If-Match` does:
    /// `None` for `*` (any current version), else the strong tags that name
    /// a version exactly (`"3"`, not `"03"` nor `W/"3"`), possibly none.
    pub fn strong_versions(&self) -> Option<Vec<u64>> {
        match self {
            EntityTags::Any => None,
            EntityTags::List(tags) => Some(
                tags.iter()
                    .filter(|t| !t.weak)
                    .filter_map(|t| {
                        t.opaque
                            .parse::<u64>()
                            .ok()
                            .filter(|v| v.to_string() == t.opaque)
                    })
                    .collect(),
            ),
        }
    }
}

/// Appends the entity tags of `#entity-tag` (empty elements allowed, as
/// RFC 9110's list rule says) to `out`; `None` when malformed.
fn parse_list(mut rest: &[u8], out: &mut Vec<EntityTag>) -> Option<()> {
    loop {
        rest = rest.trim_ascii_start();
        match rest {
            [] => return Some(()),
            [b',', tail @ ..] => {
                rest = tail;
                continue;
            }
            _ => {}
        }
        let (weak, tail) = match rest.strip_prefix(b"W/") {
            Some(tail) => (true, tail),
            None => (false, rest),
        };
        let tail = tail.strip_prefix(b"\"")?;
        let end = tail.iter().position(|b| *b == b'"')?;
        let opaque = &tail[..end];
        // etagc: %x21 / %x23-7E / obs-text (the quote is excluded above).
        if !opaque.iter().all(|b| *b == 0x21 || *b >= 0x23) || opaque.contains(&0x7f) {
            return None;
        }
        out.push(EntityTag {
            weak,
            opaque: String::from_utf8_lossy(opaque).into_owned(),
        });
        rest = tail[end + 1..].trim_ascii_start();
        match rest {
            [] => return Some(()),
            [b',', tail @ ..] => rest = tail,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderValue, header};

    use super::*;

    fn tags(lines: &[&'static str]) -> Result<Option<EntityTags>, Malformed> {
        let mut headers = HeaderMap::new();
        for l in lines {
            headers.append(header::IF_MATCH, HeaderValue::from_static(l));
        }
        EntityTags::from_headers(&headers, &header::IF_MATCH)
    }

    #[test]
    fn lists_star_and_weak_tags() {
        assert_eq!(tags(&[]), Ok(None));
        assert_eq!(tags(&[" * "]), Ok(Some(EntityTags::Any)));
        let list = tags(&["\"1\", W/\"2\",,\"a,b\"", "\"03\""])
            .unwrap()
            .unwrap();
        assert!(list.matches_weakly("2"));
        assert!(list.matches_weakly("a,b"));
        assert!(!list.matches_weakly("3"));
        assert_eq!(list.strong_versions(), Some(vec![1]));
        assert_eq!(
            tags(&["W/\"2\""]).unwrap().unwrap().strong_versions(),
            Some(vec![])
        );
    }

    #[test]
    fn malformed_values() {
        for bad in ["1", "\"1", "\"1\" \"2\"", "*, \"1\"", "w/\"1\"", "\"a b\""] {
            assert!(tags(&[bad]).is_err(), "{bad}");
        }
        assert!(tags(&["*", "\"1\""]).is_err());
    }
}
