//! berth's CRI edge: config, request validation, the RuntimeService and ImageService
//! servers over small services sharing one context, and the socket they listen on.
//! It owns the CRI -> OCI translation (`oci`) and the pod and container records;
//! `berth-runtime` (the shim) knows nothing of CRI.

pub mod api;
pub mod config;
pub mod container;
pub mod container_events;
pub mod context;
pub mod error;
pub mod events;
pub use berth_failpoint as failpoint;
pub mod handlers;
pub mod heap;
pub mod image_service;
pub mod layout;
pub mod limits;
pub mod notify;
pub mod oci;
pub mod oom_score;
pub mod podscope;
pub mod prometheus;
pub mod records;
pub mod runtime_service;
pub mod sandbox;
pub mod server;
pub mod services;
pub mod shims;
pub mod stats;
pub mod status;
pub mod streaming;
pub mod sweep;
pub mod systemd;
pub mod undo;
