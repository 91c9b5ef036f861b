//! berth's own protobuf APIs: the messages of the daemon <-> shim task service and
//! the framing they travel in.

pub mod frame;

/// Messages of `shim.proto` (package `berth.shim.v1`).
pub mod shim {
    include!(concat!(env!("OUT_DIR"), "/berth.shim.v1.rs"));
}
