//! Golden tests: testdata/<case>/in.yaml (a proxy's IR, as the compiler writes it) → one
//! out.<type>.yaml per Envoy resource type, in Envoy's own JSON form (`json.rs`).

use std::path::Path;

#[test]
fn golden_cases() {
    fsm_golden::run(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata"),
        |input| {
            let ir: fsm_ir::ProxyIr = serde_yaml_ng::from_str(input)
                .map_err(|e| format!("in.yaml is not a ProxyIr: {e}"))?;
            let resources =
                fsm_adapter_envoy::translate(&ir, &fsm_golden::placeholder_credentials())
                    .map_err(|e| e.to_string())?;
            let again = fsm_adapter_envoy::translate(&ir, &fsm_golden::placeholder_credentials())
                .map_err(|e| e.to_string())?;
            assert_eq!(
                resources.encode(),
                again.encode(),
                "translate must be deterministic"
            );
            // A translation error is a case's expected output; a rendering error is a bug.
            Ok(fsm_adapter_envoy::render(&resources).expect("resources render as JSON"))
        },
    );
}
