//! berth's image service: references, registry pulls, the content store, overlay
//! snapshots and image metadata.

pub mod config;
pub mod content;
pub mod digest;
pub mod error;
mod layer;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod service;
pub mod snapshot;
pub mod store;
pub mod tarmodel;
pub mod token;
pub mod unpack;

pub use config::{ImageConfig, ImageServiceConfig, RegistryHostConfig};
pub use digest::Digest;
pub use error::{ImageError, Result};
pub use reference::ImageRef;
pub use registry::Credentials;
pub use service::{FsUsage, GcStats, ImageService, ProgressSink, PullProgress};
pub use store::{ImageRecord, LayerRecord};
