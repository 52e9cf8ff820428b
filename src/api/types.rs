//! Small OpenAPI types poem-openapi lacks.
//!
//! - [`Text`]: a JSON string, strictly: poem-openapi's `String` also accepts numbers and
//!   booleans (`{"user_id": 42}` would become `"42"`), which hides client bugs.
//! - [`JsonObject`]: a free-form JSON object with key order kept as sent. poem-openapi has no
//!   type for `serde_json::Map`; `HashMap` would reorder keys, and clients rightly expect
//!   their `metadata` back exactly as they wrote it.
//! - [`Timestamp`]: RFC 3339 in UTC with milliseconds (`2026-11-26T22:49:56.123Z`), the one
//!   format every response uses, whichever database stored the value.
//! - [`RuledText`]: a string whose schema states the rule (lengths, pattern) the domain's
//!   validator enforces, so a schema-driven client knows what is accepted; the validator
//!   still does the checking, with errors that name the field.
//! - [`Day`]: a `YYYY-MM-DD` query parameter whose schema has the pattern the parser
//!   enforces (`format: date` alone lets schema-driven clients send an empty string).
//! - [`Real`], [`Whole`] and [`StopList`]: generation settings whose bounds, in the schema
//!   and when parsed, are the ones `domain::generation` declares (poem-openapi's validator
//!   attributes take only literals, which would be a second copy of each bound).

use std::borrow::Cow;
use std::marker::PhantomData;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use poem_openapi::registry::{MetaSchema, MetaSchemaRef, Registry};
use poem_openapi::types::{
    ParseError, ParseFromJSON, ParseFromParameter, ParseResult, ToJSON, Type,
};
use serde_json::{Map, Value};

use crate::domain::generation::{self, FloatBound, IntBound};
use confab_protocol::limits;

/// The `Type` methods of a type that is its own raw value.
macro_rules! raw_value {
    () => {
        fn register(_registry: &mut Registry) {}

        fn as_raw_value(&self) -> Option<&Self::RawValueType> {
            Some(self)
        }

        fn raw_element_iter<'a>(
            &'a self,
        ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
            Box::new(std::iter::once(self))
        }
    };
}

/// Any JSON object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JsonObject(pub Map<String, Value>);

impl Type for JsonObject {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "object".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            additional_properties: Some(Box::new(MetaSchemaRef::Inline(Box::new(MetaSchema::ANY)))),
            ..MetaSchema::new("object")
        }))
    }

    raw_value!();
}

impl ParseFromJSON for JsonObject {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::Object(m) => Ok(JsonObject(m)),
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl ToJSON for JsonObject {
    fn to_json(&self) -> Option<Value> {
        Some(Value::Object(self.0.clone()))
    }
}

/// A JSON string; numbers, booleans and other types are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(pub String);

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Type for Text {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "string".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            pattern: Some(limits::NO_NUL_PATTERN.into()),
            ..MetaSchema::new("string")
        }))
    }

    raw_value!();
}

impl ParseFromJSON for Text {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::String(s) => Ok(Text(s)),
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl ToJSON for Text {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.clone()))
    }
}

/// A UTC instant, written as RFC 3339 with milliseconds and a `Z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub DateTime<Utc>);

impl Timestamp {
    pub fn to_rfc3339(&self) -> String {
        self.0.to_rfc3339_opts(SecondsFormat::Millis, true)
    }
}

impl From<DateTime<Utc>> for Timestamp {
    fn from(t: DateTime<Utc>) -> Self {
        Timestamp(t)
    }
}

impl Type for Timestamp {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "string_date-time".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema::new_with_format("string", "date-time")))
    }

    raw_value!();
}

impl ParseFromJSON for Timestamp {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::String(s) => DateTime::parse_from_rfc3339(&s)
                .map(|t| Timestamp(t.with_timezone(&Utc)))
                .map_err(|e| ParseError::custom(format!("not an RFC 3339 timestamp: {e}"))),
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl ToJSON for Timestamp {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.to_rfc3339()))
    }
}

/// What a text field accepts: lengths in characters and a pattern.
pub trait TextRule: Send + Sync + 'static {
    const NAME: &'static str;
    const MIN_CHARS: usize;
    const MAX_CHARS: usize;
    const PATTERN: &'static str;
}

/// User ids (`domain::validate_user_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserIdRule;

impl TextRule for UserIdRule {
    const NAME: &'static str = "user_id";
    const MIN_CHARS: usize = 1;
    const MAX_CHARS: usize = limits::MAX_USER_ID_CHARS;
    const PATTERN: &'static str = limits::USER_ID_PATTERN;
}

/// Tenant names (`store::validate_tenant_name`); as a path parameter, a tenant's id fits
/// the same pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantNameRule;

impl TextRule for TenantNameRule {
    const NAME: &'static str = "tenant";
    const MIN_CHARS: usize = 1;
    const MAX_CHARS: usize = 64;
    const PATTERN: &'static str = "^[A-Za-z0-9._-]{1,64}$";
}

/// Key names (`store::KeySpec::validate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyNameRule;

impl TextRule for KeyNameRule {
    const NAME: &'static str = "key_name";
    const MIN_CHARS: usize = 1;
    const MAX_CHARS: usize = crate::store::MAX_KEY_NAME_CHARS;
    const PATTERN: &'static str = limits::TITLE_PATTERN;
}

/// Names of JSON Schemas in a `response_format` (`domain::validate_schema_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaNameRule;

impl TextRule for SchemaNameRule {
    const NAME: &'static str = "schema_name";
    const MIN_CHARS: usize = 1;
    const MAX_CHARS: usize = 64;
    const PATTERN: &'static str = crate::domain::SCHEMA_NAME_PATTERN;
}

/// Chat titles (`domain::validate_title`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TitleRule;

impl TextRule for TitleRule {
    const NAME: &'static str = "title";
    const MIN_CHARS: usize = 0;
    const MAX_CHARS: usize = limits::MAX_TITLE_CHARS;
    const PATTERN: &'static str = limits::TITLE_PATTERN;
}

/// A JSON string (or path parameter) whose schema states `R`. Any string parses: the handler
/// checks it with the domain's validator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuledText<R>(pub String, PhantomData<R>);

impl<R> RuledText<R> {
    pub fn new(s: String) -> Self {
        RuledText(s, PhantomData)
    }
}

impl<R: TextRule + Clone + std::fmt::Debug> Type for RuledText<R> {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        format!("string_{}", R::NAME).into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            min_length: (R::MIN_CHARS > 0).then_some(R::MIN_CHARS),
            max_length: Some(R::MAX_CHARS),
            pattern: Some(R::PATTERN.into()),
            ..MetaSchema::new("string")
        }))
    }

    raw_value!();
}

impl<R: TextRule + Clone + std::fmt::Debug> ParseFromJSON for RuledText<R> {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::String(s) => Ok(RuledText::new(s)),
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl<R: TextRule + Clone + std::fmt::Debug> ParseFromParameter for RuledText<R> {
    fn parse_from_parameter(value: &str) -> ParseResult<Self> {
        Ok(RuledText::new(value.to_string()))
    }
}

impl<R: TextRule + Clone + std::fmt::Debug> ToJSON for RuledText<R> {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.clone()))
    }
}

/// A calendar day, `YYYY-MM-DD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Day(pub NaiveDate);

impl Type for Day {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "string_day".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            pattern: Some("^[0-9]{4}-[0-9]{2}-[0-9]{2}$".into()),
            ..MetaSchema::new_with_format("string", "date")
        }))
    }

    raw_value!();
}

impl ParseFromParameter for Day {
    fn parse_from_parameter(value: &str) -> ParseResult<Self> {
        NaiveDate::parse_from_str(value, "%Y-%m-%d")
            .map(Day)
            .map_err(|e| ParseError::custom(format!("not a YYYY-MM-DD date: {e}")))
    }
}

/// A real-valued generation setting: which one, and its bounds.
pub trait RealSetting: Send + Sync + 'static {
    const NAME: &'static str;
    const BOUND: FloatBound;
}

/// A whole-number generation setting: which one, and its bounds.
pub trait WholeSetting: Send + Sync + 'static {
    const NAME: &'static str;
    const BOUND: IntBound;
}

macro_rules! settings {
    ($($kind:ident $bound_ty:ident $name:ident($field:literal) = $bound:path;)*) => {$(
        #[doc = concat!("The `", $field, "` setting.")]
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub struct $name;
        impl $kind for $name {
            const NAME: &'static str = $field;
            const BOUND: $bound_ty = $bound;
        }
    )*};
}

settings! {
    RealSetting FloatBound Temperature("temperature") = generation::TEMPERATURE;
    RealSetting FloatBound TopP("top_p") = generation::TOP_P;
    RealSetting FloatBound RepeatPenalty("repeat_penalty") = generation::REPEAT_PENALTY;
    WholeSetting IntBound TopK("top_k") = generation::TOP_K;
    WholeSetting IntBound MaxTokens("max_tokens") = generation::MAX_TOKENS;
}

/// A number within `S`'s bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Real<S>(pub f64, PhantomData<S>);

impl<S> Real<S> {
    pub fn new(v: f64) -> Self {
        Real(v, PhantomData)
    }
}

/// A whole number within `S`'s bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Whole<S>(pub u32, PhantomData<S>);

impl<S> Whole<S> {
    pub fn new(v: u32) -> Self {
        Whole(v, PhantomData)
    }
}

impl<S: RealSetting + Clone + std::fmt::Debug> Type for Real<S> {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        format!("number_{}", S::NAME).into()
    }

    fn schema_ref() -> MetaSchemaRef {
        let b = S::BOUND;
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            minimum: Some(b.min),
            exclusive_minimum: b.exclusive_min.then_some(true),
            maximum: Some(b.max),
            ..MetaSchema::new_with_format("number", "double")
        }))
    }

    raw_value!();
}

impl<S: RealSetting + Clone + std::fmt::Debug> ParseFromJSON for Real<S> {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::Number(n) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                S::BOUND
                    .check(S::NAME, x)
                    .map_err(|e| ParseError::custom(e.message))?;
                Ok(Real::new(x))
            }
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl<S: RealSetting + Clone + std::fmt::Debug> ToJSON for Real<S> {
    fn to_json(&self) -> Option<Value> {
        serde_json::Number::from_f64(self.0).map(Value::Number)
    }
}

impl<S: WholeSetting + Clone + std::fmt::Debug> Type for Whole<S> {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        format!("integer_{}", S::NAME).into()
    }

    fn schema_ref() -> MetaSchemaRef {
        let b = S::BOUND;
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            minimum: Some(b.min as f64),
            maximum: Some(b.max as f64),
            ..MetaSchema::new_with_format("integer", "uint32")
        }))
    }

    raw_value!();
}

impl<S: WholeSetting + Clone + std::fmt::Debug> ParseFromJSON for Whole<S> {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::Number(n) => {
                let Some(v) = n.as_u64() else {
                    return Err(ParseError::custom(format!(
                        "{} must be a whole number",
                        S::NAME
                    )));
                };
                S::BOUND
                    .check(S::NAME, v)
                    .map_err(|e| ParseError::custom(e.message))?;
                // The bounds of every whole-number setting lie within u32.
                Ok(Whole::new(v as u32))
            }
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl<S: WholeSetting + Clone + std::fmt::Debug> ToJSON for Whole<S> {
    fn to_json(&self) -> Option<Value> {
        Some(Value::from(self.0))
    }
}

/// A sampling seed: any whole number from 0. Its schema states no maximum: a JSON Schema
/// bound is a float, and floats cannot tell 2^64-1 from 2^64 (a client reading the schema
/// would send numbers just past the bound), so larger numbers are taken as u64::MAX
/// rather than refused; they still give the same reply for the same input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seed(pub u64);

impl Type for Seed {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "integer_seed".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            minimum: Some(0.0),
            ..MetaSchema::new_with_format("integer", "uint64")
        }))
    }

    raw_value!();
}

impl ParseFromJSON for Seed {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::Number(n) => match (n.as_u64(), n.as_f64()) {
                (Some(v), _) => Ok(Seed(v)),
                // Past u64 (serde_json reads such a number as a float).
                (None, Some(x)) if x >= 0.0 && x.fract() == 0.0 => Ok(Seed(u64::MAX)),
                _ => Err(ParseError::custom("seed must be a whole number from 0")),
            },
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl ToJSON for Seed {
    fn to_json(&self) -> Option<Value> {
        Some(Value::from(self.0))
    }
}

/// Strings that end a reply. The schema says how many and how long (`domain::generation`);
/// the parser takes any list of strings, and the chat's config checks it against the same
/// bounds, naming the item that breaks them (`config.stop[1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopList(pub Vec<String>);

impl Type for StopList {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "stop_list".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        let item = MetaSchema {
            min_length: Some(generation::STOP_CHARS.min as usize),
            max_length: Some(generation::STOP_CHARS.max as usize),
            pattern: Some(limits::NO_NUL_PATTERN.into()),
            ..MetaSchema::new("string")
        };
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            items: Some(Box::new(MetaSchemaRef::Inline(Box::new(item)))),
            max_items: Some(generation::MAX_STOP_STRINGS),
            ..MetaSchema::new("array")
        }))
    }

    raw_value!();
}

impl ParseFromJSON for StopList {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        let Value::Array(items) = value.unwrap_or_default() else {
            return Err(ParseError::custom("stop must be an array of strings"));
        };
        let stops = items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(ParseError::expected_type(other)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StopList(stops))
    }
}

impl ToJSON for StopList {
    fn to_json(&self) -> Option<Value> {
        Some(Value::from(self.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn generation_settings_parse_within_their_declared_bounds() {
        use serde_json::json;
        let real = |v: Value| Real::<TopP>::parse_from_json(Some(v)).map(|r| r.0);
        assert_eq!(real(json!(1)).ok(), Some(1.0));
        assert!(real(json!(0)).is_err() && real(json!(1.01)).is_err() && real(json!("1")).is_err());
        let whole = |v: Value| Whole::<TopK>::parse_from_json(Some(v)).map(|w| w.0);
        assert_eq!(whole(json!(40)).ok(), Some(40));
        assert!(
            whole(json!(0)).is_err() && whole(json!(1.5)).is_err() && whole(json!(-3)).is_err()
        );
        let seed = |v: Value| Seed::parse_from_json(Some(v)).map(|s| s.0);
        assert_eq!(seed(json!(u64::MAX)).ok(), Some(u64::MAX));
        assert_eq!(seed(json!(4.5e31)).ok(), Some(u64::MAX));
        assert!(seed(json!(-1)).is_err() && seed(json!(0.5)).is_err());
        let Some(MetaSchemaRef::Inline(schema)) = Some(Real::<TopP>::schema_ref()) else {
            panic!("inline schema");
        };
        assert_eq!(
            (schema.minimum, schema.exclusive_minimum, schema.maximum),
            (Some(0.0), Some(true), Some(1.0))
        );
    }

    #[test]
    fn timestamps_use_millis_and_z() {
        let t = Utc.with_ymd_and_hms(2026, 11, 26, 22, 49, 56).unwrap();
        assert_eq!(Timestamp(t).to_rfc3339(), "2026-11-26T22:49:56.000Z");
    }
}
