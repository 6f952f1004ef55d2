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
        let mirror = assets
            .or_else(|| {
                std::env::var_os(ASSETS_ENV)
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            // Resolved once, here: a relative mirror means the folder runner was started in.
            .map(|p| std::path::absolute(&p).unwrap_or(p));
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

/// The files of a named asset, relative to the project folder (and to a mirror).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssetFiles {
    /// One file with its SHA-256.
    One {
        /// e.g. `weights/vgg16_imagenet_notop.safetensors`.
        path: &'static str,
        /// Lowercase hex SHA-256.
        sha256: &'static str,
    },
    /// A folder whose files are listed, with their SHA-256, in a `sha256sum` file.
    Listed {
        /// The list, e.g. `data/cats_and_dogs_small.SHA256SUMS`.
        sums: &'static str,
        /// SHA-256 of the list itself.
        sums_sha256: &'static str,
        /// The folder the listed paths are relative to.
        dir: &'static str,
    },
}

/// How an upstream download is verified: the way its publisher's own tools do it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check<'a> {
    /// A full SHA-256 (lowercase hex).
    Sha256(&'a str),
    /// The SHA-256 prefix torchvision puts in its file names (what `torch.hub` checks).
    Sha256Prefix(&'a str),
    /// The MD5 Keras' `get_file` checks (`file_hash` in keras.applications).
    Md5(&'a str),
    /// Nothing published: the archive's own CRC-32s are checked as it is read, and its SHA-256
    /// is logged and recorded beside what is built from it.
    Unpublished,
}

/// What becomes of an upstream download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// The file is used as it is (weights runner reads in their published format).
    AsIs,
    /// The Dogs-vs-Cats archive: the book's 2000/1000/1000 split is built from it into `dir`.
    DogsVsCatsSplit {
        /// e.g. `data/cats_and_dogs_small`.
        dir: &'static str,
    },
}

/// The original download of an asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream {
    /// Where it is published.
    pub url: &'static str,
    /// Where the download lands, relative to the project folder (and to a mirror folder, which
    /// may hold it too).
    pub path: &'static str,
    /// How it is verified.
    pub check: Check<'static>,
    /// What is done with it.
    pub then: Build,
}

/// A named asset of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asset {
    /// e.g. `vgg16/imagenet`.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// Its files as an asset mirror holds them (pinned by SHA-256), when a mirror has them.
    pub files: Option<AssetFiles>,
    /// The original download, used when no mirror has the asset.
    pub upstream: Upstream,
}

/// Every named asset.
pub const CATALOGUE: [Asset; 5] = [
    Asset {
        name: "vgg16/imagenet",
        description: "VGG16 convolutional base, ImageNet weights (Keras' Oxford weights), Keras layer names",
        files: Some(AssetFiles::One {
            path: "weights/vgg16_imagenet_notop.safetensors",
            sha256: "3d289c1da829286cc29ca5760fca9bd62782a1ff1f86d2ee91d1485ba1431081",
        }),
        upstream: Upstream {
            url: "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            path: "weights/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            check: Check::Md5("6d6bbae143d832006294945121d1f1fc"),
            then: Build::AsIs,
        },
    },
    Asset {
        name: "vgg19/imagenet",
        description: "VGG19 convolutional base, ImageNet weights (Keras' Oxford weights), Keras layer names",
        files: None,
        upstream: Upstream {
            url: "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            path: "weights/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            check: Check::Md5("253f8cb515780f3b799900260a226db6"),
            then: Build::AsIs,
        },
    },
    Asset {
        name: "mobilenet_v2/imagenet",
        description: "MobileNetV2, torchvision IMAGENET1K_V1 weights, torchvision names",
        files: Some(AssetFiles::One {
            path: "weights/mobilenet_v2_imagenet.safetensors",
            sha256: "750b96807fca6d8060ba5963e0a6c9c42bd05c8914443ce5730c25a2bf7be88f",
        }),
        upstream: Upstream {
            url: "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
            path: "weights/mobilenet_v2-b0353104.pth",
            check: Check::Sha256Prefix("b0353104"),
            then: Build::AsIs,
        },
    },
    Asset {
        name: "resnet50/imagenet",
        description: "ResNet50, torchvision IMAGENET1K_V1 weights, torchvision names",
        files: None,
        upstream: Upstream {
            url: "https://download.pytorch.org/models/resnet50-0676ba61.pth",
            path: "weights/resnet50-0676ba61.pth",
            check: Check::Sha256Prefix("0676ba61"),
            then: Build::AsIs,
        },
    },
    Asset {
        name: "cats_and_dogs_small",
        description: "Dogs-vs-Cats, the book's 2000/1000/1000 split: train/validation/test, cats/ and dogs/",
        files: Some(AssetFiles::Listed {
            sums: "data/cats_and_dogs_small.SHA256SUMS",
            sums_sha256: "9f61d85a75b5423d82b34d421456aaea565d41a55bb7309bd34846e84f2b8369",
            dir: "data/cats_and_dogs_small",
        }),
        upstream: Upstream {
            url: "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip",
            path: "data/kagglecatsanddogs_5340.zip",
            check: Check::Unpublished,
            then: Build::DogsVsCatsSplit {
                dir: "data/cats_and_dogs_small",
            },
        },
    },
];

/// The asset named `name`.
pub fn find_asset(name: &str) -> Option<&'static Asset> {
    CATALOGUE.iter().find(|a| a.name == name)
}

impl Locations {
    /// What to do without a network or a mirror: where the files go and where they come from.
    pub fn offline_help(asset: &Asset) -> String {
        let mut places: Vec<String> = match &asset.files {
            Some(AssetFiles::One { path, .. }) => vec![(*path).to_string()],
            Some(AssetFiles::Listed { sums, dir, .. }) => {
                vec![format!("{dir}/ (and the list {sums})")]
            }
            None => vec![],
        };
        places.push(asset.upstream.path.to_string());
        format!(
            "{}: no source has it. Put {} in the project folder, or point {ASSETS_ENV} \
             (--assets) at a folder that has it there, or an HTTP mirror of such a folder with \
             --assets-url / RUNNER_ASSETS_URL. Its original is {} (download it where there is \
             a network and copy it over).",
            asset.name,
            places.join(" or "),
            asset.upstream.url
        )
    }
}
