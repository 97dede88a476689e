//! Every end-to-end test of the workspace, one module per file of `e2e/tests/`, in one test
//! binary: `cargo test -p sluice-e2e --test e2e` runs them all, side by side (most of their
//! time is spent waiting on the processes they start), and `cargo test -p sluice-e2e --test
//! e2e hostile::` the tests of one file. The package lists this binary alone
//! (`autotests = false`), so a file that is not a module here would never be compiled:
//! [`every_file_of_a_tests_directory_is_one_of_its_modules`] fails for one (here and in the data
//! plane's one test binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod anthropic;
mod budget_resets;
mod budgets;
mod common;
mod config;
mod cooldowns;
mod dashboard;
mod deploy;
mod durability;
mod gateway;
mod guarantees;
mod hostile;
mod limits;
mod metrics;
mod mock;
mod mock_anthropic;
mod module_layers;
mod proto_contract;
mod resilience;
mod responses;
mod sdk;
mod simulation;
mod token_limits;
mod usage_spool;

/// The test binaries made of one root file whose modules are the other files of its directory
/// (`autotests = false`): this one, and the data plane's integration tests.
const ONE_BINARY_TEST_DIRS: [(&str, &str); 2] = [
    ("e2e/tests", "e2e.rs"),
    ("data-plane/tests", "data_plane.rs"),
];

#[test]
fn every_file_of_a_tests_directory_is_one_of_its_modules() {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (dir, root_file) in ONE_BINARY_TEST_DIRS {
        let dir = workspace.join(dir);
        let root = std::fs::read_to_string(dir.join(root_file)).unwrap();
        let mut missing = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            // A directory holds a module's own modules (`hostile/`) or is one (`common/`);
            // other files are data (proptest's regressions).
            let module = match name.strip_suffix(".rs") {
                Some(stem) => stem.to_owned(),
                None if path.join("mod.rs").is_file() => name.clone(),
                None => continue,
            };
            if name != root_file && !root.contains(&format!("\nmod {module};\n")) {
                missing.push(module);
            }
        }
        assert!(
            missing.is_empty(),
            "files in {} that are no module of {root_file}, so never compiled: {missing:?}",
            dir.display()
        );
    }
}
