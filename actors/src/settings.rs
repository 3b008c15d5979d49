//! Layered configuration loading with the `config` crate: a TOML file under `configs/` (or the embedded
//! tiny default), then `DEEM_<SECTION>__<KEY>` environment variables, then `--set key=value` flags —
//! later layers win. Every value remembers where it came from, so each error names the file, variable or
//! flag, the dotted key path and what was expected.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use config::{Config, Map, Source, Value, ValueKind};
use deem::config::DeemConfig;

/// The configuration compiled into the binary: `configs/tiny.toml`.
pub const EMBEDDED_TINY: &str = include_str!("../../configs/tiny.toml");
/// How the embedded default is named in messages.
pub const EMBEDDED_TINY_NAME: &str = "configs/tiny.toml (embedded default)";
/// Environment variables carrying config keys: `DEEM_` + key path with `__` between the parts.
pub const ENV_PREFIX: &str = "DEEM_";
const ENV_SEPARATOR: &str = "__";

/// One problem found while loading: where the value came from, its key path, and what was expected.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub origin: String,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.origin, self.message)
        } else {
            write!(f, "{}: {}: {}", self.origin, self.key, self.message)
        }
    }
}

/// Every problem of a configuration, one per line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.problems.iter().map(Problem::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl ConfigError {
    fn one(origin: impl Into<String>, key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem {
                origin: origin.into(),
                key: key.into(),
                message: message.into(),
            }],
        }
    }
}

/// Where the base file comes from.
#[derive(Debug, Clone)]
pub enum BaseFile<'a> {
    Path(&'a Path),
    Embedded { name: &'a str, text: &'a str },
}

/// The inputs of one load: base file, environment (already filtered or the whole process environment)
/// and `--set` flags, in increasing precedence.
#[derive(Debug, Clone)]
pub struct Layers<'a> {
    pub base: BaseFile<'a>,
    pub env: Vec<(String, String)>,
    pub overrides: Vec<String>,
}

/// A validated configuration and the merged source tree it came from (for origins).
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: DeemConfig,
    /// How the base file is named in messages.
    pub base_origin: String,
    merged: Config,
}

impl LoadedConfig {
    /// Where the value at `key` (dotted path) came from: the file, `environment variable …` or `--set …`.
    pub fn origin_of(&self, key: &str) -> String {
        origin_in(&self.merged, &self.base_origin, key)
    }
}

/// The origin of the value at `key`: its own, else the first among the values inside it (a table made
/// implicitly by `--set a.b=1` has none of its own), else that of the nearest enclosing value.
fn origin_in(merged: &Config, base_origin: &str, key: &str) -> String {
    fn inner(v: &Value) -> Option<String> {
        if let Some(o) = v.origin() {
            return Some(o.to_string());
        }
        match &v.kind {
            ValueKind::Table(t) => t.values().find_map(inner),
            ValueKind::Array(a) => a.iter().find_map(inner),
            _ => None,
        }
    }
    let mut path: Vec<&Value> = vec![&merged.cache];
    for part in key_parts(key) {
        let next = match (&path[path.len() - 1].kind, part) {
            (ValueKind::Table(t), KeyPart::Field(f)) => t.get(f),
            (ValueKind::Array(a), KeyPart::Index(i)) => a.get(i),
            _ => None,
        };
        match next {
            Some(v) => path.push(v),
            None => break,
        }
    }
    let found = path.iter().rev().enumerate().find_map(|(depth, v)| {
        // Descend only into the addressed value itself; above it, only the value's own origin counts.
        if depth == 0 {
            inner(v)
        } else {
            v.origin().map(str::to_string)
        }
    });
    found.unwrap_or_else(|| base_origin.to_string())
}

enum KeyPart<'a> {
    Field(&'a str),
    Index(usize),
}

/// `a.b[2].c` → `a`, `b`, 2, `c`.
fn key_parts(key: &str) -> Vec<KeyPart<'_>> {
    let mut parts = Vec::new();
    for seg in key.split('.').filter(|s| !s.is_empty()) {
        let (name, mut rest) = seg.split_once('[').map_or((seg, ""), |(n, r)| (n, r));
        if !name.is_empty() {
            parts.push(KeyPart::Field(name));
        }
        while let Some((idx, after)) = rest.split_once(']') {
            if let Ok(i) = idx.parse() {
                parts.push(KeyPart::Index(i));
            }
            rest = after.trim_start_matches('[');
        }
    }
    parts
}

/// A `config` source made of values that already carry their origin.
#[derive(Debug, Clone)]
struct Layer(Vec<(String, Value)>);

impl Source for Layer {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        Ok(self.0.iter().cloned().collect())
    }
}

fn to_value(v: toml::Value, origin: &String) -> Value {
    let kind = match v {
        toml::Value::String(s) => ValueKind::String(s),
        toml::Value::Integer(i) => ValueKind::I64(i),
        toml::Value::Float(f) => ValueKind::Float(f),
        toml::Value::Boolean(b) => ValueKind::Boolean(b),
        toml::Value::Datetime(d) => ValueKind::String(d.to_string()),
        toml::Value::Array(a) => {
            ValueKind::Array(a.into_iter().map(|x| to_value(x, origin)).collect())
        }
        toml::Value::Table(t) => ValueKind::Table(
            t.into_iter()
                .map(|(k, x)| (k, to_value(x, origin)))
                .collect(),
        ),
    };
    Value::new(Some(origin), kind)
}

/// A scalar or array written on the command line or in a variable: a TOML literal where it parses as
/// one (`1e-4`, `true`, `[1, 2]`, `"x"`), otherwise the raw text as a string.
fn parse_literal(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
}

fn base_layer(base: &BaseFile<'_>) -> Result<(String, Layer), ConfigError> {
    let (origin, text) = match base {
        BaseFile::Path(p) => {
            let origin = p.display().to_string();
            let text = std::fs::read_to_string(p).map_err(|e| {
                ConfigError::one(&origin, "", format!("cannot read the config file: {e}"))
            })?;
            (origin, text)
        }
        BaseFile::Embedded { name, text } => (name.to_string(), text.to_string()),
    };
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let msg = e.to_string().trim_end().replace('\n', "\n    ");
        ConfigError::one(&origin, "", format!("invalid TOML: {msg}"))
    })?;
    let entries = table
        .into_iter()
        .map(|(k, v)| (k, to_value(v, &origin)))
        .collect();
    Ok((origin, Layer(entries)))
}

fn env_layer(env: &[(String, String)]) -> Result<Layer, ConfigError> {
    let mut entries = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        // Variables without `__` are the CLI's own (`DEEM_CONFIG`, `DEEM_LOG`, …), not config keys.
        if !rest.contains(ENV_SEPARATOR) {
            continue;
        }
        let origin = format!("environment variable {name}");
        let key = rest.to_ascii_lowercase().replace(ENV_SEPARATOR, ".");
        if !valid_key(&key) {
            return Err(ConfigError::one(
                origin,
                "",
                "expected DEEM_<SECTION>__<KEY> with letters, digits and single underscores in each part",
            ));
        }
        entries.push((key, to_value(parse_literal(value), &origin)));
    }
    Ok(Layer(entries))
}

fn override_layer(overrides: &[String]) -> Result<Layer, ConfigError> {
    let mut entries = Vec::new();
    for arg in overrides {
        let Some((key, value)) = arg.split_once('=') else {
            return Err(ConfigError::one(
                format!("--set {arg}"),
                "",
                "expected KEY=VALUE, e.g. --set train.lr=1e-4",
            ));
        };
        let key = key.trim();
        let origin = format!("--set {key}");
        if !valid_key(key) {
            return Err(ConfigError::one(
                origin,
                "",
                "expected a dotted key of lowercase names, e.g. train.lr or diffusion.unet.layers_per_block",
            ));
        }
        entries.push((
            key.to_string(),
            to_value(parse_literal(value.trim()), &origin),
        ));
    }
    Ok(Layer(entries))
}

/// The key path and message of a deserialization error at `path` (`serde_path_to_error`'s rendering,
/// `.` for the root). serde and the `config` crate report a missing field at its parent; the field is
/// moved into the key path.
pub(crate) fn serde_problem(path: &str, message: &str) -> (String, String) {
    let parent = if path == "." { "" } else { path };
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|m| m.strip_suffix('`'))
        .map(|field| {
            if parent.is_empty() {
                field.to_string()
            } else {
                format!("{parent}.{field}")
            }
        })
        .or_else(|| {
            // `config`: missing configuration field "train.seed"
            message
                .strip_prefix("missing configuration field \"")
                .and_then(|m| m.strip_suffix('"'))
                .map(str::to_string)
        });
    match missing {
        Some(key) => (key, "missing; every key must be set".to_string()),
        None => (parent.to_string(), message.to_string()),
    }
}

fn describe(err: &config::ConfigError) -> String {
    match err {
        config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!("expected {expected}, found {unexpected}"),
        config::ConfigError::At { error, .. } => describe(error),
        other => other.to_string(),
    }
}

fn to_toml_value(v: &Value) -> toml::Value {
    match &v.kind {
        ValueKind::Nil => toml::Value::String(String::new()),
        ValueKind::Boolean(b) => toml::Value::Boolean(*b),
        ValueKind::I64(i) => toml::Value::Integer(*i),
        ValueKind::I128(i) => toml::Value::Integer(*i as i64),
        ValueKind::U64(u) => toml::Value::Integer(*u as i64),
        ValueKind::U128(u) => toml::Value::Integer(*u as i64),
        ValueKind::Float(f) => toml::Value::Float(*f),
        ValueKind::String(s) => toml::Value::String(s.clone()),
        ValueKind::Table(t) => toml::Value::Table(
            t.iter()
                .map(|(k, x)| (k.clone(), to_toml_value(x)))
                .collect(),
        ),
        ValueKind::Array(a) => toml::Value::Array(a.iter().map(to_toml_value).collect()),
    }
}

/// Loads, merges and validates a configuration.
pub fn load(layers: &Layers<'_>) -> Result<LoadedConfig, ConfigError> {
    let (base_origin, base) = base_layer(&layers.base)?;
    let merged = Config::builder()
        .add_source(base)
        .add_source(env_layer(&layers.env)?)
        .add_source(override_layer(&layers.overrides)?)
        .build()
        .map_err(|e| ConfigError::one(&base_origin, "", describe(&e)))?;

    let origin_of = |key: &str| origin_in(&merged, &base_origin, key);

    // serde's own messages ("unknown variant `IV`, expected one of …") are clearer than the `config`
    // crate's deserializer's, so the merged tree is deserialized as a TOML value.
    let config: DeemConfig = serde_path_to_error::deserialize(to_toml_value(&merged.cache))
        .map_err(|e| {
            let (key, message) = serde_problem(&e.path().to_string(), e.inner().message());
            ConfigError::one(origin_of(&key), key, message)
        })?;

    let issues = config.validate();
    if !issues.is_empty() {
        let problems = issues
            .into_iter()
            .map(|i| Problem {
                origin: origin_of(&i.key),
                key: i.key,
                message: i.message,
            })
            .collect();
        return Err(ConfigError { problems });
    }
    Ok(LoadedConfig {
        config,
        base_origin,
        merged,
    })
}

/// The process environment's `DEEM_*` variables, sorted by name (deterministic layering order).
pub fn process_env() -> Vec<(String, String)> {
    let vars: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.into_iter().collect()
}

/// The resolved configuration as TOML, with each section's values in declaration order.
pub fn to_toml(cfg: &DeemConfig) -> String {
    toml::to_string(cfg).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
}
