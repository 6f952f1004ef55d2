//! The config hash names a run across versions: a sweep skips a point whose hash already
//! completed and `resume` accepts a run whose hash still matches. It is the SHA-256 of the
//! resolved spec as serialised, so it stays the same across versions as long as the serialised
//! form of an existing spec does: a field added to the spec must be skipped when serialising
//! while it has its default (`#[serde(default, skip_serializing_if = "...")]`), or every
//! finished run of every user would be run again after an upgrade.

use std::path::Path;

fn hash(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("experiments")
        .join(file);
    let loaded = runner::spec::load::load(&path, &[]).unwrap();
    runner::plan::config_hash(&loaded.spec)
}

#[test]
fn the_hashes_of_the_shipped_experiments_are_those_older_versions_gave() {
    // Printed by `runner check experiments/*.toml` of earlier builds (this project's history
    // back to the results schema's version 3): runs made with them are still recognised.
    for (file, want) in [
        ("conv_head.toml", "e77b90060de49d97"),
        ("feature_extraction.toml", "e02c26dfea480358"),
        ("fine_tune.toml", "83f8ec352d1c0c9e"),
        ("frozen_augmented.toml", "b8fa3702923ceaa2"),
        ("mobilenet_feature_extraction.toml", "91ea642e439646e4"),
        ("mobilenet_fine_tune.toml", "65805c7d3bdf96d8"),
    ] {
        assert_eq!(
            hash(file),
            want,
            "{file}: the config hash changed; a spec field was added or renamed without keeping the serialised form of existing specs (see this file's header)"
        );
    }
}

/// Every key path of a JSON value, with array indices.
fn keys(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                keys(&p, v, out);
            }
        }
        serde_json::Value::Array(a) if a.iter().any(|x| x.is_object()) => {
            for (i, v) in a.iter().enumerate() {
                keys(&format!("{prefix}[{i}]"), v, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn a_spec_serialises_to_the_same_keys_so_adding_a_field_needs_a_skip_when_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/fine_tune.toml");
    let loaded = runner::spec::load::load(&path, &[]).unwrap();
    let mut got = Vec::new();
    keys("", &serde_json::to_value(&loaded.spec).unwrap(), &mut got);
    got.sort();
    insta::assert_snapshot!(got.join("\n"));
}
