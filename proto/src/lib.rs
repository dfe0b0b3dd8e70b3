//! fsm.dataplane.v1: the native data-plane resource types served over ADS
