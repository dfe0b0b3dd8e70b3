//! Test tool: an in-process Kubernetes API server (list/watch, CRUD, patch, CRD validation) for integration tests
