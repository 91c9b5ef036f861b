//! Test support for berth's end-to-end tests: a local OCI registry and images built from local material.

pub mod berthd;
pub mod calls;
pub mod clients;
pub mod registry;
pub mod systemd;
pub mod testimages;
pub mod tokenauth;
