//! `runner results`: every run table of a results folder through one polars lazy scan, one row
//! per run (or per epoch), filtered, sorted and printed as a table, CSV or JSON.

use std::path::{Path, PathBuf};

use polars::prelude::*;

use super::schema::col as C;

use super::ResultsError;

/// How to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// Comma-separated values with a header.
    Csv,
    /// One JSON object per row, in an array.
    Json,
    /// A Markdown (GitHub) table, to paste into a README or an issue.
    Markdown,
}

/// What to show.
#[derive(Debug, Clone)]
pub struct Query {
    /// Conditions `column OP value` (`=`, `!=`, `>`, `>=`, `<`, `<=`, `~` for "contains"), all of
    /// which a row must meet.
    pub filters: Vec<String>,
    /// Column to sort by; a leading `-` sorts descending.
    pub sort: Option<String>,
    /// One row per epoch instead of one per run.
    pub epochs: bool,
    /// Output format.
    pub format: Format,
    /// The columns to show, in this order (empty: all).
    pub columns: Vec<String>,
}

/// The run tables in `dir` (`<run_id>.parquet`; per-image predictions are left out), sorted.
pub fn run_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        name.ends_with(".parquet")
            && !name.ends_with(".predictions.parquet")
            && !name.starts_with('.')
    });
    v.sort();
    v
}

/// Why `path` is not a run table runner can read (not parquet, cut short, or a table of other
/// columns), or `None`.
pub fn not_a_run_table(path: &Path) -> Option<String> {
    let schema = std::fs::File::open(path)
        .map_err(|e| e.to_string())
        .and_then(|f| ParquetReader::new(f).schema().map_err(|e| e.to_string()));
    let known = super::schema::schema();
    match schema {
        Err(e) => Some(e),
        Ok(s) if !s.contains(C::RUN_ID) => Some(format!("no column \"{}\"", C::RUN_ID)),
        Ok(s) => s
            .iter_names()
            .find(|n| !known.contains(n.as_str()))
            .map(|n| format!("a column \"{n}\" that run tables do not have")),
    }
}

/// One lazy scan over every run table in `dir`. A file that is not a readable parquet table
/// (junk, cut short) is left out with a warning naming it, so that it hides no good run.
pub fn scan(dir: &Path) -> Result<Option<LazyFrame>, ResultsError> {
    let files: Vec<PathBuf> = run_files(dir)
        .into_iter()
        .filter(|p| match not_a_run_table(p) {
            None => true,
            Some(e) => {
                tracing::warn!(file = %p.display(), error = %e, "Not a readable run table: left out.");
                false
            }
        })
        .collect();
    if files.is_empty() {
        return Ok(None);
    }
    let paths: Vec<PlRefPath> = files
        .iter()
        .map(|p| PlRefPath::from(p.to_string_lossy().as_ref()))
        .collect();
    let args = ScanArgsParquet {
        schema: Some(Arc::new(super::schema::schema())),
        allow_missing_columns: true,
        ..Default::default()
    };
    LazyFrame::scan_parquet_files(paths.into_iter().collect(), args)
        .map(Some)
        .map_err(|e| ResultsError::Read {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })
}

/// One row per run: key config, status, best and final val_acc, test_acc, epochs, wall time.
pub fn per_run(lf: LazyFrame) -> LazyFrame {
    lf.sort([C::RUN_ID, C::EPOCH], SortMultipleOptions::default())
        .group_by_stable([col(C::RUN_ID)])
        .agg([
            col(C::EXPERIMENT).first(),
            col(C::STATUS).first(),
            col(C::SWEEP_POINT).first(),
            col(C::BACKBONE).first(),
            col(C::TRAINABLE_FROM).last(),
            col(C::OPTIMIZER).first(),
            col(C::LR).first(),
            col(C::PHASE).n_unique().alias("phases"),
            col(C::EPOCH).max().alias("epochs"),
            col(C::VAL_ACC).max().alias("best_val_acc"),
            col(C::VAL_ACC).last().alias("final_val_acc"),
            col(C::TEST_ACC).first(),
            col(C::SECONDS).sum().alias(C::SECONDS),
            col(C::STARTED_AT).first(),
            col(C::CONFIG_HASH).first(),
            col(C::ERROR).first(),
        ])
        .sort([C::STARTED_AT, C::RUN_ID], SortMultipleOptions::default())
}

/// A parsed `--filter`: a polars expression, or a substring test (`~`) applied to the result.
enum Filter {
    Expr(Expr),
    Contains(String, String),
}

/// A `--filter` or `--sort` that does not fit the table.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No operator.
    #[error("--filter {0}: expected COLUMN OP VALUE with OP one of = != > >= < <= ~")]
    NoOperator(String),
    /// A column the table does not have.
    #[error("--{flag} {given}: no column \"{name}\"{hint}; columns: {}", columns.join(", "))]
    NoColumn {
        /// `filter` or `sort`.
        flag: &'static str,
        /// The argument as given.
        given: String,
        /// The column it names.
        name: String,
        /// `; did you mean ...?`, or empty.
        hint: String,
        /// The table's columns.
        columns: Vec<String>,
    },
    /// An order comparison on a text column.
    #[error("--filter {given}: {name} is text; compare it with =, != or ~ (contains)")]
    TextOrder {
        /// The argument as given.
        given: String,
        /// The column.
        name: String,
    },
    /// A number column compared with text.
    #[error("--filter {given}: {name} is a number; \"{raw}\" is not one")]
    NotNumber {
        /// The argument as given.
        given: String,
        /// The column.
        name: String,
        /// The value given.
        raw: String,
    },
    /// `--columns` names a column twice.
    #[error("--columns: \"{0}\" is given twice")]
    Repeated(String),
    /// The table could not be written as CSV.
    #[error("{0}")]
    Csv(PolarsError),
}

impl QueryError {
    /// `--flag given` names `name`, which is none of `columns` (the nearest is suggested).
    fn no_column(flag: &'static str, given: &str, name: &str, columns: &[String]) -> Self {
        Self::NoColumn {
            flag,
            given: given.to_string(),
            name: name.to_string(),
            hint: crate::spec::load::closest(
                name,
                &columns.iter().map(String::as_str).collect::<Vec<_>>(),
            ),
            columns: columns.to_vec(),
        }
    }
}

/// Parses `column OP value`.
fn filter_expr(f: &str, columns: &[String], types: &[DataType]) -> Result<Filter, QueryError> {
    const OPS: [&str; 7] = [">=", "<=", "!=", "=", ">", "<", "~"];
    let (at, op) = OPS
        .iter()
        .filter_map(|op| f.find(op).map(|i| (i, *op)))
        .min_by_key(|(i, op)| (*i, std::cmp::Reverse(op.len())))
        .ok_or_else(|| QueryError::NoOperator(f.to_string()))?;
    let name = f[..at].trim();
    let raw = f[at + op.len()..].trim().trim_matches('"');
    if !columns.iter().any(|c| c == name) {
        return Err(QueryError::no_column("filter", f, name, columns));
    }
    if op == "~" {
        return Ok(Filter::Contains(name.to_string(), raw.to_string()));
    }
    let text = columns
        .iter()
        .zip(types)
        .any(|(c, t)| c == name && matches!(t, DataType::String));
    let number = raw.parse::<f64>().ok();
    if text && matches!(op, ">" | ">=" | "<" | "<=") {
        return Err(QueryError::TextOrder {
            given: f.to_string(),
            name: name.to_string(),
        });
    }
    if !text && number.is_none() {
        return Err(QueryError::NotNumber {
            given: f.to_string(),
            name: name.to_string(),
            raw: raw.to_string(),
        });
    }
    let c = col(name);
    let v = match (text, number) {
        (false, Some(x)) => lit(x),
        _ => lit(raw.to_string()),
    };
    Ok(Filter::Expr(match op {
        "=" => c.eq(v),
        "!=" => c.neq(v),
        ">" => c.gt(v),
        ">=" => c.gt_eq(v),
        "<" => c.lt(v),
        _ => c.lt_eq(v),
    }))
}

/// Keeps the rows whose `column`, as text, contains `needle`.
fn contains(df: DataFrame, column: &str, needle: &str) -> PolarsResult<DataFrame> {
    let c = df.column(column)?.cast(&DataType::String)?;
    let mask: BooleanChunked = c
        .str()?
        .iter()
        .map(|v| Some(v.is_some_and(|v| v.contains(needle))))
        .collect();
    df.filter(&mask)
}

fn fail(dir: &Path, e: impl std::fmt::Display) -> ResultsError {
    ResultsError::Read {
        path: dir.to_path_buf(),
        message: e.to_string(),
    }
}

/// Runs `q` over `dir`; `None` when there are no run tables.
pub fn query(dir: &Path, q: &Query) -> Result<Option<DataFrame>, ResultsError> {
    if !dir.is_dir() {
        return Err(ResultsError::Read {
            path: dir.to_path_buf(),
            message: if dir.exists() {
                "not a folder; give the results folder (results/ by default), not a file in it"
                    .into()
            } else {
                "no such folder".into()
            },
        });
    }
    let Some(lf) = scan(dir)? else {
        return Ok(None);
    };
    // A table says `running` until its run ends; a run killed or crashed cannot say otherwise.
    // Its log tells: a live run holds a lock on it. Shown as `stopped` (resume continues it).
    let stopped: Vec<Expr> = run_files(dir)
        .iter()
        .filter_map(|p| {
            let id = p.file_stem()?.to_string_lossy().into_owned();
            let log = std::fs::File::open(dir.join(format!("{id}.log.jsonl"))).ok()?;
            let free = log.try_lock_shared().is_ok();
            let _ = log.unlock();
            free.then(|| col(C::RUN_ID).eq(lit(id)))
        })
        .collect();
    let lf = match stopped.into_iter().reduce(|a, b| a.or(b)) {
        Some(dead) => lf.with_column(
            when(col(C::STATUS).eq(lit("running")).and(dead))
                .then(lit("stopped"))
                .otherwise(col(C::STATUS))
                .alias(C::STATUS),
        ),
        None => lf,
    };
    let mut lf = if q.epochs { lf } else { per_run(lf) };
    let schema = lf.collect_schema().map_err(|e| fail(dir, e))?;
    let columns: Vec<String> = schema.iter_names().map(|n| n.to_string()).collect();
    let types: Vec<DataType> = schema.iter_fields().map(|f| f.dtype().clone()).collect();
    let mut substrings = Vec::new();
    for f in &q.filters {
        match filter_expr(f, &columns, &types)? {
            Filter::Expr(e) => lf = lf.filter(e),
            Filter::Contains(c, n) => substrings.push((c, n)),
        }
    }
    if let Some(s) = &q.sort {
        let (name, desc) = match s.strip_prefix('-') {
            Some(n) => (n, true),
            None => (s.as_str(), false),
        };
        if !columns.iter().any(|c| c == name) {
            return Err(QueryError::no_column("sort", s, name, &columns).into());
        }
        lf = lf.sort(
            [name],
            SortMultipleOptions::default()
                .with_order_descending(desc)
                .with_nulls_last(true),
        );
    }
    let mut seen = std::collections::HashSet::new();
    for name in &q.columns {
        if !seen.insert(name) {
            return Err(QueryError::Repeated(name.clone()).into());
        }
        if !columns.contains(name) {
            return Err(
                QueryError::no_column("columns", &q.columns.join(","), name, &columns).into(),
            );
        }
    }
    let mut df = lf.collect().map_err(|e| fail(dir, e))?;
    for (c, n) in substrings {
        df = contains(df, &c, &n).map_err(|e| fail(dir, e))?;
    }
    if !q.columns.is_empty() {
        df = df
            .select(q.columns.iter().map(String::as_str))
            .map_err(|e| fail(dir, e))?;
    }
    Ok(Some(df))
}

fn cell(v: &AnyValue<'_>) -> String {
    match v {
        AnyValue::Null => String::new(),
        AnyValue::Float64(x) => {
            if x.fract() == 0.0 && x.abs() < 1e15 {
                format!("{x:.0}")
            } else if x.abs() >= 1e-3 {
                format!("{x:.4}")
            } else {
                format!("{x:.2e}")
            }
        }
        AnyValue::String(s) => s.to_string(),
        AnyValue::StringOwned(s) => s.to_string(),
        other => other.to_string(),
    }
}

fn json(v: &AnyValue<'_>) -> serde_json::Value {
    match v {
        AnyValue::Null => serde_json::Value::Null,
        AnyValue::Boolean(b) => (*b).into(),
        AnyValue::Float64(x) => {
            serde_json::Number::from_f64(*x).map_or(serde_json::Value::Null, Into::into)
        }
        AnyValue::Float32(x) => {
            serde_json::Number::from_f64(f64::from(*x)).map_or(serde_json::Value::Null, Into::into)
        }
        AnyValue::UInt32(x) => (*x).into(),
        AnyValue::UInt64(x) => (*x).into(),
        AnyValue::Int32(x) => (*x).into(),
        AnyValue::Int64(x) => (*x).into(),
        other => cell(other).into(),
    }
}

/// The frame as text in `format`.
pub fn render(df: &DataFrame, format: Format) -> Result<String, ResultsError> {
    let names: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|n| n.to_string())
        .collect();
    let rows: Vec<Vec<AnyValue<'_>>> = (0..df.height())
        .map(|i| {
            df.columns()
                .iter()
                .map(|c| c.get(i).unwrap_or(AnyValue::Null))
                .collect()
        })
        .collect();
    Ok(match format {
        Format::Table => {
            let cells: Vec<Vec<String>> =
                rows.iter().map(|r| r.iter().map(cell).collect()).collect();
            let widths: Vec<usize> = names
                .iter()
                .enumerate()
                .map(|(j, n)| {
                    cells
                        .iter()
                        .map(|r| r[j].chars().count())
                        .chain([n.len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |r: &[String]| {
                r.iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            let mut out = line(&names) + "\n";
            out += &(widths
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("  ")
                + "\n");
            for r in &cells {
                out += &(line(r) + "\n");
            }
            out
        }
        Format::Markdown => {
            // A `|` inside a cell would end it, a line break the row.
            let esc = |c: String| c.replace('|', "\\|").replace(['\n', '\r'], " ");
            let row = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
            let mut out = row(names.iter().cloned().map(esc).collect());
            // Numbers right-aligned, text left, by the column's type.
            out += &row(df
                .dtypes()
                .iter()
                .map(|t| {
                    if t.is_primitive_numeric() {
                        "---:"
                    } else {
                        "---"
                    }
                    .to_string()
                })
                .collect());
            for r in &rows {
                out += &row(r.iter().map(|v| esc(cell(v))).collect());
            }
            out
        }
        Format::Csv => {
            let mut buf = Vec::new();
            let mut df = df.clone();
            CsvWriter::new(&mut buf)
                .include_header(true)
                .finish(&mut df)
                .map_err(QueryError::Csv)?;
            String::from_utf8_lossy(&buf).into_owned()
        }
        Format::Json => {
            let objs: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    serde_json::Value::Object(
                        names.iter().cloned().zip(r.iter().map(json)).collect(),
                    )
                })
                .collect();
            serde_json::to_string_pretty(&objs).unwrap_or_default() + "\n"
        }
    })
}

/// Runs by config hash: `(run_id, status, started_at)`, oldest first.
pub type RunsByHash = std::collections::HashMap<String, Vec<(String, String, String)>>;

/// The runs recorded in `dir` by config hash: `(run_id, status, started_at)`, oldest first.
pub fn runs_by_hash(dir: &Path) -> Result<RunsByHash, ResultsError> {
    let mut out = RunsByHash::default();
    let Some(lf) = scan(dir)? else {
        return Ok(out);
    };
    let df = lf
        .select([
            col(C::RUN_ID),
            col(C::CONFIG_HASH),
            col(C::STATUS),
            col(C::STARTED_AT),
        ])
        .unique_stable(None, UniqueKeepStrategy::First)
        .sort(["started_at"], SortMultipleOptions::default())
        .collect()
        .map_err(|e| fail(dir, e))?;
    let s = |name: &str| super::strings(&df, name);
    let (ids, hashes, statuses, started) =
        (s("run_id"), s("config_hash"), s("status"), s("started_at"));
    for i in 0..ids.len() {
        out.entry(hashes[i].clone()).or_default().push((
            ids[i].clone(),
            statuses[i].clone(),
            started[i].clone(),
        ));
    }
    Ok(out)
}
