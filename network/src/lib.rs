//! Pod networking through CNI: the network config list from the config dir, plugin
//! execution per the CNI spec (0.3.x to 1.1.0), results, and a per-pod cache of what
//! was set up so that teardown works after a restart or a config change.

pub mod cache;
pub mod conf;
pub mod exec;
pub mod manager;
pub mod netdev;
pub mod quantity;
pub mod result;

pub use conf::{CniConfList, ConfError};
pub use manager::{CniManager, CniSettings, NetError, PodNetwork, PortMapping};
