//! Durations in config files are human strings: `"500ms"`, `"10s"`, `"2m"`.

/// `#[serde(with = "serde_duration")]` for `std::time::Duration` fields.
pub(crate) mod serde_duration {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            D::Error::custom(format!(
                "{text:?} is not a duration ({e}); write it like \"500ms\", \"10s\" or \"2m\""
            ))
        })
    }
}
