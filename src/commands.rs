//! Every command but the runs themselves (`run`, `sweep`), with its arguments already
//! resolved by `cli`: what it calls, what it prints and the exit code of a failure.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::device;
use crate::failure::{Failure, bad_input, failed};
use crate::settings::Settings;
use crate::spec::load;

/// `runner fetch`: lists the catalogue, or puts the named assets into `into`.
pub fn fetch(
    names: &[String],
    list: bool,
    [url, upstream_base]: [Option<String>; 2],
    into: &Path,
    settings: &Settings,
) -> Result<(), Failure> {
    if list || names.is_empty() {
        for a in &crate::assets::CATALOGUE {
            let mirror = match &a.files {
                Some(crate::assets::AssetFiles::One { path, .. }) => path.to_string(),
                Some(crate::assets::AssetFiles::Listed { dir, .. }) => format!("{dir}/"),
                None => "-".into(),
            };
            println!(
                "{:<22} {}\n{:<22} mirror: {mirror}\n{:<22} original: {} -> {}",
                a.name, a.description, "", "", a.upstream.url, a.upstream.path
            );
        }
        return Ok(());
    }
    let mut assets = Vec::new();
    for n in names {
        let known: Vec<&str> = crate::assets::CATALOGUE.iter().map(|a| a.name).collect();
        assets.push(crate::assets::find_asset(n).ok_or_else(|| {
            bad_input(anyhow::anyhow!(
                "unknown asset \"{n}\"{}; known assets: {}",
                load::closest(n, &known),
                known.join(", ")
            ))
        })?);
    }
    let sources = crate::fetch::Sources {
        mirror: settings.locations.mirror.clone(),
        url,
        upstream_base,
    };
    for a in assets {
        let [present, copied, downloaded] =
            crate::fetch::fetch(a, into, &sources).map_err(|e| match e {
                crate::fetch::FetchError::Unavailable(_) => bad_input(e),
                _ => failed(e),
            })?;
        println!(
            "{}: {present} already present, {copied} copied from the mirror, {downloaded} downloaded (all verified)",
            a.name
        );
    }
    Ok(())
}

/// `runner plot`: the curves of runs (ids, tables or results folders) into a PNG or SVG.
pub fn plot(
    runs: &[String],
    out: &Path,
    smooth: Option<f64>,
    settings: &Settings,
) -> Result<(), Failure> {
    if let Some(f) = smooth.filter(|f| !(0.0..1.0).contains(f)) {
        return Err(bad_input(anyhow::anyhow!(
            "--smooth {f}: the factor must be in [0, 1), e.g. 0.8"
        )));
    }
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if ext != "png" && ext != "svg" {
        return Err(bad_input(anyhow::anyhow!(
            "--out {}: runner plots to .png or .svg files, not \".{ext}\"",
            out.display()
        )));
    }
    let targets: Vec<String> = if runs.is_empty() {
        vec![settings.results.display().to_string()]
    } else {
        runs.to_vec()
    };
    let mut files = Vec::new();
    for t in &targets {
        let p = PathBuf::from(t);
        if p.is_dir() {
            files.extend(crate::results::query::run_files(&p));
        } else if p.is_file() {
            files.push(p);
        } else {
            let f = settings.results.join(format!("{t}.parquet"));
            if !f.is_file() {
                return Err(bad_input(anyhow::anyhow!(
                    "{t}: not a run id in {}, a run table or a results folder",
                    settings.results.display()
                )));
            }
            files.push(f);
        }
    }
    if files.is_empty() {
        return Err(bad_input(anyhow::anyhow!(
            "no runs to plot in {}",
            targets.join(", ")
        )));
    }
    let curves = crate::plot::load(&files).map_err(bad_input)?;
    crate::plot::plot(&curves, out, smooth).map_err(failed)?;
    println!("{}: {} runs", out.display(), curves.len());
    Ok(())
}

/// `runner export`: writes the run's model as ONNX and checks it with tract on the run's
/// validation images (or `images`), against runner's own predictions. The file is written as
/// `<out>.unchecked.onnx` and renamed to `out` only once it agrees; one that disagrees is kept
/// as `<out>.rejected.onnx`, named, and the command fails (an earlier `out` is left alone).
/// As safetensors: every weight, written atomically, then loaded back as the backbone weights
/// of the same model, as another experiment would load it.
pub fn export(
    run_id: &str,
    (format, out): (crate::export::Format, Option<PathBuf>),
    which: crate::predict::Which,
    (images, limit): (&[PathBuf], Option<usize>),
    settings: &Settings,
) -> Result<(), Failure> {
    use crate::export;
    if !settings.sets.is_empty() {
        return Err(bad_input(anyhow::anyhow!(
            "--set {}: runner export writes the model as it was trained; --set does not apply to it",
            settings.sets.join(" --set ")
        )));
    }
    // A trailing slash is what a shell completes a run's folder with.
    let run_id = run_id.trim_end_matches('/');
    let device = burn::prelude::Device::flex();
    let (card, model) = load_model(run_id, which, &device, settings)?;
    let finished = crate::predict::card_path(&settings.results, run_id).is_file();
    let which = if finished || which != crate::predict::Which::Final {
        which
    } else {
        tracing::warn!(
            run = run_id,
            "The run has not finished (no model.json): exporting its last checkpoint."
        );
        crate::predict::Which::Last
    };
    if format == crate::export::Format::Safetensors {
        return export_safetensors(run_id, out, (&card, &model), (images, limit), settings);
    }
    let out = out.unwrap_or_else(|| {
        crate::train::checkpoint::run_dir(&settings.results, run_id).join("model.onnx")
    });
    crate::io::check_out(&out, &["onnx"], "a model").map_err(bad_input)?;
    let files =
        export::images_to_check(&card, &settings.locations, images, limit).map_err(bad_input)?;
    let (files, expected, unreadable) =
        export::runner_probabilities(&card, &model, &files, &device);
    for (path, why) in &unreadable {
        tracing::warn!(file = %path.display(), error = %why, "Image left out of the check: it cannot be read.");
    }
    if files.is_empty() {
        return Err(bad_input(anyhow::anyhow!(
            "{run_id}: none of the images could be read to check the exported model on:\n  {}",
            unreadable
                .iter()
                .map(|(p, why)| format!("{}: {why}", p.display()))
                .collect::<Vec<_>>()
                .join("\n  ")
        )));
    }
    let pending = export::sibling(&out, "unchecked");
    let (nodes, bytes) = export::write(&model, &card, which, &pending).map_err(|e| {
        bad_input(anyhow::anyhow!(
            "--out {}: cannot write the ONNX file: {e}",
            out.display()
        ))
    })?;
    let agreement = export::check(&pending, &card, &files, &expected).map_err(failed)?;
    let pct = 100.0 * agreement.same_label as f64 / agreement.images.max(1) as f64;
    let report = format!(
        "checked with tract (an ONNX runtime independent of burn) on {} images: labels agree on {} ({pct:.2} %), largest probability difference {:.2e} (tolerance {:.0e})",
        agreement.images,
        agreement.same_label,
        agreement.max_difference,
        export::TOLERANCE
    );
    let keep_as = if agreement.passed() {
        out.clone()
    } else {
        export::sibling(&out, "rejected")
    };
    std::fs::rename(&pending, &keep_as)
        .with_context(|| {
            format!(
                "{}: cannot rename to {}",
                pending.display(),
                keep_as.display()
            )
        })
        .map_err(failed)?;
    println!(
        "{}: ONNX (opset {}), {nodes} nodes, {:.1} MB; input pixels [batch, {}, {}, 3] (RGB 0-255, resized), output probabilities over {}\n{report}",
        keep_as.display(),
        crate::onnx::OPSET,
        bytes as f64 / 1e6,
        card.spec.data.image_size[0],
        card.spec.data.image_size[1],
        card.classes.join(", ")
    );
    if !agreement.passed() {
        return Err(failed(anyhow::anyhow!(
            "{}: the exported model disagrees with runner ({} of {} labels the same, largest difference {:.2e} at {}{}); kept for inspection, do not deploy it",
            keep_as.display(),
            agreement.same_label,
            agreement.images,
            agreement.max_difference,
            agreement
                .worst
                .as_ref()
                .map_or("?".into(), |p| p.display().to_string()),
            agreement
                .shape_error
                .as_ref()
                .map_or(String::new(), |e| format!("; {e}"))
        )));
    }
    Ok(())
}

/// `runner export --format safetensors`.
fn export_safetensors(
    run_id: &str,
    out: Option<PathBuf>,
    (card, model): (&crate::predict::ModelCard, &crate::model::TransferModel),
    (images, limit): (&[PathBuf], Option<usize>),
    settings: &Settings,
) -> Result<(), Failure> {
    if !images.is_empty() || limit.is_some() {
        return Err(bad_input(anyhow::anyhow!(
            "--images and --limit choose what an ONNX file is checked on; a safetensors file holds the weights themselves and is checked by loading it back"
        )));
    }
    let out = out.unwrap_or_else(|| {
        crate::train::checkpoint::run_dir(&settings.results, run_id).join("model.safetensors")
    });
    crate::io::check_out(&out, &["safetensors"], "a model").map_err(bad_input)?;
    let bytes = crate::predict::write_safetensors(&out, model, card).map_err(failed)?;
    // Loaded back as another experiment's backbone.weights would be: every tensor found, with
    // its shape.
    let def = crate::backbone::find(&card.spec.backbone.name).ok_or_else(|| {
        failed(anyhow::anyhow!(
            "unknown backbone {}",
            card.spec.backbone.name
        ))
    })?;
    model.backbone.clone().load(def, &out).map_err(|e| {
        failed(anyhow::anyhow!(
            "{}: written but cannot be loaded back: {e}",
            out.display()
        ))
    })?;
    println!(
        "{}: safetensors, {:.1} MB: the {} base under its ImageNet file's names (a backbone.weights for another experiment) and the head as head.*; classes {}",
        out.display(),
        bytes as f64 / 1e6,
        def.name,
        card.classes.join(", ")
    );
    Ok(())
}

/// `runner predict`: class probabilities for images with a run's model, as a table.
pub fn predict(
    run_id: &str,
    inputs: &[PathBuf],
    which: crate::predict::Which,
    settings: &Settings,
) -> Result<(), Failure> {
    let device = device::select(settings.device).map_err(bad_input)?.device;
    let (card, model) = load_model(run_id, which, &device, settings)?;
    let files = crate::predict::collect_images(inputs).map_err(bad_input)?;
    if files.is_empty() {
        return Err(bad_input(anyhow::anyhow!(
            "no image files ({}) in {}",
            crate::data::folder::IMAGE_EXTENSIONS.join(", "),
            inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let rows = crate::predict::predict(&card, &model, &files, &device);
    let (table, unreadable) = crate::report::predictions(&card.classes, &rows);
    print!("{table}");
    for line in &unreadable {
        eprintln!("{line}");
    }
    let bad = unreadable.len();
    if bad > 0 {
        return Err(bad_input(anyhow::anyhow!(
            "{bad} of the images could not be read"
        )));
    }
    Ok(())
}

/// `runner report`: the HTML page of the results folder `dir`, written to `out`.
pub fn report_page(dir: &Path, out: &Path, misclassified: usize) -> Result<(), Failure> {
    crate::io::check_out(out, &["html", "htm"], "a page").map_err(bad_input)?;
    let options = crate::page::Options { misclassified };
    let summary = crate::page::write(dir, out, options).map_err(|e| match e {
        crate::page::PageError::Write(_) => failed(e),
        other => bad_input(other),
    })?;
    for note in &summary.notes {
        tracing::warn!(note = %note, "Left out of the report.");
    }
    println!(
        "{}: {} runs, {} with a test evaluation, {} thumbnails, {:.1} MB",
        out.display(),
        summary.runs,
        summary.evaluated,
        summary.thumbnails,
        summary.bytes as f64 / 1e6
    );
    Ok(())
}

/// A run's model for predict and export (the frozen base from its weights file, found through
/// the settings' locations when it moved).
fn load_model(
    run_id: &str,
    which: crate::predict::Which,
    device: &burn::prelude::Device,
    settings: &Settings,
) -> Result<(crate::predict::ModelCard, crate::model::TransferModel), Failure> {
    crate::predict::load(
        &settings.results,
        run_id,
        which,
        device,
        &settings.locations,
    )
    .map_err(bad_input)
}

/// `runner results`: one row per run (or per epoch) of `dir`.
pub fn results(dir: &Path, q: &crate::results::query::Query) -> Result<(), Failure> {
    match crate::results::query::query(dir, q).map_err(bad_input)? {
        Some(df) => print!(
            "{}",
            crate::results::query::render(&df, q.format).map_err(failed)?
        ),
        None => eprintln!("no runs in {}", dir.display()),
    }
    Ok(())
}

/// `runner logs`: a run's log, readably; `follow` keeps reading until the run ends.
pub fn logs(run_id: &str, follow: bool, settings: &Settings) -> Result<(), Failure> {
    let path = settings.results.join(format!("{run_id}.log.jsonl"));
    if !path.is_file() {
        return Err(bad_input(anyhow::anyhow!(
            "{}: no log for run {run_id} in {}",
            path.display(),
            settings.results.display()
        )));
    }
    match crate::logs::show(&path, follow, &mut std::io::stdout().lock()) {
        // `runner logs RUN | head`: the reader has what it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r
            .with_context(|| path.display().to_string())
            .map_err(failed),
    }
}

/// `runner plan`: the model, Keras-style, without training.
pub fn plan(experiment: &Path, settings: &Settings) -> Result<(), Failure> {
    let plan = crate::run::load_plan(experiment, settings)?;
    print!("{}", crate::report::summary(&plan));
    Ok(())
}

/// `runner augment-preview`: a grid of augmented versions of a few training images.
pub fn augment_preview(
    experiment: &Path,
    out: &Path,
    images: usize,
    variants: usize,
    settings: &Settings,
) -> Result<(), Failure> {
    let plan = crate::run::load_plan(experiment, settings)?;
    let train = plan.split("train").expect("the plan requires train/");
    let grid = crate::data::preview::grid(
        &plan.spec,
        &plan.file,
        &train.files,
        images.max(1),
        variants,
    )
    .map_err(bad_input)?;
    crate::data::preview::write(&grid, out).map_err(failed)?;
    println!(
        "{}: {} images x {} augmented versions",
        out.display(),
        images.max(1),
        variants
    );
    Ok(())
}

/// `runner bench`: decoding, augmentation and the training step on the experiment's data.
pub fn bench(experiment: &Path, steps: usize, settings: &Settings) -> Result<(), Failure> {
    let plan = crate::run::load_plan(experiment, settings)?;
    let selected = device::select(settings.device).map_err(bad_input)?;
    if let Some(limit) = selected.max_tensor_bytes {
        crate::run::fits_on_device(&plan, limit, &selected.name).map_err(bad_input)?;
    }
    println!(
        "runner bench {} on {}, {} ({} cores)",
        experiment.display(),
        selected.name,
        chrono::Utc::now().format("%Y-%m-%d"),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    print!(
        "{}",
        crate::bench::run(&plan, &selected.device, steps.max(1)).map_err(bad_input)?
    );
    Ok(())
}

/// `runner bench-workload`: one workload of the PyTorch comparison, as a JSON line.
pub fn bench_workload(
    workload: &str,
    opts: &crate::bench::workloads::Options,
    settings: &Settings,
) -> Result<(), Failure> {
    let selected = device::select(settings.device).map_err(bad_input)?;
    let mut report =
        crate::bench::workloads::run(workload, opts, &selected.device).map_err(bad_input)?;
    report.device = selected.name;
    crate::bench::workloads::write_check(&report, &opts.out).map_err(failed)?;
    println!("{}", report.json());
    Ok(())
}
