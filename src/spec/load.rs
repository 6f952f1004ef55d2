//! Layered loading: built-in defaults < the file < `RUNNER_*` environment < `--set key=value`.
//!
//! Each section, and each head layer, is deserialized on its own so that one run reports every
//! unknown key or bad value at once, each with the file it came from and its key path.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Source};
use serde::de::DeserializeOwned;

use super::{
    HeadSpec, LayerKind, LayerSpec, OptimizerKind, OptimizerSpec, PhaseSpec, SECTIONS,
    ScheduleKind, ScheduleSpec, Spec,
};

/// One problem with a spec: where it came from, the key path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file (or `--set`, or the environment variable) the offending value came from.
    pub source: String,
    /// Key path, e.g. `head.layers[1].rate`.
    pub key: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.source, self.message)
        } else {
            write!(f, "{}: {}: {}", self.source, self.key, self.message)
        }
    }
}

/// Every problem found in one spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} problem{} in the experiment spec:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.0 {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// Errors from loading a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    // The cause is in the message (not a `source`, which `{:#}` would print a second time).
    #[error("{path}: cannot read the experiment file: {error}")]
    Read {
        /// The spec file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path}: not valid TOML: {message}")]
    Syntax {
        /// The spec file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A `--set` argument is not `key.path=value`.
    #[error("--set {0}: expected key.path=value, e.g. --set optimizer.lr=1e-4")]
    BadSet(String),
    /// An indexed `--set` (`head.layers[1].units=8`) that does not fit the spec.
    #[error("--set {set}: {why}")]
    BadSetIndex {
        /// The `--set` argument.
        set: String,
        /// Why it does not fit.
        why: IndexError,
    },
    /// Problems with keys or values.
    #[error("{0}")]
    Invalid(Problems),
}

/// A spec together with where each value came from.
#[derive(Debug)]
pub struct Loaded {
    /// The resolved spec.
    pub spec: Spec,
    /// The experiment file.
    pub file: PathBuf,
    /// The `[sweep]` point this spec is (key, value), empty outside a grid.
    pub point: Vec<(String, toml::Value)>,
    sources: Sources,
}

impl Loaded {
    /// Where the value at `key` came from (file path, environment variable or `--set`).
    pub fn source_of(&self, key: &str) -> String {
        self.sources.source_of(key)
    }

    /// A problem at `key`, attributed to the layer that set it.
    pub fn problem(&self, key: impl Into<String>, message: impl Into<String>) -> Problem {
        let key = key.into();
        Problem {
            source: self.source_of(&key),
            key,
            message: message.into(),
        }
    }
}

#[derive(Debug)]
struct Sources {
    figment: Figment,
    file: PathBuf,
    sets: Vec<String>,
    points: Vec<String>,
    /// `(key path, variable name)` of the `RUNNER_*` variables that set spec keys.
    env: Vec<(String, String)>,
}

impl Sources {
    fn source_of(&self, key: &str) -> String {
        // `--set` wins over everything, so a key under one of its paths came from it.
        let bare = strip_indices(key);
        if let Some(set) = self.sets.iter().rev().find(|s| {
            // An indexed `--set` covers that element only.
            let k = if s.contains('[') { key } else { bare.as_str() };
            k == s.as_str() || k.starts_with(&format!("{s}.")) || s.starts_with(&format!("{k}."))
        }) {
            return format!("--set {set}");
        }
        if let Some(p) = self.points.iter().find(|p| {
            bare == **p || bare.starts_with(&format!("{p}.")) || p.starts_with(&format!("{bare}."))
        }) {
            return format!("{} [sweep] {p}", self.file.display());
        }
        if let Some((_, name)) = self.env.iter().rev().find(|(k, _)| {
            bare == *k || bare.starts_with(&format!("{k}.")) || k.starts_with(&format!("{bare}."))
        }) {
            return format!("environment variable {name}");
        }
        let mut probe = bare.as_str();
        loop {
            if let Some(md) = self.figment.find_metadata(probe) {
                return match &md.source {
                    Some(Source::File(p)) => p.display().to_string(),
                    Some(Source::Custom(s)) => s.clone(),
                    _ if md.name.contains("environment") => {
                        format!(
                            "environment variable RUNNER_{}",
                            probe.to_uppercase().replace('.', "__")
                        )
                    }
                    _ => self.file.display().to_string(),
                };
            }
            match probe.rfind('.') {
                Some(i) => probe = &probe[..i],
                None => return self.file.display().to_string(),
            }
        }
    }
}

/// Why an indexed `--set` (`head.layers[1].units=8`) does not fit the spec.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// `[` without `]`.
    #[error("an index needs its closing bracket, e.g. head.layers[1].units=8")]
    Unclosed,
    /// An index that is not a number.
    #[error("the index `{0}` is not a number")]
    NotNumber(String),
    /// Two indices in one key.
    #[error("only one index per key is supported")]
    Nested,
    /// No value at the key.
    #[error("there is no array `{0}` to index")]
    Missing(String),
    /// A value that cannot be turned into TOML.
    #[error("`{array}` cannot be indexed: {error}")]
    Unindexable {
        /// The key.
        array: String,
        /// The conversion's error.
        error: toml::ser::Error,
    },
    /// A value that is not an array.
    #[error("`{0}` is not an array")]
    NotArray(String),
    /// An index past the end.
    #[error(
        "`{array}` has {len} entr{}, so indices 0 to {}",
        if *len == 1 { "y" } else { "ies" },
        len.saturating_sub(1)
    )]
    OutOfRange {
        /// The key.
        array: String,
        /// The array's length.
        len: usize,
    },
    /// A key below an entry that is not a table.
    #[error("`{array}[{index}]` has no table at `{key}`")]
    NoTable {
        /// The key.
        array: String,
        /// The index.
        index: usize,
        /// The key within the entry.
        key: String,
    },
}

/// The array at `array` as layered in `figment`, with `rest` (`1].units`: the index, then the key
/// within that element) set to `value`.
fn set_in_array(
    figment: &Figment,
    array: &str,
    rest: &str,
    value: toml::Value,
) -> Result<toml::Value, IndexError> {
    let (index, within) = rest.split_once(']').ok_or(IndexError::Unclosed)?;
    let index: usize = index
        .parse()
        .map_err(|_| IndexError::NotNumber(index.to_string()))?;
    let within = within.strip_prefix('.').unwrap_or(within);
    if within.contains('[') {
        return Err(IndexError::Nested);
    }
    let current: Value = figment
        .find_value(array)
        .map_err(|_| IndexError::Missing(array.to_string()))?;
    let mut list: toml::Value =
        toml::Value::try_from(&current).map_err(|error| IndexError::Unindexable {
            array: array.to_string(),
            error,
        })?;
    let items = list
        .as_array_mut()
        .ok_or_else(|| IndexError::NotArray(array.to_string()))?;
    let n = items.len();
    let item = items.get_mut(index).ok_or_else(|| IndexError::OutOfRange {
        array: array.to_string(),
        len: n,
    })?;
    if within.is_empty() {
        *item = value;
        return Ok(list);
    }
    let mut at = item;
    let keys: Vec<&str> = within.split('.').collect();
    for (i, k) in keys.iter().enumerate() {
        let table = at.as_table_mut().ok_or_else(|| IndexError::NoTable {
            array: array.to_string(),
            index,
            key: k.to_string(),
        })?;
        if i + 1 == keys.len() {
            table.insert(k.to_string(), value);
            break;
        }
        at = table
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    Ok(list)
}

fn strip_indices(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut depth = 0;
    for c in key.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// Parses a `--set` value as TOML (number, bool, array, inline table), else as a string.
fn parse_set_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

/// A `[sweep]` point written as `key=value` items (as a checkpoint keeps it) back as values.
pub fn parse_point(items: &[String]) -> Result<Vec<(String, toml::Value)>, SpecError> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .filter(|(k, _)| !k.trim().is_empty())
                .map(|(k, v)| (k.trim().to_string(), parse_set_value(v.trim())))
                .ok_or_else(|| SpecError::BadSet(s.clone()))
        })
        .collect()
}

/// Loads `path` with all layers and checks every key against the spec types.
pub fn load(path: &Path, sets: &[String]) -> Result<Loaded, SpecError> {
    load_with(path, sets, &[])
}

/// The most points one file's `[sweep]` grid may have.
pub const MAX_GRID_POINTS: usize = 10_000;

/// The points of the file's `[sweep]` grid: the cartesian product of its value lists, in key
/// order; one empty point without a grid.
pub fn grid(path: &Path) -> Result<Vec<Vec<(String, toml::Value)>>, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|error| SpecError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let table = toml::from_str::<toml::Table>(&text).map_err(|e| SpecError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string().trim().replace('\n', " "),
    })?;
    let Some(sweep) = table.get("sweep") else {
        return Ok(vec![Vec::new()]);
    };
    let problem = |key: String, message: String| {
        SpecError::Invalid(Problems(vec![Problem {
            source: path.display().to_string(),
            key,
            message,
        }]))
    };
    let Some(sweep) = sweep.as_table() else {
        return Err(problem(
            "sweep".into(),
            "expected a table of \"key.path\" = [values]".into(),
        ));
    };
    for key in sweep.keys() {
        let section = key.split('.').next().unwrap_or("");
        let why = if key.contains('[') {
            Some("a [sweep] key is a key path without indices; list elements can be set with --set 'head.layers[1].units=8'".to_string())
        } else if !SECTIONS.contains(&section) || key.split('.').any(str::is_empty) {
            Some(format!(
                "not a key path of the spec (section.key, e.g. \"optimizer.lr\"; sections: {})",
                SECTIONS.join(", ")
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(problem(format!("sweep.\"{key}\""), why));
        }
    }
    // Count before expanding: a grid is a product, and a few lists make millions of points.
    let sizes: Vec<usize> = sweep
        .values()
        .map(|v| v.as_array().map_or(1, |a| a.len().max(1)))
        .collect();
    let count = sizes.iter().try_fold(1usize, |a, &n| a.checked_mul(n));
    if count.is_none_or(|n| n > MAX_GRID_POINTS) {
        return Err(problem(
            "sweep".into(),
            format!(
                "a grid of {} points ({}), more than the {MAX_GRID_POINTS} one file may have; split it into several files or take fewer values",
                count.map_or("more than 2^64".to_string(), |n| n.to_string()),
                sizes
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(" x ")
            ),
        ));
    }
    let mut points: Vec<Vec<(String, toml::Value)>> = vec![Vec::new()];
    for (key, values) in sweep {
        let values = values.as_array().filter(|a| !a.is_empty()).ok_or_else(|| {
            problem(
                format!("sweep.\"{key}\""),
                format!("expected a non-empty array of values for {key}, e.g. [1e-5, 1e-4]"),
            )
        })?;
        points = points
            .into_iter()
            .flat_map(|p| {
                values.iter().map(move |v| {
                    let mut q = p.clone();
                    q.push((key.clone(), v.clone()));
                    q
                })
            })
            .collect();
    }
    Ok(points)
}

/// Like [`load`], with the values of one `[sweep]` point layered over the file (under `--set`).
pub fn load_with(
    path: &Path,
    sets: &[String],
    point: &[(String, toml::Value)],
) -> Result<Loaded, SpecError> {
    let (loaded, problems, _) = load_parts(path, sets, point)?;
    if problems.is_empty() {
        Ok(loaded)
    } else {
        Err(SpecError::Invalid(Problems(problems)))
    }
}

/// Loads like [`load_with`] and runs `check` (the plan's rules) even when some values were bad:
/// on the spec with each bad value left at its default (or a placeholder where it has none), so
/// that one pass lists every problem, the values' and the rules', as the README promises. A
/// rule's problem about a key that was already reported bad is left out (it would be about the
/// default or the placeholder, not the user's value).
pub fn load_checked<T>(
    path: &Path,
    sets: &[String],
    point: &[(String, toml::Value)],
    check: impl FnOnce(&Loaded) -> Result<T, Problems>,
) -> Result<T, SpecError> {
    let (loaded, mut problems, stand_ins) = load_parts(path, sets, point)?;
    let reported: Vec<String> = problems
        .iter()
        .map(|p| p.key.clone())
        .chain(stand_ins)
        .collect();
    let related = |a: &str, b: &str| {
        a == b
            || [".", "["].iter().any(|sep| {
                a.starts_with(&format!("{b}{sep}")) || b.starts_with(&format!("{a}{sep}"))
            })
    };
    match check(&loaded) {
        Ok(t) if problems.is_empty() => return Ok(t),
        Ok(_) => {}
        Err(Problems(more)) => problems.extend(
            more.into_iter()
                .filter(|p| !reported.iter().any(|r| related(r, &p.key))),
        ),
    }
    Err(SpecError::Invalid(Problems(problems)))
}

/// The spec with every bad value reported and left at its default (a required one replaced by a
/// placeholder), the problems, and the keys holding placeholders; an error when it cannot be made
/// whole (unreadable, not TOML, a section missing or of an unknown kind).
fn load_parts(
    path: &Path,
    sets: &[String],
    point: &[(String, toml::Value)],
) -> Result<(Loaded, Vec<Problem>, Vec<String>), SpecError> {
    let text = std::fs::read_to_string(path).map_err(|error| SpecError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    if let Err(e) = toml::from_str::<toml::Table>(&text) {
        return Err(SpecError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        });
    }

    let (env_problems, env_values) = environment();
    let (figment, set_keys) = layers(path, &env_values, point, sets)?;
    let sources = Sources {
        figment: figment.clone(),
        file: path.to_path_buf(),
        sets: set_keys,
        points: point.iter().map(|(k, _)| k.clone()).collect(),
        env: env_values
            .iter()
            .map(|(k, n, _)| (k.clone(), n.clone()))
            .collect(),
    };

    let root: Dict = figment.extract().map_err(|e| {
        SpecError::Invalid(Problems(vec![Problem {
            source: path.display().to_string(),
            key: e.path.join("."),
            message: e.kind.to_string(),
        }]))
    })?;

    let mut problems = env_problems;
    let mut stand_ins = Vec::new();
    let mut report = |key: String, message: String| {
        if message == STAND_IN {
            stand_ins.push(key);
            return;
        }
        problems.push(Problem {
            source: sources.source_of(&key),
            key,
            message,
        })
    };
    for key in root.keys() {
        // `[sweep]` is read by `grid`; a point's values are already merged in.
        if !SECTIONS.contains(&key.as_str()) && key != "sweep" {
            let hint = closest(key, &SECTIONS);
            report(
                key.clone(),
                format!(
                    "unknown section [{key}]{hint}; expected one of {}",
                    SECTIONS.map(|s| format!("[{s}]")).join(", ")
                ),
            );
        }
    }

    let spec = sections(&root, &mut report);
    // A placeholder is only ever put beside a reported problem; should one stand alone, it is
    // reported itself, so a spec holding one can never run.
    if problems.is_empty() {
        for key in &stand_ins {
            problems.push(Problem {
                source: sources.source_of(key),
                key: key.clone(),
                message: "missing".into(),
            });
        }
    }

    match spec {
        Some(spec) => Ok((
            Loaded {
                spec,
                file: path.to_path_buf(),
                point: point.to_vec(),
                sources,
            },
            problems,
            stand_ins,
        )),
        None => Err(SpecError::Invalid(Problems(problems))),
    }
}

/// The `RUNNER_A__B` variables that name spec keys, read as `--set` values are; the problems of
/// those that do not (an unknown section, an indexed key).
fn environment() -> (Vec<Problem>, Vec<(String, String, toml::Value)>) {
    // A `RUNNER_A__B` variable names a spec key; one whose section is not a section is a
    // problem, not silence (plain `RUNNER_*` variables are runner's own settings).
    // Values are read as `--set` values are (TOML: `1e-3` is a number), not by figment's own
    // environment parser, which takes `1e-3` for a string.
    let mut env_problems = Vec::new();
    let mut env_values: Vec<(String, String, toml::Value)> = Vec::new();
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let Some(rest) = name.strip_prefix("RUNNER_") else {
            continue;
        };
        let Some((section, _)) = rest.split_once("__") else {
            continue;
        };
        let section = section.to_lowercase();
        if SECTIONS.contains(&section.as_str()) {
            let key = rest
                .split("__")
                .map(str::to_lowercase)
                .collect::<Vec<_>>()
                .join(".");
            if key.contains('[') || key.split('.').any(str::is_empty) {
                env_problems.push(Problem {
                    source: format!("environment variable {name}"),
                    key: key.clone(),
                    message: "not a key path (sections and keys joined by __; list elements can be set with --set 'head.layers[1].units=8', not here)".into(),
                });
                continue;
            }
            env_values.push((key, name.clone(), parse_set_value(raw.trim())));
            continue;
        }
        {
            env_problems.push(Problem {
                source: format!("environment variable {name}"),
                key: section.clone(),
                message: format!(
                    "unknown section [{section}]{}; expected one of {}",
                    closest(&section, &SECTIONS),
                    SECTIONS.map(|s| format!("[{s}]")).join(", ")
                ),
            });
        }
    }
    (env_problems, env_values)
}

/// The layers over the built-in defaults: the file, the environment's values, the `[sweep]`
/// point's and the `--set` values; and the `--set` keys.
fn layers(
    path: &Path,
    env_values: &[(String, String, toml::Value)],
    point: &[(String, toml::Value)],
    sets: &[String],
) -> Result<(Figment, Vec<String>), SpecError> {
    let mut figment = Figment::from(Toml::string(super::DEFAULTS)).merge(Toml::file_exact(path));
    for (key, _, value) in env_values {
        figment = figment.merge(Serialized::default(key, value.clone()));
    }
    for (key, value) in point {
        figment = figment.merge(Serialized::default(key, value.clone()));
    }
    let mut set_keys = Vec::new();
    for s in sets {
        let (key, raw) = s
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| SpecError::BadSet(s.clone()))?;
        let key = key.trim().to_string();
        let value = parse_set_value(raw.trim());
        figment = match key.split_once('[') {
            None => figment.merge(Serialized::default(&key, value)),
            // `head.layers[1].units`: figment's paths have no indices, so the whole array is
            // taken as layered so far, changed at the index, and laid over.
            Some((array, rest)) => {
                let new = set_in_array(&figment, array, rest, value).map_err(|why| {
                    SpecError::BadSetIndex {
                        set: s.clone(),
                        why,
                    }
                })?;
                figment.merge(Serialized::default(array, new))
            }
        };
        set_keys.push(key);
    }
    Ok((figment, set_keys))
}

/// Every section of `root`, each checked on its own (every problem reported); the spec, when
/// each could be made whole.
fn sections(root: &Dict, report: &mut impl FnMut(String, String)) -> Option<Spec> {
    fn section<T: DeserializeOwned>(
        root: &Dict,
        name: &str,
        report: &mut impl FnMut(String, String),
    ) -> Option<T> {
        let Some(value) = root.get(name) else {
            report(name.to_string(), format!("missing section [{name}]"));
            return None;
        };
        deserialize_at(value, name, report)
    }

    let experiment = section(root, "experiment", report);
    let data = section(root, "data", report);
    let backbone = section(root, "backbone", report);
    let optimizer = root
        .get("optimizer")
        .or_else(|| {
            report("optimizer".into(), "missing section [optimizer]".into());
            None
        })
        .and_then(|v| optimizer_at(v, "optimizer", report));
    let train = section(root, "train", report);
    let head = head_section(root, report);
    let augment = match root.get("augment") {
        None => Some(None),
        Some(v) => deserialize_at(v, "augment", report).map(Some),
    };
    let schedule = match root.get("schedule") {
        None => Some(None),
        Some(v) => schedule_at(v, "schedule", report).map(Some),
    };
    let early_stopping = match root.get("early_stopping") {
        None => Some(None),
        Some(v) => deserialize_at(v, "early_stopping", report).map(Some),
    };
    let phase = phases(root, report);
    match (
        (experiment, data, backbone, head),
        (augment, optimizer, schedule, early_stopping),
        (train, phase),
    ) {
        (
            (Some(experiment), Some(data), Some(backbone), Some(head)),
            (Some(augment), Some(optimizer), Some(schedule), Some(early_stopping)),
            (Some(train), Some(phase)),
        ) => Some(Spec {
            experiment,
            data,
            backbone,
            head,
            augment,
            optimizer,
            schedule,
            early_stopping,
            train,
            phase,
        }),
        _ => None,
    }
}

/// `head` is checked layer by layer, so every bad layer is reported.
fn head_section(root: &Dict, report: &mut impl FnMut(String, String)) -> Option<HeadSpec> {
    let Some(value) = root.get("head") else {
        report(
            "head.layers".into(),
            "missing: the head needs at least one layer ([[head.layers]])".into(),
        );
        return None;
    };
    head_at(value, "head", report)
}

/// A head table at `at` (`head`, `phase[1].head`), layer by layer.
fn head_at(value: &Value, at: &str, report: &mut impl FnMut(String, String)) -> Option<HeadSpec> {
    let Some(dict) = value.as_dict() else {
        report(at.into(), "expected a table with `layers`".into());
        return None;
    };
    // How the table is written in TOML: `[[phase.head.layers]]` under its `[[phase]]`.
    let table = if at.starts_with("phase[") {
        "phase.head"
    } else {
        at
    };
    let mut ok = true;
    for key in dict.keys().filter(|k| k.as_str() != "layers") {
        report(
            format!("{at}.{key}"),
            format!("unknown field `{key}`, expected `layers`"),
        );
    }
    let Some(layers) = dict.get("layers") else {
        report(
            format!("{at}.layers"),
            format!("missing: the head needs at least one layer ([[{table}.layers]])"),
        );
        return None;
    };
    let Some(array) = layers.as_array() else {
        report(
            format!("{at}.layers"),
            format!("expected an array of tables ([[{table}.layers]])"),
        );
        return None;
    };
    let mut out = Vec::with_capacity(array.len());
    for (i, layer) in array.iter().enumerate() {
        match layer_at(layer, &format!("{at}.layers[{i}]"), report) {
            Some(l) => out.push(l),
            // Reported; a shape-neutral stand-in lets the other layers (and the plan's rules)
            // still be checked in the same pass. The spec is invalid either way.
            None if layer.as_dict().is_some() => {
                out.push(LayerSpec::Dropout(super::DropoutSpec { rate: 0.0 }))
            }
            None => ok = false,
        }
    }
    ok.then_some(HeadSpec { layers: out })
}

/// Splits a `kind`-tagged table into its kind and the other keys; reports a missing or unknown
/// kind (listing the valid ones).
fn tagged<K: std::str::FromStr + strum::VariantNames>(
    value: &Value,
    at: &str,
    what: &str,
    report: &mut impl FnMut(String, String),
) -> Option<(K, Value)> {
    let kinds = K::VARIANTS;
    let Some(dict) = value.as_dict() else {
        report(at.to_string(), "expected a table".into());
        return None;
    };
    let Some(kind) = dict.get("kind").and_then(Value::as_str) else {
        report(
            format!("{at}.kind"),
            format!(
                "missing: every {what} needs a kind, one of {}",
                kinds.join(", ")
            ),
        );
        return None;
    };
    let Ok(parsed) = kind.parse::<K>() else {
        report(
            format!("{at}.kind"),
            format!(
                "unknown {what} kind \"{kind}\"{}; valid kinds: {}",
                closest(kind, kinds),
                kinds.join(", ")
            ),
        );
        return None;
    };
    let mut rest = dict.clone();
    rest.remove("kind");
    Some((parsed, Value::from(rest)))
}

/// One head layer: the kind picks the settings type, whose fields are checked with their paths.
fn layer_at(value: &Value, at: &str, report: &mut impl FnMut(String, String)) -> Option<LayerSpec> {
    let (kind, rest) = tagged::<LayerKind>(value, at, "layer", report)?;
    let r = &rest;
    match kind {
        LayerKind::Conv2d => deserialize_at(r, at, report).map(LayerSpec::Conv2d),
        LayerKind::MaxPool2d => deserialize_at(r, at, report).map(LayerSpec::MaxPool2d),
        LayerKind::GlobalAveragePool => {
            deserialize_at(r, at, report).map(LayerSpec::GlobalAveragePool)
        }
        LayerKind::Flatten => deserialize_at(r, at, report).map(LayerSpec::Flatten),
        LayerKind::Dense => deserialize_at(r, at, report).map(LayerSpec::Dense),
        LayerKind::Dropout => deserialize_at(r, at, report).map(LayerSpec::Dropout),
    }
}

/// `[[phase]]`: each phase on its own; its optimizer and schedule are kind-tagged like the
/// top-level sections.
fn phases(root: &Dict, report: &mut impl FnMut(String, String)) -> Option<Vec<PhaseSpec>> {
    let Some(value) = root.get("phase") else {
        return Some(Vec::new());
    };
    let Some(array) = value.as_array() else {
        report(
            "phase".into(),
            "expected an array of tables ([[phase]])".into(),
        );
        return None;
    };
    let mut out = Vec::with_capacity(array.len());
    let mut ok = true;
    for (i, v) in array.iter().enumerate() {
        let at = format!("phase[{i}]");
        let Some(dict) = v.as_dict() else {
            report(at, "expected a table ([[phase]])".into());
            ok = false;
            continue;
        };
        let mut rest = dict.clone();
        let optimizer = rest
            .remove("optimizer")
            .map(|v| optimizer_at(&v, &format!("{at}.optimizer"), report));
        let schedule = rest
            .remove("schedule")
            .map(|v| schedule_at(&v, &format!("{at}.schedule"), report));
        let head = rest
            .remove("head")
            .map(|v| head_at(&v, &format!("{at}.head"), report));
        let phase: Option<PhaseSpec> = deserialize_at(&Value::from(rest), &at, report);
        let failed = matches!(optimizer, Some(None))
            || matches!(schedule, Some(None))
            || matches!(head, Some(None));
        match phase {
            Some(mut p) if !failed => {
                p.optimizer = optimizer.flatten();
                p.schedule = schedule.flatten();
                p.head = head.flatten();
                out.push(p);
            }
            _ => ok = false,
        }
    }
    ok.then_some(out)
}

/// `[schedule]`: the kind picks the settings type.
fn schedule_at(
    value: &Value,
    at: &str,
    report: &mut impl FnMut(String, String),
) -> Option<ScheduleSpec> {
    let (kind, rest) = tagged::<ScheduleKind>(value, at, "schedule", report)?;
    let r = &rest;
    match kind {
        ScheduleKind::Constant => deserialize_at(r, at, report).map(ScheduleSpec::Constant),
        ScheduleKind::Step => deserialize_at(r, at, report).map(ScheduleSpec::Step),
        ScheduleKind::Exponential => deserialize_at(r, at, report).map(ScheduleSpec::Exponential),
        ScheduleKind::Cosine => deserialize_at(r, at, report).map(ScheduleSpec::Cosine),
        ScheduleKind::ReduceOnPlateau => {
            deserialize_at(r, at, report).map(ScheduleSpec::ReduceOnPlateau)
        }
    }
}

/// `[optimizer]`: the kind picks the settings type.
fn optimizer_at(
    value: &Value,
    at: &str,
    report: &mut impl FnMut(String, String),
) -> Option<OptimizerSpec> {
    let (kind, rest) = tagged::<OptimizerKind>(value, at, "optimizer", report)?;
    let r = &rest;
    match kind {
        OptimizerKind::Rmsprop => deserialize_at(r, at, report).map(OptimizerSpec::Rmsprop),
        OptimizerKind::Adam => deserialize_at(r, at, report).map(OptimizerSpec::Adam),
        OptimizerKind::Adamw => deserialize_at(r, at, report).map(OptimizerSpec::Adamw),
        OptimizerKind::Sgd => deserialize_at(r, at, report).map(OptimizerSpec::Sgd),
    }
}

fn one_of(names: &[&str]) -> String {
    match names {
        [] => "no fields here".into(),
        [a] => format!("`{a}`"),
        [a, b] => format!("`{a}` or `{b}`"),
        _ => format!(
            "one of {}",
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// serde's wording for an error, and the key it is about when that is deeper than the path.
fn describe(kind: &figment::error::Kind) -> (Option<String>, String) {
    use figment::error::Kind;
    match kind {
        Kind::UnknownField(f, expected) => (
            Some(f.clone()),
            format!("unknown field `{f}`, expected {}", one_of(expected)),
        ),
        Kind::UnknownVariant(v, expected) => (
            None,
            format!("unknown variant `{v}`, expected {}", one_of(expected)),
        ),
        Kind::InvalidType(actual, expected) => (
            None,
            format!("invalid type: found {actual}, expected {expected}"),
        ),
        Kind::InvalidValue(actual, expected) => (
            None,
            format!("invalid value: found {actual}, expected {expected}"),
        ),
        Kind::MissingField(f) => (Some(f.to_string()), format!("missing field `{f}`")),
        other => (None, other.to_string()),
    }
}

/// Deserializes `value` as `T`, reporting every bad key, not only the first: after each error the
/// offending key is taken out (its default applies) and the rest is tried again. A required key
/// that is bad or missing is reported and replaced by a placeholder of whatever type fits (a
/// number, a string, ...), so that the rest of the spec, and the plan's rules, can still be
/// checked in the same pass; the spec stays invalid (its problem is reported) and problems the
/// rules find about a placeholder are left out by [`load_checked`]. Returns the value so
/// repaired, or `None` when it cannot be made whole (the value is not a table, or no
/// placeholder fits).
fn deserialize_at<T: DeserializeOwned>(
    value: &Value,
    at: &str,
    report: &mut impl FnMut(String, String),
) -> Option<T> {
    let mut value = value.clone();
    let mut removed: Vec<String> = Vec::new();
    let mut unknown: Vec<String> = Vec::new();
    // Required keys standing in for a bad or missing value: key -> index into PLACEHOLDERS.
    let mut placeholders: Vec<(String, usize)> = Vec::new();
    for _ in 0..256 {
        let e = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(v) => return Some(v),
            Err(e) => e,
        };
        let mut keys: Vec<String> = e
            .path()
            .iter()
            .filter_map(|seg| match seg {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                _ => None,
            })
            .collect();
        let inner = e.path().to_string();
        let mut key = if inner == "." || inner.is_empty() {
            at.to_string()
        } else if inner.starts_with('[') {
            format!("{at}{inner}")
        } else {
            format!("{at}.{inner}")
        };
        let kind = e.into_inner().kind;
        let missing = matches!(kind, figment::error::Kind::MissingField(_));
        let is_unknown = matches!(kind, figment::error::Kind::UnknownField(..));
        let (field, message) = describe(&kind);
        if let Some(f) = field.filter(|f| !key.ends_with(&format!(".{f}"))) {
            key = format!("{key}.{f}");
            keys.push(f);
        }
        if let Some(slot) = placeholders.iter_mut().find(|(k, _)| *k == key) {
            // The placeholder tried here does not fit the key's type: the next one.
            slot.1 += 1;
            let next = PLACEHOLDERS.get(slot.1)?;
            if !insert_path(&mut value, &keys, next()) {
                return None;
            }
            continue;
        }
        if missing {
            // A required key taken out for being bad is not missing as well, nor one beside an
            // unknown key (most likely its misspelling, already reported).
            let parent = key.rsplit_once('.').map_or("", |(p, _)| p);
            let beside_unknown = unknown
                .iter()
                .any(|r| r.rsplit_once('.').map_or("", |(p, _)| p) == parent);
            if !removed.contains(&key) && !beside_unknown {
                report(key.clone(), message);
            }
            if !insert_path(&mut value, &keys, PLACEHOLDERS[0]()) {
                return None;
            }
            report(key.clone(), STAND_IN.into());
            placeholders.push((key, 0));
            continue;
        }
        report(key.clone(), message);
        if !remove_path(&mut value, &keys) {
            return None;
        }
        if is_unknown {
            unknown.push(key.clone());
        }
        removed.push(key);
    }
    None
}

/// The message that marks a key as holding a placeholder (see [`deserialize_at`]): not a
/// problem of its own (the key's problem, or its misspelling's, is reported), but the rules'
/// problems about it are left out.
const STAND_IN: &str = "\u{0}stands in for a bad or missing required value";

/// Stand-ins for a required key whose value was bad or missing, tried in turn until one has the
/// key's type (the first a float fits, an integer where a float does not, ...). Only ever seen
/// by the checks: a spec with a placeholder has a reported problem and never runs.
const PLACEHOLDERS: [fn() -> Value; 5] = [
    || Value::from(0.001f64),
    || Value::from(1u64),
    || Value::from("placeholder"),
    || Value::from(false),
    || Value::from(Vec::<Value>::new()),
];

/// The table holding the key at `path` (map keys, outermost first), and the key.
fn parent_of<'a>(value: &'a mut Value, path: &'a [String]) -> Option<(&'a mut Dict, &'a String)> {
    let (last, parents) = path.split_last()?;
    let mut v = value;
    for k in parents {
        match v {
            Value::Dict(_, d) => v = d.get_mut(k)?,
            _ => return None,
        }
    }
    match v {
        Value::Dict(_, d) => Some((d, last)),
        _ => None,
    }
}

/// Sets the key at `path` in `value`; whether its parent was there.
fn insert_path(value: &mut Value, path: &[String], new: Value) -> bool {
    parent_of(value, path)
        .map(|(d, k)| d.insert(k.clone(), new))
        .is_some()
}

/// Removes the key at `path` from `value`; whether it was there.
fn remove_path(value: &mut Value, path: &[String]) -> bool {
    parent_of(value, path).is_some_and(|(d, k)| d.remove(k).is_some())
}

/// ` (did you mean "x"?)` when a candidate is close to `word`, else empty.
pub fn closest(word: &str, candidates: &[&str]) -> String {
    let best = candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), *c))
        .min();
    match best {
        Some((d, c)) if d <= 2.max(word.len() / 3) => format!(" (did you mean \"{c}\"?)"),
        _ => String::new(),
    }
}
