//! Kubernetes CRD types the mesh reads (MeshConfig, SMI, FSM policies) and the CRD YAML generator
