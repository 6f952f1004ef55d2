//! Where named assets and relative paths are found: the project's own `weights/` and `data/`
//! first, then a local mirror (`$RUNNER_ASSETS` or `--assets DIR`). A miss says every place tried.

use std::path::{Path, PathBuf};

/// The environment variable naming a local asset mirror.
pub const ASSETS_ENV: &str = "RUNNER_ASSETS";

/// A file or folder that is in none of the places it was looked for.
#[derive(Debug, thiserror::Error)]
#[error("{what} not found; tried:\n{}{hint}", tried.iter().map(|p| format!("  {}\n", p.display())).collect::<String>())]
pub struct NotFound {
    /// What was looked for.
    pub what: String,
    /// Every path tried, in order.
    pub tried: Vec<PathBuf>,
    /// How to fix it.
    pub hint: String,
}

/// Where to look for assets.
#[derive(Debug, Clone, Default)]
pub struct Locations {
    /// The local mirror, if any (`--assets` or `$RUNNER_ASSETS`).
    pub mirror: Option<PathBuf>,
}

impl Locations {
    /// Uses `--assets` when given, else `$RUNNER_ASSETS`.
    pub fn new(assets: Option<PathBuf>) -> Self {
        let mirror = assets.or_else(|| {
            std::env::var_os(ASSETS_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        Self { mirror }
    }

    fn hint(&self) -> String {
        match &self.mirror {
            Some(_) => String::new(),
            None => format!(
                "hint: point {ASSETS_ENV} (or --assets) at a folder with weights/ and data/, e.g. {ASSETS_ENV}=../shared/assets"
            ),
        }
    }

    /// A named weights file: `weights/<file>`, then `<mirror>/weights/<file>`.
    pub fn weights_file(&self, file: &str, what: &str) -> Result<PathBuf, NotFound> {
        let mut tried = vec![Path::new("weights").join(file)];
        if let Some(m) = &self.mirror {
            tried.push(m.join("weights").join(file));
        }
        tried
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .ok_or_else(|| NotFound {
                what: what.to_string(),
                tried,
                hint: self.hint(),
            })
    }

    /// A path from a spec: as given (relative to the current directory), then, when relative,
    /// under the mirror.
    pub fn path(&self, given: &str, what: &str, want_dir: bool) -> Result<PathBuf, NotFound> {
        let p = PathBuf::from(given);
        let mut tried = vec![p.clone()];
        if let (true, Some(m)) = (p.is_relative(), &self.mirror) {
            tried.push(m.join(&p));
        }
        let ok = |q: &PathBuf| if want_dir { q.is_dir() } else { q.is_file() };
        tried
            .iter()
            .find(|q| ok(q))
            .cloned()
            .ok_or_else(|| NotFound {
                what: what.to_string(),
                tried,
                hint: if p.is_relative() {
                    self.hint()
                } else {
                    String::new()
                },
            })
    }
}
