//! berth's CRI edge: config, request validation, the RuntimeService and ImageService
//! servers, and the socket they listen on.

pub mod config;
pub mod containers;
pub mod events;
pub mod failpoint;
pub mod handlers;
pub mod image_service;
pub mod layout;
pub mod metrics;
pub mod pods;
pub mod resources;
pub mod runtime_service;
pub mod server;
pub mod stats;
pub mod status;
pub mod streaming;
pub mod sweep;
