//! Reading the `config.json` files of diffusers and transformers the way those libraries read
//! them, for every component sdcam loads (U-Net, VAE, tiny VAE, text encoder, scheduler).
//!
//! The rules, one implementation for all components ([`parse`], [`load`]):
//! * **`null` is the library default.** diffusers passes a `null` value to the component's
//!   `__init__` as `None`, which for nearly every key means "the default" (`upcast_attention:
//!   null` behaves as `false`). Two kinds of key differ and are listed by the component:
//!   keys whose `None` means something of its own (the U-Net's `mid_block_type: null` = no mid
//!   block; [`ComponentConfig::NULL_IS_A_VALUE`], kept as `None` for its check to judge), and
//!   booleans whose default is `true`, where `None` is falsy in Python's `if use_quant_conv:`
//!   ([`ComponentConfig::NULL_IS_FALSE`], read as `false`).
//! * **Absent keys take the library default** (`#[serde(default)]` on every field: SD 1.5's
//!   U-Net config has 19 keys, its VAE no `scaling_factor`).
//! * **Unknown keys are ignored**, and logged at debug level (files written by newer diffusers
//!   carry keys sdcam has no use for, e.g. `_use_default_values`, `timestep_spacing`).
//! * **Only a value that changes the computation and is not implemented is refused**
//!   ([`ComponentConfig::check`]), naming the file, the key and the value.
//!
//! Why not plain `serde_json::from_str`: serde rejects `null` for a non-`Option` field and knows
//! nothing of per-library defaults for `null`; `serde_ignored` (dtolnay) reports unknown keys and
//! `serde_path_to_error` names the key of a value of the wrong type.

use std::path::Path;

use anyhow::{Context as _, Result};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// A value in a config file that sdcam does not implement.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("key `{key}` = {value}: {reason}")]
pub struct Unsupported {
    /// The config key, e.g. `mid_block_type`.
    pub(crate) key: String,
    /// The value as JSON, e.g. `null` or `"UNetMidBlock2DSimpleCrossAttn"` (at most 80
    /// characters).
    pub(crate) value: String,
    /// What is supported instead, or what is missing.
    pub(crate) reason: String,
}

impl Unsupported {
    /// `key` = `value` (written as JSON) is not supported because `reason`.
    pub(crate) fn new(key: &str, value: impl serde::Serialize, reason: impl Into<String>) -> Self {
        let mut value =
            serde_json::to_string(&value).unwrap_or_else(|_| "(unprintable)".to_string());
        if value.chars().count() > 80 {
            value = value.chars().take(79).collect::<String>() + "…";
        }
        Self {
            key: key.to_string(),
            value,
            reason: reason.into(),
        }
    }
}

/// `Err(Unsupported)` when `cond` holds.
pub(crate) fn refuse_if(
    cond: bool,
    key: &str,
    value: impl serde::Serialize,
    reason: impl Into<String>,
) -> std::result::Result<(), Unsupported> {
    if cond {
        Err(Unsupported::new(key, value, reason))
    } else {
        Ok(())
    }
}

/// `Err(Unsupported)` unless `value` is a finite number above zero (scales, factors).
pub(crate) fn refuse_unless_positive(
    key: &str,
    value: f64,
) -> std::result::Result<(), Unsupported> {
    refuse_if(
        !(value.is_finite() && value > 0.0),
        key,
        value,
        "must be a positive number",
    )
}

/// A component config read from a diffusers/transformers `config.json`.
pub trait ComponentConfig: DeserializeOwned {
    /// What the file configures, for messages (`"U-Net"`, `"CLIP text encoder"`).
    const KIND: &'static str;

    /// Keys whose `null` is not the default but a value of its own (kept as `None`).
    const NULL_IS_A_VALUE: &'static [&'static str] = &[];

    /// Booleans that default to `true` but that the library tests for truth, so `null` = false.
    const NULL_IS_FALSE: &'static [&'static str] = &[];

    /// Rewrites the parsed JSON object before deserialisation where the library does (e.g.
    /// transformers takes `text_config` out of a full CLIP config). Default: unchanged.
    fn preprocess(object: Map<String, Value>) -> Map<String, Value> {
        object
    }

    /// Refuses values that change the computation and are not implemented.
    ///
    /// # Errors
    /// The first unsupported key, with its value and what is implemented instead.
    fn check(&self) -> std::result::Result<(), Unsupported>;
}

/// Parses config text (`source` names it in messages: a path or `"embedded sd-turbo unet"`)
/// the way diffusers/transformers read a `config.json`: absent or `null` keys take the library
/// default, unknown keys are logged at debug level and ignored.
///
/// # Errors
/// The text is not a JSON object, a key has the wrong type (named by its path), or
/// [`ComponentConfig::check`] refuses a value.
pub fn parse<T: ComponentConfig>(text: &str, source: &str) -> Result<T> {
    let value: Value = serde_json::from_str(text)
        .with_context(|| format!("{source}: not valid JSON (a {} config.json)", T::KIND))?;
    let Value::Object(object) = value else {
        anyhow::bail!(
            "{source}: expected a JSON object (a {} config.json), found {}",
            T::KIND,
            json_kind(&value)
        );
    };
    let object: Map<String, Value> = T::preprocess(object)
        .into_iter()
        .filter_map(|(k, v)| match v {
            Value::Null if T::NULL_IS_FALSE.contains(&k.as_str()) => Some((k, Value::Bool(false))),
            Value::Null if !T::NULL_IS_A_VALUE.contains(&k.as_str()) => None,
            v => Some((k, v)),
        })
        .collect();
    let mut ignored = Vec::new();
    let cfg: T = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
        Value::Object(object),
        &mut |path: serde_ignored::Path| ignored.push(path.to_string()),
    ))
    .map_err(|e| {
        anyhow::anyhow!(
            "{source}: reading the {} config: key `{}`: {}",
            T::KIND,
            e.path(),
            e.inner()
        )
    })?;
    if !ignored.is_empty() {
        tracing::debug!(
            "{source}: {} key(s) sdcam does not use, ignored: {}",
            ignored.len(),
            ignored.join(", ")
        );
    }
    cfg.check()
        .map_err(|u| anyhow::anyhow!("{source}: unsupported {} configuration: {u}", T::KIND))?;
    Ok(cfg)
}

/// Reads and parses a config file ([`parse`]); errors name the file.
///
/// # Errors
/// The file cannot be read, or [`parse`] fails.
pub fn load<T: ComponentConfig>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the {} config {}", T::KIND, path.display()))?;
    parse(&text, &path.display().to_string())
}

/// A config value that diffusers accepts either as one value or as a per-block list
/// (`attention_head_dim: 8` or `[5, 10, 20, 20]`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// One value for every block.
    One(T),
    /// One value per block, in block order.
    Many(Vec<T>),
}

impl<'de, T: DeserializeOwned> serde::Deserialize<'de> for OneOrMany<T> {
    /// One `T` or a list of them; the error names the value and what was expected (serde's
    /// untagged enums say only "did not match any variant").
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let v = Value::deserialize(d)?;
        let what = std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("value");
        let fail = |v: &Value| {
            let mut s = v.to_string();
            if s.len() > 80 {
                s = s.chars().take(79).collect::<String>() + "…";
            }
            D::Error::custom(format!("expected a {what} or a list of them, got {s}"))
        };
        match &v {
            Value::Array(items) => items
                .iter()
                .map(|i| serde_json::from_value(i.clone()).map_err(|_| fail(&v)))
                .collect::<std::result::Result<Vec<T>, _>>()
                .map(OneOrMany::Many),
            _ => serde_json::from_value(v.clone())
                .map(OneOrMany::One)
                .map_err(|_| fail(&v)),
        }
    }
}

impl<T: Clone> OneOrMany<T> {
    /// The list length, `None` for a single value.
    pub(crate) fn list_len(&self) -> Option<usize> {
        match self {
            OneOrMany::One(_) => None,
            OneOrMany::Many(v) => Some(v.len()),
        }
    }

    /// The per-block list for `n` blocks (a single value is repeated).
    pub(crate) fn per_block(&self, n: usize, name: &str) -> candle_core::Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Ok(v.clone()),
            OneOrMany::Many(v) => candle_core::bail!(
                "unet config: `{name}` has {} entries, expected {n} (one per down block)",
                v.len()
            ),
        }
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn d_mid() -> Option<String> {
        Some("Mid".into())
    }
    fn d_seven() -> u32 {
        7
    }

    #[derive(Debug, Deserialize)]
    struct Demo {
        #[serde(default)]
        flag: bool,
        #[serde(default = "d_seven")]
        n: u32,
        #[serde(default = "d_mid")]
        mid: Option<String>,
    }

    impl ComponentConfig for Demo {
        const KIND: &'static str = "demo";
        const NULL_IS_A_VALUE: &'static [&'static str] = &["mid"];
        fn check(&self) -> std::result::Result<(), Unsupported> {
            refuse_if(self.n == 13, "n", self.n, "13 is not implemented")
        }
    }

    #[test]
    fn null_is_the_default_absent_is_the_default_unknown_is_ignored() {
        let d: Demo = parse(r#"{"flag": null, "n": null, "other": [1, {"x": 2}]}"#, "t").unwrap();
        assert_eq!((d.flag, d.n, d.mid.as_deref()), (false, 7, Some("Mid")));
        let d: Demo = parse("{}", "t").unwrap();
        assert_eq!((d.flag, d.n), (false, 7));
        // A key whose null means "none".
        let d: Demo = parse(r#"{"mid": null}"#, "t").unwrap();
        assert_eq!(d.mid, None);
    }

    #[test]
    fn refusals_name_the_file_key_and_value() {
        let e = parse::<Demo>(r#"{"n": 13}"#, "some/config.json").unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("some/config.json"), "{msg}");
        assert!(msg.contains("`n` = 13"), "{msg}");
        // A wrong type is still an error, with the file named.
        let e = parse::<Demo>(r#"{"n": "x"}"#, "some/config.json").unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("some/config.json") && msg.contains("key `n`"),
            "{msg}"
        );
        let e = parse::<Demo>("[1]", "f.json").unwrap_err();
        assert!(format!("{e:#}").contains("found an array"), "{e:#}");
    }
}
