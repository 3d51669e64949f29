//! Our own extractors, whose rejections are problems in our format.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{Uri, header, request::Parts};
use serde::de::DeserializeOwned;

use super::error::{ApiError, ProblemItem};

/// A JSON body. Not JSON → 415; too large → 413; broken JSON → 400; JSON of
/// the wrong shape (missing or unknown fields, wrong types) → 422 naming the
/// field.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType(
                "the body must be JSON (Content-Type: application/json)".into(),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(body_error)?;
        parse_json(&bytes).map(ApiJson)
    }
}

fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn body_error(rejection: BytesRejection) -> ApiError {
    let text = rejection.body_text();
    if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge("the request body is larger than allowed".into())
    } else {
        ApiError::BadRequest(format!("could not read the request body: {text}"))
    }
}

/// Parses JSON, telling broken syntax (400) from a wrong shape (422).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let field = if path == "." { None } else { Some(path) };
                ApiError::invalid(vec![ProblemItem {
                    field,
                    index: None,
                    message: strip_position(&inner.to_string()),
                }])
            }
            _ => ApiError::BadRequest(format!("malformed JSON: {inner}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// serde_json appends " at line 1 column 7" to data errors; the field path
/// says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// A path parameter; a malformed one (say, an id that is not a UUID) is a
/// 400 problem.
#[derive(Debug, Clone)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e: PathRejection| {
                ApiError::BadRequest(format!("bad path: {}", e.body_text()))
            })
    }
}

/// The query string as name/value pairs, for handlers that check every
/// parameter themselves (repeated keys, unknown names → 400).
#[derive(Debug, Clone, Default)]
pub struct QueryPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(QueryPairs::from_uri(&parts.uri))
    }
}

fn form_urlencoded_pairs(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

impl QueryPairs {
    /// The pairs of `uri`'s query string.
    pub fn from_uri(uri: &Uri) -> Self {
        QueryPairs(form_urlencoded_pairs(uri.query().unwrap_or("")))
    }

    /// Fails with 400 on any parameter not in `allowed`, so typos surface.
    pub fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        match self.0.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            Some((k, _)) => Err(ApiError::BadRequest(format!(
                "unknown query parameter {k:?}; allowed: {}",
                allowed.join(", ")
            ))),
            None => Ok(()),
        }
    }

    /// The single value of `name`; 400 when it is given twice.
    pub fn one(&self, name: &str) -> Result<Option<&str>, ApiError> {
        let mut values = self
            .0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str());
        let first = values.next();
        if values.next().is_some() {
            return Err(ApiError::BadRequest(format!(
                "query parameter {name:?} given more than once"
            )));
        }
        Ok(first)
    }

    /// Every value of a repeatable parameter.
    pub fn all(&self, name: &str) -> impl Iterator<Item = &str> {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A parsed single value; 400 naming the parameter when it does not parse.
    pub fn parse<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, ApiError> {
        self.one(name)?
            .map(|v| {
                v.parse::<T>().map_err(|_| {
                    ApiError::BadRequest(format!("query parameter {name:?} is not valid: {v:?}"))
                })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
    }

    #[test]
    fn syntax_is_400_and_shape_is_422() {
        assert!(matches!(
            parse_json::<Body>(b"{\"name\":"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            parse_json::<Body>(b"{\"name\":\"a\"} x"),
            Err(ApiError::BadRequest(_))
        ));
        match parse_json::<Body>(b"{\"name\": 5}") {
            Err(ApiError::Validation { errors, .. }) => {
                assert_eq!(errors[0].field.as_deref(), Some("name"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_json::<Body>(b"{\"name\":\"x\",\"y\":1}"),
            Err(ApiError::Validation { .. })
        ));
    }

    #[test]
    fn query_decoding() {
        let pairs = form_urlencoded_pairs("q=a+b%21&tag=env%3Aprod&bad=%zz&x");
        assert_eq!(pairs[0], ("q".into(), "a b!".into()));
        assert_eq!(pairs[1], ("tag".into(), "env:prod".into()));
        assert_eq!(pairs[2], ("bad".into(), "%zz".into()));
        assert_eq!(pairs[3], ("x".into(), "".into()));
    }
}
