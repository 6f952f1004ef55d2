//! The trained model on disk, and `runner predict`.
//!
//! A finished run leaves `results/<run_id>/model.bpk` (burn's record of what the run trained,
//! parameter ids included) and `results/<run_id>/model.json` (what is needed to rebuild and use
//! the model: the resolved spec, the classes, the preprocessing, the cutoff and the frozen
//! base's file and digest). `runner export RUN_ID --format safetensors` writes
//! `model.safetensors` on demand ([`write_safetensors`]: the backbone in the ImageNet files'
//! naming, so it can be the `backbone.weights` of another experiment; the head as `head.*`).

use std::path::{Path, PathBuf};

use burn::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::backbone;
use crate::data::folder;
use crate::io::{WriteError, write_atomic};
use crate::model::TransferModel;
use crate::plan::Plan;
use crate::results::ResultsError;
use crate::spec::{Preprocess, Spec};
use crate::train::{self, checkpoint, loss};

/// The version of `model.json` this runner writes: 2 records `bpk_sha256` always; 3 may leave
/// the backbone's frozen layers out of `model.bpk` (`frozen`). Cards without `card_version`
/// are version 1 (written before the checksum was recorded).
pub const CARD_VERSION: u32 = 3;

fn card_version_1() -> u32 {
    1
}

/// What `runner predict` needs besides the weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    /// The card's format version ([`CARD_VERSION`]; 1 when absent).
    #[serde(default = "card_version_1")]
    pub card_version: u32,
    /// The run.
    pub run_id: String,
    /// The resolved spec.
    pub spec: Spec,
    /// Class names; a label is an index into this.
    pub classes: Vec<String>,
    /// Input preprocessing.
    pub preprocess: Preprocess,
    /// Freeze cutoff of the last phase.
    pub cut: usize,
    /// SHA-256 of `model.bpk` (hex), checked when the model is loaded; absent in cards written
    /// before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpk_sha256: Option<String>,
    /// The backbone layers `model.bpk` leaves out: no phase trained them, so they are those of
    /// the weights file named here, checked by their digest when the model is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<crate::model::FrozenBase>,
}

impl ModelCard {
    /// The model this card describes (check it with [`ModelCard::validate`] first), built the
    /// way training builds it.
    pub fn model_config(&self, def: &'static backbone::BackboneDef) -> crate::model::ModelConfig {
        self.model_config_at(def, None)
    }

    /// The model whose weights a checkpoint holds: the head of phase `head_from` (the
    /// checkpoint's `head_from`), or the final head (`None`).
    pub fn model_config_at(
        &self,
        def: &'static backbone::BackboneDef,
        head_from: Option<usize>,
    ) -> crate::model::ModelConfig {
        let head = match head_from {
            Some(from) => self.spec.head_of_phase(from),
            None => self.spec.final_head().1,
        };
        crate::model::ModelConfig {
            backbone: def,
            cut: self.cut,
            head: head.to_vec(),
            image_size: self.spec.data.image_size,
            batchnorm_frozen: self.spec.backbone.batchnorm == crate::spec::BatchNormMode::Frozen,
        }
    }

    /// Checks the card as a spec is checked: it is a file a user can edit, and the model is built
    /// from it. Returns what is wrong, naming the key.
    pub fn validate(&self, def: &backbone::BackboneDef) -> Result<(), CardError> {
        match &self.bpk_sha256 {
            Some(h) if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                return Err(CardError::Checksum(h.clone()));
            }
            _ => {}
        }
        if let Some(f) = &self.frozen
            && (f.layers == 0 || f.layers > def.layers().len())
        {
            return Err(CardError::Frozen {
                layers: f.layers,
                backbone: def.name,
                max: def.layers().len(),
            });
        }
        let lower = |p: Preprocess| format!("{p:?}").to_lowercase();
        if let Some(p) = self
            .spec
            .backbone
            .preprocess
            .filter(|p| *p != self.preprocess)
        {
            return Err(CardError::Preprocess {
                card: lower(self.preprocess),
                spec: lower(p),
            });
        }
        let layers = def.layers().len();
        if self.cut > layers {
            return Err(CardError::Cut {
                cut: self.cut,
                backbone: def.name,
                layers,
            });
        }
        let [h, w] = self.spec.data.image_size;
        if !(def.min_input..=4096).contains(&h) || !(def.min_input..=4096).contains(&w) {
            return Err(CardError::ImageSize {
                size: [h, w],
                min: def.min_input,
                backbone: def.name,
            });
        }
        let (at, head) = self.spec.final_head();
        if head.is_empty() {
            return Err(CardError::EmptyHead(at));
        }
        let mut shape = crate::head::Shape::Map(def.shape_at(layers, [h, w]));
        let mut params = 0usize;
        for (index, layer) in head.iter().enumerate() {
            let (out, n) = crate::head::infer(layer, shape).map_err(|error| CardError::Layer {
                at: at.clone(),
                index,
                error,
                input: shape.keras(),
            })?;
            params = params.saturating_add(n);
            if params > crate::head::MAX_HEAD_PARAMS {
                return Err(CardError::HeadTooLarge { at, index, params });
            }
            shape = out;
        }
        let units = match shape {
            crate::head::Shape::Flat(n) => n,
            crate::head::Shape::Map(_) => return Err(CardError::LastNotVector(at)),
        };
        let n = self.classes.len();
        let fits = match self.spec.train.loss {
            crate::spec::Loss::BinaryCrossentropy => n == 2 && units == 1,
            crate::spec::Loss::CategoricalCrossentropy => n >= 2 && units == n,
        };
        if !fits {
            return Err(CardError::Classes {
                classes: self.classes.clone(),
                units,
                loss: self.spec.train.loss,
            });
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = self.classes.iter().find(|c| !seen.insert(c.as_str())) {
            return Err(CardError::Duplicate(dup.clone()));
        }
        Ok(())
    }
}

/// What is wrong in a `model.json`, named by its key.
#[derive(Debug, thiserror::Error)]
pub enum CardError {
    /// `bpk_sha256` is not 64 hexadecimal digits.
    #[error("bpk_sha256 = \"{0}\" is not a SHA-256 (64 hexadecimal digits)")]
    Checksum(String),
    /// `frozen.layers` is not a number of the backbone's layers.
    #[error("frozen.layers = {layers}, but {backbone} has layers 1 to {max}")]
    Frozen {
        /// The value.
        layers: usize,
        /// The backbone.
        backbone: &'static str,
        /// Its number of layers.
        max: usize,
    },
    /// `preprocess` and the spec's `backbone.preprocess` disagree.
    #[error("preprocess = \"{card}\" contradicts spec.backbone.preprocess = \"{spec}\"")]
    Preprocess {
        /// The card's value.
        card: String,
        /// The spec's value.
        spec: String,
    },
    /// `cut` beyond the backbone's layers.
    #[error("cut = {cut}, but {backbone} has {layers} layers (0 to {layers})")]
    Cut {
        /// The card's cut.
        cut: usize,
        /// The backbone.
        backbone: &'static str,
        /// Its number of layers.
        layers: usize,
    },
    /// An image size the backbone cannot take.
    #[error(
        "spec.data.image_size = [{}, {}]: each side must be in [{min}, 4096] for {backbone}",
        size[0], size[1]
    )]
    ImageSize {
        /// Height and width.
        size: [usize; 2],
        /// The backbone's smallest input side.
        min: usize,
        /// The backbone.
        backbone: &'static str,
    },
    /// No head layers.
    #[error("spec.{0}.layers is empty")]
    EmptyHead(String),
    /// A head layer that cannot take its input.
    #[error("spec.{at}.layers[{index}]: {error} (input {input})")]
    Layer {
        /// `head`, or `phase[i].head`.
        at: String,
        /// The layer's index.
        index: usize,
        /// Why.
        error: crate::head::ShapeError,
        /// Its input shape, Keras style.
        input: String,
    },
    /// The head's parameters beyond the limit.
    #[error("spec.{at}.layers[{index}]: the head is too large ({params} parameters)")]
    HeadTooLarge {
        /// `head`, or `phase[i].head`.
        at: String,
        /// The layer where the limit is passed.
        index: usize,
        /// The parameters up to it.
        params: usize,
    },
    /// The head ends on a feature map.
    #[error("spec.{0}.layers: the last layer must give a vector (a dense layer)")]
    LastNotVector(String),
    /// The classes do not fit the head's outputs and the loss.
    #[error(
        "classes: {} class names ({}) for a head with {units} output{} under {loss:?}",
        classes.len(), classes.join(", "), if *units == 1 { "" } else { "s" }
    )]
    Classes {
        /// The card's classes.
        classes: Vec<String>,
        /// The head's outputs.
        units: usize,
        /// The loss.
        loss: crate::spec::Loss,
    },
    /// A class name given twice.
    #[error("classes: \"{0}\" appears twice")]
    Duplicate(String),
}

/// Errors saving or using a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be written.
    #[error(transparent)]
    Write(#[from] ResultsError),
    /// A file could not be written.
    #[error(transparent)]
    WriteFile(#[from] crate::io::WriteError),
    /// No model or checkpoint for this run.
    #[error("{0}")]
    Missing(String),
    /// A saved model could not be read.
    #[error("{path}: {message}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// `results/<run_id>/model.json`.
pub fn card_path(results: &Path, run_id: &str) -> PathBuf {
    checkpoint::run_dir(results, run_id).join("model.json")
}

/// Saves the model of a finished run, `model.bpk` (what it trained; the frozen base is named by
/// its file and digest in the card), with its card (`model.json`).
pub fn save(
    results: &Path,
    run_id: &str,
    plan: &Plan,
    (model, whole): (&TransferModel, bool),
) -> Result<PathBuf, ModelError> {
    let dir = checkpoint::run_dir(results, run_id);
    let card = ModelCard {
        card_version: CARD_VERSION,
        run_id: run_id.to_string(),
        spec: plan.spec.clone(),
        classes: plan.classes.clone(),
        preprocess: plan.preprocess,
        cut: model.cut(),
        bpk_sha256: None,
        frozen: (!whole)
            .then(|| {
                model.frozen_base(
                    plan.frozen_layers(plan.phases.len().saturating_sub(1)),
                    &plan.weights,
                )
            })
            .flatten(),
    };
    let bpk = dir.join("model.bpk");
    let bytes =
        train::model_bytes(model, card.frozen.as_ref()).map_err(|e| WriteError::new(&bpk, e))?;
    let card = ModelCard {
        bpk_sha256: Some(crate::io::hex(&sha2::Sha256::digest(&bytes))),
        ..card
    };
    write_atomic(&bpk, |f| std::io::Write::write_all(f, &bytes))?;
    // The card after the weights it describes, so that a card is never there without them.
    let json = serde_json::to_string_pretty(&card).unwrap_or_default();
    write_atomic(&card_path(results, run_id), |f| {
        std::io::Write::write_all(f, json.as_bytes())
    })?;
    Ok(dir)
}

/// The whole model (the frozen base included) as one safetensors file at `out`, written
/// atomically: the backbone under the names of its ImageNet file (Keras names for VGG,
/// torchvision's names and conventions for the others), so that it can be another experiment's
/// `backbone.weights`, whose loader ignores the `head.*` tensors; the run, classes and config in
/// its metadata. `runner export RUN_ID --format safetensors` writes it on demand: a run keeps
/// only what it trained (`model.bpk`).
pub fn write_safetensors(
    out: &Path,
    model: &TransferModel,
    card: &ModelCard,
) -> Result<usize, ModelError> {
    let def = backbone::find(&card.spec.backbone.name).ok_or_else(|| ModelError::Unreadable {
        path: out.to_path_buf(),
        message: format!("unknown backbone {}", card.spec.backbone.name),
    })?;
    let fail = |e: crate::backbone::weights::ExportError| WriteError::new(out, e);
    let root = format!("backbone.{}", model.backbone.variant());
    let bytes = crate::backbone::weights::to_safetensors(
        model,
        &root,
        &model.backbone.key_map(def),
        // VGG's base holds convolutions only; the others follow torchvision's conventions.
        def.family != backbone::Family::Vgg,
        &[
            ("runner.run_id", card.run_id.clone()),
            ("runner.classes", card.classes.join(",")),
            (
                "runner.config",
                toml::to_string_pretty(&card.spec).unwrap_or_default(),
            ),
        ],
    )
    .map_err(fail)?;
    write_atomic(out, |f| std::io::Write::write_all(f, &bytes))?;
    Ok(bytes.len())
}

/// Which weights `runner predict` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// The final model of a finished run (else the last checkpoint).
    Final,
    /// The best checkpoint by `train.monitor`.
    Best,
    /// The last checkpoint.
    Last,
}

impl Which {
    /// The name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Final => "final",
            Self::Best => "best",
            Self::Last => "last",
        }
    }
}

/// Reads a run's `model.json`: a bad value is named by its key, a card of an unknown version
/// refused, and a version-2 card must record model.bpk's checksum.
fn read_card(cp: &Path) -> Result<ModelCard, ModelError> {
    let unreadable = |path: &Path, message: String| ModelError::Unreadable {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(cp).map_err(|e| unreadable(cp, e.to_string()))?;
    // The key a bad value is at, as a spec's problems name it (`bpk_sha256: invalid type`).
    let card: ModelCard = serde_path_to_error::deserialize(
        &mut serde_json::Deserializer::from_str(&text),
    )
    .map_err(|e| {
        let at = e.path().to_string();
        let m = e.into_inner().to_string();
        unreadable(
            cp,
            if at == "." || at == "?" {
                m
            } else {
                format!("{at}: {m}")
            },
        )
    })?;
    if !(1..=CARD_VERSION).contains(&card.card_version) {
        return Err(unreadable(
            cp,
            format!(
                "card_version = {}, but this runner reads versions 1 to {CARD_VERSION} (written by a newer runner, or edited?)",
                card.card_version
            ),
        ));
    }
    if card.bpk_sha256.is_none() && card.card_version >= 2 {
        return Err(unreadable(
            cp,
            format!(
                "bpk_sha256 is missing, but a version {} card always records model.bpk's checksum; the saved model description does not fit the model (was it edited?)",
                card.card_version
            ),
        ));
    }
    Ok(card)
}

/// Loads a run's model on `device`. The base layers a run did not store come from the weights
/// file it recorded, else from the file its `backbone.weights` names through `locations` now (a
/// mirror that moved); either is checked by the layers' digest.
pub fn load(
    results: &Path,
    run_id: &str,
    which: Which,
    device: &Device,
    locations: &crate::assets::Locations,
) -> Result<(ModelCard, TransferModel), ModelError> {
    let cp = card_path(results, run_id);
    let dir = checkpoint::run_dir(results, run_id);
    let unreadable = |path: &Path, message: String| ModelError::Unreadable {
        path: path.to_path_buf(),
        message,
    };
    let (card, bytes) = if cp.exists() {
        (read_card(&cp)?, None)
    } else {
        // A run that has not finished: the card comes from the config and the checkpoint.
        let config = results.join(format!("{run_id}.toml"));
        if !config.exists() {
            return Err(ModelError::Missing(format!(
                "no run {run_id} in {}: neither {} nor {} exists",
                results.display(),
                cp.display(),
                config.display()
            )));
        }
        let spec: Spec = toml::from_str(
            &std::fs::read_to_string(&config).map_err(|e| unreadable(&config, e.to_string()))?,
        )
        .map_err(|e| unreadable(&config, e.to_string()))?;
        let ck = checkpoint::read(&checkpoint::last_path(results, run_id))
            .map_err(|e| ModelError::Missing(e.to_string()))?;
        let def = backbone::find(&spec.backbone.name)
            .ok_or_else(|| unreadable(&config, "unknown backbone".into()))?;
        let classes = ck.state.origin.classes.clone();
        let from = ck.state.progress.head_from;
        let card = ModelCard {
            card_version: CARD_VERSION,
            run_id: run_id.to_string(),
            preprocess: spec.backbone.preprocess.unwrap_or_else(|| {
                def.preprocess_for(std::path::Path::new(&spec.backbone.weights))
            }),
            cut: 0,
            classes,
            spec,
            bpk_sha256: None,
            frozen: None,
        };
        (card, Some((ck.model, from, ck.state.frozen)))
    };
    let def = backbone::find(&card.spec.backbone.name).ok_or_else(|| {
        unreadable(
            &cp,
            format!(
                "spec.backbone.name: unknown backbone \"{}\"",
                card.spec.backbone.name
            ),
        )
    })?;
    if card.run_id != run_id {
        return Err(unreadable(
            &cp,
            format!(
                "run_id = \"{}\", but this is run {run_id}'s folder; the saved model description does not fit the model (was it edited?)",
                card.run_id
            ),
        ));
    }
    card.validate(def).map_err(|m| {
        unreadable(
            &cp,
            format!("{m}; the saved model description does not fit the model (was it edited?)"),
        )
    })?;
    let keep = cp
        .exists()
        .then(|| card.spec.train.keep.unwrap_or_default());
    let which = kept(results, run_id, which, keep)?;
    // The weights, and the phase whose head they hold (`None`: the final model's).
    let (path, bytes, head_from, frozen) = match (which, bytes) {
        (Which::Final, Some((b, from, frozen))) => (
            checkpoint::last_path(results, run_id),
            b,
            Some(from),
            frozen,
        ),
        (Which::Final, None) => {
            let p = dir.join("model.bpk");
            let b = std::fs::read(&p).map_err(|e| unreadable(&p, e.to_string()))?;
            if card.bpk_sha256.is_none() {
                tracing::warn!(
                    file = %p.display(),
                    "model.json (version 1, written before checksums were recorded) has no bpk_sha256: model.bpk is not verified"
                );
            }
            if let Some(want) = &card.bpk_sha256 {
                let got = crate::io::hex(&sha2::Sha256::digest(&b));
                if !got.eq_ignore_ascii_case(want) {
                    return Err(unreadable(
                        &p,
                        format!(
                            "its SHA-256 is {got}, not the {want} model.json recorded: the file is damaged or was replaced"
                        ),
                    ));
                }
            }
            (p, b, None, card.frozen.clone())
        }
        (Which::Best | Which::Last, _) => {
            let p = if which == Which::Best {
                checkpoint::best_path(results, run_id)
            } else {
                checkpoint::last_path(results, run_id)
            };
            let ck = checkpoint::read(&p).map_err(|e| ModelError::Missing(e.to_string()))?;
            let from = ck.state.progress.head_from;
            (p, ck.model, Some(from), ck.state.frozen)
        }
    };
    let config = card.model_config_at(def, head_from);
    let model = match &frozen {
        None => config.init(device),
        Some(f) => {
            let named = (card.spec.backbone.weights.as_str(), locations);
            config.assemble(frozen_base(&config, f, &path, named, device)?, device)
        }
    };
    let described = if cp.exists() {
        cp
    } else {
        results.join(format!("{run_id}.toml"))
    };
    let model = train::load_model_bytes(model, &bytes, frozen.as_ref()).map_err(|m| {
        unreadable(
            &path,
            format!(
                "these weights do not fit the model {} describes (was it edited?): {m}",
                described.display()
            ),
        )
    })?;
    Ok((card, model))
}

/// `which` where a completed run's checkpoint may be gone (`train.keep`): its last weights are
/// the final model; a best checkpoint not kept is said so.
fn kept(
    results: &Path,
    run_id: &str,
    which: Which,
    keep: Option<crate::spec::Keep>,
) -> Result<Which, ModelError> {
    use crate::spec::Keep;
    // `keep` is the completed run's setting (`None`: the run has not completed).
    let gone = |p: PathBuf| keep.is_some() && !p.exists();
    let why = |kept: bool| {
        if kept {
            format!(
                "deleted since the run (its train.keep = \"{}\" keeps it)",
                keep.map_or("all", Keep::as_str)
            )
        } else {
            format!(
                "not kept (train.keep = \"{}\")",
                keep.map_or("all", Keep::as_str)
            )
        }
    };
    Ok(match which {
        Which::Last if gone(checkpoint::last_path(results, run_id)) => {
            tracing::info!(
                run = run_id,
                "last.ckpt is {}: the final model holds the same weights.",
                why(keep == Some(Keep::All))
            );
            Which::Final
        }
        Which::Best if gone(checkpoint::best_path(results, run_id)) => {
            return Err(ModelError::Missing(format!(
                "{}: {}; --weights final is run {run_id}'s model",
                checkpoint::best_path(results, run_id).display(),
                why(keep != Some(Keep::Model))
            )));
        }
        w => w,
    })
}

/// The backbone with the frozen layers `f` names, loaded from its weights file and checked;
/// the error names `stored` (the file that holds the rest) and what to do.
fn frozen_base(
    config: &crate::model::ModelConfig,
    f: &crate::model::FrozenBase,
    stored: &Path,
    (named, locations): (&str, &crate::assets::Locations),
    device: &Device,
) -> Result<crate::model::Backbone, ModelError> {
    let refers = format!(
        "holds the trained layers only; the first {} backbone layers are those of {}",
        f.layers,
        f.weights.display()
    );
    let file = if f.weights.is_file() {
        f.weights.clone()
    } else {
        // The file the spec names, found again (a mirror that moved, another machine's copy).
        let again = crate::plan::resolve_weights(config.backbone, named, locations)
            .ok()
            .filter(|p| p.is_file());
        match again {
            Some(p) => {
                tracing::info!(recorded = %f.weights.display(), found = %p.display(), "The run's weights file is not where it was; using the one backbone.weights names now (its digest is checked).");
                p
            }
            None => {
                let what = if f.weights.exists() {
                    "which is not a file"
                } else {
                    "which is missing"
                };
                let hint = if named == "imagenet" {
                    format!(
                        "put it back, or give the folder that holds it now with --assets (`runner fetch {}/imagenet` fetches the published file into weights/)",
                        config.backbone.name
                    )
                } else {
                    "put it back".to_string()
                };
                return Err(ModelError::Missing(format!(
                    "{}: {refers}, {what}: {hint}",
                    stored.display()
                )));
            }
        }
    };
    let base = config
        .init_backbone(device)
        .load(config.backbone, &file)
        .map_err(|e| ModelError::Unreadable {
            path: stored.to_path_buf(),
            message: format!("{refers}, which does not load: {e}"),
        })?;
    if !f.matches(&base) {
        return Err(ModelError::Unreadable {
            path: stored.to_path_buf(),
            message: format!(
                "{refers}, but that file's values differ now (replaced or changed since the run): put the original back"
            ),
        });
    }
    Ok(base)
}

/// Image files under `inputs` (files as given, folders searched recursively, sorted).
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, ModelError> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut found = Vec::new();
            let mut stack = vec![p.clone()];
            while let Some(d) = stack.pop() {
                let rd = std::fs::read_dir(&d).map_err(|e| ModelError::Unreadable {
                    path: d.clone(),
                    message: e.to_string(),
                })?;
                for e in rd.flatten() {
                    let path = e.path();
                    if path.is_dir() {
                        stack.push(path);
                    } else if path.extension().and_then(|x| x.to_str()).is_some_and(|x| {
                        folder::IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str())
                    }) {
                        found.push(path);
                    }
                }
            }
            found.sort();
            out.extend(found);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            return Err(ModelError::Missing(format!(
                "{}: no such file or folder",
                p.display()
            )));
        }
    }
    Ok(out)
}

/// Class probabilities of each image; an unreadable image gets its error instead.
pub fn predict(
    card: &ModelCard,
    model: &TransferModel,
    files: &[PathBuf],
    device: &Device,
) -> Vec<(PathBuf, Result<Vec<f32>, folder::DecodeError>)> {
    let spec = &card.spec;
    let m = model.valid();
    let plain = device.clone().without_autodiff();
    let [h, w] = spec.data.image_size;
    let mut out = Vec::with_capacity(files.len());
    // At most what one tensor may hold on the device (a GPU adapter's buffer binding limit).
    let per_image = crate::backbone::find(&spec.backbone.name)
        .map_or(0, |def| def.largest_activation([h, w]) as u64 * 4);
    let batch = spec
        .data
        .batch_size
        .min(crate::device::batch_that_fits(device, per_image))
        .max(1);
    for chunk in files.chunks(batch) {
        let decoded: Vec<Result<Vec<u8>, folder::DecodeError>> = chunk
            .iter()
            .map(|p| folder::decode(p, [h, w], spec.data.interpolation).map(|d| d.pixels))
            .collect();
        let good: Vec<u8> = decoded
            .iter()
            .filter_map(|d| d.as_ref().ok())
            .flatten()
            .copied()
            .collect();
        let n = decoded.iter().filter(|d| d.is_ok()).count();
        let mut probs = if n > 0 {
            let x = crate::data::pixels_tensor(&good, n, [h, w], card.preprocess, &plain);
            let probs = |x| {
                let logits = m.forward_from_cut(m.frozen_features(x));
                loss::probabilities(spec.train.loss, logits)
            };
            match spec.train.test_time_augmentation {
                crate::spec::TestTimeAugmentation::None => probs(x).into_iter(),
                crate::spec::TestTimeAugmentation::HorizontalFlip => {
                    // As the test split was evaluated: the image and its mirror, averaged.
                    let mirrored = probs(x.clone().flip([3]));
                    let mut out = probs(x);
                    for (p, q) in out.iter_mut().zip(mirrored) {
                        p.iter_mut().zip(q).for_each(|(a, b)| *a = (*a + b) / 2.0);
                    }
                    out.into_iter()
                }
            }
        } else {
            Vec::new().into_iter()
        };
        for (p, d) in chunk.iter().zip(decoded) {
            out.push((p.clone(), d.map(|_| probs.next().unwrap_or_default())));
        }
    }
    out
}
