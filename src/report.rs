//! What runner prints for people: the Keras-style model summary (`runner plan`) and the
//! prediction table (`runner predict`).

use crate::head::{Shape, thousands};
use crate::plan::Plan;

/// A Keras-style summary of the plan's model.
pub fn summary(plan: &Plan) -> String {
    let def = plan.backbone;
    let [h, w] = plan.spec.data.image_size;
    let mut rows: Vec<(String, String, usize, &str)> = Vec::new();
    let mut shape = [3, h, w];
    let (mut frozen, mut trainable) = (0, 0);
    for (i, l) in def.layers().iter().enumerate() {
        shape = l.output_shape(shape);
        let p = l.num_params();
        let is_frozen = i < plan.cutoff.index;
        if is_frozen {
            frozen += p;
        } else {
            trainable += p;
        }
        let state = match (p, is_frozen) {
            (0, _) => "",
            (_, true) => "frozen",
            (_, false) => "trainable",
        };
        rows.push((
            format!("{} ({})", l.name, l.kind()),
            Shape::Map(shape).keras(),
            p,
            state,
        ));
    }
    for (i, (layer, (out, p))) in plan
        .spec
        .head
        .layers
        .iter()
        .zip(&plan.head_shapes)
        .enumerate()
    {
        trainable += p;
        rows.push((
            format!("head_{i} ({})", layer.describe()),
            out.keras(),
            *p,
            if *p > 0 { "trainable" } else { "" },
        ));
    }
    let mut s = format!(
        "Experiment: {} ({})\nBackbone: {} weights {} preprocess {} (its weights' own: {}), trainable from {}\nInput: ({h}, {w}, 3), at least {m}x{m} for {}; {} classes: {}\nLayer names (cutoffs): {} ... {}\n\n",
        plan.spec.experiment.name,
        plan.file.display(),
        def.name,
        plan.weights.display(),
        plan.preprocess.as_str(),
        def.preprocess_for(&plan.weights).as_str(),
        plan.cutoff.label,
        def.name,
        plan.classes.len(),
        plan.classes.join(", "),
        def.layers().first().map_or("", |l| l.name.as_str()),
        def.layers().last().map_or("", |l| l.name.as_str()),
        m = def.min_input,
    );
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(20).max(20);
    s += &format!(
        "{:<width$}  {:<16}  {:>12}  {}\n",
        "Layer (type)", "Output Shape", "Param #", ""
    );
    s += &format!("{}\n", "=".repeat(width + 44));
    for (name, out, p, state) in &rows {
        s += &format!(
            "{name:<width$}  {out:<16}  {:>12}  {state}\n",
            thousands(*p)
        );
    }
    s += &format!("{}\n", "=".repeat(width + 44));
    let base = def.num_params();
    s += &format!(
        "Total params: {}\nTrainable params: {}\nNon-trainable params: {}\nBackbone params: {} (output {}); head params: {}\n",
        thousands(frozen + trainable),
        thousands(trainable),
        thousands(frozen),
        thousands(base),
        Shape::Map(plan.base_output).keras(),
        thousands(plan.head_shapes.iter().map(|(_, p)| p).sum())
    );
    let frozen_tensors: Vec<String> = if def.family != crate::backbone::Family::Vgg {
        // Every tensor of each frozen layer (BatchNorm statistics included).
        def.layers()[..plan.cutoff.index]
            .iter()
            .map(|l| format!("{}.*", l.name))
            .collect()
    } else {
        def.expected_tensors()
            .into_iter()
            .filter(|(name, _)| {
                def.layers()
                    .iter()
                    .position(|l| name.starts_with(&format!("{}.", l.name)))
                    .is_some_and(|i| i < plan.cutoff.index)
            })
            .map(|(n, _)| n)
            .collect()
    };
    s += &phase_lines(plan);
    s += &format!(
        "Frozen tensors ({}): {}\n",
        frozen_tensors.len(),
        if frozen_tensors.is_empty() {
            "none".into()
        } else {
            frozen_tensors.join(", ")
        }
    );
    s
}

/// One line per phase: epochs, cutoff, trainable parameters, optimizer, schedule, augmentation,
/// early stopping, and the new head of a phase that starts one.
fn phase_lines(plan: &Plan) -> String {
    let def = plan.backbone;
    let mut s = format!("Phases ({}):\n", plan.phases.len());
    for (i, ph) in plan.phases.iter().enumerate() {
        let base_trainable: usize = def.layers()[ph.cutoff.index..]
            .iter()
            .map(|l| l.num_params())
            .sum();
        let head_params: usize = ph.head_shapes.iter().map(|(_, p)| p).sum();
        let new_head = if i > 0 && ph.head_from == i {
            format!(
                ", a new head: {} ({} params)",
                crate::spec::describe_layers(&ph.head),
                thousands(head_params)
            )
        } else {
            String::new()
        };
        s += &format!(
            "  {}. {}: {} epochs, trainable from {} ({} trainable params), {} lr {}, schedule {}, {}{}{new_head}\n",
            i + 1,
            ph.name,
            ph.epochs,
            ph.cutoff.label,
            thousands(base_trainable + head_params),
            ph.optimizer.kind(),
            ph.optimizer.lr(),
            ph.schedule.kind(),
            if ph.augment.is_some() {
                "augmented"
            } else {
                "not augmented (activations at the cutoff computed once)"
            },
            ph.early_stopping
                .as_ref()
                .map_or(String::new(), |e| format!(
                    ", early stopping (patience {})",
                    e.patience
                ))
        );
    }
    s
}

/// `runner predict`'s table: a row per image (its path, each class's probability and the
/// predicted class), and a line per image that could not be read.
pub fn predictions(
    classes: &[String],
    rows: &[(
        std::path::PathBuf,
        Result<Vec<f32>, crate::data::folder::DecodeError>,
    )],
) -> (String, Vec<String>) {
    let width = rows
        .iter()
        .map(|(p, _)| p.display().to_string().len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut table = format!("{:<width$}", "path");
    for c in classes {
        table += &format!("  {c:>10}");
    }
    table += "  predicted\n";
    let mut unreadable = Vec::new();
    for (path, r) in rows {
        match r {
            Ok(p) => {
                table += &format!("{:<width$}", path.display());
                for v in p {
                    table += &format!("  {v:>10.4}");
                }
                let best = crate::metrics::predicted_class(p);
                table += &format!("  {}\n", classes.get(best).map_or("?", String::as_str));
            }
            Err(e) => unreadable.push(format!("{}: cannot read: {e}", path.display())),
        }
    }
    (table, unreadable)
}
