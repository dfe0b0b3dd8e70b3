//! Native adapter: mesh IR to fsm.dataplane.v1 resources for fsm-sidecar
