//! Parsing a request body's fields into the domain's validated types,
//! collecting every field's verdict so one 422 lists all that is wrong.

use events::FieldError;
use infra::http::ApiError;

/// Every bad field of one body, in the order they were checked.
#[derive(Default)]
pub(crate) struct Verdicts(Vec<FieldError>);

impl Verdicts {
    pub(crate) fn check<T>(&mut self, r: Result<T, FieldError>) -> Option<T> {
        r.map_err(|e| self.0.push(e)).ok()
    }

    /// Parses a field the body must give.
    pub(crate) fn required<R, T>(
        &mut self,
        field: &str,
        v: Option<R>,
        parse: impl FnOnce(R) -> Result<T, FieldError>,
    ) -> Option<T> {
        if v.is_none() {
            self.0.push(FieldError::new(field, "is required"));
        }
        self.optional(v, parse)
    }

    /// Parses a field that takes `default` when absent.
    pub(crate) fn defaulted<R, T>(
        &mut self,
        v: Option<R>,
        default: impl FnOnce() -> T,
        parse: impl FnOnce(R) -> Result<T, FieldError>,
    ) -> Option<T> {
        match v {
            Some(raw) => self.check(parse(raw)),
            None => Some(default()),
        }
    }

    /// Parses an optional field: absent stays absent.
    pub(crate) fn optional<R, T>(
        &mut self,
        v: Option<R>,
        parse: impl FnOnce(R) -> Result<T, FieldError>,
    ) -> Option<T> {
        v.and_then(|raw| self.check(parse(raw)))
    }

    /// The resource a create body describes, once every field passed.
    /// `build` finds each parsed field `Some`: every `None` left a verdict.
    pub(crate) fn created<T>(
        self,
        build: impl FnOnce() -> Option<T>,
    ) -> Result<T, Vec<FieldError>> {
        if !self.0.is_empty() {
            return Err(self.0);
        }
        build().ok_or(self.0)
    }

    /// The changes an update body asks for, once every field passed. A body
    /// that changes nothing is refused too, naming the `fields` it may give.
    pub(crate) fn changes<C: Default + PartialEq>(
        self,
        changes: C,
        fields: &str,
    ) -> Result<C, Vec<FieldError>> {
        if !self.0.is_empty() {
            return Err(self.0);
        }
        if changes == C::default() {
            return Err(vec![FieldError::new(
                "body",
                format!("give at least one of {fields}"),
            )]);
        }
        Ok(changes)
    }
}

/// Field errors as a 422.
pub(crate) fn invalid(errors: Vec<FieldError>) -> ApiError {
    ApiError::invalid(errors.into_iter().map(Into::into).collect())
}
